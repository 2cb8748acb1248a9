"""``zoopt train``: DeepZero / first-order / RGE training of image classifiers.

Kept free of torch imports at module level so ``zoopt --help`` stays fast; the command
imports torch when it runs.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

DATASETS = ("digits", "cifar10")
MODELS = ("cnn", "resnet20", "cnn8")


def add_train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train an image classifier with DeepZero (sparse CGE), FO SGD or RGE",
        description="Train an image classifier with DeepZero (ZO-GraSP ratios, dynamic sparse "
        "masks, sparse CGE with feature reuse), the first-order baseline or RGE. Writes "
        "DIR/summary.json, DIR/metrics.jsonl, DIR/curves.png and DIR/checkpoint.pt.",
    )
    _add_train_arguments(p)
    p.set_defaults(func=run_train)


def train_args(**overrides: Any) -> argparse.Namespace:
    """The arguments of ``zoopt train``: its defaults, then ``overrides`` (by attribute name,
    e.g. ``batch_size=64``). Applications build their runs from this, so that every setting
    they do not choose is the CLI's own default rather than a copy of it.

    Raises:
        TypeError: an override that ``zoopt train`` does not have.
    """
    parser = argparse.ArgumentParser(add_help=False)
    _add_train_arguments(parser)
    args = parser.parse_args(["--out", ""])
    args.out = None
    unknown = sorted(set(overrides) - set(vars(args)))
    if unknown:
        raise TypeError(f"zoopt train has no argument(s) {', '.join(unknown)}")
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 python batches folder (cifar10)")
    p.add_argument(
        "--model",
        default="cnn",
        help=f"one of {', '.join(MODELS)} (cnn = small CNN for digits), or your own model as "
        "path/to/file.py:factory (called with num_classes= if it takes it; see docs/your_model.md)",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="initial weights: a state dict saved with torch.save (read with weights_only=True)",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="print how the engine evaluates each parameter tensor's queries, then exit",
    )
    p.add_argument("--width", type=int, default=16, help="width of cnn8")
    p.add_argument("--method", choices=("deepzero", "fo", "rge", "cge"), default="deepzero")
    p.add_argument("--sparsity", type=float, default=0.9, help="gradient sparsity (deepzero)")
    p.add_argument(
        "--ratios",
        choices=("zo-grasp", "fo-grasp", "random", "uniform", "smart"),
        default="zo-grasp",
        help="layer-wise keep ratios (deepzero)",
    )
    p.add_argument("--epochs", type=int, default=None, help="default: 50 (cifar10), 20 (digits)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="default: 256 (cifar10), 64 (digits)"
    )
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-epochs", type=int, default=0)
    p.add_argument("--mu", type=float, default=5e-3)
    p.add_argument("--rge-q", type=int, default=192, help="directions per RGE step")
    p.add_argument("--grasp-q", type=int, default=192, help="RGE directions of ZO-GraSP scoring")
    p.add_argument("--reshuffle-every", type=int, default=5, help="epochs between new masks")
    p.add_argument(
        "--max-steps", type=int, default=None, help="cap on steps per epoch (quick runs)"
    )
    p.add_argument(
        "--max-queries", type=int, default=None, help="stop (with checkpoint) at this budget"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="forward parallelization over N Dask worker processes (local cluster)",
    )
    p.add_argument(
        "--scheduler", default=None, help="use an existing Dask cluster, e.g. tcp://host:8786"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true")


def build_task(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Data + model → a ClassificationTask (imports torch)."""
    import torch

    from . import data as zdata
    from .torch.tasks import ClassificationTask

    torch.manual_seed(args.seed)
    if args.dataset == "digits":
        X_tr, y_tr, X_te, y_te = zdata.load_digits_split(seed=args.seed)
        augment = False
    else:
        if args.data_dir is None:
            raise ValueError(
                "--dataset cifar10 needs --data-dir (folder with the python pickle batches)"
            )
        X_tr, y_tr, X_te, y_te = zdata.load_cifar10(args.data_dir)
        augment = True
    num_classes = int(y_tr.max()) + 1
    model = _model_from_args(args, num_classes, X_tr)
    default_batch = 64 if args.dataset == "digits" else 256
    task = ClassificationTask(
        model,
        (X_tr, y_tr),
        (X_te, y_te),
        batch_size=args.batch_size or default_batch,
        augment=augment,
        device=args.device,
    )
    info = {
        "dataset": args.dataset,
        "model": args.model,
        "parameters": int(task.parameters_vector().numel()),
    }
    return task, info


def _model_from_args(args: argparse.Namespace, num_classes: int, X_train: Any) -> Any:
    """The built-in model by name, or the user's ``file.py:factory``; then ``--weights``."""
    import torch

    from .torch.models import build_model
    from .torch.user_model import build_user_model, is_model_spec, load_weights

    if is_model_spec(args.model):
        model = build_user_model(args.model, num_classes)
        with torch.no_grad():
            was = model.training
            logits = model.eval()(torch.as_tensor(X_train[:2], dtype=torch.float32))
            model.train(was)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, num_classes):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ValueError(
                f"model {args.model!r} maps images {tuple(X_train.shape[1:])} to {shape}; "
                f"expected logits (batch, {num_classes})"
            )
    elif args.model in MODELS:
        name = {"cnn": "smallcnn"}.get(args.model, args.model)
        options = {"width": args.width} if name == "cnn8" else {}
        model = build_model(
            name,
            num_classes=num_classes,
            in_channels=X_train.shape[1],
            image_size=X_train.shape[2],
            **options,
        )
    else:
        raise ValueError(
            f"unknown --model {args.model!r}; use one of {', '.join(MODELS)} or "
            "path/to/file.py:factory"
        )
    if args.weights is not None:
        load_weights(model, args.weights)
    return model


def explain(task: Any) -> str:
    """The engine's plan on the task's first training batch (``zoopt train --explain``)."""
    import numpy as np

    oracle = task.oracle
    batch = next(iter(task.train_batches(0, np.random.default_rng(0))))
    oracle.set_batch(*batch)
    return oracle.explain()


def config_from_args(args: argparse.Namespace) -> Any:
    from .torch.train import TrainConfig

    epochs = args.epochs or (20 if args.dataset == "digits" else 50)
    return TrainConfig(
        method=args.method,
        epochs=epochs,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        mu=args.mu,
        sparsity=args.sparsity,
        ratios=args.ratios,
        rge_q=args.rge_q,
        grasp_q=args.grasp_q,
        reshuffle_every=args.reshuffle_every,
        seed=args.seed,
        max_steps_per_epoch=args.max_steps,
        max_queries=args.max_queries,
        progress=not args.no_progress,
    )


def run_train(args: argparse.Namespace) -> int:
    import contextlib

    from .torch.train import Trainer

    config = config_from_args(args)
    task, info = build_task(args)
    if args.explain:
        print(explain(task))
        return 0
    print(
        f"zoopt train: {args.method} on {args.dataset} with {args.model} "
        f"({info['parameters']} parameters) -> {args.out}"
    )
    scale: Any = contextlib.nullcontext()
    if args.workers is not None or args.scheduler is not None:
        from .distributed import distributed_training

        scale = distributed_training(task, workers=args.workers, scheduler=args.scheduler)
        info["workers"] = args.workers
    with scale:
        # built inside: a resumed query count must land on the distributed oracle
        trainer = Trainer(task, config, args.out, resume=args.resume, extra_summary=info)
        summary = trainer.fit()
    keys = ("method", "sparsity", "test_accuracy", "queries", "wall_seconds", "epochs_completed")
    print(json.dumps({k: summary.get(k) for k in keys}))
    return 0
