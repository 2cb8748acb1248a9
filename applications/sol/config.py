"""The settings of one ZO-SOL run (frozen, validated) and the run options that are not settings.

:class:`SolSettings` is everything the numbers depend on (stored in ``mae.json``);
:class:`RunOptions` is where the results go and how the process runs (not stored: they do not
change the numbers). The CLI only maps flags onto these two.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from zoopt.recipe import Recipe

if TYPE_CHECKING:
    from zoopt.torch.train import TrainConfig

METHODS = ("SRC", "NON", "FO-SOL", "ZO-SOL")
#: the methods that train a network (SRC is the coarse solver alone)
TRAINED_METHODS = ("NON", "FO-SOL", "ZO-SOL")
#: Um et al.'s Re layout: training Re spaced by factors of 2, test Re halfway (x1.5) between.
TRAIN_REYNOLDS = (100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0)
TEST_REYNOLDS = (150.0, 300.0, 600.0, 1200.0, 2400.0)
#: per-method learning rates picked by the rule of docs/zo_sol.md
DEFAULT_LR = {"NON": 0.1, "FO-SOL": 0.003, "ZO-SOL": 0.01}


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (not a bool); otherwise ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_network_shape(width: Any, depth: Any, kernel_size: Any) -> None:
    """The rules of :class:`CorrectionCNN`'s shape: positive ints, depth >= 2, odd kernel."""
    for name, value in (("width", width), ("depth", depth), ("kernel_size", kernel_size)):
        check_positive_int(name, value)
    if depth < 2:
        raise ValueError(f"depth must be >= 2, got {depth}")
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd ('same' padding), got {kernel_size}")


def _check_grid(name: str, value: Any) -> tuple[int, int]:
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise ValueError(f"{name} must be a pair (H, W) of positive ints, got {value!r}")
    return value


def _check_reynolds(name: str, values: Any) -> None:
    if not values or not all(
        isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in values
    ):
        raise ValueError(f"{name} must be a non-empty tuple of finite numbers > 0, got {values!r}")


@dataclass(frozen=True)
class SolSettings:
    """Everything one run depends on (stored in ``mae.json``).

    Grids are ``(H, W)``; ``frames`` recorded reference steps per simulation (after
    ``warmup`` fine steps); ``n_steps`` unrolled solver steps per training window;
    ``eval_steps`` steps of each test rollout (default all ``frames``). ``steps`` optimizer
    steps per method, the same for every trained method, and by default every step sees 16
    reference frames (NON: ``non_batch_size`` one-step pairs; SOL: ``windows_per_step`` windows of
    ``n_steps``); ``steps_per_epoch`` (the ZO mask is redrawn, the test MAE logged and a
    checkpoint written every epoch). Learning rates are per method (``lr``: method -> lr, kept
    read-only), each picked by one rule on this default without looking at the test set: the
    value of the grid 0.001, 0.003, 0.01, 0.02, 0.05, 0.1, 0.2 with the lowest final loss of
    the method's own objective on its whole training set (seed 0, 600 steps; see
    docs/zo_sol.md). The rest of the recipe is shared.

    Raises:
        ValueError: naming the bad setting and its value. The optimizer part (lr, momentum,
            mu, sparsity, ratios, ...) is checked by building the trained methods'
            :class:`~zoopt.recipe.Recipe` (see :meth:`recipe`; torch-free).
    """

    res: tuple[int, int] = (16, 32)
    fine_res: tuple[int, int] = (64, 128)
    train_reynolds: tuple[float, ...] = TRAIN_REYNOLDS
    test_reynolds: tuple[float, ...] = TEST_REYNOLDS
    frames: int = 100
    warmup: int = 400
    n_steps: int = 16
    eval_steps: int | None = None
    width: int = 8
    depth: int = 3
    kernel_size: int = 3
    steps: int = 600
    steps_per_epoch: int = 20
    windows_per_step: int = 1
    non_batch_size: int = 16
    lr: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_LR))
    momentum: float = 0.9
    weight_decay: float = 0.0
    mu: float = 5e-3
    sparsity: float = 0.95
    ratios: str = "zo-grasp"
    grasp_q: int = 192
    reshuffle_every: int = 1
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {self.methods}")
        _check_grid("res", self.res)
        _check_grid("fine_res", self.fine_res)
        _check_reynolds("train_reynolds", self.train_reynolds)
        _check_reynolds("test_reynolds", self.test_reynolds)
        overlap = sorted(set(self.train_reynolds) & set(self.test_reynolds))
        if overlap:
            raise ValueError(f"test Reynolds numbers {overlap} are also in the training set")
        for name in (
            "frames",
            "n_steps",
            "steps",
            "steps_per_epoch",
            "windows_per_step",
            "non_batch_size",
        ):
            check_positive_int(name, getattr(self, name))
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative int, got {self.warmup!r}")
        if self.n_steps > self.frames:
            raise ValueError(f"n_steps={self.n_steps} exceeds frames={self.frames}")
        if self.eval_steps is not None and not 1 <= self.eval_steps <= self.frames:
            raise ValueError(
                f"eval_steps must be in [1, frames={self.frames}], got {self.eval_steps}"
            )
        check_network_shape(self.width, self.depth, self.kernel_size)
        if not isinstance(self.lr, Mapping):
            raise ValueError(f"lr must be a mapping method -> learning rate, got {self.lr!r}")
        missing = [m for m in self.trained_methods if m not in self.lr]
        if missing:
            raise ValueError(f"lr has no learning rate for {missing}, got {dict(self.lr)}")
        # read-only, so that a frozen settings object cannot change under a run
        object.__setattr__(self, "lr", MappingProxyType(dict(self.lr)))
        for method in self.trained_methods:
            self.recipe(method)

    @property
    def epochs(self) -> int:
        return math.ceil(self.steps / self.steps_per_epoch)

    @property
    def trained_methods(self) -> tuple[str, ...]:
        """``methods`` without SRC, in order."""
        return tuple(m for m in self.methods if m in TRAINED_METHODS)

    def recipe(self, method: str) -> Recipe:
        """The training recipe of one trained method (``deepzero`` for ZO-SOL, else ``fo``)."""
        if method not in TRAINED_METHODS:
            raise ValueError(f"method must be one of {TRAINED_METHODS}, got {method!r}")
        return Recipe(
            method="deepzero" if method == "ZO-SOL" else "fo",
            epochs=self.epochs,
            lr=self.lr[method],
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            mu=self.mu,
            sparsity=self.sparsity,
            ratios=self.ratios,
            grasp_q=self.grasp_q,
            grasp_mu=self.mu,
            reshuffle_every=self.reshuffle_every,
            seed=self.seed,
            max_steps_per_epoch=self.steps_per_epoch,
        )

    def train_config(self, method: str, progress: bool) -> TrainConfig:
        """The Trainer's configuration of one trained method: its :meth:`recipe`, with
        progress output as asked and curve plots (imports torch)."""
        from zoopt.recipe import RunOptions as TrainerRunOptions
        from zoopt.torch.train import TrainConfig

        return TrainConfig.of(self.recipe(method), TrainerRunOptions(progress=progress))

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values, in field order (``mae.json``'s ``settings``)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = dict(value) if isinstance(value, Mapping) else value
        return out


@dataclass(frozen=True)
class RunOptions:
    """How a run executes, not what it computes.

    Attributes:
        out: the output folder (``mae.json``, figures, one Trainer folder per method).
        threads: torch intra-op threads (the solver itself uses 1).
        resume: continue each method's Trainer from its checkpoint in ``out``.
        progress: print progress.
    """

    out: Path = Path("runs/zo_sol")
    threads: int = 1
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        check_positive_int("threads", self.threads)
