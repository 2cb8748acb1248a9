"""DeepZero image classification (paper Sec. 6.1, Table 1 / Fig. 4).

Trains the same network with DeepZero (ZO-GraSP layer-wise ratios → dynamic sparse masks
→ sparse CGE with feature reuse → SGD) and with the first-order baseline under the same
recipe, and prints both test accuracies.

Embedded default (2 CPU cores, a few minutes): scikit-learn's 8×8 digits, the small CNN,
90% gradient sparsity::

    python applications/image_classification.py --out runs/digits

Paper scale (ResNet-20 on CIFAR-10, recipe of the paper: SGD lr 0.1, momentum 0.9,
weight decay 5e-4, cosine, μ = 5e-3, 50 epochs, batch 256; one run per sparsity)::

    for s in 0.8 0.9 0.95 0.99; do
      zoopt train --dataset cifar10 --data-dir ~/data/cifar-10-batches-py --model resnet20 \
          --method deepzero --sparsity $s --epochs 50 --batch-size 256 --device cuda \
          --out runs/cifar10-deepzero-$s
    done
    zoopt train --dataset cifar10 --data-dir ~/data/cifar-10-batches-py --model resnet20 \
        --method fo --epochs 50 --batch-size 256 --device cuda --out runs/cifar10-fo

(paper: 86.46% at 90% sparsity, FO dense 92.85%).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zoopt.train_cli import build_task, config_from_args, train_args

# Embedded default recipe on digits: `zoopt train`'s defaults (the paper's optimizer settings,
# batch 64 and 20 epochs on digits), equal epochs for both methods.
EPOCHS, SPARSITY = 20, 0.9


def run(method: str, args: argparse.Namespace) -> dict:
    from zoopt.torch.train import Trainer

    ns = argparse.Namespace(**{**vars(args), "method": method})
    task, info = build_task(ns)
    out = Path(args.out) / method
    summary = Trainer(task, config_from_args(ns), out, resume=args.resume, extra_summary=info).fit()
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="DeepZero vs first-order image classification.")
    ap.add_argument("--out", default="runs/image_classification")
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--sparsity", type=float, default=SPARSITY)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (smoke runs)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    cli = ap.parse_args(argv)
    args = train_args(**vars(cli))

    results = {m: run(m, args) for m in ("deepzero", "fo")}
    dz, fo = results["deepzero"], results["fo"]
    ratio = dz["test_accuracy"] / fo["test_accuracy"] if fo["test_accuracy"] else float("nan")
    table = {
        "deepzero_test_accuracy": dz["test_accuracy"],
        "fo_test_accuracy": fo["test_accuracy"],
        "deepzero_over_fo": ratio,
        "deepzero_queries": dz["queries"],
        "deepzero_wall_seconds": dz["wall_seconds"],
        "fo_wall_seconds": fo["wall_seconds"],
        "sparsity": args.sparsity,
        "epochs": args.epochs,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "comparison.json").write_text(json.dumps(table, indent=2))
    print("\n" + "=" * 60)
    print(
        f"DeepZero ({args.sparsity:.0%} gradient sparsity): test accuracy {dz['test_accuracy']:.4f}"
        f"  ({dz['queries']:,} queries, {dz['wall_seconds']:.0f} s)"
    )
    print(
        f"First-order SGD baseline:            test accuracy {fo['test_accuracy']:.4f}"
        f"  ({fo['wall_seconds']:.0f} s)"
    )
    print(f"DeepZero / FO = {ratio:.3f}   (results in {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
