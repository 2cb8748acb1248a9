"""``zoopt train``: DeepZero / first-order / RGE / CGE training of image classifiers.

The configuration is :class:`TrainOptions`, a frozen dataclass; argparse only maps flags to
it (its defaults are the flags' defaults). Applications build their runs as
``TrainOptions(batch_size=64, ...)``, so every setting they do not choose is the command's
own default. Kept free of torch imports at module level so ``zoopt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

#: The built-in data sets; anything else given as ``--dataset`` is a path (see dataset_kind).
DATASETS = ("digits", "cifar10", "fashion-mnist", "mnist")
#: Default (epochs, batch size) per kind of data set.
DATASET_DEFAULTS = {
    "digits": (20, 64),
    "cifar10": (50, 256),
    "fashion-mnist": (20, 128),
    "mnist": (20, 128),
    "folder": (20, 64),
    "npz": (20, 64),
}
MODELS = ("cnn", "resnet20", "cnn8")
METHODS = ("deepzero", "fo", "rge", "cge", "mezo", "forward-grad")
OPTIMIZERS = ("sgd", "adam", "signsgd")
LR_SCHEDULES = ("cosine", "constant")
RATIOS = ("zo-grasp", "fo-grasp", "random", "uniform", "smart")


@dataclass(frozen=True)
class TrainOptions:
    """Everything ``zoopt train`` takes; see ``zoopt train --help`` for each field.

    ``dataset``: a built-in name (:data:`DATASETS`) or the path of an image folder or an
    ``.npz`` (:func:`dataset_kind`). ``epochs`` / ``batch_size`` ``None``: the data set's
    defaults (:data:`DATASET_DEFAULTS`: 50 / 256 on cifar10, 20 / 128 on mnist and
    fashion-mnist, 20 / 64 on digits and your own data).
    """

    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    model: str = "cnn"
    weights: str | None = None
    explain: bool = False
    width: int = 16
    method: str = "deepzero"
    optimizer: str = "sgd"
    lr_schedule: str = "cosine"
    sparsity: float = 0.9
    ratios: str = "zo-grasp"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    mu: float = 5e-3
    rge_q: int = 192
    conservative: bool = False
    trainable: str | None = None
    grasp_q: int = 192
    reshuffle_every: int = 5
    max_steps: int | None = None
    max_queries: int | None = None
    seed: int = 0
    device: str = "cpu"
    workers: int | None = None
    scheduler: str | None = None
    out: str | None = None
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        dataset_kind(self.dataset)  # a built-in name, an image folder or an .npz
        if self.image_size is not None and (
            isinstance(self.image_size, bool)
            or not isinstance(self.image_size, int)
            or self.image_size < 1
        ):
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}")
        for name, allowed in (
            ("method", METHODS),
            ("optimizer", OPTIMIZERS),
            ("lr_schedule", LR_SCHEDULES),
            ("ratios", RATIOS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def epochs_or_default(self) -> int:
        return self.epochs or DATASET_DEFAULTS[dataset_kind(self.dataset)][0]

    @property
    def batch_size_or_default(self) -> int:
        return self.batch_size or DATASET_DEFAULTS[dataset_kind(self.dataset)][1]


def dataset_kind(dataset: str) -> str:
    """What ``--dataset`` names: a built-in set (its name), else a path: ``"folder"`` (an
    image folder, one subfolder per class) or ``"npz"`` (a file ending in ``.npz``). Built-in
    names win: a folder called ``mnist`` is ``./mnist``.

    Raises:
        ValueError: a path that is neither an existing folder nor an existing ``.npz`` file.
    """
    from pathlib import Path

    if dataset in DATASETS:
        return dataset
    path = Path(str(dataset)).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file() and path.suffix.lower() == ".npz":
        return "npz"
    if path.is_file():
        why = "is a file but not an .npz"
    else:
        why = "is neither a folder nor a file" if path.exists() else "does not exist"
    raise ValueError(
        f"--dataset {str(dataset)!r} {why}: expected a built-in data set "
        f"({', '.join(DATASETS)}), an image folder (one subfolder of images per class) or an "
        ".npz with 'x' and 'y' arrays"
    )


_D = TrainOptions()


def add_train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train an image classifier with DeepZero (sparse CGE), FO SGD, RGE or CGE",
        description="Train an image classifier with DeepZero (ZO-GraSP ratios, dynamic sparse "
        "masks, sparse CGE with feature reuse), the first-order baseline, RGE or CGE. Writes "
        "DIR/summary.json, DIR/metrics.jsonl, DIR/curves.png and DIR/checkpoint.pt.",
    )
    _add_train_arguments(p)
    p.set_defaults(func=run_train)


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default=_D.dataset,
        metavar="NAME|PATH",
        help=f"a built-in data set ({', '.join(DATASETS)}; mnist = MNIST 60k; fashion-mnist and "
        "mnist are fetched once into the cache), or your own data: an image folder (one "
        "subfolder per class, optional train/ and test/) or an .npz with x and y arrays "
        "(docs/training.md, 'Your own data')",
    )
    p.add_argument(
        "--data-dir",
        default=_D.data_dir,
        help="CIFAR-10 python batches (cifar10, required); for fashion-mnist / mnist, a folder "
        "holding fashion_mnist.pyndb.gz / mnist.pyndb.gz (nothing is fetched then)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=_D.image_size,
        metavar="N",
        help="resample the images to N x N (area resampling; image folders: each image "
        "center-cropped to a square first, needed when their sizes differ); default: as stored",
    )
    p.add_argument(
        "--model",
        default=_D.model,
        help=f"one of {', '.join(MODELS)} (cnn = small CNN for digits), or your own model as "
        "path/to/file.py:factory (called with num_classes= if it takes it; see docs/your_model.md)",
    )
    p.add_argument(
        "--weights",
        default=_D.weights,
        help="initial weights: a state dict saved with torch.save (read with weights_only=True)",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="print how the engine evaluates each parameter tensor's queries, then exit",
    )
    p.add_argument("--width", type=int, default=_D.width, help="width of cnn8")
    p.add_argument("--method", choices=METHODS, default=_D.method)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=_D.optimizer)
    p.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=_D.lr_schedule,
        help="cosine decay (with --warmup-epochs) or a constant learning rate",
    )
    p.add_argument("--sparsity", type=float, default=_D.sparsity, help="gradient sparsity")
    p.add_argument(
        "--ratios", choices=RATIOS, default=_D.ratios, help="layer-wise keep ratios (deepzero)"
    )
    p.add_argument(
        "--epochs", type=int, default=_D.epochs, help="default: 50 cifar10, 20 the others"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=_D.batch_size,
        help="default: 256 cifar10, 128 mnist and fashion-mnist, 64 digits and your own data",
    )
    p.add_argument("--lr", type=float, default=_D.lr)
    p.add_argument("--momentum", type=float, default=_D.momentum)
    p.add_argument("--weight-decay", type=float, default=_D.weight_decay)
    p.add_argument("--warmup-epochs", type=int, default=_D.warmup_epochs)
    p.add_argument("--mu", type=float, default=_D.mu)
    p.add_argument(
        "--rge-q",
        type=int,
        default=_D.rge_q,
        help="directions per step of --method rge and forward-grad (mezo: 1)",
    )
    p.add_argument(
        "--conservative",
        action="store_true",
        help="ZO-SGD-Cons: keep a step only if the loss on its batch does not rise (one more "
        "query per step)",
    )
    p.add_argument(
        "--trainable",
        default=_D.trainable,
        metavar="REGEX",
        help="train only the parameters whose names match REGEX (re.search; e.g. 'lora_' or "
        "'fc'); the others are frozen (requires_grad=False). Default: those with requires_grad",
    )
    p.add_argument("--grasp-q", type=int, default=_D.grasp_q, help="RGE directions of ZO-GraSP")
    p.add_argument(
        "--reshuffle-every", type=int, default=_D.reshuffle_every, help="epochs between new masks"
    )
    p.add_argument("--max-steps", type=int, default=_D.max_steps, help="cap on steps per epoch")
    p.add_argument(
        "--max-queries", type=int, default=_D.max_queries, help="stop (with checkpoint) at this"
    )
    p.add_argument("--seed", type=int, default=_D.seed)
    p.add_argument("--device", default=_D.device, help="cpu or cuda")
    p.add_argument(
        "--workers",
        type=int,
        default=_D.workers,
        help="forward parallelization over N Dask worker processes (local cluster)",
    )
    p.add_argument(
        "--scheduler", default=_D.scheduler, help="an existing Dask cluster, e.g. tcp://host:8786"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """The parsed flags as :class:`TrainOptions` (the one place argparse meets the config)."""
    names = {f.name for f in dataclasses.fields(TrainOptions)}
    return TrainOptions(**{k: v for k, v in vars(args).items() if k in names})


def build_task(opts: TrainOptions) -> tuple[Any, dict[str, Any]]:
    """Data + model → a ClassificationTask (imports torch)."""
    import numpy as np
    import torch

    from .torch.tasks import ClassificationTask

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
    Numpy only: :mod:`zoopt.data` reads everything."""
    from pathlib import Path

    from . import data as zdata

    kind, size = dataset_kind(opts.dataset), opts.image_size
    if kind == "digits":
        split = zdata.load_digits_split(seed=opts.seed)
    elif kind == "cifar10":
        if opts.data_dir is None:
            raise ValueError(
                "--dataset cifar10 needs --data-dir (folder with the python pickle batches)"
            )
        split = zdata.load_cifar10(opts.data_dir)
    elif kind in ("fashion-mnist", "mnist"):
        spec = zdata.FASHION_MNIST_FILE if kind == "fashion-mnist" else zdata.MNIST60K_FILE
        path = None if opts.data_dir is None else Path(opts.data_dir) / spec.filename
        load = zdata.load_fashion_mnist if kind == "fashion-mnist" else zdata.load_mnist60k
        try:
            return load(size, path=path)
        except zdata.PackageFetchError as exc:  # offline, no cached copy: a clear CLI error
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
    from .torch.models import build_model
    from .torch.user_model import (
        build_user_model,
        check_model_output,
        is_model_spec,
        load_weights,
    )

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
        from .torch.params import select_trainable

        select_trainable(model, opts.trainable)
    return model


def explain(task: Any, opts: TrainOptions | None = None) -> str:
    """Which step runs (with ``opts``: the method's path and its memory) and the engine's
    plan on the task's first training batch (``zoopt train --explain``)."""
    import numpy as np

    oracle = task.oracle
    batch = next(iter(task.train_batches(0, np.random.default_rng(0))))
    oracle.set_batch(*batch)
    if opts is None:
        return oracle.explain()
    from .torch.train import Trainer, describe_path

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


def config_from_options(opts: TrainOptions) -> Any:
    """The trainer's recipe (:class:`~zoopt.torch.train.TrainConfig`) from the options."""
    from .torch.train import TrainConfig

    return TrainConfig(
        method=opts.method,
        epochs=opts.epochs_or_default,
        optimizer=opts.optimizer,
        lr_schedule=opts.lr_schedule,
        lr=opts.lr,
        momentum=opts.momentum,
        weight_decay=opts.weight_decay,
        warmup_epochs=opts.warmup_epochs,
        mu=opts.mu,
        sparsity=opts.sparsity,
        ratios=opts.ratios,
        rge_q=opts.rge_q,
        conservative=opts.conservative,
        grasp_q=opts.grasp_q,
        reshuffle_every=opts.reshuffle_every,
        seed=opts.seed,
        max_steps_per_epoch=opts.max_steps,
        max_queries=opts.max_queries,
        progress=opts.progress,
    )


def train(opts: TrainOptions) -> dict[str, Any]:
    """Run ``zoopt train`` with ``opts``; returns the summary."""
    import contextlib

    from .torch.train import Trainer

    if opts.out is None:
        raise ValueError("TrainOptions.out (the output folder) is required to train")
    from .torch.callbacks import check_out_dir

    check_out_dir(opts.out, label="--out")  # before the data and the model: fail fast
    config = config_from_options(opts)
    task, info = build_task(opts)
    print(
        f"zoopt train: {opts.method} on {opts.dataset} with {opts.model} "
        f"({info['parameters']} parameters) -> {opts.out}"
    )
    scale: Any = contextlib.nullcontext(None)
    if opts.workers is not None or opts.scheduler is not None:
        from .parallel import parallel_oracle

        scale = parallel_oracle(task.oracle, workers=opts.workers, scheduler=opts.scheduler)
        info["workers"] = opts.workers
    with scale as oracle:
        # built inside: a resumed query count must land on the parallel oracle
        trainer = Trainer(
            task, config, opts.out, resume=opts.resume, extra_summary=info, oracle=oracle
        )
        return trainer.fit()


def run_train(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    if opts.explain:
        task, _ = build_task(opts)
        print(explain(task, opts))
        return 0
    summary = train(opts)
    keys = ("method", "sparsity", "test_accuracy", "queries", "wall_seconds", "epochs_completed")
    print(json.dumps({k: summary.get(k) for k in keys}))
    return 0
