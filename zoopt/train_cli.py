"""``zoopt train``: DeepZero / first-order / RGE / CGE training of image classifiers — its
flags and its configuration, torch-free.

The configuration is :class:`TrainOptions`, a frozen dataclass: a
:class:`~zoopt.recipe.Recipe` and :class:`~zoopt.recipe.RunOptions` (their fields, flat) plus
the command's data, model and process settings; argparse only maps flags to it (its
defaults are the flags' defaults). Applications build their runs as
``TrainOptions(batch_size=64, ...)``, so every setting they do not choose is the command's
own default. The torch half (data + model → task, the run) is
:mod:`zoopt.torch.cli_tasks`; this module never imports torch, so ``zoopt --help`` stays
fast and options can be parsed and checked without it.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from . import registry
from .recipe import METHODS as RECIPE_METHODS
from .recipe import RATIOS, Recipe, RunOptions, check_recipe, check_run_options

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
#: the recipe's methods but "custom" (a gradient source is code, not a flag)
METHODS = tuple(m for m in RECIPE_METHODS if m != "custom")


@dataclass(frozen=True)
class TrainOptions(RunOptions, Recipe):
    """Everything ``zoopt train`` takes; see ``zoopt train --help`` for each field.

    The fields of :class:`~zoopt.recipe.Recipe` (what the run computes) and
    :class:`~zoopt.recipe.RunOptions` (how it runs), then the command's own: the data, the
    model, the device and Dask workers, the output folder. :attr:`recipe` and :attr:`run`
    are the two parts the trainer gets.

    ``dataset``: a built-in name (:data:`DATASETS`) or the path of an image folder or an
    ``.npz`` (:func:`dataset_kind`). ``epochs`` / ``batch_size`` ``None``: the data set's
    defaults (:data:`DATASET_DEFAULTS`: 50 / 256 on cifar10, 20 / 128 on mnist and
    fashion-mnist, 20 / 64 on digits and your own data).

    Raises:
        ValueError: naming the bad field and its value (the recipe's checks included).
    """

    # unlike a Recipe's, None here: the data set's default (see recipe)
    epochs: int | None = None  # type: ignore[assignment]
    batch_size: int | None = None
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    model: str = "cnn"
    weights: str | None = None
    explain: bool = False
    width: int = 16
    trainable: str | None = None
    device: str = "cpu"
    workers: int | None = None
    scheduler: str | None = None
    out: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        dataset_kind(self.dataset)  # a built-in name, an image folder or an .npz
        if self.image_size is not None and (
            isinstance(self.image_size, bool)
            or not isinstance(self.image_size, int)
            or self.image_size < 1
        ):
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        check_recipe(self.recipe)
        check_run_options(self)

    @property
    def recipe(self) -> Recipe:
        """The run's :class:`~zoopt.recipe.Recipe`, ``epochs`` and ``batch_size`` resolved to
        the data set's defaults where ``None``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(Recipe)}
        return Recipe(
            **fields | {"epochs": self.epochs_or_default, "batch_size": self.batch_size_or_default}
        )

    @property
    def epochs_or_default(self) -> int:
        default = DATASET_DEFAULTS[dataset_kind(self.dataset)][0]
        return default if self.epochs is None else self.epochs

    @property
    def batch_size_or_default(self) -> int:
        default = DATASET_DEFAULTS[dataset_kind(self.dataset)][1]
        return default if self.batch_size is None else self.batch_size


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


def add_train_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``train`` with its flags to the subparsers ``sub``; returns it. What it runs is
    set by the caller (:mod:`zoopt.cli`: the torch half, :func:`zoopt.torch.cli_tasks.run`),
    so that this module never imports it."""
    p = sub.add_parser(
        "train",
        help="train an image classifier with DeepZero (sparse CGE), FO SGD, RGE or CGE",
        description="Train an image classifier with DeepZero (ZO-GraSP ratios, dynamic sparse "
        "masks, sparse CGE with feature reuse), the first-order baseline, RGE or CGE. Writes "
        "DIR/summary.json, DIR/metrics.jsonl, DIR/curves.png and DIR/checkpoint.pt.",
    )
    _add_train_arguments(p)
    return p


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
    p.add_argument("--optimizer", choices=tuple(registry.OPTIMIZERS), default=_D.optimizer)
    p.add_argument(
        "--lr-schedule",
        choices=tuple(registry.SCHEDULES),
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
    p.add_argument(
        "--max-steps",
        dest="max_steps_per_epoch",
        type=int,
        default=_D.max_steps_per_epoch,
        help="cap on steps per epoch",
    )
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
