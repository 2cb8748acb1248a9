"""Training NON, FO-SOL and ZO-SOL through the Trainer, and what each run reports."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from zoopt import sparsity as sp
from zoopt.torch import ParamGroup
from zoopt.torch.train import Trainer

from .config import SolSettings
from .data import CoarseSolver, OneStepPairs, Trajectories
from .model import Normalization, build_model
from .oracle import CorrectionOracle
from .tasks import CorrectionTask, SolverInTheLoopTask, SupervisedCorrectionTask


def build_task(
    method: str,
    settings: SolSettings,
    solver: CoarseSolver,
    train: Trajectories,
    test: Trajectories,
    pairs: OneStepPairs,
    normalization: Normalization,
) -> CorrectionTask:
    """NON's supervised task or the SOL task (FO-SOL and ZO-SOL share it), on a fresh
    network with the seeded initial weights."""
    model = build_model(settings, normalization)
    if method == "NON":
        return SupervisedCorrectionTask(
            model,
            pairs,
            solver,
            test,
            batch_size=settings.non_batch_size,
            eval_steps=settings.eval_steps,
        )
    return SolverInTheLoopTask(
        model,
        solver,
        train,
        test,
        n_steps=settings.n_steps,
        batch_size=settings.windows_per_step,
        eval_steps=settings.eval_steps,
    )


def zo_step_seconds(oracle: CorrectionOracle) -> dict[str, float]:
    """Wall seconds per ZO step (base rollout + coordinate queries), first step excluded.

    The first step of each batch size traces the jit-compiled solver; it is reported apart.
    """
    per_step = np.add(oracle.seconds["base_value"], oracle.seconds["coordinate_steps"])
    rest = per_step[1:] if per_step.size > 1 else per_step
    return {
        "mean": float(rest.mean()),
        "median": float(np.median(rest)),
        "first": float(per_step[0]),
    }


def zo_queries_per_step(keep_ratios: dict[str, float], groups: list[ParamGroup]) -> int:
    """1 (the unperturbed rollout) + the coordinates the sparse mask keeps per step."""
    return 1 + sum(sp.kept_count(keep_ratios.get(g.name, 1.0), g.size) for g in groups)


def method_info(
    method: str, task: CorrectionTask, summary: dict[str, Any], run_seconds: float
) -> dict[str, Any]:
    """One method's entry of ``mae.json``'s ``methods``: steps, queries, seconds, the
    whole-training-set loss (what picks the lr, docs/zo_sol.md) and, for ZO-SOL, the
    keep ratios and queries per step."""
    oracle = task.oracle
    info: dict[str, Any] = {
        "steps": summary["steps"],
        "queries": summary["queries"],
        "train_seconds": summary["wall_seconds"],
        "run_seconds": run_seconds,
        "parameters": oracle.dim,
        "train_loss": task.training_loss(),
    }
    if method == "ZO-SOL" and oracle.seconds["base_value"]:
        info["seconds_per_step"] = zo_step_seconds(oracle)
        info["queries_per_step"] = zo_queries_per_step(summary["keep_ratios"], task.groups)
        info["keep_ratios"] = summary["keep_ratios"]
    elif oracle.seconds["loss_and_grad"]:
        info["seconds_per_step"] = {"mean": float(np.mean(oracle.seconds["loss_and_grad"]))}
    return info


def train_method(
    method: str,
    settings: SolSettings,
    solver: CoarseSolver,
    train: Trajectories,
    test: Trajectories,
    pairs: OneStepPairs,
    normalization: Normalization,
    out: Path,
    *,
    resume: bool,
    progress: bool,
) -> tuple[CorrectionTask, dict[str, Any]]:
    """Train one of NON / FO-SOL / ZO-SOL (Trainer folder ``out / method.lower()``);
    returns the trained task and the method's :func:`method_info`."""
    task = build_task(method, settings, solver, train, test, pairs, normalization)
    start = time.perf_counter()
    summary = Trainer(
        task,
        settings.train_config(method, progress),
        out / method.lower(),
        resume=resume,
        extra_summary={"application": "zo_sol", "sol_method": method},
    ).fit()
    return task, method_info(method, task, summary, time.perf_counter() - start)
