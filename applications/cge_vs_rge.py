"""CGE vs RGE as the model grows (paper Fig. 2).

Trains CNNs of growing width with first-order SGD, dense CGE (d + 1 queries per step) and
RGE with q = d directions (the same query budget), and reports test accuracy and wall time
against the number of parameters. The paper's finding: at equal queries CGE trains better,
and with feature reuse it is also faster than RGE, whose dense perturbations admit no reuse.

Embedded default (2 CPU cores, a few minutes): the 8-layer CNN at widths 1 and 2 on the
digits, one short epoch (RGE with q = d is the slow part)::

    python applications/cge_vs_rge.py --out runs/cge_vs_rge

Paper scale: ``--dataset cifar10 --data-dir DIR --widths 1 2 4 8 --epochs 50 --device cuda``
(drop ``--max-steps``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from zoopt.train_cli import DATASETS, TrainOptions

METHODS = ("fo", "cge", "rge")


@dataclass(frozen=True)
class CgeVsRgeConfig:
    """Which widths and methods to train, and the short recipe they share."""

    dataset: str = "digits"
    data_dir: str | None = None
    widths: tuple[int, ...] = (1, 2)
    methods: tuple[str, ...] = METHODS
    epochs: int = 1
    max_steps: int | None = 3  # steps per epoch; None: full epochs
    batch_size: int | None = None
    lr: float = 0.05
    device: str = "cpu"
    seed: int = 0
    out: str = "runs/cge_vs_rge"
    progress: bool = True

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"methods must be among {METHODS}, got {bad[0]!r}")
        bad_widths = [w for w in self.widths if not (isinstance(w, int) and w >= 1)]
        if bad_widths:
            raise ValueError(f"widths must be integers >= 1, got {bad_widths[0]!r}")

    def train_options(self, width: int, method: str) -> TrainOptions:
        return TrainOptions(
            dataset=self.dataset,
            data_dir=self.data_dir,
            model="cnn8",
            width=width,
            method=method,
            sparsity=0.0,
            ratios="uniform",
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            max_steps_per_epoch=self.max_steps,
            seed=self.seed,
            device=self.device,
            progress=self.progress,
            out=str(Path(self.out) / f"w{width}-{method}"),
        )


def train_one(config: CgeVsRgeConfig, width: int, method: str) -> dict[str, Any]:
    """Train the width-``width`` CNN with ``method``; RGE gets q = d directions (the same
    queries per step as CGE). Returns one row of the table."""
    from zoopt.torch.cli_tasks import build_task, config_from_options
    from zoopt.torch.train import Trainer

    opts = config.train_options(width, method)
    task, info = build_task(opts)
    opts = replace(opts, rge_q=info["parameters"])
    summary = Trainer(task, config_from_options(opts), opts.out, extra_summary=info).fit()
    return {
        "width": width,
        "method": method,
        "parameters": info["parameters"],
        "test_accuracy": summary["test_accuracy"],
        "queries": summary["queries"],
        "wall_seconds": summary["wall_seconds"],
    }


def run(config: CgeVsRgeConfig) -> list[dict[str, Any]]:
    """Train every (width, method); write ``cge_vs_rge.json`` and ``cge_vs_rge.png``."""
    rows = []
    for width in config.widths:
        for method in config.methods:
            row = train_one(config, width, method)
            rows.append(row)
            print(json.dumps(row))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cge_vs_rge.json").write_text(json.dumps(rows, indent=2))
    plot(rows, config.methods, out / "cge_vs_rge.png")
    return rows


def parse_args(argv: list[str] | None = None) -> CgeVsRgeConfig:
    d = CgeVsRgeConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default=d.dataset, choices=DATASETS)
    ap.add_argument("--data-dir", default=d.data_dir)
    ap.add_argument("--widths", type=int, nargs="+", default=list(d.widths))
    ap.add_argument("--methods", nargs="+", default=list(d.methods), choices=METHODS)
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--max-steps", type=int, default=d.max_steps, help="steps per epoch (0: full)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--out", default=d.out)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ns = ap.parse_args(argv)
    return CgeVsRgeConfig(
        **{
            **vars(ns),
            "widths": tuple(ns.widths),
            "methods": tuple(ns.methods),
            "max_steps": ns.max_steps or None,
        }
    )


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


def plot(rows: list[dict[str, Any]], methods: tuple[str, ...], path: Path) -> None:
    """Test accuracy and wall time against parameters, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for method in methods:
        rs = [r for r in rows if r["method"] == method]
        axes[0].plot(
            [r["parameters"] for r in rs], [r["test_accuracy"] for r in rs], "o-", label=method
        )
        axes[1].plot(
            [r["parameters"] for r in rs], [r["wall_seconds"] for r in rs], "o-", label=method
        )
    for ax, label in zip(axes, ("test accuracy", "wall seconds"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
