"""The COCO harness (benchmarks/bbob.py) end to end on one function, one instance, a tiny
budget: real cocoex problems and Observer, the shared counter, the scoring and the plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

cocoex = pytest.importorskip("cocoex")
pytest.importorskip("matplotlib")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bbob  # noqa: E402


def test_the_harness_runs_end_to_end(tmp_path, capsys):
    summary = bbob.main(
        [
            "--dims", "2",
            "--instances", "1",
            "--functions", "1,15",
            "--budget-multiplier", "10",
            "--solvers", "zoopt", "lbfgsb",
            "--out", str(tmp_path),
            "--markdown",
        ]
    )  # fmt: skip
    table = capsys.readouterr().out.split("| solver |")[1]
    assert "| zoopt |" in table and "| lbfgsb |" in table
    rows = json.loads((tmp_path / "runs.json").read_text())
    assert {(r["solver"], r["function"]) for r in rows} == {
        (s, f) for s in ("zoopt", "lbfgsb") for f in (1, 15)
    }
    for r in rows:
        assert r["error"] is None, r
        assert 1 <= r["evaluations"] <= r["budget"] == 20
        hits = [h for h in r["hits"] if h is not None]
        # targets are nested: reached in order, each no later than the next harder one
        assert r["hits"][: len(hits)] == hits and hits == sorted(hits)
        assert all(1 <= h <= r["evaluations"] for h in hits)
        assert (r["best_minus_fopt"] <= 1e-8) == (r["stop"] == "final target reached")
    for s in ("zoopt", "lbfgsb"):
        mine = [r for r in rows if r["solver"] == s]
        reached = sum(h is not None and h <= 20 for r in mine for h in r["hits"])
        assert summary["solvers"][s]["at"]["10d"] == pytest.approx(reached / (2 * 51))
        assert 0.0 <= summary["solvers"][s]["auc"] <= summary["solvers"][s]["at"]["10d"]
        # COCO-format data, readable by cocopp
        assert list((tmp_path / "exdata").glob(f"{s}*/bbobexp_f1.info"))
        assert list((tmp_path / "exdata").glob(f"{s}*/data_f15/*_DIM2.dat"))
    assert (tmp_path / "bbob_ecdf.png").stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    # the COCO logger's data tell the same first hits as the harness's own counter
    for s in ("zoopt", "lbfgsb"):
        (folder,) = (tmp_path / "exdata").glob(f"{s}*")
        from_coco = {r["problem"]: r for r in bbob.rows_from_coco(folder, s, 10)}
        for r in (r for r in rows if r["solver"] == s):
            assert from_coco[r["problem"]]["hits"] == r["hits"]
            assert from_coco[r["problem"]]["evaluations"] == r["evaluations"]


def test_the_counter_stops_a_solver_at_the_budget_and_at_the_last_target(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # cocoex writes x* to a file in the working directory
    options = "dimensions: 2 instance_indices: 1 function_indices: 1"
    suite = cocoex.Suite("bbob", "", options)  # the problem lives as long as its suite
    problem = suite[0]
    f_opt = bbob.optimal_values(options)[problem.id]
    f = bbob.TrackedProblem(problem, f_opt, budget=3)
    for _ in range(3):
        f(np.full(2, 4.0))
    with pytest.raises(bbob.StopRun, match="budget"):
        f(np.zeros(2))
    assert f.evaluations == 3
    # f* itself: every target at once, and the run ends
    g = bbob.TrackedProblem(problem, f_opt, budget=10)
    problem._best_parameter("print")
    with pytest.raises(bbob.StopRun, match="final target"):
        g(np.loadtxt("._bbob_problem_best_parameter.txt"))
    assert g.hits == [1] * 51
    problem.free()


def test_ecdf_counts_pairs_reached_within_each_budget():
    rows = [
        {"d": 2, "hits": [2, 4] + [None] * 49},
        {"d": 5, "hits": [5] + [None] * 50},
    ]
    got = bbob.ecdf(rows, np.array([0.5, 1.0, 2.0]))
    np.testing.assert_allclose(got, np.array([0, 2, 3]) / (2 * 51))
