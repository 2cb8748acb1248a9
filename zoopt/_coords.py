"""The one coordinate validator: indices (or a boolean mask) into a flat vector of length d."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._array import to_numpy


def check_coords(coords: Any, dim: int, *, unique: bool = False) -> np.ndarray:
    """``coords`` as int64 indices into ``range(dim)``.

    Accepts a 1-D array or sequence of integers (numpy, torch, CuPy), or a boolean mask of
    shape ``(dim,)``. With ``unique=True`` the result is sorted and duplicates are an error
    (a set of coordinates, as sparse CGE takes); otherwise order and repeats are kept (a list
    of queries, as ``eval_coordinate_steps`` takes).

    Raises:
        TypeError: not integers (or booleans).
        ValueError: not 1-D, a mask of the wrong length, an index out of range (named), or a
            duplicate with ``unique=True``.
    """
    c = np.asarray(to_numpy(coords))
    if c.dtype == bool:
        if c.shape != (dim,):
            raise ValueError(f"a boolean coords mask must have shape ({dim},), got {c.shape}")
        return np.flatnonzero(c).astype(np.int64)
    if c.ndim != 1:
        raise ValueError(f"coords must be 1-D (indices or a boolean mask), got shape {c.shape}")
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(c.dtype, np.integer):
        raise TypeError(f"coords must be integers, got dtype {c.dtype}")
    c = c.astype(np.int64, copy=False)
    bad = (c < 0) | (c >= dim)
    if bad.any():
        raise ValueError(f"coords index {int(c[bad][0])} out of range for dim={dim}")
    if unique:
        u = np.unique(c)
        if u.size != c.size:
            raise ValueError("coords contains duplicate indices")
        return u
    return c
