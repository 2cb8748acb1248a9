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
from pathlib import Path

from zoopt.train_cli import build_task, config_from_args, train_args

METHODS = ("fo", "cge", "rge")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits", choices=("digits", "cifar10"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=3, help="steps per epoch (0: full epochs)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/cge_vs_rge")
    ap.add_argument("--no-progress", action="store_true")
    cli = ap.parse_args(argv)

    from zoopt.torch.train import Trainer

    rows = []
    for width in cli.widths:
        for method in cli.methods:
            args = train_args(
                dataset=cli.dataset,
                data_dir=cli.data_dir,
                model="cnn8",
                width=width,
                method=method,
                sparsity=0.0,
                ratios="uniform",
                epochs=cli.epochs,
                batch_size=cli.batch_size,
                lr=cli.lr,
                rge_q=1,
                max_steps=cli.max_steps or None,
                seed=cli.seed,
                device=cli.device,
                no_progress=cli.no_progress,
            )
            task, info = build_task(args)
            args.rge_q = info["parameters"]  # RGE gets q = d: the same queries as CGE
            out = Path(cli.out) / f"w{width}-{method}"
            summary = Trainer(task, config_from_args(args), out, extra_summary=info).fit()
            row = {
                "width": width,
                "method": method,
                "parameters": info["parameters"],
                "test_accuracy": summary["test_accuracy"],
                "queries": summary["queries"],
                "wall_seconds": summary["wall_seconds"],
            }
            rows.append(row)
            print(json.dumps(row))
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cge_vs_rge.json").write_text(json.dumps(rows, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for method in cli.methods:
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
    fig.savefig(out / "cge_vs_rge.png", dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
