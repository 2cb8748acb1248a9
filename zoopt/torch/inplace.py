"""RGE with the parameters as the only copy of θ: MeZO's memory mode.

A step at the memory of inference (Malladi et al., 2023): the directions are regenerated
from one seed (:mod:`zoopt.directions`); each query adds ``s·u`` to the parameters, runs the
forward and subtracts it again; the update ``θ ← rule(θ, Σ cᵢuᵢ)`` is applied tensor by
tensor from the seeds. No flat vector of θ, no direction and no gradient is ever built.

The price is rounding drift: ``θ + s·u - s·u`` is not always θ in floating point, so after
many steps the parameters differ slightly from the exact trajectory (measured in
docs/large_models.md). When one more copy of the parameters fits, the exact mode keeps θ as
a flat ``x`` and restores from it (``ModuleOracle.eval_direction_steps``, used by
:func:`zoopt.step.step` with ``inplace=True`` and by the trainer).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..estimators import RGE, Estimate
from ..interrupts import deferred_interrupt
from ..optim import Optimizer, OptState
from .oracle import ModuleOracle


def flat_like(oracle: ModuleOracle) -> torch.Tensor:
    """A ``(dim,)`` tensor of the parameters' dtype and device that takes no memory (a
    stride-0 view of one element): what a plan needs to know of x when there is no x."""
    view = oracle.view
    return torch.zeros((), dtype=view.dtype, device=view.device).expand(view.dim)


@dataclass(frozen=True)
class InPlaceRGE:
    """MeZO's step: RGE on the parameters themselves, then an elementwise update rule.

    Args:
        estimator: the :class:`~zoopt.RGE` (MeZO: ``RGE(q=1, mu=1e-3, mu_mode="absolute")``;
            any ``dist`` and ``scheme``).
        optimizer: any elementwise rule of :mod:`zoopt.optim` (ZO-SGD: ``SGD``; ZO-SGD-MMT:
            ``SGD(momentum=...)``; ZO-SGD-Sign: ``SignSGD``; ZO-Adam: ``Adam``). Its buffers,
            if any, are flat arrays of d numbers (momentum: one, Adam: two).

    ``init()`` gives the optimizer's state; ``step(oracle, state, rng=...)`` returns the
    new state and the :class:`~zoopt.estimators.Estimate` (lazy gradient, ``fx``). Cost:
    ``queries_per_step`` forwards (q+1 for the forward scheme), 2 direction generations per
    query and q per update.
    """

    estimator: RGE
    optimizer: Optimizer

    def __post_init__(self) -> None:
        if not isinstance(self.estimator, RGE):
            raise TypeError(f"estimator must be a zoopt.RGE, got {self.estimator!r}")
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(f"optimizer must be a zoopt optimizer, got {self.optimizer!r}")

    def init(self) -> OptState:
        return self.optimizer.init()

    def queries_per_step(self, dim: int, *, fx_known: bool = False) -> int:
        return self.estimator.queries_per_step(dim, fx_known)

    def step(
        self,
        oracle: ModuleOracle,
        state: OptState,
        *,
        rng: np.random.Generator | int | None = None,
        fx: float | None = None,
    ) -> tuple[OptState, Estimate]:
        """One step on ``oracle``'s current minibatch; the parameters are updated in place.

        A Ctrl-C during the queries leaves the parameters as they were (each perturbation is
        undone on the way out); the update itself is held against Ctrl-C until it is whole.
        """
        if not isinstance(oracle, ModuleOracle):
            raise TypeError(f"oracle must be a zoopt.torch.ModuleOracle, got {oracle!r}")
        like = flat_like(oracle)
        plan = self.estimator.plan(like, rng=rng, fx=fx)
        assert plan.direction_steps is not None
        parts = []
        if plan.includes_base:
            parts.append(
                torch.tensor(
                    [oracle.value_in_place()], dtype=oracle.values_dtype, device=like.device
                )
            )
        parts.append(oracle.eval_direction_steps_in_place(plan.direction_steps))
        est = plan.finish(torch.cat(parts))
        with deferred_interrupt():
            new_state = self.optimizer.update_segments(state, oracle.view.segments(), est.gradient)
        return new_state, est
