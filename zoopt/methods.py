"""Optimization methods as query coroutines: one implementation for ``minimize`` and ask/tell.

A method's run is a generator. It yields a :class:`~zoopt.estimators.QueryPlan` when it needs
function values (the driver evaluates the plan's points and sends the ``(n,)`` values back)
and an :class:`Iterate` when an iteration is complete (the driver counts it, runs callbacks,
checks its limits, and may save :attr:`Iterate.state` to resume exactly). It returns a
message when it has converged or cannot go on. :func:`zoopt.minimize` drives it with an
oracle; :class:`zoopt.AskTell` hands the points out and takes the values back.

Methods:

* :class:`LBFGS` (the default of ``minimize``): limited-memory quasi-Newton on
  finite-difference gradients, with a line search on function values only. Needs no
  learning rate.
* :class:`FixedStep`: any gradient source (RGE, CGE, sparse CGE; :mod:`zoopt.step`) and any
  optimizer of :mod:`zoopt.optim` with its learning-rate schedule: ``x ← opt.step(x, ĝ)``.
* :class:`SPSA`: simultaneous-perturbation stochastic approximation with Spall's decaying
  gains, for noisy objectives.

Every point a method queries lies inside ``bounds`` when bounds are given.

State: each method's :attr:`Iterate.state` is a value (a frozen dataclass: :class:`LBFGSState`,
:class:`SPSAState`, :class:`FixedStepState`) with one serializer, ``to_dict()``, and one
checked deserializer, the method's ``state_from_dict(d, dim)``. A method of your own may yield
a plain dict instead (it is saved and handed back as it is).

Limits: every method's ``run`` gets the run's :class:`Limits` (``maxiter``, ``max_queries``,
``gtol``). The driver enforces ``maxiter`` and ``max_queries``; a method may plan with them
(SPSA's gains) and stops itself when its gradient estimate passes ``gtol``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ._array import Array, like, to_numpy
from .estimators import Estimate, QueryPlan
from .optim import Optimizer, OptState
from .step import ZO

#: float64 machine epsilon: the default for the finite-difference steps
EPS = float(np.finfo(np.float64).eps)

Run = Generator["QueryPlan | Iterate", Any, str]


@dataclass(frozen=True)
class Iterate:
    """The end of one iteration.

    Attributes:
        x: the new iterate, shape ``(d,)``, of the caller's array type.
        fun: f(x) if the method knows it (``None`` otherwise, e.g. after a fixed step).
        estimate: the gradient estimate of this iteration (``jac`` of the result).
        lr: the step size used (learning rate, or line-search step length).
        state: everything needed to continue exactly from here: the method's state value
            (a :class:`MethodState`, host arrays and numbers) or, for a method of your own,
            a dict.
    """

    x: Array
    fun: float | None
    estimate: Estimate
    lr: float
    state: Any = field(repr=False)


@dataclass(frozen=True)
class Limits:
    """The limits of one run, handed to every method's ``run``.

    Attributes:
        maxiter: iterations (``None``: no limit).
        max_queries: queries, a cap never exceeded (``None``: no limit).
        gtol: converged when ``max_i |ĝ_i|`` of the projected gradient estimate (the
            coordinates at a bound the estimate pushes against count 0) is at most ``gtol``:
            scipy L-BFGS-B's ``pgtol``. One meaning for every method, given by name or as an
            object. ``None``: no such test.
    """

    maxiter: int | None = None
    max_queries: int | None = None
    gtol: float | None = None

    def __post_init__(self) -> None:
        if self.maxiter is not None:
            _check_count_or_zero("maxiter", self.maxiter)
        if self.max_queries is not None:
            _check_count("max_queries", self.max_queries)
        if self.gtol is not None:
            _check_number("gtol", self.gtol, zero_ok=False)


#: the limits of a run that has none (the default of every ``run``)
NO_LIMITS = Limits()


def _check_count_or_zero(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")


@runtime_checkable
class MethodState(Protocol):
    """A method's state value: ``to_dict()`` gives host numbers and arrays (a checkpoint's
    ``method`` entry); the method's ``state_from_dict`` reads it back."""

    def to_dict(self) -> dict[str, Any]: ...


@runtime_checkable
class RestorableMethod(Protocol):
    """A method that checks a saved state before resuming from it."""

    def state_from_dict(self, state: Mapping[str, Any], dim: int) -> MethodState:
        """The state value saved as ``state`` (``to_dict()``'s output); ``ValueError``
        naming the first thing wrong."""
        ...


def projected_gradient_max(x: np.ndarray, g: np.ndarray, box: Box | None) -> float:
    """``max_i |ĝ_i|`` over the coordinates free to move (:data:`Limits.gtol`'s measure)."""
    return float(np.max(np.abs(np.where(free_coordinates(x, g, box), g, 0.0)), initial=0.0))


def gtol_message(gtol: float) -> str:
    return f"converged: max|projected gradient| <= gtol={gtol}"


def _check_number(name: str, value: Any, *, zero_ok: bool) -> None:
    """A method setting that must be a finite number > 0 (or >= 0): ValueError naming it."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value >= 0 if zero_ok else value > 0)):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


# ---------------------------------------------------------------------------------------
# Bounds
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Box:
    """Box bounds ``lb <= x <= ub`` (host float64 arrays; ±inf where unbounded)."""

    lb: np.ndarray
    ub: np.ndarray

    def project(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, self.lb, self.ub)

    @property
    def bounded(self) -> bool:
        return bool(np.any(np.isfinite(self.lb)) or np.any(np.isfinite(self.ub)))


def as_box(bounds: Any, dim: int) -> Box | None:
    """``bounds`` as a :class:`Box`: ``None``; a sequence of ``d`` ``(low, high)`` pairs
    (``None`` for no bound), as scipy takes them; or anything with ``lb``/``ub`` arrays or
    scalars (``scipy.optimize.Bounds``). Raises ``ValueError`` naming a bad entry."""
    if bounds is None:
        return None
    if hasattr(bounds, "lb") and hasattr(bounds, "ub"):  # scipy.optimize.Bounds
        lb, ub = _bound_array("lb", bounds.lb, dim), _bound_array("ub", bounds.ub, dim)
    else:
        if isinstance(bounds, str | bytes):
            raise ValueError(f"bounds must be (low, high) pairs, got {bounds!r}")
        try:
            pairs = list(bounds)
        except TypeError as exc:
            raise ValueError(
                f"bounds must be (low, high) pairs or scipy.optimize.Bounds, got {bounds!r}"
            ) from exc
        if len(pairs) != dim:
            raise ValueError(f"bounds has {len(pairs)} (low, high) pairs but x0 has {dim} entries")
        lb, ub = np.empty(dim), np.empty(dim)
        for i, pair in enumerate(pairs):
            try:
                low, high = pair
            except (TypeError, ValueError) as exc:
                raise ValueError(f"bounds[{i}] must be a (low, high) pair, got {pair!r}") from exc
            lb[i] = -np.inf if low is None else _bound_number(f"bounds[{i}] low", low)
            ub[i] = np.inf if high is None else _bound_number(f"bounds[{i}] high", high)
    if np.any(np.isnan(lb)) or np.any(np.isnan(ub)):
        bad = int(np.flatnonzero(np.isnan(lb) | np.isnan(ub))[0])
        raise ValueError(f"bounds[{bad}] is NaN")
    if np.any(lb > ub):
        bad = int(np.flatnonzero(lb > ub)[0])
        raise ValueError(f"bounds[{bad}] has low {lb[bad]} > high {ub[bad]}")
    # (inf, inf) or (-inf, -inf) holds no finite point: x0 would be projected to infinity
    empty = (lb == np.inf) | (ub == -np.inf)
    if np.any(empty):
        bad = int(np.flatnonzero(empty)[0])
        raise ValueError(
            f"bounds[{bad}] = ({lb[bad]}, {ub[bad]}) holds no finite value; use None or "
            "-inf/inf for a missing bound"
        )
    return Box(lb, ub)


def _bound_number(name: str, value: Any) -> float:
    """One bound as a float; a string, bool or other object is refused by name."""
    if isinstance(value, bool | str | bytes):
        raise ValueError(f"{name} must be a number or None, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number or None, got {value!r}") from exc


def _bound_array(name: str, value: Any, dim: int) -> np.ndarray:
    """``Bounds.lb``/``ub`` as ``(dim,)`` floats: a number, or one per entry of x0."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bounds.{name} must be numbers, got {value!r}") from exc
    if arr.size == 1 and arr.ndim <= 1:  # one number for every entry (Bounds(0, 1))
        return np.full(dim, float(arr.reshape(())))
    if arr.shape != (dim,):
        raise ValueError(
            f"bounds.{name} has shape {arr.shape} but x0 has {dim} entries; give one bound "
            "per entry or a single number"
        )
    return arr.copy()


# ---------------------------------------------------------------------------------------
# Plans of explicit points
# ---------------------------------------------------------------------------------------
def points_plan(points: np.ndarray, like_x: Array, kind: str = "values") -> QueryPlan:
    """A plan that queries the given ``(n, d)`` points (host float64), as ``like_x``'s type."""
    X = like(points, like_x)
    return QueryPlan(
        x=like(points[0], like_x),
        n=int(points.shape[0]),
        points=lambda a, b: X[a:b],
        finish=_no_finish,
        kind=kind,
    )


def _no_finish(values: Array) -> Estimate:  # pragma: no cover - drivers never call it
    raise RuntimeError("this plan's values go back to its method, not through finish()")


def fd_gradient_plan(
    x: np.ndarray,
    plus: np.ndarray,
    minus: np.ndarray,
    central: bool,
    box: Box | None,
    like_x: Array,
    coords: np.ndarray | None = None,
) -> QueryPlan:
    """The finite-difference points of :func:`fd_gradient_steps`' steps as a lazy plan: rows
    ``a:b`` are built when asked for (the driver asks in chunks under ``max_batch_bytes``),
    so the memory is O(chunk · d), never d × d. Row ``j < m`` is ``x + plus_c e_c`` for the
    ``j``-th coordinate ``c`` of ``coords`` (default: all d, in order); with ``central`` row
    ``m + j`` is ``x + minus_c e_c``; every other entry is ``x``'s."""
    idx = np.arange(x.shape[0]) if coords is None else np.asarray(coords, dtype=np.int64)
    cols_all = np.concatenate([idx, idx]) if central else idx
    steps = np.concatenate([plus[idx], minus[idx]]) if central else plus[idx]

    base = x + 0.0  # as x + 0 in every untouched entry (-0.0 becomes 0.0), bit for bit

    def points(a: int, b: int) -> Array:
        cols = cols_all[a:b]
        P = np.empty((b - a, x.shape[0]))
        P[...] = base  # one pass per chunk
        P[np.arange(b - a), cols] = x[cols] + steps[a:b]
        if box is not None:
            P = box.project(P)  # no-op but for rounding at the bounds
        return like(P, like_x)

    return QueryPlan(
        x=like(x, like_x), n=int(steps.shape[0]), points=points, finish=_no_finish, kind="gradient"
    )


def fd_gradient_steps(
    x: np.ndarray, central: bool, box: Box | None, eps: float = EPS
) -> tuple[np.ndarray, np.ndarray]:
    """The signed steps ``(plus, minus)`` of a finite-difference gradient at ``x`` (host
    float64, shape ``(d,)``; O(d) memory).

    Steps are relative, as in scipy's ``approx_derivative``: ``h_i = r · max(1, |x_i|)`` with
    ``r = sqrt(eps)`` (forward, error ~1e-8) or ``eps^(1/3)`` (central, error ~1e-11 on
    smooth functions). With bounds, a coordinate whose step would leave the box is
    differenced one-sided towards the inside, so no point leaves the box. ``eps`` is the
    machine epsilon of the points' dtype (float32 points need larger steps).
    ``plus[i]``/``minus[i]`` are the signed steps of coordinate ``i``'s two points
    (``minus[i] == 0`` for a one-sided difference against f(x)); :func:`fd_gradient_plan`
    builds the points (forward: d of them; central: 2d).
    """
    d = x.shape[0]
    r = eps ** (1 / 3) if central else eps**0.5  # eps: of the queried points' dtype
    h = r * np.maximum(1.0, np.abs(x))
    plus = h.copy()
    minus = -h if central else np.zeros(d)
    if box is not None:
        up_ok = x + h <= box.ub
        down_ok = x - h >= box.lb
        if central:
            both = up_ok & down_ok
            plus = np.where(both, h, np.where(up_ok, h, -h))
            minus = np.where(both, -h, 0.0)
            room = np.where(up_ok | down_ok, 1.0, 0.0)  # a box thinner than 2h: its width
            plus = np.where(room > 0, plus, _inside_step(x, box))
        else:
            plus = np.where(up_ok, h, np.where(down_ok, -h, _inside_step(x, box)))
    return plus, minus


def _inside_step(x: np.ndarray, box: Box) -> np.ndarray:
    """For coordinates whose box is narrower than the step: the larger way in."""
    up, down = box.ub - x, x - box.lb
    return np.where(up >= down, up, -down)


def fd_gradient(
    values: np.ndarray, fx: float, plus: np.ndarray, minus: np.ndarray, central: bool
) -> np.ndarray:
    """The gradient from :func:`fd_gradient_plan`'s values (host float64)."""
    d = plus.shape[0]
    v_plus = values[:d]
    if not central:
        return (v_plus - fx) / np.where(plus != 0, plus, 1.0)
    v_minus = values[d:]
    two_sided = minus != 0
    g = np.where(
        two_sided,
        (v_plus - v_minus) / np.where(two_sided, plus - minus, 1.0),
        (v_plus - fx) / np.where(plus != 0, plus, 1.0),
    )
    return g


# ---------------------------------------------------------------------------------------
# L-BFGS on finite-difference gradients
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LBFGS:
    """Limited-memory BFGS on zeroth-order gradients, with a values-only line search.

    Per iteration: the direction ``p = −H ĝ`` from the last ``memory`` steps (two-loop
    recursion; steepest descent when the memory is empty or ``p`` is not a descent
    direction), a line search along ``p`` on function values alone (Armijo sufficient
    decrease; quadratic interpolation to backtrack and to extrapolate, so an exact minimizer
    along a quadratic costs one extra query), then a gradient estimate at the new point.

    Gradients (``estimator=None``): finite differences with relative steps (see
    :func:`fd_gradient_steps`), forward (``d`` queries: f(x) is known from the line search)
    while far from the optimum, and central (``2d`` queries) from the first time either the
    line search finds no decrease or the gradient is small next to f's rounding
    (``max|ĝ| < 1e-6 · max(1, |f(x)|)``): the point where forward differences' error
    (~1e-8 relative) starts to matter. A line search that fails with central differences
    and an empty memory ends the run: f cannot be decreased to the precision of the
    differences (``converged``).

    Costs per iteration: ``d`` (or ``2d``) queries for the gradient, plus the line search's
    (usually 1–3). The initial step is ``min(1, 1/‖p‖)`` in the first iteration and after a
    restart of the memory (a unit-length step), 1 afterwards. A non-finite value at a trial
    point shrinks the step tenfold (divergence guard). A run down an objective unbounded
    below ends (not converged) with "f appears unbounded below": f under
    ``-1e15·max(1, |f(x0)|)``, or ``max|x|`` past ``1e15·max(1, max|x0|)`` while f is below
    f(x0) (:data:`UNBOUNDED`).

    With ``restarts=True`` a converged run is restarted from the best point plus a random
    perturbation while the budget lasts (basin hopping with scale ``restart_scale·max(1,
    |x|)``, doubling after each restart that finds nothing better): useful on multimodal
    functions when a budget is set, harmless otherwise (the best point is kept).

    Args:
        memory: number of (s, y) pairs kept (scipy's L-BFGS-B: 10).
        estimator: a :class:`~zoopt.CGE` or :class:`~zoopt.RGE` to use instead of adaptive
            finite differences (fixed μ; no switch to central differences).
        c1: Armijo constant.
        max_line_search: trial points per line search before it counts as failed.
        gtol: stop when ``max|ĝ|`` (projected onto the box) is at most ``gtol``.
        ftol: stop when an iteration decreases f by at most ``ftol · max(|f|, |f_new|, 1)``.
        restarts: restart after convergence (see above).
        restart_scale: initial relative size of a restart's perturbation.
    """

    memory: int = 10
    estimator: Any = None
    c1: float = 1e-4
    max_line_search: int = 20
    gtol: float = 0.0
    ftol: float = 0.0
    restarts: bool = False
    restart_scale: float = 0.1
    noise: float = 0.0
    max_resamples: int = 8

    def __post_init__(self) -> None:
        _check_count("memory", self.memory)
        _check_number("noise", self.noise, zero_ok=True)
        _check_count("max_resamples", self.max_resamples)
        if self.noise and self.estimator is not None:
            raise ValueError("noise= sizes LBFGS's own finite differences; not with an estimator")
        if not 0 < self.c1 < 0.5:
            raise ValueError(f"c1 must be in (0, 0.5), got {self.c1!r}")
        if self.max_line_search < 1:
            raise ValueError(f"max_line_search must be >= 1, got {self.max_line_search!r}")
        for name in ("gtol", "ftol"):
            _check_number(name, getattr(self, name), zero_ok=True)
        if not self.restart_scale > 0:
            raise ValueError(f"restart_scale must be > 0, got {self.restart_scale!r}")

    def run(
        self,
        x0: Array,
        *,
        rng: np.random.Generator,
        box: Box | None = None,
        state: LBFGSState | None = None,
        limits: Limits = NO_LIMITS,
    ) -> Run:
        """The coroutine (see the module docstring); ``state``: an :attr:`Iterate.state`."""
        gtol = self.gtol if limits.gtol is None else limits.gtol
        like_x = x0
        d = int(x0.shape[0])
        if state is None:
            x = to_numpy(x0).astype(np.float64)
            if box is not None:
                x = box.project(x)
            values = yield points_plan(x[None, :], like_x)
            fx = float(to_numpy(values)[0])
            if not math.isfinite(fx):
                return "f(x0) is not finite"
            stalls = 0
            central = bool(self.noise)  # noisy values: central differences from the start
            g = yield from self._gradient(x, fx, central, box, like_x, rng)
            if g is None:
                return "the gradient estimate at x0 is not finite"
            S: list[np.ndarray] = []
            Y: list[np.ndarray] = []
            restart_sigma, best = self.restart_scale, fx
            f0, xscale0 = fx, float(np.max(np.abs(x), initial=0.0))
        else:
            x, fx, g, central = state.x, state.fx, state.g, state.central
            S, Y = list(state.S), list(state.Y)
            restart_sigma, best, stalls = state.restart_sigma, state.best, state.stalls
            f0, xscale0 = state.f0, state.xscale0
            if state.stop:  # it had converged at that iteration
                return state.stop
        if g.shape != (d,):  # pragma: no cover - guarded by the driver
            raise ValueError(f"state gradient has shape {g.shape}, expected ({d},)")

        while True:
            free = free_coordinates(x, g, box)
            pg = np.where(free, g, 0.0)
            if gtol and np.max(np.abs(pg), initial=0.0) <= gtol:
                return gtol_message(gtol)
            if not central and np.max(np.abs(pg), initial=0.0) < 1e-6 * max(1.0, abs(fx)):
                central = True  # forward differences' error is about to dominate
                g = yield from self._gradient(x, fx, central, box, like_x, rng)
                if g is None:
                    return "the gradient estimate is not finite"
                continue
            if central and self.estimator is None and not self.restarts:
                eps = self._value_eps(like_x)
                if self.noise and below_noise(x, pg, self.noise, eps, self.max_resamples):
                    return (
                        f"converged: the gradient estimate is below the noise (noise={self.noise})"
                    )
                if not self.noise and at_noise_level(x, fx, pg, eps):
                    return NOISE_LEVEL_MESSAGE
            p = -_two_loop(pg, S, Y)
            p = np.where(free, p, 0.0)
            if not np.dot(p, pg) < 0:  # not a descent direction: forget the curvature
                S, Y = [], []
                p = -pg
            pnorm = float(np.linalg.norm(p))
            if pnorm == 0.0:
                stop = "converged: the projected gradient estimate is zero"
                if self.restarts:
                    x, fx, g, restart_sigma, best = yield from self._restart(
                        x, fx, best, restart_sigma, box, like_x, rng, d
                    )
                    S, Y, central = [], [], False
                    continue
                return stop
            alpha0 = 1.0 if S else min(1.0, 1.0 / pnorm)
            found = yield from self._line_search(x, fx, pg, p, alpha0, box, like_x)
            if found is None:
                if S or not central:
                    # retry from here with central differences and no memory
                    S, Y, central = [], [], True
                    g = yield from self._gradient(x, fx, central, box, like_x, rng)
                    if g is None:
                        return "the gradient estimate is not finite"
                    continue
                stop = "converged: no decrease along the gradient estimate (precision reached)"
                if self.restarts:
                    x, fx, g, restart_sigma, best = yield from self._restart(
                        x, fx, best, restart_sigma, box, like_x, rng, d
                    )
                    S, Y, central = [], [], False
                    continue
                return stop
            alpha, x_new, f_new = found
            runaway = _runaway(x_new, f_new, f0, xscale0)
            if runaway is not None:
                return runaway  # the driver keeps x_new: the best point queried
            g_new = yield from self._gradient(x_new, f_new, central, box, like_x, rng)
            if g_new is None:
                return "the gradient estimate is not finite"
            s, y = x_new - x, g_new - g
            sy = float(np.dot(s, y))
            if sy > 1e-10 * float(np.linalg.norm(s)) * float(np.linalg.norm(y)):
                S.append(s)
                Y.append(y)
                if len(S) > self.memory:
                    S.pop(0)
                    Y.pop(0)
            decrease = fx - f_new
            stop = None
            # in central mode, decreases at the rounding level of f are noise: three in a
            # row end the run (f cannot be decreased to the precision of its values)
            tiny = decrease <= 8 * self._value_eps(like_x) * max(abs(fx), abs(f_new), 1.0)
            stalls = stalls + 1 if central and tiny else 0
            if stalls >= 3 and not self.restarts:
                stop = "converged: f decreases only at the rounding level of its values"
            if self.ftol and decrease <= self.ftol * max(abs(fx), abs(f_new), 1.0):
                stop = f"converged: relative decrease of f <= ftol={self.ftol}"
                if self.restarts:
                    stop = None  # keep going: the restart happens at the next failed search
            x, fx, g = x_new, f_new, g_new
            best = min(best, fx)
            yield Iterate(
                x=like(x, like_x),
                fun=fx,
                estimate=Estimate(grad=like(g, like_x), fx=fx, queries=0),
                lr=alpha,
                state=LBFGSState(
                    x=x,
                    fx=fx,
                    g=g,
                    central=central,
                    S=tuple(S),
                    Y=tuple(Y),
                    restart_sigma=restart_sigma,
                    best=best,
                    stop=stop,
                    stalls=stalls,
                    f0=f0,
                    xscale0=xscale0,
                ),
            )
            if stop:
                return stop

    def state_from_dict(self, state: Mapping[str, Any], dim: int) -> LBFGSState:
        """The :class:`LBFGSState` saved as ``state`` (checked whole first)."""
        return state_from_dict(LBFGSState, state, dim)

    # -- pieces ----------------------------------------------------------------------
    @staticmethod
    def _value_eps(like_x: Array) -> float:
        """Machine epsilon of the queried points' dtype: it sizes the difference steps and
        the rounding level of f's values (float32 points usually give float32 values)."""
        return float(np.finfo(to_numpy(like_x[:1]).dtype).eps)

    def _gradient(
        self,
        x: np.ndarray,
        fx: float,
        central: bool,
        box: Box | None,
        like_x: Array,
        rng: np.random.Generator,
    ) -> Generator[QueryPlan, Any, np.ndarray | None]:
        if self.estimator is not None:
            plan = ZO(self.estimator).plan(like(x, like_x), rng=rng, fx=fx)
            if box is not None:
                plan = projected(plan, box, like_x)
            values = yield plan
            g = to_numpy(plan.finish(values).grad).astype(np.float64)
        else:
            eps = self._value_eps(like_x)
            # noisy values: steps sized as if rounding were the noise (see `noise`)
            plus, minus = fd_gradient_steps(x, central, box, max(eps, self.noise))
            plan = fd_gradient_plan(x, plus, minus, central, box, like_x)
            values = yield plan
            values = to_numpy(values).astype(np.float64)
            if self.noise and central:
                values = yield from self._resampled(x, plus, minus, box, like_x, values)
            # the steps as they will be represented in the queried points' dtype
            plus = to_numpy(like(x + plus, like_x)).astype(np.float64) - x
            if central:
                minus = to_numpy(like(x + minus, like_x)).astype(np.float64) - x
            g = fd_gradient(values, fx, plus, minus, central)
        return g if np.all(np.isfinite(g)) else None

    def _resampled(
        self,
        x: np.ndarray,
        plus: np.ndarray,
        minus: np.ndarray,
        box: Box | None,
        like_x: Array,
        values: np.ndarray,
    ) -> Generator[QueryPlan, Any, np.ndarray]:
        """Central-difference values ``(2d,)`` averaged over resamples: a coordinate whose
        difference is below the noise (``|f₊ − f₋| < 2·noise·√(2/k)`` after ``k`` samples)
        is queried again at both points, up to ``max_resamples`` samples."""
        d = x.shape[0]
        sums_p, sums_m = values[:d].copy(), values[d:].copy()
        k = np.ones(d)
        two_sided = minus != 0
        for _ in range(self.max_resamples - 1):
            diff = np.abs(sums_p - sums_m) / k
            below = np.flatnonzero(two_sided & (diff < 2 * self.noise * np.sqrt(2 / k)))
            if below.size == 0:
                break
            plan = fd_gradient_plan(x, plus, minus, True, box, like_x, coords=below)
            again = to_numpy((yield plan)).astype(np.float64)
            sums_p[below] += again[: below.size]
            sums_m[below] += again[below.size :]
            k[below] += 1
        return np.concatenate([sums_p / k, sums_m / k])

    def _line_search(
        self,
        x: np.ndarray,
        fx: float,
        g: np.ndarray,
        p: np.ndarray,
        alpha0: float,
        box: Box | None,
        like_x: Array,
    ) -> Generator[QueryPlan, Any, tuple[float, np.ndarray, float] | None]:
        """Armijo line search on values; returns (α, x_new, f_new) or None (no decrease)."""
        gp = float(np.dot(g, p))
        best: tuple[float, np.ndarray, float] | None = None
        alpha = alpha0
        extrapolating = False
        for _ in range(self.max_line_search):
            x_try = x + alpha * p if box is None else box.project(x + alpha * p)
            step = x_try - x
            if not np.any(step):  # the step vanished in rounding (or into a bound)
                break
            values = yield points_plan(x_try[None, :], like_x)
            f_try = float(to_numpy(values)[0])
            if not math.isfinite(f_try):  # divergence guard
                if best is not None:
                    break
                alpha *= 0.1
                continue
            armijo = f_try <= fx + self.c1 * float(np.dot(g, step))
            if armijo and (best is None or f_try < best[2]):
                best = (alpha, x_try, f_try)
            elif best is not None:
                break  # extrapolation or refinement went too far: keep the best
            # quadratic model of f along p through f(x), g·p and f(x + αp)
            curvature = (f_try - fx - gp * alpha) / alpha**2
            if armijo:
                target = -gp / (2 * curvature) if curvature > 0 else 4 * alpha
                if target > 2 * alpha and not (box is not None and np.any(step != alpha * p)):
                    alpha, extrapolating = min(target, 10 * alpha), True
                    continue
                if not extrapolating and curvature > 0 and target < 0.5 * alpha:
                    alpha = target  # the minimum along p is well short of α: one more query
                    continue
                break
            if best is not None:
                break
            target = -gp / (2 * curvature) if curvature > 0 else 0.1 * alpha
            alpha = min(max(target, 0.1 * alpha), 0.5 * alpha)
        return best

    def _restart(
        self,
        x: np.ndarray,
        fx: float,
        best: float,
        sigma: float,
        box: Box | None,
        like_x: Array,
        rng: np.random.Generator,
        d: int,
    ) -> Generator[QueryPlan, Any, tuple[np.ndarray, float, np.ndarray, float, float]]:
        """A new start near the best point (the driver keeps the best point seen)."""
        improved = fx < best - 1e-12 * max(1.0, abs(best))
        sigma = self.restart_scale if improved else 2 * sigma
        best = min(best, fx)
        scale = sigma * max(1.0, float(np.mean(np.abs(x))))
        while True:
            x_new = x + scale * rng.standard_normal(d)
            if box is not None:
                x_new = box.project(x_new)
            values = yield points_plan(x_new[None, :], like_x)
            f_new = float(to_numpy(values)[0])
            if math.isfinite(f_new):
                break
            scale *= 0.5
        g = yield from self._gradient(x_new, f_new, False, box, like_x, rng)
        if g is None:
            g = np.zeros(d)
        return x_new, f_new, g, sigma, best


#: L-BFGS stops as on an objective unbounded below when f falls under
#: ``-UNBOUNDED · max(1, |f(x0)|)``, or when ``max|x|`` passes ``UNBOUNDED · max(1, max|x0|)``
#: while f is below f(x0) (scipy's L-BFGS-B ends such runs in an abnormal line search)
UNBOUNDED = 1e15


def _runaway(x: np.ndarray, fx: float, f0: float, xscale0: float) -> str | None:
    """Why the iterate ``x`` with value ``fx`` looks like a run down an objective unbounded
    below (a message for the result), or ``None``."""
    size = float(np.max(np.abs(x), initial=0.0))  # inf once x overflowed
    if fx < -UNBOUNDED * max(1.0, abs(f0)):
        return (
            f"f appears unbounded below: f = {fx:.3g} (f(x0) = {f0:.3g}; stopped below "
            f"-{UNBOUNDED:.0e}·max(1, |f(x0)|)) at max|x| = {size:.3g}"
        )
    if fx < f0 and not size <= UNBOUNDED * max(1.0, xscale0):
        return (
            f"f appears unbounded below: the iterates run away (max|x| = {size:.3g}, "
            f"{xscale0:.3g} at x0) while f keeps decreasing (f = {fx:.3g}, f(x0) = {f0:.3g})"
        )
    return None


#: how many times the rounding error of a central difference a gradient component may be and
#: still count as noise (see :func:`at_noise_level`)
NOISE_FACTOR = 4.0
NOISE_LEVEL_MESSAGE = (
    "converged: the gradient estimate is at the noise level of the finite differences"
)


def at_noise_level(x: np.ndarray, fx: float, pg: np.ndarray, eps: float) -> bool:
    """Whether every component of the projected central-difference gradient ``pg`` at ``x``
    is at the rounding noise of its difference: ``|ĝ_i| · h_i <= NOISE_FACTOR · eps · |f|``
    with ``h_i = eps^(1/3) · max(1, |x_i|)`` the central step (two values, each rounded to
    ``eps·|f|``, differenced over ``2h_i``). There the estimate says nothing more about
    the gradient, and a line search along it can only gain rounding. ``f = 0`` exactly
    never counts (no rounding to hide in)."""
    h = eps ** (1 / 3) * np.maximum(1.0, np.abs(x))
    return bool(np.all(np.abs(pg) * h <= NOISE_FACTOR * eps * abs(fx))) and fx != 0


def below_noise(x: np.ndarray, pg: np.ndarray, noise: float, eps: float, samples: int) -> bool:
    """Whether every projected central difference ``2h_i·ĝ_i`` is below what ``samples``
    resampled values with noise ``noise`` (standard deviation) can resolve:
    ``2·noise·√(2/samples)``, with ``h_i = max(eps, noise)^(1/3) · max(1, |x_i|)``."""
    h = max(eps, noise) ** (1 / 3) * np.maximum(1.0, np.abs(x))
    return bool(np.all(np.abs(pg) * 2 * h < 2 * noise * np.sqrt(2 / samples)))


def free_coordinates(x: np.ndarray, g: np.ndarray, box: Box | None) -> np.ndarray:
    """Coordinates free to move: not at a bound that the gradient pushes against."""
    if box is None:
        return np.ones(x.shape[0], dtype=bool)
    at_low = (x <= box.lb) & (g > 0)
    at_high = (x >= box.ub) & (g < 0)
    return ~(at_low | at_high)


def _two_loop(g: np.ndarray, S: Sequence[np.ndarray], Y: Sequence[np.ndarray]) -> np.ndarray:
    """H·g by the L-BFGS two-loop recursion (H0 = γI, γ = s·y / y·y of the newest pair)."""
    q = g.copy()
    rhos = [1.0 / float(np.dot(y, s)) for s, y in zip(S, Y, strict=True)]
    alphas = []
    for s, y, rho in zip(reversed(S), reversed(Y), reversed(rhos), strict=True):
        a = rho * float(np.dot(s, q))
        alphas.append(a)
        q -= a * y
    if S:
        q *= float(np.dot(S[-1], Y[-1])) / float(np.dot(Y[-1], Y[-1]))
    for (s, y, rho), a in zip(zip(S, Y, rhos, strict=True), reversed(alphas), strict=True):
        b = rho * float(np.dot(y, q))
        q += (a - b) * s
    return q


# ---------------------------------------------------------------------------------------
# Fixed step: a gradient source and an optimizer
# ---------------------------------------------------------------------------------------
def projected(plan: QueryPlan, box: Box, like_x: Array) -> QueryPlan:
    """``plan`` with every point projected onto ``box`` (no coordinate fast path: the
    projection must see every point). Differences then see the projected steps, which is
    the projected-gradient estimate at the bounds."""

    def points(a: int, b: int) -> Array:
        return like(box.project(to_numpy(plan.points(a, b)).astype(np.float64)), like_x)

    return QueryPlan(x=plan.x, n=plan.n, points=points, finish=plan.finish, kind=plan.kind)


@dataclass(frozen=True)
class FixedStepState:
    """:class:`FixedStep`'s state: iterations done and its optimizer's :class:`OptState`."""

    nit: int = field(metadata={"kind": "count"})
    optimizer: OptState = field(metadata={"kind": "optimizer"})

    def to_dict(self) -> dict[str, Any]:
        return state_to_dict(self)


@dataclass
class FixedStep:
    """``x ← optimizer.update(x, ĝ)`` with ``ĝ`` from a gradient source (:class:`~zoopt.step.ZO`).

    One plan per iteration (the source's queries); the new iterate is projected onto the box.
    A non-finite value ends the run (the step it would give is meaningless). The optimizer's
    state travels in :class:`FixedStepState` (starting from ``optimizer.init()``): the
    optimizer object itself is only the rule and is never written to.
    """

    source: ZO
    optimizer: Optimizer

    def run(
        self,
        x0: Array,
        *,
        rng: np.random.Generator,
        box: Box | None = None,
        state: FixedStepState | None = None,
        limits: Limits = NO_LIMITS,
    ) -> Run:
        x = x0
        if box is not None:
            x = like(box.project(to_numpy(x).astype(np.float64)), x0)
        if state is None:
            state = FixedStepState(0, self.optimizer.init())
        t, opt_state = state.nit, state.optimizer
        while True:
            plan = self.source.plan(x, rng=rng, iteration=t)
            if box is not None:
                plan = projected(plan, box, x0)
            values = yield plan
            if not np.all(np.isfinite(to_numpy(values))):
                return "a queried value was non-finite; stopped"
            est = plan.finish(values)
            lr = self.optimizer.lr_at(opt_state.t)
            x, opt_state = self.optimizer.update(opt_state, x, est.gradient)
            if box is not None:
                x = like(box.project(to_numpy(x).astype(np.float64)), x0)
            t += 1
            yield Iterate(x=x, fun=None, estimate=est, lr=lr, state=FixedStepState(t, opt_state))

    def state_from_dict(self, state: Mapping[str, Any], dim: int) -> FixedStepState:
        """The :class:`FixedStepState` saved as ``state`` (checked whole first)."""
        return state_from_dict(FixedStepState, state, dim, optimizer=self.optimizer.state_from_dict)


# ---------------------------------------------------------------------------------------
# SPSA: noisy objectives
# ---------------------------------------------------------------------------------------
#: SPSA's iterations when a run has neither ``maxiter`` nor ``max_queries`` (its own default,
#: documented with ``minimize``; the stability constant is then ``A = 100``)
SPSA_DEFAULT_MAXITER = 1000


@dataclass(frozen=True)
class SPSAState:
    """:class:`SPSA`'s state: iterations done, the gain ``a`` (``None`` before the first
    estimate) and the iterate."""

    nit: int = field(metadata={"kind": "count"})
    a: float | None = field(metadata={"kind": "float_or_none"})
    x: np.ndarray = field(metadata={"kind": "vector"})

    def to_dict(self) -> dict[str, Any]:
        return state_to_dict(self)


@dataclass(frozen=True)
class SPSA:
    """Simultaneous-perturbation stochastic approximation (Spall 1998), for noisy f.

    Per iteration ``k``: ``q`` Rademacher directions ``Δ``, values ``f(x ± c_k Δ)``
    (``2q`` queries), ``ĝ = mean[(f₊ − f₋) / (2 c_k)] Δ``, ``x ← x − a_k ĝ``, with Spall's
    gains ``a_k = a / (k + 1 + A)^0.602`` and ``c_k = c / (k + 1)^0.101``: the decay that
    averages noise out. ``A = 0.1 · N`` with ``N`` the iterations the run's limits allow:
    ``maxiter``, else ``max_queries // (2q)``, else :data:`SPSA_DEFAULT_MAXITER` (Spall's
    rule; ``run`` sees the :class:`Limits`). ``a`` is set from the first estimate so that the
    first step moves each coordinate by about ``step0`` on average; no step moves a
    coordinate by more than ``10·step0`` (step blocking: keeps an overshoot from diverging).

    Args:
        c: initial perturbation size (about the noise's standard deviation in x units; 0.1).
        step0: target size of the first step per coordinate (0.1).
        q: perturbations averaged per iteration.
        A: stability constant (``None``: ``0.1 · N`` as above).
    """

    c: float = 0.1
    step0: float = 0.1
    q: int = 1
    A: float | None = None

    def __post_init__(self) -> None:
        for name in ("c", "step0"):
            _check_number(name, getattr(self, name), zero_ok=False)
        _check_count("q", self.q)
        if self.A is not None:
            _check_number("A", self.A, zero_ok=True)

    def horizon(self, limits: Limits) -> int:
        """The iterations ``limits`` allow (what ``A = 0.1 · N`` is computed from)."""
        if limits.maxiter is not None:
            return int(limits.maxiter)
        if limits.max_queries is not None:
            return max(1, int(limits.max_queries) // (2 * self.q))
        return SPSA_DEFAULT_MAXITER

    def run(
        self,
        x0: Array,
        *,
        rng: np.random.Generator,
        box: Box | None = None,
        state: SPSAState | None = None,
        limits: Limits = NO_LIMITS,
    ) -> Run:
        like_x = x0
        x = to_numpy(x0).astype(np.float64)
        if box is not None:
            x = box.project(x)
        A = 0.1 * self.horizon(limits) if self.A is None else float(self.A)
        k, a = (0, None) if state is None else (state.nit, state.a)
        if state is not None:
            x = np.array(state.x, dtype=np.float64)
        d = x.shape[0]
        while True:
            ck = self.c / (k + 1) ** 0.101
            delta = rng.integers(0, 2, size=(self.q, d)).astype(np.float64) * 2 - 1
            plus, minus = x + ck * delta, x - ck * delta
            if box is not None:
                plus, minus = box.project(plus), box.project(minus)
            values = yield points_plan(np.concatenate([plus, minus]), like_x, kind="gradient")
            v = to_numpy(values).astype(np.float64)
            if not np.all(np.isfinite(v)):
                return "a queried value was non-finite; stopped"
            widths = np.einsum("qd,qd->q", plus - minus, delta) / d  # 2c_k without bounds
            widths = np.where(widths > 0, widths, 2 * ck)
            g = np.mean(((v[: self.q] - v[self.q :]) / widths)[:, None] * delta, axis=0)
            if a is None:
                first = float(np.mean(np.abs(g)))
                a = self.step0 * (A + 1) ** 0.602 / first if first > 0 else self.step0
            ak = a / (k + 1 + A) ** 0.602
            # a coordinate moves at most 10·step0 per iteration (Spall's step blocking):
            # a gain set from an unluckily small first estimate overshoots, not diverges
            x = x - np.clip(ak * g, -10 * self.step0, 10 * self.step0)
            if box is not None:
                x = box.project(x)
            k += 1
            yield Iterate(
                x=like(x, like_x),
                fun=None,
                estimate=Estimate(grad=like(g, like_x), fx=None, queries=2 * self.q),
                lr=ak,
                state=SPSAState(nit=k, a=a, x=x),
            )

    def state_from_dict(self, state: Mapping[str, Any], dim: int) -> SPSAState:
        """The :class:`SPSAState` saved as ``state`` (checked whole first)."""
        return state_from_dict(SPSAState, state, dim)


def default_maxiter(method: Any) -> int | None:
    """The iterations a run of ``method`` gets when neither ``maxiter`` nor ``max_queries``
    is given: fixed steps :data:`FIXED_STEP_DEFAULT_MAXITER`, SPSA
    :data:`SPSA_DEFAULT_MAXITER` (neither ever converges by itself), L-BFGS and methods of
    your own ``None`` (they run until they return)."""
    if isinstance(method, FixedStep):
        return FIXED_STEP_DEFAULT_MAXITER
    if isinstance(method, SPSA):
        return SPSA_DEFAULT_MAXITER
    return None


#: fixed-step methods run this many iterations when neither maxiter nor max_queries is given
FIXED_STEP_DEFAULT_MAXITER = 1000


# ---------------------------------------------------------------------------------------
# State values: one serializer (to_dict) and one checked deserializer per state class
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LBFGSState:
    """:class:`LBFGS`'s state as of a finished iteration (host float64 arrays): the iterate,
    f and the gradient estimate there, the difference scheme, the memory ``S``/``Y``, the
    restart scale, the best value, why it stopped (``None`` while running), the stall count,
    and f(x0), max|x0| for the runaway guard."""

    x: np.ndarray = field(metadata={"kind": "vector"})
    fx: float = field(metadata={"kind": "float"})
    g: np.ndarray = field(metadata={"kind": "vector"})
    central: bool = field(metadata={"kind": "bool"})
    S: tuple[np.ndarray, ...] = field(metadata={"kind": "vectors"})
    Y: tuple[np.ndarray, ...] = field(metadata={"kind": "vectors"})
    restart_sigma: float = field(metadata={"kind": "float"})
    best: float = field(metadata={"kind": "float"})
    stop: str | None = field(metadata={"kind": "str_or_none"})
    stalls: int = field(metadata={"kind": "count"})
    f0: float = field(metadata={"kind": "float"})
    xscale0: float = field(metadata={"kind": "float"})

    def to_dict(self) -> dict[str, Any]:
        return state_to_dict(self)

    def __post_init__(self) -> None:
        if len(self.S) != len(self.Y):
            raise ValueError("state method S and Y must be lists of the same length")


def state_to_dict(state: Any) -> dict[str, Any]:
    """Host copies of a state value's fields, by the kind each field declares (arrays
    copied, tuples of arrays as lists, nested state values by their own ``to_dict``): the
    one serializer of every state class here."""
    out: dict[str, Any] = {}
    for f in fields(state):
        value = getattr(state, f.name)
        if f.metadata["kind"] == "vector":
            value = np.array(value, dtype=np.float64, copy=True)
        elif f.metadata["kind"] == "vectors":
            value = [np.array(v, dtype=np.float64, copy=True) for v in value]
        elif isinstance(value, MethodState):
            value = value.to_dict()
        out[f.name] = value
    return out


def state_from_dict(cls: type, state: Any, dim: int, **readers: Callable[[Any, int], Any]) -> Any:
    """The ``cls`` state value saved as ``state`` by its ``to_dict``; every field checked
    by the kind its declaration names, before anything is built. A kind of field that
    holds another state (a fixed step's ``optimizer``, a restart's ``local`` run) is read
    by ``readers[kind](value, dim)``. ``ValueError`` naming the first bad field
    (``state method <field> ...``)."""
    if not isinstance(state, Mapping):
        raise ValueError(f"state method must be a dict or None, got {state!r}")
    declared = {f.name: f.metadata["kind"] for f in fields(cls)}
    name = cls.__name__.removesuffix("State")
    if set(state) != set(declared):
        raise ValueError(
            f"state method is not a {name} state: expected keys {sorted(declared)}, got "
            f"{sorted(map(str, state))}"
        )
    values = {
        key: _field_value(key, kind, state[key], dim, readers) for key, kind in declared.items()
    }
    return cls(**values)


def _field_value(
    key: str, kind: str, value: Any, dim: int, readers: Mapping[str, Callable[[Any, int], Any]]
) -> Any:
    if kind == "vector":
        return _state_vector(key, value, dim)
    if kind == "vectors":
        if not isinstance(value, list | tuple):
            raise ValueError(f"state method {key} must be a list of arrays, got {value!r}")
        return tuple(_state_vector(f"{key}[{i}]", v, dim) for i, v in enumerate(value))
    if kind == "float":
        return _state_float(key, value)
    if kind == "float_or_none":
        return None if value is None else _state_float(key, value)
    if kind == "count":
        _state_count(key, value)
        return int(value)
    if kind == "bool":
        if not isinstance(value, bool | np.bool_):
            raise ValueError(f"state method {key} must be a bool, got {value!r}")
        return bool(value)
    if kind == "str_or_none":
        if value is not None and not isinstance(value, str):
            raise ValueError(f"state method {key} must be a str or None, got {value!r}")
        return value
    if kind in readers:
        return readers[kind](value, dim)
    raise AssertionError(f"unknown state field kind {kind!r}")  # pragma: no cover


def restore_method_state(method: Any, state: Any, dim: int) -> Any:
    """The state value ``method`` resumes from, read from a saved ``state`` (``None``, or a
    ``to_dict()`` output): checked whole by the method's ``state_from_dict`` (``ValueError``
    naming the first bad thing). A method of your own without ``state_from_dict`` is
    trusted with any dict (handed back as a copy)."""
    if state is None:
        return None
    if isinstance(method, RestorableMethod):
        return method.state_from_dict(state, dim)
    if not isinstance(state, Mapping):
        raise ValueError(f"state method must be a dict or None, got {state!r}")
    return copy.deepcopy(dict(state))


def _state_vector(name: str, value: Any, dim: int) -> np.ndarray:
    try:
        arr = np.array(value, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"state method {name} is not an array of numbers: {exc}") from exc
    if arr.shape != (dim,):
        raise ValueError(f"state method {name} has shape {arr.shape}, expected ({dim},)")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"state method {name} holds a non-finite value")
    return arr


def _state_float(name: str, value: Any) -> float:
    ok = isinstance(value, int | float | np.floating | np.integer) and not isinstance(
        value, bool | np.bool_
    )
    if not (ok and math.isfinite(float(value))):
        raise ValueError(f"state method {name} must be a finite number, got {value!r}")
    return float(value)


def _state_count(name: str, value: Any) -> None:
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"state method {name} must be a non-negative integer, got {value!r}")
