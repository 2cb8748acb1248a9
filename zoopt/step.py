"""One optimization step, used by ``minimize``, ``AskTell``, the trainer and every application.

A step is: a :class:`GradientSource` produces an :class:`~zoopt.estimators.Estimate` of the
gradient at ``x`` from an oracle, then the optimizer applies it::

    x_new, est = step(ZO(CGE(mu=5e-3)), SGD(lr=0.1), oracle, x, rng=rng, iteration=t)

Sources:

* :class:`ZO` -- zeroth-order: an estimator's queries (RGE, CGE, sparse CGE with coordinates
  per iteration, a μ schedule). Its :meth:`ZO.plan` is what ask/tell hands out.
* :class:`Autograd` -- first order: the oracle's own ``loss_and_grad`` (no ZO queries).
* anything else with ``estimate(oracle, x, *, fx, rng, iteration) -> Estimate`` and a
  ``wants_base_value`` flag (e.g. ZO-AE-DS's latent-space estimate in ``applications``;
  the forward gradient of :mod:`zoopt.torch.forward_gradient`).

ZO-Bench's optimizers are all this one step: ZO-SGD (``SGD``), ZO-SGD-MMT
(``SGD(momentum=...)``), ZO-SGD-Sign (``SignSGD``), ZO-Adam (``Adam``), and ZO-SGD-Cons
(:func:`conservative_step`: the step is kept only if the loss does not rise; its pieces
:func:`propose` and :func:`accepts` serve loops that query by themselves, like the trainer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ._array import Array, namespace
from .estimators import Estimate, Estimator, QueryPlan
from .optim import Optimizer, OptState
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


def update(optimizer: Optimizer, x: Array, est: Estimate, *, inplace: bool = False) -> Array:
    """Apply an estimate: the new ``x`` (``x`` itself is not modified unless ``inplace``).

    A seeded RGE estimate is applied slice by slice from its seeds (``est.gradient``): no
    gradient vector is built. ``inplace=True`` writes the new values into ``x`` (and the
    optimizer's buffers): the large-model step, whose only copy of θ beside the model is x.
    """
    return optimizer.step(x, est.gradient, inplace=inplace)


def step(
    source: GradientSource,
    optimizer: Optimizer,
    oracle: Any,
    x: Array,
    *,
    fx: float | None = None,
    rng: np.random.Generator | None = None,
    iteration: int = 0,
    inplace: bool = False,
) -> tuple[Array, Estimate]:
    """One step: the source's gradient estimate at ``x``, then the optimizer's update.

    Returns ``(x_new, estimate)``; ``estimate.fx`` is f(x) when the source knows it.
    ``inplace``: see :func:`update` (``x_new`` is then ``x``).
    """
    est = source.estimate(oracle, x, fx=fx, rng=rng, iteration=iteration)
    return update(optimizer, x, est, inplace=inplace), est


# -- ZO-SGD-Cons: a step that never raises the loss --------------------------------------------
#: Queries ZO-SGD-Cons adds to a step: f at the candidate (plus f(x) itself when neither the
#: caller nor the estimate knows it, e.g. the central scheme).
CONSERVATIVE_QUERIES = 1


def propose(optimizer: Optimizer, x: Array, est: Estimate) -> tuple[Array, OptState]:
    """The step ``est`` would take, as a candidate: ``(x_new, new_state)``, computed from
    ``optimizer.state`` without changing it or ``x`` (both stay valid if the candidate is
    rejected). Memory: one new array like ``x`` plus the rule's new buffers."""
    return optimizer.update(optimizer.state, x, est.gradient)


def accepts(fx: float, f_new: float) -> bool:
    """ZO-SGD-Cons's test: keep the candidate iff the loss does not rise (``f_new <= fx``);
    a non-finite ``f_new`` is a rise."""
    return bool(math.isfinite(f_new) and f_new <= fx)


def value_at(oracle: Any, x: Array) -> float:
    """``f(x)`` as one counted query of ``oracle`` (``oracle.batch`` of one row; running
    statistics, e.g. BatchNorm's, are not updated)."""
    xp = namespace(x)
    return float(oracle.batch(xp.reshape(x, (1, -1)))[0])


def conservative_step(
    source: GradientSource,
    optimizer: Optimizer,
    oracle: Any,
    x: Array,
    *,
    fx: float | None = None,
    rng: np.random.Generator | None = None,
    iteration: int = 0,
) -> tuple[Array, Estimate, bool]:
    """ZO-SGD-Cons (ZO-Bench, Zhang et al. 2024): one step, taken only if the loss does not
    rise on the same minibatch.

    The source's estimate at ``x``, then the candidate ``x_new`` (:func:`propose`), then one
    more query ``f(x_new)``. If ``f(x_new) > f(x)`` (:func:`accepts`) the step is rejected:
    ``x`` is returned and ``optimizer.state`` keeps its old value (the step counter does not
    advance, so a learning-rate schedule waits too); otherwise the optimizer's state becomes
    the candidate's.

    Returns ``(x or x_new, estimate, accepted)``. Queries: the source's, plus
    :data:`CONSERVATIVE_QUERIES` (one), plus one for ``f(x)`` when neither ``fx`` nor the
    estimate knows it. Memory: the candidate (one more array like ``x``) during the step.
    """
    est = source.estimate(oracle, x, fx=fx, rng=rng, iteration=iteration)
    f0 = est.fx if est.fx is not None else fx
    if f0 is None:
        f0 = value_at(oracle, x)
    x_new, state = propose(optimizer, x, est)
    if accepts(float(f0), value_at(oracle, x_new)):
        optimizer.state = state
        return x_new, est, True
    return x, est, False
