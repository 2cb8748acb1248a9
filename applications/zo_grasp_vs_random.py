"""Layer-wise pruning ratios from ZO-GraSP vs random vs FO-GraSP at equal sparsity.

DeepZero trains with sparse gradients whose per-layer density comes from ZO-GraSP scores at
initialization. This script trains the same network with the same recipe and the same
gradient sparsity, changing only where the ratios come from, and prints the test accuracies
and the ratios themselves.

Embedded default (2 CPU cores, a few minutes): digits, small CNN, 90% sparsity::

    python applications/zo_grasp_vs_random.py --out runs/lpr

Paper scale: ``--dataset cifar10 --data-dir DIR --model resnet20 --epochs 50 --batch-size 256
--device cuda`` (one run per ratio method).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoopt.train_cli import DATASETS, TrainOptions

RATIOS = ("zo-grasp", "random", "fo-grasp", "uniform")


@dataclass(frozen=True)
class RatiosComparisonConfig:
    """Which ratio methods to compare, and the recipe they share (``zoopt train``'s defaults
    for everything not named here)."""

    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "cnn"
    ratios: tuple[str, ...] = RATIOS[:3]
    sparsity: float = 0.9
    epochs: int = 10
    batch_size: int | None = None
    max_steps: int | None = None
    device: str = "cpu"
    seed: int = 0
    out: str = "runs/zo_grasp_vs_random"
    progress: bool = True

    def __post_init__(self) -> None:
        bad = [r for r in self.ratios if r not in RATIOS]
        if bad:
            raise ValueError(f"ratios must be among {RATIOS}, got {bad[0]!r}")

    def train_options(self, ratios: str) -> TrainOptions:
        return TrainOptions(
            dataset=self.dataset,
            data_dir=self.data_dir,
            model=self.model,
            ratios=ratios,
            sparsity=self.sparsity,
            epochs=self.epochs,
            batch_size=self.batch_size,
            max_steps_per_epoch=self.max_steps,
            device=self.device,
            seed=self.seed,
            progress=self.progress,
            out=str(Path(self.out) / ratios),
        )


def train_with_ratios(config: RatiosComparisonConfig, ratios: str) -> dict[str, Any]:
    """DeepZero with keep ratios from ``ratios``; returns accuracy, queries and the ratios."""
    from zoopt.torch.cli_tasks import build_task, config_from_options
    from zoopt.torch.train import Trainer

    opts = config.train_options(ratios)
    task, info = build_task(opts)
    summary = Trainer(task, config_from_options(opts), opts.out, extra_summary=info).fit()
    return {
        "test_accuracy": summary["test_accuracy"],
        "queries": summary["queries"],
        "keep_ratios": summary["keep_ratios"],
    }


def run(config: RatiosComparisonConfig) -> dict[str, dict[str, Any]]:
    """Train once per ratio method; write ``comparison.json`` and print the accuracies."""
    results = {ratios: train_with_ratios(config, ratios) for ratios in config.ratios}
    Path(config.out).mkdir(parents=True, exist_ok=True)
    (Path(config.out) / "comparison.json").write_text(json.dumps(results, indent=2))
    print(
        f"\n{'ratios':>10}  test accuracy   (sparsity {config.sparsity:.0%}, "
        f"{config.epochs} epochs)"
    )
    for name, r in results.items():
        print(f"{name:>10}  {r['test_accuracy']:.4f}")
    return results


def parse_args(argv: list[str] | None = None) -> RatiosComparisonConfig:
    d = RatiosComparisonConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default=d.dataset, choices=DATASETS)
    ap.add_argument("--data-dir", default=d.data_dir)
    ap.add_argument("--model", default=d.model, choices=("cnn", "resnet20", "cnn8"))
    ap.add_argument("--ratios", nargs="+", default=list(d.ratios), choices=RATIOS)
    ap.add_argument("--sparsity", type=float, default=d.sparsity)
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--max-steps", type=int, default=d.max_steps)
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--out", default=d.out)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ns = ap.parse_args(argv)
    return RatiosComparisonConfig(**{**vars(ns), "ratios": tuple(ns.ratios)})


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
