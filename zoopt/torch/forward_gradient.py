"""The forward gradient: ZO-Bench's first-order-memory baseline.

``ĝ = (1/q) Σᵢ (∇f(x)·uᵢ) uᵢ`` with the directional derivatives ``∇f(x)·uᵢ`` computed
exactly by forward-mode automatic differentiation (``torch.func.jvp`` over
``torch.func.functional_call``): one forward pass with tangents per direction, no backward
pass and no stored activations (Baydin et al. 2022, "Gradients without backpropagation";
the forward-gradient baseline of ZO-Bench, Zhang et al. 2024). The directions are the
seeded ones of :mod:`zoopt.directions` (one seed drawn from the step's ``rng``, as a
seeded RGE step draws it), and the estimate is the same lazy ``Σ cᵢuᵢ`` that RGE returns,
so every optimizer applies it in place from the seeds.

Costs per step: ``q`` jvp passes (each about 2-3 forwards), counted in
``oracle.grad_evaluations``, not as ZO queries; memory: the model, x, one direction (the
tangents of all parameter tensors, regenerated per direction) and the forward-mode
activations of one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..directions import DirectionCombination, SeededDirections, SeededDist, draw_seed
from ..estimators import Estimate
from .oracle import ModuleOracle


@dataclass(frozen=True)
class ForwardGradient:
    """A :class:`~zoopt.step.GradientSource`: ``(1/q) Σᵢ (∇f·uᵢ) uᵢ`` by ``torch.func.jvp``.

    Args:
        q: directions (jvp passes) per estimate.
        dist: ``"gaussian"`` (N(0, I): ``E[uuᵀ] = I``, so the estimate is unbiased) or
            ``"rademacher"`` (±1 entries, also ``E[uuᵀ] = I``).
        update_stats: the first pass updates the module's running statistics (BatchNorm)
            as a training forward does; the trainer then needs no base value.

    Works on a :class:`~zoopt.torch.ModuleOracle` (its ``view``, ``module`` and
    :meth:`~zoopt.torch.ModuleOracle.functional_loss`). ``estimate`` returns
    ``Estimate(lazy=Σ cᵢuᵢ, fx=f(x), queries=0)`` and adds ``q`` to
    ``oracle.grad_evaluations``.
    """

    q: int = 1
    dist: SeededDist = "gaussian"
    update_stats: bool = True
    wants_base_value: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.q, bool) or not isinstance(self.q, int | np.integer) or self.q < 1:
            raise ValueError(f"q must be an integer >= 1, got {self.q!r}")
        if self.dist not in ("gaussian", "rademacher"):
            raise ValueError(f"dist must be 'gaussian' or 'rademacher', got {self.dist!r}")

    def queries_per_step(self, dim: int, *, fx_known: bool = False, iteration: int = 0) -> int:
        return 0

    def directions(self, dim: int, rng: np.random.Generator | int | None) -> SeededDirections:
        """The step's directions (one seed drawn from ``rng``, as :meth:`estimate` does)."""
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        return SeededDirections(draw_seed(gen), self.q, dim, self.dist)

    def estimate(
        self,
        oracle: Any,
        x: torch.Tensor,
        *,
        fx: float | None = None,
        rng: np.random.Generator | None = None,
        iteration: int = 0,
    ) -> Estimate:
        if not isinstance(oracle, ModuleOracle):
            raise TypeError(
                "the forward gradient needs a zoopt.torch.ModuleOracle (it differentiates the "
                f"module in forward mode), got {type(oracle).__name__}"
            )
        view = oracle.view
        xt = view.check_flat(x, "x").detach()
        if xt.device != view.device or xt.dtype != view.dtype:
            xt = xt.to(view.device, view.dtype)
        dirs = self.directions(view.dim, rng)
        primals = {g.name: t for g, t in zip(view.groups, view.split(xt), strict=True)}
        buffers = dict(oracle.module.named_buffers())
        functional = oracle.functional_loss()

        def loss(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
            own = {k: b.clone() for k, b in buffers.items()}  # updated in place: not captured
            return functional({**params, **own}), own

        coef = np.empty(self.q)
        f0: float | None = None
        new_buffers: dict[str, torch.Tensor] = {}
        for i in range(self.q):
            tangents = {
                g.name: dirs.chunk(i, g.start, g.stop, xt).view(g.shape) for g in view.groups
            }
            value, derivative, after = torch.func.jvp(loss, (primals,), (tangents,), has_aux=True)
            if i == 0:
                f0, new_buffers = float(value), after
            coef[i] = float(derivative) / self.q
            del tangents
        oracle.grad_evaluations += self.q
        if self.update_stats and new_buffers:
            with torch.no_grad():
                for k, b in buffers.items():
                    b.copy_(new_buffers[k])
        lazy = DirectionCombination(dirs, coef, xt)
        return Estimate(fx=f0, queries=0, lazy=lazy)
