"""The paper-figure scripts of applications/ run end to end on tiny settings."""

import json

import pytest

pytest.importorskip("torch")


def test_feature_reuse_script(tmp_path):
    from applications.feature_reuse import main

    assert main(["--models", "smallcnn", "--coords", "20", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "feature_reuse.json").read_text())
    assert row["max_abs_value_diff"] < 1e-6  # reuse changes the cost, never the values
    assert row["queries_per_step"] == round(0.1 * row["parameters"])
    assert (tmp_path / "feature_reuse.png").stat().st_size > 0


def test_zo_grasp_vs_random_script(tmp_path):
    from applications.zo_grasp_vs_random import main

    args = [
        "--ratios",
        "zo-grasp",
        "random",
        "--epochs",
        "1",
        "--max-steps",
        "1",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert main(args) == 0
    result = json.loads((tmp_path / "comparison.json").read_text())
    assert set(result) == {"zo-grasp", "random"}
    assert result["zo-grasp"]["keep_ratios"] != result["random"]["keep_ratios"]


def test_cge_vs_rge_script(tmp_path):
    from applications.cge_vs_rge import main

    args = [
        "--widths",
        "1",
        "--methods",
        "fo",
        "cge",
        "--max-steps",
        "1",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert main(args) == 0
    rows = json.loads((tmp_path / "cge_vs_rge.json").read_text())
    cge = next(r for r in rows if r["method"] == "cge")
    assert cge["queries"] == cge["parameters"] + 1  # one dense CGE step: d + 1 queries
