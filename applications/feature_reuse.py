"""Time per sparse-CGE step with and without feature reuse (paper Fig. 3).

Without feature reuse every query is a full forward of the perturbed network (the
reference implementation's loop); with it, the engine reuses every activation upstream of
the perturbed layer and batches the queries through the downstream stages. Both compute
the same values (checked here).

Embedded default (2 CPU cores, about a minute): the small digits CNN and ResNet-20 at a
CIFAR shape, a few hundred coordinates at 90% sparsity::

    python applications/feature_reuse.py --out runs/feature_reuse

Paper scale: ``--models resnet20 --batch 256 --coords 28217 --device cuda``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zoopt.torch.models import build_model
from zoopt.torch.oracle import ModuleOracle

SHAPES = {"smallcnn": (1, 8, 10), "resnet20": (3, 32, 10), "cnn8": (3, 32, 10)}


def time_step(model_name: str, batch: int, coords: int, sparsity: float, device: str, seed: int):
    channels, size, classes = SHAPES[model_name]
    torch.manual_seed(seed)
    model = build_model(model_name, num_classes=classes, in_channels=channels, image_size=size)
    model = model.to(device).train()
    inputs = torch.randn(batch, channels, size, size, device=device)
    targets = torch.randint(0, classes, (batch,), device=device)
    rng = np.random.default_rng(seed)
    result = {"model": model_name, "batch": batch}
    values = {}
    chosen = None  # the same coordinates for both timings
    for reuse in (True, False):
        oracle = ModuleOracle(model, F.cross_entropy, inputs, targets, engine=reuse)
        x = oracle.view.flatten()
        selected = int(round((1 - sparsity) * oracle.dim))
        k = min(coords, selected)
        if chosen is None:
            chosen = np.sort(rng.choice(oracle.dim, size=k, replace=False))
        oracle.base_value(x)
        t = time.perf_counter()
        values[reuse] = oracle.eval_coordinate_steps(x, chosen, 5e-3)
        seconds = time.perf_counter() - t
        key = "with_reuse" if reuse else "without_reuse"
        result[f"{key}_queries_per_second"] = k / seconds
        # a full step at this sparsity costs `selected` queries
        result[f"{key}_seconds_per_step"] = selected / (k / seconds)
        result["parameters"] = oracle.dim
        result["queries_per_step"] = selected
        result["timed_queries"] = k
    result["speedup"] = (
        result["without_reuse_seconds_per_step"] / result["with_reuse_seconds_per_step"]
    )
    result["max_abs_value_diff"] = float((values[True] - values[False]).abs().max())
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smallcnn", "resnet20"], choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--coords", type=int, default=300, help="coordinates timed per model")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/feature_reuse")
    args = ap.parse_args(argv)
    if not 0 <= args.sparsity < 1:
        raise SystemExit(f"--sparsity must be in [0, 1), got {args.sparsity}")
    rows = [
        time_step(m, args.batch, args.coords, args.sparsity, args.device, args.seed)
        for m in args.models
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "feature_reuse.json").write_text(json.dumps(rows, indent=2))
    for r in rows:
        print(json.dumps(r))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = np.arange(len(rows))
    ax.bar(xs - 0.2, [r["without_reuse_seconds_per_step"] for r in rows], 0.4, label="no reuse")
    ax.bar(xs + 0.2, [r["with_reuse_seconds_per_step"] for r in rows], 0.4, label="feature reuse")
    ax.set_xticks(xs, [r["model"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel(f"seconds per step ({args.sparsity:.0%} sparsity)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "feature_reuse.png", dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
