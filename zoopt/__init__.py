"""zoopt — zeroth-order optimization of black boxes, scaled to deep networks (DeepZero).

Light to import: numpy, scipy and array-api-compat only; torch, CuPy, PhiFlow and Dask are
imported when a feature needs them (``zoopt.torch``, ``zoopt.parallel``, ``oracles``).
"""

from ._coords import check_coords
from .directions import DirectionCombination, DirectionSteps, SeededDirections
from .estimators import CGE, RGE, Estimate, Estimator, QueryPlan
from .minimize import AskTell, OptimizeResult, minimize
from .optim import SGD, Adam, Optimizer, OptState, SignSGD
from .oracle import BaseOracle, BudgetExceeded, FunctionOracle, Oracle, OracleError, as_oracle
from .registry import make_estimator, make_optimizer
from .schedules import Constant, Cosine, Step, as_schedule

__version__ = "0.1.0"

__all__ = [
    "CGE",
    "RGE",
    "SGD",
    "SeededDirections",
    "Adam",
    "AskTell",
    "BaseOracle",
    "BudgetExceeded",
    "Constant",
    "Cosine",
    "DirectionCombination",
    "DirectionSteps",
    "Estimate",
    "Estimator",
    "FunctionOracle",
    "OptState",
    "OptimizeResult",
    "Optimizer",
    "Oracle",
    "OracleError",
    "QueryPlan",
    "SignSGD",
    "Step",
    "as_oracle",
    "as_schedule",
    "check_coords",
    "make_estimator",
    "make_optimizer",
    "minimize",
]
