"""The settings of one fine-tuning run (frozen, validated) and the methods it compares.

:class:`FinetuneSettings` is everything the numbers depend on (stored in ``results.json``);
the CLI only maps flags onto it. :data:`METHODS` names each compared method and how the one
trainer (:class:`~zoopt.torch.train.Trainer`) runs it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

#: the two trainable sets: every parameter, or a LoRA adapter on ``fc1`` plus the head
MODES = ("full", "lora")


@dataclass(frozen=True)
class MethodSpec:
    """How one compared method runs through the Trainer.

    Attributes:
        label: the name in tables and plots.
        method: ``TrainConfig.method`` (``mezo``, ``rge``, ``deepzero``, ``fo``).
        optimizer: ``TrainConfig.optimizer`` (``sgd`` or ``adam``: ZO-Adam with a ZO method).
        momentum: SGD momentum (0 for plain ZO-SGD as in MeZO).
        rge_q: directions per step (``rge``).
        budget: which query budget applies: ``"rge"`` (the RGE family), ``"cge"`` (sparse CGE)
            or ``"steps"`` (first order: a number of steps, no queries).
    """

    label: str
    method: str
    optimizer: str
    momentum: float
    rge_q: int
    budget: str

    @property
    def zeroth_order(self) -> bool:
        return self.budget != "steps"


METHODS: dict[str, MethodSpec] = {
    "zo-sgd": MethodSpec("ZO-SGD (MeZO, RGE q=1 in place)", "mezo", "sgd", 0.0, 1, "rge"),
    "rge-q16": MethodSpec("RGE q=16 + SGD-momentum", "rge", "sgd", 0.9, 16, "rge"),
    "zo-adam": MethodSpec("ZO-Adam (RGE q=16)", "rge", "adam", 0.0, 16, "rge"),
    "deepzero": MethodSpec("DeepZero (ZO-GraSP + sparse CGE)", "deepzero", "sgd", 0.9, 1, "cge"),
    "fo": MethodSpec("first-order SGD-momentum", "fo", "sgd", 0.9, 1, "steps"),
}

#: learning rates per (method, mode), picked on seed 0 from a small grid at a 2,000-query (RGE
#: family) / 100,000-query (DeepZero) budget (docs/finetune.md lists the grid and the caveat)
DEFAULT_LR: dict[str, dict[str, float]] = {
    "zo-sgd": {"full": 3e-4, "lora": 1e-3},
    "rge-q16": {"full": 1e-3, "lora": 1e-3},
    "zo-adam": {"full": 3e-3, "lora": 1e-2},
    "deepzero": {"full": 0.05, "lora": 0.05},
    "fo": {"full": 0.05, "lora": 0.05},
}
#: DeepZero's gradient sparsity per mode (fraction of coordinates *not* queried per step)
DEFAULT_SPARSITY = {"full": 0.95, "lora": 0.8}


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything one run depends on.

    The default is the small setting ``zoopt experiment finetune`` runs with no flags (one
    seed, a few hundred steps; under a minute on 2 CPU cores); docs/finetune.md gives the
    documented larger command.

    Attributes:
        image_size: MNIST and Fashion-MNIST are area-resampled to this side (1..28).
        seeds: one full comparison per seed (pretraining included).
        methods, modes: what is compared (keys of :data:`METHODS`, :data:`MODES`).
        batch_size: minibatch of every step (pretraining and fine-tuning).
        pretrain_steps: first-order steps on MNIST 60k.
        fo_steps: first-order fine-tuning steps (the reference).
        rge_queries: query budget of each RGE-family run (ZO-SGD, RGE q=16, ZO-Adam).
        cge_queries: query budget of each DeepZero run (its queries are batched by the
            feature-reuse engine: far cheaper in wall time than a full forward each).
        evals: test evaluations per fine-tuning run (the curve's points, plus the last).
        test_images: Fashion-MNIST test images evaluated (``None``: all 10,000).
        lora_rank: rank of the adapter on ``fc1``.
        mu: finite-difference step of every ZO method.
        lr: learning rate per method and mode (defaults :data:`DEFAULT_LR`).
        sparsity: DeepZero's gradient sparsity per mode (defaults :data:`DEFAULT_SPARSITY`).
        grasp_q: ZO-GraSP directions (its queries count towards DeepZero's budget).
        lora_impl: ``"auto"`` (``peft`` if importable, else the plain-torch adapter),
            ``"peft"`` or ``"torch"``.
    """

    image_size: int = 14
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = tuple(METHODS)
    modes: tuple[str, ...] = MODES
    batch_size: int = 64
    pretrain_steps: int = 200
    fo_steps: int = 100
    rge_queries: int = 300
    cge_queries: int = 3000
    evals: int = 3
    test_images: int | None = 1000
    lora_rank: int = 4
    mu: float = 1e-3
    lr: dict[str, dict[str, float]] = field(default_factory=lambda: DEFAULT_LR)
    sparsity: dict[str, float] = field(default_factory=lambda: DEFAULT_SPARSITY)
    grasp_q: int = 16
    lora_impl: str = "auto"

    def __post_init__(self) -> None:
        if not 1 <= self.image_size <= 28 or isinstance(self.image_size, bool):
            raise ValueError(f"image_size must be in 1..28, got {self.image_size!r}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        for name, values, known in (
            ("methods", self.methods, METHODS),
            ("modes", self.modes, MODES),
        ):
            unknown = [v for v in values if v not in known]
            if not values or unknown:
                raise ValueError(
                    f"{name} must be a non-empty subset of {tuple(known)}, got {values!r}"
                )
        for name in ("batch_size", "pretrain_steps", "fo_steps", "rge_queries", "cge_queries",
                     "evals", "lora_rank", "grasp_q"):  # fmt: skip
            _positive_int(name, getattr(self, name))
        if self.test_images is not None:
            _positive_int("test_images", self.test_images)
        if not (self.mu > 0 and math.isfinite(self.mu)):
            raise ValueError(f"mu must be a finite number > 0, got {self.mu!r}")
        if self.lora_impl not in ("auto", "peft", "torch"):
            raise ValueError(f"lora_impl must be auto, peft or torch, got {self.lora_impl!r}")
        for m in self.methods:
            for mode in self.modes:
                lr = self.lr.get(m, {}).get(mode)
                if lr is None or not (lr > 0 and math.isfinite(lr)):
                    raise ValueError(f"lr[{m!r}][{mode!r}] must be a finite number > 0, got {lr!r}")
        for mode in self.modes:
            if not 0.0 <= self.sparsity.get(mode, -1.0) < 1.0:
                raise ValueError(f"sparsity[{mode!r}] must be in [0, 1)")

    def budget(self, method: str) -> int:
        """The run's budget: queries (ZO) or steps (first order)."""
        kind = METHODS[method].budget
        return {"rge": self.rge_queries, "cge": self.cge_queries, "steps": self.fo_steps}[kind]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seeds": list(self.seeds), "methods": list(self.methods),
                "modes": list(self.modes)}  # fmt: skip
