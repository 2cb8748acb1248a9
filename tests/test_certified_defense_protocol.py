"""The certified-defense protocol of issue 26: a validation split carved from the training
images, each method's learning rate chosen on it by the same sweep, certification in blocks
(the same certificates as CERTIFY image by image, resumable), Clopper-Pearson intervals and
paired tests, and the same numbers for the same seed and thread count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from scipy.stats import beta  # noqa: E402

from applications.defense import cli, summary  # noqa: E402
from applications.defense import data as ddata  # noqa: E402
from applications.defense import statistics as dstats  # noqa: E402
from applications.defense.certification import certify_blocks, image_ids  # noqa: E402
from applications.defense.config import METHODS, TrainingConfig  # noqa: E402
from applications.defense.selection import carve_validation  # noqa: E402
from zoopt.certify import certify  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# -- the validation split ---------------------------------------------------------------------
def test_validation_is_carved_from_every_class_of_the_training_images_only():
    full = ddata.digits_data(8)
    dev = carve_validation(full, 0.2, seed=3)
    n = full.y_train.size
    assert dev.y_train.size + dev.y_test.size == n
    # every validation image is a training image, none is a test image
    train_rows = {x.tobytes() for x in full.X_train}
    test_rows = {x.tobytes() for x in full.X_test}
    assert all(x.tobytes() in train_rows and x.tobytes() not in test_rows for x in dev.X_test)
    assert not {x.tobytes() for x in dev.X_test} & {x.tobytes() for x in dev.X_train}
    for c in np.unique(full.y_train):
        members = int(np.sum(full.y_train == c))
        assert int(np.sum(dev.y_test == c)) == max(1, round(0.2 * members))
    again = carve_validation(full, 0.2, seed=3)
    assert np.array_equal(again.X_test, dev.X_test) and np.array_equal(again.y_train, dev.y_train)
    assert not np.array_equal(carve_validation(full, 0.2, seed=4).y_test, dev.y_test)
    with pytest.raises(ValueError, match="validation fraction must lie in"):
        carve_validation(full, 1.0, seed=0)


def test_every_method_sweeps_the_same_number_of_learning_rates():
    tr = TrainingConfig(lr_fo_ds=0.001, lr_zo_ae_ds=0.002, lr_deepzero=0.05)
    sizes = {m: len(tr.lr_candidates(m)) for m in METHODS}
    assert set(sizes.values()) == {len(tr.lr_factors)}
    assert tr.lr_candidates("deepzero") == pytest.approx((0.015, 0.05, 0.15))
    assert TrainingConfig(lr_factors=(1.0,)).lr_candidates("fo-ds") == (0.001,)
    for kwargs, match in (({"lr_factors": ()}, "--lr-factors must be positive"),
                          ({"lr_factors": (1.0, 1.0)}, "--lr-factors must not repeat"),
                          ({"lr_factors": (0.0, 1.0)}, "--lr-factors must be positive"),
                          ({"sweep_epochs": 5}, "--sweep-epochs must lie in"),
                          ({"validation_fraction": 0.0}, "--validation-fraction"),
                          ({"sweep_draws": 0}, "--sweep-draws")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            TrainingConfig(**kwargs)
    config = cli.parse_config(["--lr-factors", "0.5,1,2", "--sweep-epochs", "2", "--threads", "1"])
    assert config.training.lr_factors == (0.5, 1.0, 2.0) and config.threads == 1
    with pytest.raises(ValueError, match="--threads must be a positive integer"):
        cli.parse_config(["--threads", "0"])


# -- certification in blocks ------------------------------------------------------------------
def mean_threshold_labels(images: np.ndarray) -> np.ndarray:
    """A deterministic base classifier of 3 classes (by the mean pixel), per image, so its
    labels do not depend on the batch an image comes in."""
    means = images.reshape(images.shape[0], -1).mean(axis=1)
    return np.digitize(means, [0.45, 0.55]).astype(np.int64)


@settings(max_examples=15, deadline=None)
@given(
    k=st.integers(1, 5),
    first=st.integers(0, 50),
    seed=st.integers(0, 2**16),
    level=st.floats(0.3, 0.7),
)
def test_block_certification_equals_certify_image_by_image(k, first, seed, level):
    gen = np.random.default_rng(seed)
    images = (level + 0.05 * gen.standard_normal((k, 1, 4, 4))).astype(np.float32)
    blocks = certify_blocks(
        mean_threshold_labels, images, sigma=0.25, n0=10, n=200, alpha=0.01, seed=seed,
        first_index=first,
    )  # fmt: skip
    alone = [
        certify(mean_threshold_labels, images[i], 0.25, n0=10, n=200, alpha=0.01, batch=37,
                rng=np.random.default_rng([seed, first + i]))
        for i in range(k)
    ]  # fmt: skip
    assert blocks == alone


def test_image_ids_name_the_content():
    images = np.random.default_rng(0).random((3, 1, 4, 4), dtype=np.float32)
    ids = image_ids(images)
    assert len(set(ids)) == 3 and image_ids(images[::-1].copy()) == ids[::-1]


# -- intervals and paired tests ---------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(trials=st.integers(1, 600), data=st.data())
def test_clopper_pearson_is_the_beta_quantile_interval(trials, data):
    k = data.draw(st.integers(0, trials))
    low, high = dstats.clopper_pearson(k, trials, 0.95)
    assert low <= k / trials <= high
    expected_low = 0.0 if k == 0 else beta.ppf(0.025, k, trials - k + 1)
    expected_high = 1.0 if k == trials else beta.ppf(0.975, k + 1, trials - k)
    assert low == pytest.approx(expected_low, abs=1e-9)
    assert high == pytest.approx(expected_high, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=200))
def test_mcnemar_counts_the_discordant_images_and_is_symmetric(pairs):
    a = np.array([p[0] for p in pairs])
    b = np.array([p[1] for p in pairs])
    ab, ba = dstats.mcnemar_exact(a, b), dstats.mcnemar_exact(b, a)
    assert ab["a_only"] == int(np.sum(a & ~b)) and ab["b_only"] == int(np.sum(b & ~a))
    assert ab["pvalue"] == pytest.approx(ba["pvalue"]) and 0.0 < ab["pvalue"] <= 1.0
    assert dstats.mcnemar_exact(a, a)["pvalue"] == 1.0


def test_mcnemar_separates_a_clear_difference_but_not_a_small_one():
    a = np.array([True] * 30 + [False] * 70)
    b = np.array([False] * 30 + [False] * 70)
    assert dstats.mcnemar_exact(a, b)["pvalue"] < 1e-8  # 30 against 0 discordant
    c = np.array([True] * 3 + [False] * 97)
    d = np.array([False] * 3 + [True] * 1 + [False] * 96)
    assert dstats.mcnemar_exact(c, d)["pvalue"] == pytest.approx(0.625)  # 3 vs 1


def test_run_statistics_counts_intervals_and_pairs():
    labels = [0, 1, 2, 1]
    certs = {
        "fo-ds": [[0, 0.8], [1, 0.3], [-1, 0.0], [1, 0.1]],
        "deepzero": [[0, 0.2], [2, 0.9], [2, 0.6], [1, 0.5]],
    }
    stats = dstats.run_statistics(certs, labels, [0.0, 0.5])
    assert stats["images"] == 4
    assert stats["certified"]["fo-ds"]["0"]["count"] == 3
    assert stats["certified"]["deepzero"]["0.5"]["count"] == 2
    lo, hi = stats["certified"]["fo-ds"]["0.5"]["interval"]
    assert (lo, hi) == pytest.approx(dstats.clopper_pearson(1, 4))
    t = next(t for t in stats["paired_tests"] if t["radius"] == "0")
    assert (t["a"], t["b"], t["a_only"], t["b_only"]) == ("fo-ds", "deepzero", 1, 1)


def test_image_bootstrap_brackets_the_mean_and_collapses_without_variation():
    values = {f"i{i}": [float(i % 3 == 0), float(i % 2 == 0)] for i in range(60)}
    mean, (low, high) = dstats.image_bootstrap(values)
    assert mean == pytest.approx(np.mean([np.mean(v) for v in values.values()]))
    assert low < mean < high
    assert dstats.image_bootstrap({"a": [1.0], "b": [1.0]}) == (1.0, (1.0, 1.0))


# -- the app: determinism and resumption ------------------------------------------------------
def owner_checkpoint(tmp_path: Path) -> Path:
    from oracles.resnet import build_resnet, save_classifier_checkpoint

    torch.manual_seed(0)
    weights = tmp_path / "owner.pt"
    model = build_resnet("resnet18", num_classes=10, in_channels=1).eval()
    save_classifier_checkpoint(weights, model, "resnet18", input_shape=(1, 8, 8))
    return weights


def tiny_run(out: Path, weights: Path, num_certify: int) -> dict:
    argv = [
        sys.executable, str(ROOT / "applications" / "certified_defense.py"), "--out", str(out),
        "--dataset", "digits", "--image-size", "8", "--classifier-weights", str(weights),
        "--local", "--q", "16", "--batch-size", "32", "--epochs", "2", "--steps-per-epoch", "1",
        "--lr-factors", "0.5,2", "--sweep-draws", "2", "--pretrain-epochs", "1",
        "--denoiser-init", "random",
        "--dncnn-depth", "3", "--dncnn-width", "4", "--ae-width", "4", "--grasp-q", "2",
        "--grasp-per-class", "1", "--num-validate", "8", "--n0", "5", "--n", "30",
        "--num-certify", str(num_certify), "--certify-block", "2", "--threads", "1",
        "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "certified_accuracy.json").read_text())


#: what one call spent or where it wrote, not what it computed
PER_CALL = ("out", "folder", "certification_api_images")


def without_timing(value):
    """``value`` without wall times, rates, folders and what this call certified (which
    differ between identical runs)."""
    if isinstance(value, dict):
        return {
            k: without_timing(v)
            for k, v in value.items()
            if k not in PER_CALL and not any(w in k for w in ("seconds", "per_second"))
        }
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def test_same_seed_and_threads_give_identical_numbers_and_a_rerun_certifies_only_the_rest(
    tmp_path,
):
    weights = owner_checkpoint(tmp_path)
    whole = tiny_run(tmp_path / "a", weights, num_certify=5)
    part = tiny_run(tmp_path / "b", weights, num_certify=2)
    assert part["certified_images"] == 2
    first = json.loads((tmp_path / "b" / "deepzero" / "certificates.json").read_text())
    rest = tiny_run(tmp_path / "b", weights, num_certify=5)  # the same folder, more images
    assert without_timing(rest) == without_timing(whole)
    for m in METHODS:
        a = json.loads((tmp_path / "a" / m / "certificates.json").read_text())
        b = json.loads((tmp_path / "b" / m / "certificates.json").read_text())
        assert a == b and len(a["certificates"]) == 5
        if m == "deepzero":
            assert first["certificates"] == b["certificates"][:2]
    # the record: the sweep per method, the split, intervals and paired tests
    assert whole["split"]["certified"] == 5 and whole["settings"]["torch_threads"] == 1
    for m in METHODS:
        sweep = whole["learning_rates"][m]
        assert (
            len(sweep["candidates"]) == 2
            and sweep["validation_images"] == whole["split"]["validation"]
        )
        assert sweep["chosen_lr"] in [c["lr"] for c in sweep["candidates"]]
        assert whole["queries"][m]["lr"] == sweep["chosen_lr"]
        for r, (lo, hi) in whole["intervals"][m].items():
            assert lo <= whole["certified_accuracy"][m][r] <= hi
    assert len(whole["paired_tests"]) == 3 * 4  # 3 pairs x 4 radii
    runs = [summary.load_run(tmp_path / "a"), summary.load_run(tmp_path / "b")]
    tables = summary.statistics_tables(runs, [0.0, 0.25, 0.5, 0.75])
    assert "Clopper-Pearson" in tables and "McNemar" in tables and "bootstrap" in tables


def test_summary_pools_seeds_by_image_from_the_certificates_of_unfinished_runs(tmp_path, capsys):
    """Two seeds certify the same photos in different orders, one still certifying (no
    certified_accuracy.json): per-seed intervals and tests on the images every method has,
    pooled accuracies and differences matched by image id."""
    ids, labels = ["p0", "p1", "p2", "p3"], [0, 1, 2, 3]
    # (prediction, radius) per photo: FO-DS right on all, DeepZero on p0 and p1 only
    right = {"fo-ds": {"p0", "p1", "p2", "p3"}, "zo-ae-ds": {"p0"}, "deepzero": {"p0", "p1"}}
    for seed, order in ((0, [0, 1, 2, 3]), (1, [3, 2, 1, 0])):
        for m in METHODS:
            certs = [[labels[i] if ids[i] in right[m] else -1, 0.6] for i in order]
            if seed == 1 and m == "deepzero":
                certs = certs[:3]  # still certifying: 3 of 4 photos done
            folder = tmp_path / f"seed{seed}" / m
            folder.mkdir(parents=True)
            record = {"seed": seed, "sigma": 0.25, "certificates": certs,
                      "labels": [labels[i] for i in order][: len(certs)],
                      "image_ids": [ids[i] for i in order][: len(certs)]}  # fmt: skip
            (folder / "certificates.json").write_text(json.dumps(record))
    runs = [summary.load_run(tmp_path / f"seed{s}") for s in (0, 1)]
    assert all(r["partial"] for r in runs)
    assert runs[1]["certified_accuracy"]["fo-ds"]["0"] == 1.0  # on the 3 common photos
    assert runs[1]["certified_accuracy"]["deepzero"]["0.5"] == pytest.approx(1 / 3)  # p1 only
    seed1 = summary.per_seed_statistics(runs[1], [0.0])
    assert seed1["images"] == 3
    test = next(t for t in seed1["paired_tests"] if (t["a"], t["b"]) == ("fo-ds", "deepzero"))
    assert (test["a_only"], test["b_only"]) == (2, 0)  # p3 and p2
    pooled = summary.pooled_statistics(runs, [0.0, 0.75])
    assert pooled["images"] == 4
    # per photo over its seeds: DeepZero p0 1, p1 1, p2 0 (both seeds), p3 0 (seed 0 only)
    assert pooled["accuracy"]["deepzero"]["0"]["mean"] == pytest.approx(0.5)
    assert pooled["accuracy"]["fo-ds"]["0.75"]["mean"] == 0.0  # no radius reaches 0.75
    diff = next(d for d in pooled["differences"] if (d["a"], d["b"], d["radius"]) ==
                ("fo-ds", "deepzero", "0"))  # fmt: skip
    assert diff["mean"] == pytest.approx(0.5)
    lo, hi = diff["interval"]
    assert lo <= 0.5 <= hi
    assert summary.main([str(tmp_path / "seed0"), str(tmp_path / "seed1"),
                         "--plot", str(tmp_path / "p.png")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| 1 (partial) |" in printed and "Pooled over 2 seeds (4 distinct" in printed
    assert (tmp_path / "p.png").stat().st_size > 0


def test_summary_states_an_ordering_only_where_interval_and_every_seed_agree(tmp_path, capsys):
    """FO-DS certifies all 40 photos in both seeds, ZO-AE-DS 10: resolved, with McNemar
    significant in both seeds. DeepZero beats ZO-AE-DS by 2 photos in seed 0 and loses by 2 in
    seed 1: not resolved, whatever the pooled mean."""
    ids = [f"p{i}" for i in range(40)]
    right = {
        0: {"fo-ds": set(ids), "zo-ae-ds": set(ids[:10]), "deepzero": set(ids[:12])},
        1: {"fo-ds": set(ids), "zo-ae-ds": set(ids[:10]), "deepzero": set(ids[:8])},
    }
    for seed in (0, 1):
        for m in METHODS:
            folder = tmp_path / f"seed{seed}" / m
            folder.mkdir(parents=True)
            certs = [[1 if i in right[seed][m] else 0, 0.3] for i in ids]
            record = {"seed": seed, "sigma": 0.25, "certificates": certs,
                      "labels": [1] * len(ids), "image_ids": ids}  # fmt: skip
            (folder / "certificates.json").write_text(json.dumps(record))
    runs = [summary.load_run(tmp_path / f"seed{s}") for s in (0, 1)]
    found = {
        (o["a"], o["b"], o["radius"]): o for o in summary.supported_orderings(runs, [0.0, 0.5])
    }
    fo = found["fo-ds", "zo-ae-ds", "0"]
    assert fo["verdict"] == "fo-ds > zo-ae-ds" and fo["seeds_significant"] == 2
    assert [(t["a_only"], t["b_only"]) for t in fo["per_seed"]] == [(30, 0), (30, 0)]
    mixed = found["zo-ae-ds", "deepzero", "0"]
    assert mixed["verdict"] == "not resolved" and mixed["seeds_significant"] is None
    # no certificate reaches r = 0.5: every method certifies nothing, nothing is ordered
    assert all(found[k]["verdict"] == "not resolved" for k in found if k[2] == "0.5")
    out = tmp_path / "stats.json"
    assert summary.main([str(tmp_path / "seed0"), str(tmp_path / "seed1"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "**FO-DS > ZO-AE-DS** (2/2 seeds p < 0.05)" in printed
    saved = json.loads(out.read_text())
    assert {o["verdict"] for o in saved["orderings"]} >= {"fo-ds > zo-ae-ds", "not resolved"}
