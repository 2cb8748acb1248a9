"""One optimization step, used by ``minimize``, ``AskTell``, the trainer and every application.

A step is: a :class:`GradientSource` produces an :class:`~zoopt.estimators.Estimate` of the
gradient at ``x`` from an oracle, then the optimizer applies it::

    x_new, est = step(ZO(CGE(mu=5e-3)), SGD(lr=0.1), oracle, x, rng=rng, iteration=t)

Sources:

* :class:`ZO` -- zeroth-order: an estimator's queries (RGE, CGE, sparse CGE with coordinates
  per iteration, a μ schedule). Its :meth:`ZO.plan` is what ask/tell hands out.
* :class:`Autograd` -- first order: the oracle's own ``loss_and_grad`` (no ZO queries).
* anything else with ``estimate(oracle, x, *, fx, rng, iteration) -> Estimate`` and a
  ``wants_base_value`` flag (e.g. ZO-AE-DS's latent-space estimate in ``applications``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ._array import Array
from .estimators import Estimate, Estimator, QueryPlan
from .optim import Optimizer
from .oracle import BaseOracle
from .schedules import Schedule, as_schedule


@runtime_checkable
class GradientSource(Protocol):
    """Where a step's gradient comes from.

    ``wants_base_value``: the trainer first calls ``oracle.base_value(x)`` (the one forward
    per step that may update state such as BatchNorm statistics) and passes it as ``fx``.
    """

    wants_base_value: bool

    def queries_per_step(self, dim: int, *, fx_known: bool = False, iteration: int = 0) -> int:
        """Queries one :meth:`estimate` at this iteration costs (0 for first order)."""
        ...

    def estimate(
        self,
        oracle: Any,
        x: Array,
        *,
        fx: float | None = None,
        rng: np.random.Generator | None = None,
        iteration: int = 0,
    ) -> Estimate: ...


@dataclass(frozen=True)
class ZO:
    """Zeroth-order gradient: ``estimator``'s queries to the oracle.

    Args:
        estimator: :class:`~zoopt.RGE` or :class:`~zoopt.CGE`.
        mu: optional schedule of the smoothing radius (iteration -> μ > 0).
        coords: optional ``iteration -> coordinates`` (dynamic sparse CGE, e.g. DeepZero's
            mask); only estimators that restrict to coordinates accept it.
    """

    estimator: Estimator
    mu: Schedule | None = None
    coords: Callable[[int], Any] | None = None
    wants_base_value: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.estimator, Estimator):
            raise TypeError(
                f"estimator must be a zoopt estimator (RGE, CGE), got {self.estimator!r}"
            )
        if self.mu is not None:
            object.__setattr__(self, "mu", as_schedule(self.mu, "mu", allow_zero=False))

    def queries_per_step(self, dim: int, *, fx_known: bool = False, iteration: int = 0) -> int:
        coords = None if self.coords is None else self.coords(iteration)
        return self.estimator.queries_per_step(dim, fx_known, coords=coords)

    def estimator_at(self, iteration: int) -> Estimator:
        return self.estimator if self.mu is None else self.estimator.with_mu(self.mu(iteration))

    def plan(
        self,
        x: Array,
        *,
        rng: np.random.Generator | None = None,
        fx: float | None = None,
        iteration: int = 0,
    ) -> QueryPlan:
        """The query points of this iteration's estimate (what ask/tell hands out)."""
        coords = None if self.coords is None else self.coords(iteration)
        return self.estimator_at(iteration).plan(x, rng=rng, fx=fx, coords=coords)

    def estimate(
        self,
        oracle: BaseOracle,
        x: Array,
        *,
        fx: float | None = None,
        rng: np.random.Generator | None = None,
        iteration: int = 0,
    ) -> Estimate:
        if oracle.dim != x.shape[0]:
            raise ValueError(f"x has {x.shape[0]} entries but the oracle has dim={oracle.dim}")
        plan = self.plan(x, rng=rng, fx=fx, iteration=iteration)
        return plan.finish(plan.evaluate(oracle))


@dataclass(frozen=True)
class Autograd:
    """First-order gradient: the oracle's ``loss_and_grad(x)`` (counts no ZO queries)."""

    wants_base_value: bool = False

    def queries_per_step(self, dim: int, *, fx_known: bool = False, iteration: int = 0) -> int:
        return 0

    def estimate(
        self,
        oracle: Any,
        x: Array,
        *,
        fx: float | None = None,
        rng: np.random.Generator | None = None,
        iteration: int = 0,
    ) -> Estimate:
        loss, grad = oracle.loss_and_grad(x)
        return Estimate(grad=grad, fx=float(loss), queries=0)


def update(optimizer: Optimizer, x: Array, est: Estimate) -> Array:
    """Apply an estimate: the new ``x`` (``x`` itself is not modified)."""
    return optimizer.step(x, est.grad)


def step(
    source: GradientSource,
    optimizer: Optimizer,
    oracle: Any,
    x: Array,
    *,
    fx: float | None = None,
    rng: np.random.Generator | None = None,
    iteration: int = 0,
) -> tuple[Array, Estimate]:
    """One step: the source's gradient estimate at ``x``, then the optimizer's update.

    Returns ``(x_new, estimate)``; ``estimate.fx`` is f(x) when the source knows it.
    """
    est = source.estimate(oracle, x, fx=fx, rng=rng, iteration=iteration)
    return update(optimizer, x, est), est
