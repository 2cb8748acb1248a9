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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoopt.train_cli import TrainOptions


@dataclass(frozen=True)
class ImageClassificationConfig:
    """The comparison's settings; every training setting not named here is ``zoopt train``'s
    default (the paper's optimizer recipe, batch 64 and 20 epochs on digits)."""

    out: str = "runs/image_classification"
    epochs: int = 20
    sparsity: float = 0.9
    seed: int = 0
    max_steps: int | None = None  # cap on steps per epoch (smoke runs)
    resume: bool = False
    progress: bool = True

    def train_options(self, method: str) -> TrainOptions:
        return TrainOptions(
            method=method,
            epochs=self.epochs,
            sparsity=self.sparsity,
            seed=self.seed,
            max_steps_per_epoch=self.max_steps,
            resume=self.resume,
            progress=self.progress,
            out=str(Path(self.out) / method),
        )


def train_method(config: ImageClassificationConfig, method: str) -> dict[str, Any]:
    """Train the small CNN with ``method`` (``deepzero`` or ``fo``); returns the summary."""
    from zoopt.torch.cli_tasks import build_task, config_from_options
    from zoopt.torch.train import Trainer

    opts = config.train_options(method)
    task, info = build_task(opts)
    trainer = Trainer(
        task, config_from_options(opts), opts.out, resume=opts.resume, extra_summary=info
    )
    return trainer.fit()


def compare(deepzero: dict[str, Any], fo: dict[str, Any], config: ImageClassificationConfig):
    """The comparison table (what ``comparison.json`` holds)."""
    fo_acc = fo["test_accuracy"]
    return {
        "deepzero_test_accuracy": deepzero["test_accuracy"],
        "fo_test_accuracy": fo_acc,
        "deepzero_over_fo": deepzero["test_accuracy"] / fo_acc if fo_acc else float("nan"),
        "deepzero_queries": deepzero["queries"],
        "deepzero_wall_seconds": deepzero["wall_seconds"],
        "fo_wall_seconds": fo["wall_seconds"],
        "sparsity": config.sparsity,
        "epochs": config.epochs,
    }


def run(config: ImageClassificationConfig) -> dict[str, Any]:
    """Train both methods, write ``OUT/comparison.json``, print the comparison."""
    dz, fo = (train_method(config, m) for m in ("deepzero", "fo"))
    table = compare(dz, fo, config)
    Path(config.out).mkdir(parents=True, exist_ok=True)
    (Path(config.out) / "comparison.json").write_text(json.dumps(table, indent=2))
    print("\n" + "=" * 60)
    print(
        f"DeepZero ({config.sparsity:.0%} gradient sparsity): test accuracy "
        f"{dz['test_accuracy']:.4f}  ({dz['queries']:,} queries, {dz['wall_seconds']:.0f} s)"
    )
    print(
        f"First-order SGD baseline:            test accuracy {fo['test_accuracy']:.4f}"
        f"  ({fo['wall_seconds']:.0f} s)"
    )
    print(f"DeepZero / FO = {table['deepzero_over_fo']:.3f}   (results in {config.out})")
    return table


def parse_args(argv: list[str] | None = None) -> ImageClassificationConfig:
    d = ImageClassificationConfig()
    ap = argparse.ArgumentParser(description="DeepZero vs first-order image classification.")
    ap.add_argument("--out", default=d.out)
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--sparsity", type=float, default=d.sparsity)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--max-steps", type=int, default=d.max_steps, help="cap steps per epoch")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ImageClassificationConfig(**vars(ap.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
