"""The sparse-CGE engine: fast, exact ``f(x + step * e_c)`` for many coordinates of any model.

See :mod:`.core` for how it works, :mod:`.registry` for adding a rule for your own op, and
docs/engine.md for measurements.
"""

from .context import EngineContext
from .core import DEFAULT_CHUNK_BYTES, SparseCGEEngine
from .losses import LossFn, cast_for_loss
from .reference import block_reuse_coordinate_values, naive_coordinate_values
from .registry import RuleHandle, register_rule
from .rules import Rule, elementwise, rule_generic
from .values import Chunk, Dense, SliceDelta, Value

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "Chunk",
    "Dense",
    "EngineContext",
    "LossFn",
    "Rule",
    "RuleHandle",
    "SliceDelta",
    "SparseCGEEngine",
    "Value",
    "block_reuse_coordinate_values",
    "cast_for_loss",
    "elementwise",
    "naive_coordinate_values",
    "register_rule",
    "rule_generic",
]
