"""Data loaders, augmentation and batching (zoopt.data; CIFAR-10's pickles: zoopt.datasets)."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoopt import data, datasets

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- digits ------------------------------------------------------------------------------


def test_digits_split_shapes_stratification_and_normalization():
    X_train, y_train, X_test, y_test = data.load_digits_split(test_fraction=0.25, seed=0)
    assert X_train.dtype == X_test.dtype == np.float32
    assert y_train.dtype == y_test.dtype == np.int64
    assert X_train.shape[1:] == X_test.shape[1:] == (1, 8, 8)
    assert len(X_train) == len(y_train) and len(X_test) == len(y_test)
    assert len(X_train) + len(X_test) == 1797
    assert len(X_test) == pytest.approx(0.25 * 1797, abs=1)
    # Stratified: every class's share of the test set is its share of the whole, ±1 sample.
    all_labels = np.concatenate([y_train, y_test])
    for label in range(10):
        share = (all_labels == label).sum() * len(y_test) / len(all_labels)
        assert abs((y_test == label).sum() - share) <= 1
    # Standardized with training statistics.
    assert float(X_train.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(X_train.std()) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(X_test.mean())) < 0.1


def test_digits_split_is_seeded():
    a = data.load_digits_split(seed=1)
    b = data.load_digits_split(seed=1)
    c = data.load_digits_split(seed=2)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2, 1.5])
def test_digits_split_rejects_bad_fraction(bad):
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_digits_split(test_fraction=bad)


# -- CIFAR-10 from pickle batches ----------------------------------------------------------


def write_batch(path, images: np.ndarray, labels: list[int], protocol: int = 2) -> None:
    """The standard CIFAR-10 python batch: a dict with bytes keys, uint8 (n, 3072) data."""
    batch = {
        b"batch_label": b"fake batch",
        b"labels": list(labels),
        b"data": images.reshape(len(images), -1),
        b"filenames": [f"img{i}.png".encode() for i in range(len(images))],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=protocol)


def python2_batch_bytes(images: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle (protocol 2) wrote the real files: str keys (read back as
    bytes), ``numpy.core.multiarray._reconstruct`` and the pixels as one raw string."""

    def string(b: bytes) -> bytes:  # SHORT_BINSTRING / BINSTRING
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def integer(v: int) -> bytes:  # BININT
        return b"J" + struct.pack("<i", v)

    n = len(images)
    dtype = (
        b"cnumpy\ndtype\n" + string(b"u1") + integer(0) + integer(1) + b"\x87R"
        + b"(" + integer(3) + string(b"|") + b"NNN" + integer(-1) + integer(-1) + integer(0)
        + b"tb"
    )  # fmt: skip
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + integer(0) + b"\x85"
        + string(b"b") + b"\x87R" + b"(" + integer(1) + integer(n) + integer(3072) + b"\x86"
        + dtype + b"\x89" + string(images.tobytes()) + b"tb"
    )  # fmt: skip
    label_list = b"](" + b"".join(integer(v) for v in labels) + b"e"
    return b"\x80\x02}(" + string(b"data") + array + string(b"labels") + label_list + b"u."


def fake_cifar(folder, n_per_batch: int = 3, seed: int = 0):
    """Write data_batch_1..5 and test_batch into ``folder``; returns (train, labels, test, labels)."""
    os.makedirs(folder, exist_ok=True)
    r = np.random.default_rng(seed)
    train, train_labels = [], []
    for i in range(1, 6):
        imgs = r.integers(0, 256, size=(n_per_batch, 3, 32, 32), dtype=np.uint8)
        labels = r.integers(0, 10, size=n_per_batch).tolist()
        write_batch(os.path.join(folder, f"data_batch_{i}"), imgs, labels, protocol=2 + i % 4)
        train.append(imgs)
        train_labels += labels
    test = r.integers(0, 256, size=(n_per_batch + 1, 3, 32, 32), dtype=np.uint8)
    test_labels = r.integers(0, 10, size=n_per_batch + 1).tolist()
    write_batch(os.path.join(folder, "test_batch"), test, test_labels)
    return np.concatenate(train), np.array(train_labels), test, np.array(test_labels)


def normalized(raw: np.ndarray) -> np.ndarray:
    mean = np.array(datasets.CIFAR10_MEAN)[None, :, None, None]
    std = np.array(datasets.CIFAR10_STD)[None, :, None, None]
    return (raw / 255.0 - mean) / std


@pytest.mark.parametrize("nested", [False, True])
def test_cifar10_reads_standard_batches(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    raw_train, y_train_raw, raw_test, y_test_raw = fake_cifar(folder)
    X_train, y_train, X_test, y_test = datasets.load_cifar10(tmp_path)
    assert X_train.shape == (15, 3, 32, 32) and X_test.shape == (4, 3, 32, 32)
    assert X_train.dtype == np.float32 and y_train.dtype == np.int64
    np.testing.assert_array_equal(y_train, y_train_raw)
    np.testing.assert_array_equal(y_test, y_test_raw)
    np.testing.assert_allclose(X_train, normalized(raw_train), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(X_test, normalized(raw_test), rtol=1e-5, atol=1e-5)


def test_cifar10_pixels_without_normalization(tmp_path):
    raw_train, _, raw_test, _ = fake_cifar(tmp_path)
    X_train, _, X_test, _ = datasets.load_cifar10(tmp_path, normalize=False)
    np.testing.assert_allclose(X_train, raw_train / 255.0, rtol=1e-6)
    np.testing.assert_allclose(X_test, raw_test / 255.0, rtol=1e-6)
    assert X_train.dtype == np.float32 and 0.0 <= X_train.min() and X_train.max() <= 1.0


def test_cifar10_reads_python2_pickles(tmp_path):
    raw_train, y_train_raw, _, _ = fake_cifar(tmp_path)
    r = np.random.default_rng(5)
    test = r.integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8)
    (tmp_path / "test_batch").write_bytes(python2_batch_bytes(test, [7, 3]))
    X_train, _, X_test, y_test = datasets.load_cifar10(tmp_path)
    np.testing.assert_array_equal(y_test, [7, 3])
    np.testing.assert_allclose(X_test, normalized(test), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(X_train, normalized(raw_train), rtol=1e-5, atol=1e-5)


def test_cifar10_missing_folder_and_files_are_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        datasets.load_cifar10(missing)
    fake_cifar(tmp_path / "cifar-10-batches-py")
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3") as info:
        datasets.load_cifar10(tmp_path)
    assert "data_batch_1" not in str(info.value).split(":")[1].split("(")[0]


def test_cifar10_rejects_malformed_and_malicious_pickles(tmp_path):
    fake_cifar(tmp_path)
    write_batch(tmp_path / "data_batch_2", np.zeros((2, 3, 16, 16), dtype=np.uint8), [0, 1])
    with pytest.raises(ValueError, match="data_batch_2.*3072"):
        datasets.load_cifar10(tmp_path)

    fake_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        datasets.load_cifar10(tmp_path)


# -- augmentation --------------------------------------------------------------------------


def crops_of(image: np.ndarray, pad: int, fill: float = 0.0) -> list[np.ndarray]:
    """Every crop (and its mirror) that augment_crop_flip may return for one image."""
    c, h, w = image.shape
    padded = np.full((c, h + 2 * pad, w + 2 * pad), fill, dtype=image.dtype)
    padded[:, pad : pad + h, pad : pad + w] = image
    out = []
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            crop = padded[:, top : top + h, left : left + w]
            out += [crop, crop[:, :, ::-1]]
    return out


@SETTINGS
@given(
    n=st.integers(1, 6),
    c=st.integers(1, 3),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    pad=st.integers(0, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_augment_returns_a_padded_crop_or_its_mirror(n, c, h, w, pad, seed):
    X = np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(np.float32)
    out = data.augment_crop_flip(X, np.random.default_rng(seed), pad=pad)
    assert out.shape == X.shape and out.dtype == X.dtype
    for i in range(n):
        assert any(np.array_equal(out[i], crop) for crop in crops_of(X[i], pad))
    again = data.augment_crop_flip(X, np.random.default_rng(seed), pad=pad)
    np.testing.assert_array_equal(out, again)


def test_augment_actually_flips_and_shifts():
    r = np.random.default_rng(0)
    X = r.standard_normal((64, 3, 8, 8)).astype(np.float32) + 5.0  # no pixel equals the fill
    out = data.augment_crop_flip(X, r, pad=2)
    flipped = [np.array_equal(out[i], X[i, :, :, ::-1]) for i in range(64)]
    unchanged = [np.array_equal(out[i], X[i]) for i in range(64)]
    has_padding = [(out[i] == 0).any() for i in range(64)]
    # 64 independent draws: P(no flip) = 2^-64, P(no shift) = (1/25)^64.
    assert any(flipped) and any(has_padding)
    assert not all(unchanged)


def test_augment_fill_per_channel_and_errors():
    X = np.ones((32, 2, 4, 4))
    out = data.augment_crop_flip(X, 1, pad=4, fill=(-1.0, -2.0))
    assert set(np.unique(out[:, 0])) <= {1.0, -1.0} and set(np.unique(out[:, 1])) <= {1.0, -2.0}
    assert (out[:, 1] == -2.0).any()
    with pytest.raises(ValueError, match="pad"):
        data.augment_crop_flip(X, 0, pad=-1)
    with pytest.raises(ValueError, match="\\(n, c, h, w\\)"):
        data.augment_crop_flip(X[0], 0)
    with pytest.raises(ValueError, match="fill"):
        data.augment_crop_flip(X, 0, fill=(1.0, 2.0, 3.0))


# -- batching and sampling -----------------------------------------------------------------


@SETTINGS
@given(
    n=st.integers(1, 60),
    batch_size=st.integers(1, 20),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_batches_cover_an_epoch_once(n, batch_size, drop_last, seed):
    X = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), dtype=np.float32)
    y = np.arange(n, dtype=np.int64)
    got = list(data.batches(X, y, batch_size, np.random.default_rng(seed), drop_last=drop_last))
    seen = np.concatenate([yb for _, yb in got]) if got else np.zeros(0, dtype=np.int64)
    for Xb, yb in got:
        np.testing.assert_array_equal(Xb[:, 0], yb)  # pairs stay together
        assert len(yb) == batch_size or (not drop_last and yb is got[-1][1])
    assert len(np.unique(seen)) == len(seen)
    assert len(seen) == (n - n % batch_size if drop_last else n)
    again = list(data.batches(X, y, batch_size, np.random.default_rng(seed), drop_last=drop_last))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(got, again, strict=True))


def test_batches_shuffle_and_reject_bad_input():
    X, y = np.zeros((100, 2)), np.arange(100)
    order = np.concatenate([yb for _, yb in data.batches(X, y, 10, 0)])
    assert not np.array_equal(order, np.arange(100))
    with pytest.raises(ValueError, match="batch_size"):
        list(data.batches(X, y, 0, 0))
    with pytest.raises(ValueError, match="100 samples but y has 99"):
        list(data.batches(X, y[:99], 10, 0))


@SETTINGS
@given(per_class=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_class_balanced_sample(per_class, seed):
    r = np.random.default_rng(seed)
    y = np.concatenate([np.full(5 + k, k) for k in range(4)])
    r.shuffle(y)
    X = np.arange(len(y))[:, None].astype(np.float32)  # row i holds i
    Xs, ys = data.class_balanced_sample(X, y, per_class, np.random.default_rng(seed))
    np.testing.assert_array_equal(np.bincount(ys, minlength=4), [per_class] * 4)
    rows = Xs[:, 0].astype(int)
    assert len(np.unique(rows)) == len(rows)
    np.testing.assert_array_equal(y[rows], ys)
    Xs2, _ = data.class_balanced_sample(X, y, per_class, np.random.default_rng(seed))
    np.testing.assert_array_equal(Xs, Xs2)


def test_class_balanced_sample_needs_enough_per_class():
    y = np.array([0, 0, 0, 1])
    with pytest.raises(ValueError, match="class 1 has only 1 samples"):
        data.class_balanced_sample(np.zeros((4, 1)), y, 2, 0)
