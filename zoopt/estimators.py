"""Zeroth-order gradient estimators.

An estimator is an immutable value object. ``estimate(oracle, x)`` returns an
:class:`Estimate`; the same computation is split in two for ask/tell use:
``plan(x, rng=..., fx=...)`` gives a :class:`QueryPlan` whose points are sent to the
oracle (in chunks) and whose ``finish(values)`` returns the estimate.

Formulas (x ∈ R^d, μ > 0, u_i random directions, e_i unit vectors):

=====================  ===============================================================  ==========
estimator              gradient estimate                                                 queries
=====================  ===============================================================  ==========
RGE forward            (φ/q) Σ_i [f(x+μu_i) − f(x)]/μ · u_i                              q + 1
RGE central            (φ/q) Σ_i [f(x+μu_i) − f(x−μu_i)]/(2μ) · u_i                      2q
RGE antithetic         (φ/q) Σ_{i≤q/2} [f(x+μu_i) − f(x−μu_i)]/μ · u_i  (q even)          q
CGE forward            Σ_{i∈S} [f(x+μe_i) − f(x)]/μ · e_i                                |S| + 1
CGE central            Σ_{i∈S} [f(x+μe_i) − f(x−μe_i)]/(2μ) · e_i                        2|S|
=====================  ===============================================================  ==========

φ = 1 for Gaussian and Rademacher directions, φ = d for directions uniform on the unit
sphere. The "+1" is f(x), skipped when the caller passes a known ``fx``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ._array import Array, device_of, itemsize, namespace, to_numpy
from ._coords import check_coords
from .directions import (
    DirectionCombination,
    DirectionSteps,
    SeededDirections,
    draw_seed,
)
from .oracle import BaseOracle

Direction = Literal["gaussian", "sphere", "rademacher"]
RGEScheme = Literal["forward", "central", "antithetic"]
MuMode = Literal["direction", "absolute"]
CGEScheme = Literal["forward", "central"]


class Estimate:
    """Result of one gradient estimate.

    Attributes:
        grad: gradient estimate, shape ``(d,)``, same array type and device as ``x``. For a
            seeded RGE estimate it is built on first access (O(d) memory, q regenerations).
        gradient: what an optimizer should take: the lazy ``Σ cᵢuᵢ``
            (:class:`~zoopt.directions.DirectionCombination`) when there is one, else
            ``grad`` -- applying the lazy form never builds a gradient vector.
        fx: f(x) if it was evaluated or given, else ``None`` (central schemes).
        queries: oracle queries this estimate spent.
    """

    __slots__ = ("_grad", "fx", "queries", "lazy")

    def __init__(
        self,
        grad: Array | None = None,
        fx: float | None = None,
        queries: int = 0,
        *,
        lazy: DirectionCombination | None = None,
    ):
        if grad is None and lazy is None:
            raise ValueError("an Estimate needs a grad or a lazy gradient")
        self._grad = grad
        self.fx = fx
        self.queries = queries
        self.lazy = lazy

    @property
    def grad(self) -> Array:
        if self._grad is None:
            assert self.lazy is not None
            self._grad = self.lazy.dense()
        return self._grad

    @property
    def gradient(self) -> Array | DirectionCombination:
        return self.lazy if self.lazy is not None and self._grad is None else self.grad

    def __repr__(self) -> str:
        kind = "lazy" if self._grad is None else "dense"
        return f"Estimate({kind} grad, fx={self.fx}, queries={self.queries})"


def check_mu(mu: Any) -> float:
    """``mu`` as a float if it is a finite number > 0 (TypeError / ValueError otherwise)."""
    if isinstance(mu, bool) or not isinstance(mu, int | float | np.floating | np.integer):
        raise TypeError(f"mu must be a number, got {mu!r}")
    if not math.isfinite(mu) or mu <= 0:
        raise ValueError(f"mu must be a finite number > 0, got {mu!r}")
    return float(mu)


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


@dataclass
class QueryPlan:
    """The points one estimate needs, built lazily in chunks.

    ``n`` points in all; ``points(start, stop)`` returns rows ``start:stop`` as an
    ``(stop-start, d)`` array of x's type; ``finish(values)`` turns the ``n`` values into an
    :class:`Estimate`. ``coord_steps`` is set for coordinate plans so oracles with a fast
    path (``eval_coordinate_steps``) can skip materializing points.
    """

    x: Array
    n: int
    points: Callable[[int, int], Array]
    finish: Callable[[Array], Estimate]
    #: ``[(coords, step), ...]`` blocks after an optional base point (CGE only).
    coord_steps: list[tuple[np.ndarray, float]] | None = None
    includes_base: bool = False
    #: ``"gradient"`` (a gradient estimate's points) or ``"values"`` (e.g. a line search's)
    kind: str = "gradient"
    #: the perturbed rows as seeds and steps (seeded RGE): after an optional base point,
    #: row r is ``x + steps[r]·u_{index[r]}``; oracles with ``eval_direction_steps`` perturb
    #: in place instead of receiving points
    direction_steps: DirectionSteps | None = None

    def all_points(self) -> Array:
        """Every point as one ``(n, d)`` array (for ask/tell; mind the memory at large n·d)."""
        return self.points(0, self.n)

    def evaluate(self, oracle: BaseOracle, max_batch_bytes: int | None = None) -> Array:
        """Send the plan's points to ``oracle`` in memory-capped chunks; returns ``(n,)`` values."""
        x = self.x
        xp = namespace(x)
        if self.coord_steps is not None:  # oracles with structure answer these fast
            parts = []
            if self.includes_base:
                parts.append(oracle.batch(xp.reshape(x, (1, -1))))
            for coords, step in self.coord_steps:
                parts.append(oracle.eval_coordinate_steps(x, coords, step))
            parts = [xp.asarray(p, device=device_of(x)) for p in parts if p.shape[0] > 0]
            return xp.concat(parts) if parts else xp.zeros((0,), dtype=x.dtype, device=device_of(x))
        if self.direction_steps is not None:
            parts = []
            if self.includes_base:
                parts.append(oracle.batch(xp.reshape(x, (1, -1))))
            parts.append(oracle.eval_direction_steps(x, self.direction_steps))
            parts = [xp.asarray(p, device=device_of(x)) for p in parts if p.shape[0] > 0]
            return xp.concat(parts) if len(parts) > 1 else parts[0]
        cap = max_batch_bytes or oracle.max_batch_bytes
        rows = max(1, cap // max(1, x.shape[0] * itemsize(x)))
        out = [oracle.batch(self.points(s, min(s + rows, self.n))) for s in range(0, self.n, rows)]
        out = [xp.asarray(v, device=device_of(x)) for v in out]
        return xp.concat(out) if len(out) > 1 else out[0]


class Estimator:
    """Base class: ``estimate`` = ``plan`` → evaluate in chunks → ``finish``."""

    mu: float

    def plan(
        self,
        x: Array,
        *,
        rng: np.random.Generator | int | None = None,
        fx: float | None = None,
        coords: Any = None,
    ) -> QueryPlan:  # pragma: no cover - abstract
        """The points of one estimate at ``x``: ``rng`` draws random directions, ``fx``
        (f(x), if known) saves the base query, ``coords`` restricts coordinate estimators to
        a set of coordinates (estimators that cannot restrict refuse it)."""
        raise NotImplementedError

    def queries_per_step(
        self, dim: int, fx_known: bool = False, coords: Any = None
    ) -> int:  # pragma: no cover
        """Queries of one estimate in dimension ``dim`` (``coords``: as for :meth:`plan`)."""
        raise NotImplementedError

    def estimate(
        self,
        oracle: BaseOracle,
        x: Array,
        *,
        rng: np.random.Generator | int | None = None,
        fx: float | None = None,
        **plan_options: Any,
    ) -> Estimate:
        """Estimate ∇f(x) by querying ``oracle``.

        Args:
            oracle: the black box (``oracle.dim == x.shape[0]``).
            x: the point, shape ``(d,)`` (numpy, torch or CuPy; the gradient has the same type).
            rng: random generator or seed for random directions (ignored by CGE).
            fx: f(x) if already known; saves one query in forward schemes.
            plan_options: ``coords=`` (sparse CGE).
        """
        if oracle.dim != x.shape[0]:
            raise ValueError(f"x has {x.shape[0]} entries but the oracle has dim={oracle.dim}")
        plan = self.plan(x, rng=rng, fx=fx, **plan_options)
        return plan.finish(plan.evaluate(oracle))

    def with_mu(self, mu: float) -> Estimator:
        """A copy with another smoothing radius (for μ schedules)."""
        return dataclasses.replace(self, mu=mu)


@dataclass(frozen=True)
class RGE(Estimator):
    """Randomized gradient estimator over ``q`` random directions.

    Args:
        q: number of directions (function queries for ``antithetic``; must be even then).
        mu: smoothing radius μ > 0.
        dist: ``"gaussian"`` (N(0, I)), ``"sphere"`` (uniform on the unit sphere, scaled by d)
            or ``"rademacher"`` (±1 entries).
        scheme: ``"forward"``, ``"central"`` or ``"antithetic"`` (see the module table).
        mu_mode: ``"direction"`` (default): each direction ``u_i`` is stepped by
            ``h_i = μ/‖u_i‖``, so every perturbation has length μ whatever d is (a Gaussian
            direction has length ≈ √d; a fixed μ would perturb by μ√d at d = 1000 and bias
            the estimate). The estimate keeps its expectation ``∇f``: the difference quotient
            divides by ``h_i``. ``"absolute"``: the step is ``μ·u_i`` as in the papers'
            formula (DeepZero's trainer uses it). Directions on the sphere have unit length,
            so both modes agree for ``dist="sphere"``.
    """

    q: int = 10
    mu: float = 5e-3
    dist: Direction = "gaussian"
    scheme: RGEScheme = "forward"
    mu_mode: MuMode = "direction"

    def __post_init__(self) -> None:
        if isinstance(self.q, bool) or not isinstance(self.q, int | np.integer) or self.q < 1:
            raise ValueError(f"q must be an integer >= 1, got {self.q!r}")
        object.__setattr__(self, "mu", check_mu(self.mu))
        if self.dist not in ("gaussian", "sphere", "rademacher"):
            raise ValueError(
                f"dist must be 'gaussian', 'sphere' or 'rademacher', got {self.dist!r}"
            )
        if self.scheme not in ("forward", "central", "antithetic"):
            raise ValueError(
                f"scheme must be 'forward', 'central' or 'antithetic', got {self.scheme!r}"
            )
        if self.mu_mode not in ("direction", "absolute"):
            raise ValueError(f"mu_mode must be 'direction' or 'absolute', got {self.mu_mode!r}")
        if self.scheme == "antithetic" and self.q % 2:
            raise ValueError(
                f"the antithetic scheme needs an even q (mirrored pairs), got q={self.q}"
            )

    @property
    def n_directions(self) -> int:
        return self.q // 2 if self.scheme == "antithetic" else self.q

    def queries_per_step(self, dim: int, fx_known: bool = False, coords: Any = None) -> int:
        if coords is not None:
            raise ValueError("RGE perturbs all coordinates at once and takes no coords")
        if self.scheme == "forward":
            return self.q + (0 if fx_known else 1)
        return 2 * self.q if self.scheme == "central" else self.q

    def seeded(self, dim: int, seed: int) -> SeededDirections:
        """The step's raw directions: Gaussian (also for ``"sphere"``, normalized by the
        estimator) or Rademacher, regenerated from ``seed`` (see :mod:`zoopt.directions`)."""
        base = "rademacher" if self.dist == "rademacher" else "gaussian"
        return SeededDirections(seed, self.n_directions, dim, base)

    def directions(self, dim: int, rng: np.random.Generator | int | None) -> np.ndarray:
        """The ``(n_directions, dim)`` float64 directions a :meth:`plan` with this ``rng``
        uses, as one host matrix (a reference for tests and small problems: a plan never
        builds it). ``rng`` advances as in :meth:`plan` (one seed drawn)."""
        raw = self.seeded(dim, draw_seed(_as_rng(rng)))
        host = np.zeros(1)
        u = np.stack([raw.dense(i, host) for i in range(raw.count)])
        if self.dist == "sphere":
            u /= raw.norms(host)[:, None]
        return u

    def plan(
        self,
        x: Array,
        *,
        rng: np.random.Generator | int | None = None,
        fx: float | None = None,
        coords: Any = None,
    ) -> QueryPlan:
        """The points of one estimate. The directions are seeded (one seed drawn from
        ``rng``) and regenerated slice by slice: the plan holds O(q) numbers, ``points`` builds
        only the rows asked for, and ``finish`` returns a lazy ``Σ cᵢuᵢ``."""
        if coords is not None:
            raise ValueError(
                "RGE perturbs all coordinates at once and takes no coords; use CGE for a "
                "coordinate subset"
            )
        xp = namespace(x)
        d = x.shape[0]
        raw = self.seeded(d, draw_seed(_as_rng(rng)))
        m = raw.count
        mu = self.mu
        # u_i = raw_i (gaussian, rademacher) or raw_i/‖raw_i‖ (sphere). Points are built as
        # x + s_i·raw_i: s_i = μ/‖raw_i‖ for the sphere and for mu_mode="direction" (every
        # perturbation has length μ), s_i = μ for "absolute" (the paper's μ·u_i).
        by_length = self.dist == "sphere" or self.mu_mode == "direction"
        norms = raw.norms(x) if by_length else None
        s = mu / np.where(norms > 0, norms, 1.0) if norms is not None else np.full(m, mu)
        # the difference quotient divides by the step along u_i: h_i = μ/‖u_i‖ (direction
        # mode), μ (sphere, absolute); the raw coefficient adds the sphere's 1/‖raw_i‖
        if self.dist == "sphere":
            h, to_raw = np.full(m, mu), 1.0 / np.where(norms > 0, norms, 1.0)
        else:
            h, to_raw = s, np.ones(m)
        scale = (d if self.dist == "sphere" else 1.0) / self.q
        forward = self.scheme == "forward"
        need_base = forward and fx is None
        # Point layout: [x]? then x + s_i·raw_i (i < m), then (central/antithetic) x - s_i·raw_i.
        offset = 1 if need_base else 0
        n = offset + (m if forward else 2 * m)
        index = np.arange(m) if forward else np.concatenate([np.arange(m), np.arange(m)])
        signed = s if forward else np.concatenate([s, -s])
        perturbed = DirectionSteps(raw, index.astype(np.int64), signed.astype(np.float64))

        def points(start: int, stop: int) -> Array:
            rows = []
            if start < offset:
                rows.append(xp.reshape(x, (1, d)))
            lo, hi = max(start, offset) - offset, stop - offset
            if hi > lo:
                rows.append(perturbed.rows(lo, hi).points(x))
            return rows[0] if len(rows) == 1 else xp.concat(rows)

        def finish(values: Array) -> Estimate:
            values = _values_for_differences(xp, values, x)
            if values.shape[0] != n:
                raise ValueError(f"expected {n} values for this plan, got {values.shape[0]}")
            host = np.asarray(to_numpy(values), dtype=np.float64)
            base = float(host[0]) if need_base else fx
            # quotients on the host in float64: a step rounded to x's dtype (float32) would
            # bias every quotient
            if forward:
                coef = (host[offset:] - base) / h
            elif self.scheme == "central":
                coef = (host[:m] - host[m:]) / (2 * h)
            else:  # antithetic: mirrored forward differences, f(x) cancels
                coef = (host[:m] - host[m:]) / h
            lazy = DirectionCombination(raw, scale * coef * to_raw, x)
            return Estimate(fx=None if base is None else float(base), queries=n, lazy=lazy)

        return QueryPlan(
            x=x,
            n=n,
            points=points,
            finish=finish,
            includes_base=need_base,
            direction_steps=perturbed,
        )


def _values_for_differences(xp: Any, values: Any, x: Array) -> Array:
    """Oracle values on x's device, keeping their precision if it exceeds x's.

    Finite differences subtract nearly equal losses: an oracle that returns float64 losses for
    float32 parameters (the torch engine does) must not be rounded to float32 before the
    subtraction, or the ~1e-5 differences drown in float32's rounding of the loss itself.
    """
    values = xp.asarray(values, device=device_of(x))
    if not xp.isdtype(values.dtype, "real floating"):
        return xp.astype(values, x.dtype)
    if xp.finfo(values.dtype).bits < xp.finfo(x.dtype).bits:
        return xp.astype(values, x.dtype)
    return values


@dataclass(frozen=True)
class CGE(Estimator):
    """Coordinate-wise gradient estimator; with ``coords`` it is sparse CGE.

    Args:
        mu: finite-difference step μ > 0.
        scheme: ``"forward"`` (|S|+1 queries) or ``"central"`` (2|S| queries, exact on quadratics).
        coords: indices (or a boolean mask of length d) of the set S; ``None`` means all
            coordinates. The estimate is zero outside S. ``plan``/``estimate`` also accept
            ``coords=`` per call (dynamic sparsity), which overrides this field.
    """

    mu: float = 5e-3
    scheme: CGEScheme = "forward"
    coords: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mu", check_mu(self.mu))
        if self.scheme not in ("forward", "central"):
            raise ValueError(f"scheme must be 'forward' or 'central' for CGE, got {self.scheme!r}")

    def queries_per_step(self, dim: int, fx_known: bool = False, coords: Any = None) -> int:
        chosen = coords if coords is not None else self.coords
        k = dim if chosen is None else check_coords(chosen, dim, unique=True).size
        return k + (0 if fx_known else 1) if self.scheme == "forward" else 2 * k

    def plan(
        self,
        x: Array,
        *,
        rng: np.random.Generator | int | None = None,
        fx: float | None = None,
        coords: Any = None,
    ) -> QueryPlan:
        xp = namespace(x)
        d = x.shape[0]
        dev = device_of(x)
        chosen = coords if coords is not None else self.coords
        idx = (
            np.arange(d, dtype=np.int64) if chosen is None else check_coords(chosen, d, unique=True)
        )
        k = idx.size
        mu = self.mu
        forward = self.scheme == "forward"
        need_base = forward and fx is None
        offset = 1 if need_base else 0
        n = offset + (k if forward else 2 * k)
        steps = [(idx, mu)] if forward else [(idx, mu), (idx, -mu)]

        def points(start: int, stop: int) -> Array:
            m = stop - start
            out = xp.empty((m, d), dtype=x.dtype, device=dev)
            out[...] = x[None, :]
            rows = np.arange(start, stop)
            pert = rows >= offset
            j = rows[pert] - offset
            col = idx[j % k] if k else j
            step = np.where(j < k, mu, -mu)
            if pert.any():
                r = xp.asarray(np.flatnonzero(pert), device=dev)
                c = xp.asarray(col, device=dev)
                out[r, c] = out[r, c] + xp.asarray(step, dtype=x.dtype, device=dev)
            return out

        def finish(values: Array) -> Estimate:
            values = _values_for_differences(xp, values, x)
            if values.shape[0] != n:
                raise ValueError(f"expected {n} values for this plan, got {values.shape[0]}")
            base = float(values[0]) if need_base else fx
            if forward:
                diff = (values[offset:] - base) / mu
            else:
                diff = (values[:k] - values[k:]) / (2 * mu)
            grad = xp.zeros((d,), dtype=x.dtype, device=dev)
            if k:
                grad[xp.asarray(idx, device=dev)] = xp.astype(diff, x.dtype)
            return Estimate(grad=grad, fx=None if base is None else float(base), queries=n)

        return QueryPlan(
            x=x, n=n, points=points, finish=finish, coord_steps=steps, includes_base=need_base
        )
