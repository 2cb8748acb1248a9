"""What a training run computes (:class:`Recipe`) apart from how it runs (:class:`RunOptions`).

A :class:`Recipe` holds every setting that shapes the trajectory: the gradient source and its
knobs, the optimizer and its learning-rate schedule, the sparsity recipe, the batch size, the
seed, the length of the run. Two runs with equal recipes (and the same task) take the same
steps. :class:`RunOptions` holds what does not change a single step: progress output, plots,
checkpoint cadence, the query budget.

A resumed run must have the recipe it was checkpointed with. :func:`recipe_differences`
compares a stored recipe with a new one field by field, over :func:`dataclasses.fields`, so a
field added to :class:`Recipe` is checked without being listed anywhere; the one exception,
declared on the field itself (``metadata={"on_resume": "may change"}``), is ``epochs``: a
finished run may be continued for more epochs.

Torch-free; :class:`zoopt.torch.train.TrainConfig` is a ``Recipe`` plus ``RunOptions`` (one
flat frozen dataclass), and ``zoopt train``'s :class:`~zoopt.train_cli.TrainOptions` adds the
command's data, model and process settings to them. The choices of ``optimizer`` and
``lr_schedule`` are the names in :mod:`zoopt.registry`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, TypeVar

from . import registry

#: gradient sources of the trainer; "custom": the caller passes one (e.g. ZO-AE-DS)
METHODS = ("deepzero", "fo", "rge", "cge", "mezo", "forward-grad", "custom")
#: layer-wise keep ratios of ``method="deepzero"`` (:mod:`zoopt.sparsity`)
RATIOS = ("zo-grasp", "fo-grasp", "random", "uniform", "smart")

#: ``Field.metadata`` key: what a resumed run may do with the field (default: keep it equal)
ON_RESUME = "on_resume"
MAY_CHANGE = "may change"


@dataclass(frozen=True)
class Recipe:
    """Everything that shapes a training trajectory. Defaults follow the paper's
    ResNet-20/CIFAR-10 recipe.

    ``method`` picks the gradient source (``deepzero``: sparse CGE on a ZO-GraSP mask;
    ``cge``/``rge``: dense ZO estimates, RGE with ``rge_q`` seeded directions; ``mezo``: RGE
    with one direction (MeZO); ``forward-grad``: ``rge_q`` forward-mode directional
    derivatives (the first-order-memory baseline); ``fo``: autograd; ``custom``: given to
    the trainer). ``optimizer`` (a name of :data:`zoopt.registry.OPTIMIZERS`: ``sgd``,
    ``adam``, ``signsgd``; with ``momentum``: ZO-SGD-MMT) and ``lr_schedule``
    (:data:`zoopt.registry.SCHEDULES`: ``cosine`` with optional warmup, or ``constant``) the
    update; the optimizer gets each of its options that is a field here (``momentum``,
    ``nesterov``, ``weight_decay``). ``conservative``: ZO-SGD-Cons, each step is kept only
    if the loss on its minibatch does not rise (one more query per step).
    ``reshuffle_every`` counts epochs (the sparse mask is redrawn every that many epochs);
    ``max_steps_per_epoch`` truncates epochs for quick runs. ``batch_size``: ``None`` takes
    the task's; a number must be the task's. ``epochs`` may grow when a run is resumed.

    Raises:
        ValueError: naming the bad field and its value.
    """

    method: str = "deepzero"
    epochs: int = field(default=50, metadata={ON_RESUME: MAY_CHANGE})
    optimizer: str = "sgd"
    lr_schedule: str = "cosine"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    final_lr: float = 0.0
    mu: float = 5e-3
    scheme: str = "forward"
    sparsity: float = 0.9
    ratios: str = "zo-grasp"
    grasp_q: int = 192
    grasp_mu: float = 5e-3
    reshuffle_every: int = 5
    rge_q: int = 192
    conservative: bool = False
    seed: int = 0
    max_steps_per_epoch: int | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        check_recipe(self)

    @property
    def recipe(self) -> Recipe:
        """The :class:`Recipe` part of this value (itself for a plain ``Recipe``)."""
        return part(Recipe, self)

    def as_dict(self) -> dict[str, Any]:
        """The recipe's fields as plain values (what a checkpoint stores)."""
        return asdict(self.recipe)


def check_recipe(r: Recipe) -> None:
    """``ValueError`` naming the first bad field of ``r`` and its value."""
    for name, allowed in (
        ("method", METHODS),
        ("optimizer", tuple(registry.OPTIMIZERS)),
        ("lr_schedule", tuple(registry.SCHEDULES)),
        ("ratios", RATIOS),
    ):
        if getattr(r, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(r, name)!r}")
    if isinstance(r.epochs, bool) or not isinstance(r.epochs, int) or r.epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {r.epochs!r}")
    if not 0.0 <= r.sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {r.sparsity!r}")
    if not (r.lr >= 0 and math.isfinite(r.lr)):
        raise ValueError(f"lr must be a finite number >= 0, got {r.lr!r}")
    if not (r.mu > 0 and math.isfinite(r.mu)):
        raise ValueError(f"mu must be a finite number > 0, got {r.mu!r}")
    if not isinstance(r.reshuffle_every, int) or r.reshuffle_every < 1:
        raise ValueError(f"reshuffle_every must be an integer >= 1, got {r.reshuffle_every!r}")
    if not 0 <= r.warmup_epochs < r.epochs:
        raise ValueError(
            f"warmup_epochs must be in [0, epochs={r.epochs}), got {r.warmup_epochs!r}"
        )
    if r.max_steps_per_epoch is not None and r.max_steps_per_epoch < 1:
        raise ValueError(f"max_steps_per_epoch must be >= 1, got {r.max_steps_per_epoch!r}")
    if isinstance(r.rge_q, bool) or not isinstance(r.rge_q, int) or r.rge_q < 1:
        raise ValueError(f"rge_q must be an integer >= 1, got {r.rge_q!r}")
    if r.batch_size is not None and (
        isinstance(r.batch_size, bool) or not isinstance(r.batch_size, int) or r.batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive integer or None, got {r.batch_size!r}")


@dataclass(frozen=True)
class RunOptions:
    """How a run executes, never what it computes: changing these between a checkpoint and
    its resume is fine.

    Attributes:
        max_queries: stop (with a checkpoint) before a step would exceed this many queries;
            ``None``: no budget.
        checkpoint_every: also checkpoint every that many steps (0: at epoch ends and stops).
        progress: show a progress bar.
        plots: draw ``curves.png`` after every epoch.
    """

    max_queries: int | None = None
    checkpoint_every: int = 0
    progress: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        check_run_options(self)

    @property
    def run(self) -> RunOptions:
        """The :class:`RunOptions` part of this value (itself for a plain ``RunOptions``)."""
        return part(RunOptions, self)


def check_run_options(o: RunOptions) -> None:
    """``ValueError`` naming the first bad field of ``o`` and its value."""
    if o.max_queries is not None and (
        isinstance(o.max_queries, bool) or not isinstance(o.max_queries, int) or o.max_queries < 1
    ):
        raise ValueError(f"max_queries must be a positive integer, got {o.max_queries!r}")
    if (
        isinstance(o.checkpoint_every, bool)
        or not isinstance(o.checkpoint_every, int)
        or o.checkpoint_every < 0
    ):
        raise ValueError(f"checkpoint_every must be an integer >= 0, got {o.checkpoint_every!r}")


T = TypeVar("T")


def part(cls: type[T], value: Any) -> T:
    """The ``cls`` (a dataclass) made of ``value``'s fields of the same names: e.g. the
    :class:`Recipe` of a :class:`~zoopt.torch.train.TrainConfig`."""
    return cls(**{f.name: getattr(value, f.name) for f in fields(cls)})  # type: ignore[arg-type]


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    assert f.default_factory is not MISSING, f"Recipe.{f.name} needs a default"
    return f.default_factory()


def recipe_differences(saved: Mapping[str, Any], recipe: Recipe) -> dict[str, tuple[Any, Any]]:
    """``{name: (saved value, new value)}`` for each setting a resume must keep that differs.

    Every field of :class:`Recipe` is compared unless its metadata says it may change
    (``epochs``). A field missing from ``saved`` (a checkpoint older than the field) counts
    as its default, the behaviour before the field existed; a name in ``saved`` that is no
    field (a setting this version no longer has) differs from anything.
    """
    out: dict[str, tuple[Any, Any]] = {}
    for f in fields(Recipe):
        if f.metadata.get(ON_RESUME) == MAY_CHANGE:
            continue
        old, new = saved.get(f.name, _default(f)), getattr(recipe, f.name)
        if old != new:
            out[f.name] = (old, new)
    known = {f.name for f in fields(Recipe)}
    for name in sorted(set(saved) - known):
        out[name] = (saved[name], "no such setting")
    return out


def check_resume(saved: Mapping[str, Any], recipe: Recipe, source: str = "checkpoint") -> None:
    """``ValueError`` naming every setting where ``recipe`` differs from the ``saved`` one
    (:func:`recipe_differences`), with both values; nothing if they agree."""
    diff = recipe_differences(saved, recipe)
    if diff:
        was = ", ".join(f"{k}={old!r}" for k, (old, _) in diff.items())
        now = ", ".join(f"{k}={new!r}" for k, (_, new) in diff.items())
        raise ValueError(
            f"checkpoint {source} was written with {was}, but this run has {now}; resume with "
            "the same settings, or start a new run in another folder"
        )
