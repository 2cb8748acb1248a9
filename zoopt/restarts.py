"""A global phase after local convergence: IPOP-CMA-ES restarts around L-BFGS.

:class:`IPOPRestarts` is a method (:mod:`zoopt.methods`): it runs its local method (L-BFGS)
until that converges, then, while the budget lasts, up to ``max_restarts`` times: a CMA-ES
run (Hansen's ``cma`` package, imported only here, when a restart begins) with a population
that doubles at each restart (IPOP, Auger & Hansen 2005), started from a new point of the
search region, and an L-BFGS polish from that run's best point (CMA-ES finds the basin,
L-BFGS the last digits at a fraction of the queries). The best point of all of it is what
``minimize`` returns (the oracle tracks it).

Why CMA-ES and not more L-BFGS from random points: on multimodal and weakly structured
functions a local method's basin is found by where it starts; a growing population smooths
the landscape out (COCO's ``bbob``: pycma with 9 IPOP restarts reached 76% of the targets at
2,000·d evaluations, restarts of the local method 54%).

``minimize(restarts=...)``: ``True`` (9 restarts), an int (that many), ``False``, or
``"auto"`` (the default): restarts when ``max_queries >= AUTO_RESTARTS_BUDGET · d`` — a
budget that large says "spend it on the best point" (as COCO's budgets do); below it
``max_queries`` is a cap and a converged run stops and reports ``success=True``.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ._array import Array, like, to_numpy
from .estimators import QueryPlan
from .methods import (
    LBFGS,
    NO_LIMITS,
    Box,
    Iterate,
    LBFGSState,
    Limits,
    Run,
    points_plan,
    state_from_dict,
    state_to_dict,
)

#: ``restarts="auto"`` turns the global phase on when ``max_queries`` is at least this many
#: times d (the README's smooth example, 500·d, stops when converged)
AUTO_RESTARTS_BUDGET = 1000


@dataclass(frozen=True)
class IPOPState:
    """:class:`IPOPRestarts`' state as of an L-BFGS iteration: the restart in progress (0:
    the first local run), the local run's state, where the first local run started (the
    centre of an unbounded search region), the queries asked for so far and the CMA-ES
    step size (0 until the first local run has converged)."""

    restart: int = field(metadata={"kind": "count"})
    local: LBFGSState = field(metadata={"kind": "local"})
    x_start: np.ndarray = field(metadata={"kind": "vector"})
    spent: int = field(metadata={"kind": "count"})
    sigma: float = field(metadata={"kind": "float"})

    def to_dict(self) -> dict[str, Any]:
        return state_to_dict(self)


@dataclass(frozen=True)
class IPOPRestarts:
    """L-BFGS, then IPOP-CMA-ES restarts each polished by L-BFGS (see the module docstring).

    Args:
        local: the local method (:class:`~zoopt.methods.LBFGS`, without its own restarts).
        max_restarts: CMA-ES runs after the first local convergence (COCO's pycma: 9).
        popsize: the first CMA-ES run's population (``None``: ``4 + ⌊3 ln d⌋``); doubled at
            each restart.
        sigma0: the CMA-ES runs' initial step size (``None``: a quarter of the box's mean
            width when bounded, else ``max(1, max|x_local − x0|, 0.1·max|x0|)``).

    Queries: the local runs' (``d`` or ``2d`` per gradient, plus line searches) and
    ``popsize·2^(k−1)`` per generation of the ``k``-th CMA-ES run. A restart's CMA-ES run
    stops at ``cma``'s own termination criteria or when the budget ends.
    """

    local: LBFGS = field(default_factory=LBFGS)
    max_restarts: int = 9
    popsize: int | None = None
    sigma0: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.local, LBFGS) or self.local.restarts:
            raise ValueError(f"local must be an LBFGS without restarts, got {self.local!r}")
        r = self.max_restarts
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"max_restarts must be an integer >= 0, got {r!r}")
        if self.popsize is not None and (
            isinstance(self.popsize, bool) or not isinstance(self.popsize, int) or self.popsize < 2
        ):
            raise ValueError(f"popsize must be an integer >= 2 or None, got {self.popsize!r}")
        if self.sigma0 is not None and not (
            isinstance(self.sigma0, int | float) and math.isfinite(self.sigma0) and self.sigma0 > 0
        ):
            raise ValueError(f"sigma0 must be a finite number > 0 or None, got {self.sigma0!r}")

    def run(
        self,
        x0: Array,
        *,
        rng: np.random.Generator,
        box: Box | None = None,
        state: IPOPState | None = None,
        limits: Limits = NO_LIMITS,
    ) -> Run:
        like_x = x0
        d = int(x0.shape[0])
        if state is None:
            restart, local_state, spent, sigma = 0, None, 0, 0.0
            x_start = to_numpy(x0).astype(np.float64)
            if box is not None:
                x_start = box.project(x_start)
            last_x = x_start
        else:
            restart, local_state, spent = state.restart, state.local, state.spent
            x_start, sigma, last_x = state.x_start, state.sigma, state.local.x
        start: Array = x0
        message = "the method finished"
        while True:
            # -- a local run (the first, or the polish of restart `restart`) ----------------
            local = self.local.run(start, rng=rng, box=box, state=local_state, limits=limits)
            values: Any = None
            while True:
                try:
                    event = local.send(values)
                except StopIteration as stop:
                    message = str(stop.value)
                    break
                if isinstance(event, Iterate):
                    last_x = event.state.x
                    wrapped = IPOPState(restart, event.state, x_start, spent, sigma)
                    values = yield replace(event, state=wrapped)
                else:
                    spent += event.n
                    values = yield event
            local_state = None
            if not message.startswith("converged") or restart >= self.max_restarts:
                if restart and message.startswith("converged"):
                    return f"{message}; then {restart} IPOP-CMA-ES restarts"
                return message
            restart += 1
            if not sigma:  # from where the first local run converged (kept in the state)
                sigma = self._sigma(box, x_start, last_x)
            # -- a CMA-ES run with a doubled population --------------------------------------
            left = None if limits.max_queries is None else limits.max_queries - spent
            found = yield from self._cma(restart, x_start, sigma, box, like_x, rng, d, left)
            if found is None:
                return f"{message}; IPOP-CMA-ES restart {restart} found no finite value"
            spent += found[1]
            start = like(found[0], like_x)

    def _sigma(self, box: Box | None, x_start: np.ndarray, x_local: np.ndarray) -> float:
        """The CMA-ES runs' initial step size (see the class docstring)."""
        if self.sigma0 is not None:
            return float(self.sigma0)
        if box is not None and bool(np.all(np.isfinite(box.lb) & np.isfinite(box.ub))):
            width = 0.25 * float(np.mean(box.ub - box.lb))
            return width if width > 0 else 1.0
        far = float(np.max(np.abs(x_local - x_start)))
        return max(1.0, far, 0.1 * float(np.max(np.abs(x_start))))

    def _cma(
        self,
        restart: int,
        x_start: np.ndarray,
        sigma: float,
        box: Box | None,
        like_x: Array,
        rng: np.random.Generator,
        d: int,
        left: int | None,
    ) -> Generator[QueryPlan, Any, tuple[np.ndarray, int] | None]:
        """One CMA-ES run; returns (its best point, queries asked) or None. ``left``: the
        queries the budget has left: the last generation is cut to it (the run ends there)."""
        import cma  # lazily: only a run that restarts needs it

        lam0 = self.popsize if self.popsize is not None else 4 + int(3 * math.log(d))
        popsize = lam0 * 2 ** (restart - 1)
        opts: dict[str, Any] = {
            "popsize": popsize,
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            "seed": np.nan,  # cma must not touch numpy's global generator: ...
            "randn": lambda *shape: rng.standard_normal(shape),  # ...it draws from the run's
        }
        bounded = box is not None and bool(np.all(np.isfinite(box.lb) & np.isfinite(box.ub)))
        if bounded:
            assert box is not None
            mean = rng.uniform(box.lb, box.ub)
            opts["bounds"] = [box.lb.tolist(), box.ub.tolist()]
        else:
            mean = x_start.copy()
            if box is not None:  # some bounds infinite: cma takes None for those
                lb = [None if not np.isfinite(v) else float(v) for v in box.lb]
                ub = [None if not np.isfinite(v) else float(v) for v in box.ub]
                opts["bounds"] = [lb, ub]
                mean = box.project(mean)
        es = cma.CMAEvolutionStrategy(mean, sigma, opts)
        spent = 0
        best: tuple[float, np.ndarray | None] = (math.inf, None)
        while not es.stop():
            X = np.asarray(es.ask(), dtype=np.float64)
            if box is not None:
                X = box.project(X)  # cma's bounds handling already does; rounding
            last = left is not None and X.shape[0] >= left - spent
            if last:  # the budget's last queries: as many of the population as fit
                X = X[: max(0, left - spent)]
                if X.shape[0] == 0:
                    break
            values = yield points_plan(X, like_x)
            spent += X.shape[0]
            v = to_numpy(values).astype(np.float64)
            finite = np.isfinite(v)
            if not finite.any():
                break
            i = int(np.argmin(np.where(finite, v, np.inf)))
            if v[i] < best[0]:
                best = (float(v[i]), X[i].copy())
            if last:
                break
            # a non-finite value ranks last (worse than every finite one)
            worst = float(np.max(v[finite]))
            v = np.where(finite, v, worst + 1.0 + abs(worst))
            es.tell(list(X), v.tolist())
        if best[1] is None:
            return None
        return best[1], spent

    def state_from_dict(self, state: Mapping[str, Any], dim: int) -> IPOPState:
        """The :class:`IPOPState` saved as ``state`` (checked whole first)."""
        return state_from_dict(IPOPState, state, dim, local=self.local.state_from_dict)


def restarts_for(restarts: bool | int | str, max_queries: int | None, dim: int) -> int:
    """How many IPOP restarts ``minimize(restarts=...)`` asks for (0: none); ``"auto"``: 9
    when ``max_queries >= AUTO_RESTARTS_BUDGET · dim``, else 0. ``ValueError`` for anything
    else than a bool, an int >= 0 or ``"auto"``."""
    if restarts == "auto":
        return 9 if max_queries is not None and max_queries >= AUTO_RESTARTS_BUDGET * dim else 0
    if isinstance(restarts, bool):
        return 9 if restarts else 0
    if isinstance(restarts, int) and restarts >= 0:
        return restarts
    raise ValueError(f"restarts must be True, False, an integer >= 0 or 'auto', got {restarts!r}")
