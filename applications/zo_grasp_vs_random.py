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
from pathlib import Path

from zoopt.train_cli import build_task, config_from_args, train_args

RATIOS = ("zo-grasp", "random", "fo-grasp", "uniform")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits", choices=("digits", "cifar10"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--model", default="cnn", choices=("cnn", "resnet20", "cnn8"))
    ap.add_argument("--ratios", nargs="+", default=list(RATIOS[:3]), choices=RATIOS)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/zo_grasp_vs_random")
    ap.add_argument("--no-progress", action="store_true")
    cli = ap.parse_args(argv)

    from zoopt.torch.train import Trainer

    results = {}
    for ratios in cli.ratios:
        args = train_args(**{**vars(cli), "ratios": ratios})
        task, info = build_task(args)
        out = Path(cli.out) / ratios
        summary = Trainer(task, config_from_args(args), out, extra_summary=info).fit()
        results[ratios] = {
            "test_accuracy": summary["test_accuracy"],
            "queries": summary["queries"],
            "keep_ratios": summary["keep_ratios"],
        }
    Path(cli.out).mkdir(parents=True, exist_ok=True)
    (Path(cli.out) / "comparison.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'ratios':>10}  test accuracy   (sparsity {cli.sparsity:.0%}, {cli.epochs} epochs)")
    for name, r in results.items():
        print(f"{name:>10}  {r['test_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
