"""Array-API plumbing: one code path for numpy, torch and CuPy arrays.

Only numpy is imported eagerly; torch and CuPy are reached through ``array_api_compat``
when the caller hands us such an array.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Array = Any  # an array of any array-API namespace (numpy, torch, cupy)


def namespace(*arrays: Array) -> Any:
    """The array-API namespace of ``arrays`` (numpy for plain Python sequences)."""
    import array_api_compat

    arrays = tuple(a for a in arrays if a is not None)
    if not arrays:
        return array_api_compat.array_namespace(np.empty(0))
    return array_api_compat.array_namespace(*arrays)


def device_of(x: Array) -> Any:
    import array_api_compat

    return array_api_compat.device(x)


def is_numpy(x: Array) -> bool:
    return isinstance(x, np.ndarray)


def to_numpy(x: Array) -> np.ndarray:
    """A host numpy copy of ``x`` (no copy for numpy input)."""
    if isinstance(x, np.ndarray):
        return x
    mod = type(x).__module__
    if mod.startswith("torch"):
        return x.detach().cpu().numpy()
    if mod.startswith("cupy"):
        return x.get()
    return np.asarray(x)


def like(values: Any, x: Array, dtype: Any = None) -> Array:
    """``values`` (numpy or sequence) as an array of ``x``'s namespace, device and dtype."""
    xp = namespace(x)
    return xp.asarray(values, dtype=x.dtype if dtype is None else dtype, device=device_of(x))


def as_float_vector(x0: Any, name: str = "x0") -> Array:
    """Validate ``x0`` as a finite 1-D floating vector; numpy input is converted to float64.

    Torch/CuPy arrays keep their type, device and (floating) dtype.
    """
    mod = type(x0).__module__
    if not (mod.startswith("torch") or mod.startswith("cupy") or isinstance(x0, np.ndarray)):
        try:
            x0 = np.asarray(x0)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a 1-D array of numbers, got {x0!r}") from exc
    dtype_name = str(getattr(x0, "dtype", ""))
    if "complex" in dtype_name:
        raise TypeError(f"{name} must be real, got dtype {dtype_name} (optimize over real and "
                        "imaginary parts as separate coordinates)")  # fmt: skip
    if isinstance(x0, np.ndarray) and x0.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a 1-D array of numbers, got dtype {x0.dtype}")
    if isinstance(x0, np.ndarray) and not np.issubdtype(x0.dtype, np.floating):
        x0 = x0.astype(np.float64)
    if mod.startswith("torch") and not x0.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x0.dtype}")
    if x0.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D (a flat parameter vector), got shape {tuple(x0.shape)}"
        )
    if x0.shape[0] == 0:
        raise ValueError(f"{name} must not be empty")
    host = to_numpy(x0)
    if not np.all(np.isfinite(host)):
        bad = int(np.flatnonzero(~np.isfinite(host))[0])
        raise ValueError(f"{name} must be finite; {name}[{bad}] = {host[bad]}")
    return x0


def copy_of(x: Array) -> Array:
    """A copy of ``x`` in its own namespace and device (numpy, torch or CuPy)."""
    if hasattr(x, "clone"):
        return x.clone()
    return x.copy()


def itemsize(x: Array) -> int:
    mod = type(x).__module__
    if mod.startswith("torch"):
        return x.element_size()
    return int(np.dtype(x.dtype).itemsize)
