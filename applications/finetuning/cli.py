"""Flags -> :class:`~applications.finetuning.config.FinetuneSettings`; ``main`` runs.

``zoopt experiment finetune`` (or ``python applications/finetune.py``) with no flags runs the
small default (one seed, a few hundred steps, under a minute on 2 CPU cores); the documented
larger run (3 seeds, docs/finetune.md)::

    zoopt experiment finetune --seeds 0 1 2 --pretrain-steps 1500 --fo-steps 1500 \\
        --rge-queries 6000 --cge-queries 500000 --evals 8 --test-images 10000 \\
        --out runs/finetune
"""

from __future__ import annotations

import argparse

from .config import DEFAULT_LR, METHODS, MODES, FinetuneSettings


def _lr_flag(method: str, mode: str) -> str:
    return f"--lr-{method}-{mode}"


def _lr_dest(method: str, mode: str) -> str:
    return f"lr_{method}_{mode}".replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    d = FinetuneSettings()
    ap = argparse.ArgumentParser(
        prog="zoopt experiment finetune",
        description="Pretrain a small CNN first-order on MNIST 60k, fine-tune it to "
        "Fashion-MNIST with ZO-SGD (MeZO), RGE q=16, ZO-Adam, DeepZero sparse CGE and first "
        "order, full and LoRA; accuracy vs queries and wall time (docs/finetune.md).",
    )
    ap.add_argument("--out", default="runs/finetune", help="output folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(d.methods))
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(d.modes))
    ap.add_argument("--image-size", type=int, default=d.image_size, help="side (area-resampled)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps)
    ap.add_argument("--fo-steps", type=int, default=d.fo_steps, help="first-order fine-tuning")
    ap.add_argument(
        "--rge-queries", type=int, default=d.rge_queries, help="budget of ZO-SGD, RGE, ZO-Adam"
    )
    ap.add_argument("--cge-queries", type=int, default=d.cge_queries, help="budget of DeepZero")
    ap.add_argument("--evals", type=int, default=d.evals, help="test evaluations per run")
    ap.add_argument(
        "--test-images", type=int, default=d.test_images, help="Fashion/MNIST test images (0: all)"
    )
    ap.add_argument("--lora-rank", type=int, default=d.lora_rank)
    ap.add_argument("--lora-impl", choices=("auto", "peft", "torch"), default=d.lora_impl)
    ap.add_argument("--mu", type=float, default=d.mu)
    ap.add_argument("--grasp-q", type=int, default=d.grasp_q)
    for mode in MODES:
        ap.add_argument(f"--sparsity-{mode}", type=float, default=d.sparsity[mode], help="DeepZero")
    for method in METHODS:
        for mode in MODES:
            ap.add_argument(_lr_flag(method, mode), type=float, default=DEFAULT_LR[method][mode])
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ap


def parse_args(argv: list[str] | None = None) -> tuple[FinetuneSettings, argparse.Namespace]:
    a = build_parser().parse_args(argv)
    settings = FinetuneSettings(
        image_size=a.image_size,
        seeds=tuple(a.seeds),
        methods=tuple(a.methods),
        modes=tuple(a.modes),
        batch_size=a.batch_size,
        pretrain_steps=a.pretrain_steps,
        fo_steps=a.fo_steps,
        rge_queries=a.rge_queries,
        cge_queries=a.cge_queries,
        evals=a.evals,
        test_images=a.test_images or None,
        lora_rank=a.lora_rank,
        mu=a.mu,
        lr={m: {mode: getattr(a, _lr_dest(m, mode)) for mode in MODES} for m in METHODS},
        sparsity={mode: getattr(a, f"sparsity_{mode}") for mode in MODES},
        grasp_q=a.grasp_q,
        lora_impl=a.lora_impl,
    )
    return settings, a


def main(argv: list[str] | None = None) -> int:
    """Run the experiment from command-line flags; prints the summary table; returns 0."""
    import warnings

    import torch

    from .experiment import run
    from .report import summary_table

    settings, a = parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", module="peft")  # peft's notes on a model it does not know
    result = run(settings, a.out, progress=a.progress)
    print("\n" + summary_table(result))
    print(f"\nresults.json, summary.md, finetune.png in {a.out} ({result['wall_seconds']:.0f} s)")
    return 0
