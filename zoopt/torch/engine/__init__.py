"""The sparse-CGE engine: fast, exact ``f(x + step * e_c)`` for many coordinates of any model.

See :mod:`.core` for how it works and docs/engine.md for measurements.
"""

from .core import (
    DEFAULT_CHUNK_BYTES,
    LossFn,
    SparseCGEEngine,
    cast_for_loss,
    naive_coordinate_values,
)
from .reference import block_reuse_coordinate_values

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "LossFn",
    "SparseCGEEngine",
    "block_reuse_coordinate_values",
    "cast_for_loss",
    "naive_coordinate_values",
]
