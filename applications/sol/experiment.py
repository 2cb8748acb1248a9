"""One run of the experiment: data, every method of ``settings.methods``, ``mae.json`` and figures."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from oracles.wake_flow import WakeFlowSimulator

from .config import SolSettings
from .data import OneStepPairs, Trajectories, load_trajectories, one_step_pairs
from .model import Normalization
from .report import gap_closed, plot_mae, plot_vorticity
from .rollout import corrected_rollout, rollout_mae
from .training import train_method

#: what ``mae.json`` says the loss and the metric are
LOSS = "MSE over the n unrolled steps, each channel / RMS one-step correction"
METRIC = "MAE of corrected vs downsampled fine velocity, all test steps and cells"


@dataclass(frozen=True)
class Problem:
    """What every method is trained and tested on.

    Attributes:
        train, test: reference trajectories (disjoint Re).
        solver: the coarse solver at ``settings.res``.
        pairs: NON's one-step pairs from ``train``.
        normalization: fitted on ``train`` and its ideal one-step corrections.
        data_seconds: wall seconds to load (or simulate) the references.
    """

    train: Trajectories
    test: Trajectories
    solver: WakeFlowSimulator
    pairs: OneStepPairs
    normalization: Normalization
    data_seconds: float


def prepare(settings: SolSettings, *, progress: bool = True) -> Problem:
    """Load the references, build the coarse solver, the one-step pairs and the scaling."""
    start = time.perf_counter()
    train, test = load_trajectories(settings, progress=progress)
    data_seconds = time.perf_counter() - start
    solver = WakeFlowSimulator(settings.res)
    pairs = one_step_pairs(solver, train)
    normalization = Normalization.fit(train.frames, train.reynolds, pairs.targets - pairs.inputs)
    return Problem(train, test, solver, pairs, normalization, data_seconds)


def snapshot(model: nn.Module | None, problem: Problem, sim: int, n_steps: int) -> np.ndarray:
    """The corrected state ``(2, H, W)`` of test simulation ``sim`` after ``n_steps`` steps."""
    test = problem.test
    rollout = corrected_rollout(
        model,
        problem.solver,
        test.frames[sim : sim + 1, 0],
        test.reynolds[sim : sim + 1],
        n_steps,
    )
    return rollout[0, -1]


def run(
    settings: SolSettings, out: str | Path, *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train and evaluate every method of ``settings.methods``; returns the ``mae.json`` dict.

    Writes ``out/mae.json``, ``out/mae.png``, ``out/vorticity.png`` and one Trainer folder
    per trained method (``resume``: continue each from its checkpoint).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    problem = prepare(settings, progress=progress)
    test = problem.test

    n_eval = settings.eval_steps or settings.frames
    snap_sim = test.n_sims // 2  # the middle test Re
    snapshots = {"reference": test.frames[snap_sim, n_eval]}
    per_sim: dict[str, list[float]] = {}
    info: dict[str, dict[str, Any]] = {}
    for method in settings.methods:
        if method == "SRC":
            model = None
            start = time.perf_counter()
            per_sim[method] = rollout_mae(None, problem.solver, test, n_eval).tolist()
            info[method] = {"eval_seconds": time.perf_counter() - start}
        else:
            task, info[method] = train_method(
                method,
                settings,
                problem.solver,
                problem.train,
                test,
                problem.pairs,
                problem.normalization,
                out,
                resume=resume,
                progress=progress,
            )
            model = task.model
            per_sim[method] = task.test_mae_per_simulation().tolist()
        snapshots[method] = snapshot(model, problem, snap_sim, n_eval)
        if progress:
            print(f"zo_sol: {method:7s} test MAE {np.mean(per_sim[method]):.4f}", flush=True)

    mae = {m: float(np.mean(v)) for m, v in per_sim.items()}
    zo = info.get("ZO-SOL", {})
    result = {
        "mae": mae,
        "per_simulation": per_sim,
        "test_reynolds": list(test.reynolds),
        "train_reynolds": list(problem.train.reynolds),
        "gap_closed_by_zo": gap_closed(mae),
        "zo_seconds_per_step": zo.get("seconds_per_step"),
        "zo_queries": zo.get("queries"),
        "zo_queries_per_step": zo.get("queries_per_step"),
        "methods": info,
        "loss": LOSS,
        "metric": METRIC,
        "data_seconds": problem.data_seconds,
        "total_seconds": time.perf_counter() - t0,
        "settings": settings.as_dict(),
        "normalization": problem.normalization.as_dict(),
    }
    (out / "mae.json").write_text(json.dumps(result, indent=2))
    plot_mae(mae, per_sim, test.reynolds, out / "mae.png")
    plot_vorticity(
        snapshots,
        problem.solver.spacing,
        f"vorticity, test Re {test.reynolds[snap_sim]:g}, step {n_eval}",
        out / "vorticity.png",
    )
    return result
