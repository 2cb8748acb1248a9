"""``minimize`` and its ask/tell twin.

Both drive the same method (:mod:`zoopt.methods`): a coroutine that asks for the values of
query plans and reports finished iterations. :class:`AskTell` hands the points out and takes
the values back; :func:`minimize` evaluates them itself, enforces the limits, keeps the best
point and returns a scipy-style :class:`OptimizeResult`. With the same seed both produce
identical iterates.

Methods (``method=``):

=================  =========================================================  ===============
method             what it does                                               needs
=================  =========================================================  ===============
``"lbfgs"``        L-BFGS on finite-difference gradients + a line search on   nothing
                   values (the default)
``"spsa"``         SPSA with decaying gains: noisy objectives                 nothing
``"sgd"``,         ``x ← opt.step(x, ĝ)`` with an estimator (RGE default)     ``lr`` (1e-3
``"adam"``,                                                                   default)
``"signsgd"``
a method object    :class:`~zoopt.methods.LBFGS`, :class:`~zoopt.methods.SPSA`,
                   :class:`~zoopt.methods.FixedStep` or your own ``run``
=================  =========================================================  ===============

``method=None`` picks ``"lbfgs"`` unless a fixed-step argument is given (``optimizer``,
``lr``, ``mu`` or ``coords``): then the fixed step with that optimizer (SGD by default).
Optimizer names are :data:`zoopt.registry.OPTIMIZERS`' (a registered one works too).

A converged run stops and reports ``success=True`` (``max_queries`` is a cap); L-BFGS's
global phase (``restarts=``, :mod:`zoopt.restarts`) spends a large budget on IPOP-CMA-ES
restarts; ``noise=`` resamples finite differences below the noise of a stochastic ``fun``.
Every method gets the run's :class:`~zoopt.methods.Limits`; the queries are counted by the
oracle's one :class:`~zoopt.oracle.Budget`.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from . import registry
from ._array import Array, as_float_vector, copy_of, like, to_numpy
from .estimators import RGE, Estimate, Estimator, QueryPlan
from .executors import QueryExecutor, WorkersSpec, as_executor
from .methods import (
    FIXED_STEP_DEFAULT_MAXITER,
    LBFGS,
    SPSA,
    Box,
    FixedStep,
    Iterate,
    Limits,
    MethodState,
    Run,
    as_box,
    default_maxiter,
    gtol_message,
    projected_gradient_max,
    restore_method_state,
)
from .optim import Optimizer
from .oracle import BaseOracle, BudgetExceeded, FunctionOracle, OracleError
from .restarts import IPOPRestarts, restarts_for
from .schedules import Schedule
from .step import ZO

#: result status codes, as scipy's: 0 converged, 1 an iteration or query limit was reached
STATUS_CONVERGED = 0
STATUS_LIMIT = 1
STATUS_FAILED = 2  # the oracle raised, or a method could not go on (non-finite values)
STATUS_INTERRUPTED = 3  # KeyboardInterrupt
STATUS_CALLBACK = 99  # the callback returned True or raised StopIteration (scipy's code)

__all__ = [
    "FIXED_STEP_DEFAULT_MAXITER",
    "STATUS_CALLBACK",
    "STATUS_CONVERGED",
    "STATUS_FAILED",
    "STATUS_INTERRUPTED",
    "STATUS_LIMIT",
    "AskTell",
    "Method",
    "OptimizeResult",
    "make_method",
    "minimize",
]


@runtime_checkable
class Method(Protocol):
    """What :class:`AskTell` drives: a coroutine of query plans and iterations
    (see :mod:`zoopt.methods`). ``state``: ``None`` or what an earlier :attr:`Iterate.state`
    was; ``limits``: the run's :class:`~zoopt.methods.Limits`."""

    def run(
        self,
        x0: Array,
        *,
        rng: np.random.Generator,
        box: Box | None = None,
        state: Any = None,
        limits: Limits = ...,
    ) -> Run: ...


def _optimizer_names() -> list[str]:
    return list(registry.OPTIMIZERS)


class OptimizeResult(dict):
    """scipy-style result: a dict whose keys are also attributes.

    Keys:
        x: the best point queried (the recommendation), shape ``(d,)``, x0's type.
        fun: f(x), exactly the value the function returned there.
        jac: the last gradient estimate (``None`` before the first iteration).
        status: 0 converged, 1 ``maxiter``/``max_queries`` reached, 2 the oracle failed or
            the method could not go on, 3 interrupted, 99 stopped by the callback.
        success: ``status == 0`` (as scipy: running out of budget is not success).
        message: why it stopped, in words.
        nit: iterations; nfev: queries; njev: gradient estimates (their queries are in nfev).
        best_x, best_fun: the same as ``x``, ``fun``.
        last_x, last_fun: the last iterate and f there (NaN if never evaluated).
        history: per-iteration lists: ``fun`` (f(x_k) or NaN when the method did not
            evaluate it, e.g. after a fixed step), ``fun_at_estimate`` (f where the
            iteration's gradient was estimated, NaN for central schemes), ``nfev``
            (cumulative queries), ``lr`` (step size), ``grad_norm`` (‖ĝ‖₂).
        wall_seconds: time spent.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    def __repr__(self) -> str:
        keys = ("message", "success", "status", "fun", "nit", "nfev")
        return "OptimizeResult(" + ", ".join(f"{k}={self.get(k)!r}" for k in keys) + ")"


def _default_estimator(dim: int) -> Estimator:
    return RGE(q=min(20, dim), mu=1e-3)


def make_method(
    method: str | Method | None,
    dim: int,
    *,
    estimator: Estimator | None = None,
    optimizer: Optimizer | None = None,
    lr: float | Schedule | None = None,
    mu: Schedule | None = None,
    coords: Callable[[int], Any] | None = None,
    tol: float | None = None,
    options: Mapping[str, Any] | None = None,
    restarts: bool | int | str = False,
    max_queries: int | None = None,
    noise: float | None = None,
) -> Method:
    """The method ``minimize``/``AskTell`` run for these arguments (see the module table).

    ``tol`` sets L-BFGS's ``gtol`` and ``ftol`` (as scipy's L-BFGS-B); ``options`` go to the
    method's constructor (``LBFGS``, ``SPSA``) or the optimizer's (any name of
    :data:`zoopt.registry.OPTIMIZERS`). ``gtol`` is not a method setting but a
    :class:`~zoopt.methods.Limits` entry (one meaning for every method). ``restarts``:
    IPOP-CMA-ES restarts after L-BFGS converges (:func:`zoopt.restarts.restarts_for`;
    ``"auto"`` reads ``max_queries`` and applies to L-BFGS chosen by name only).
    Raises ``ValueError`` naming an argument the method does not take.
    """
    if estimator is not None and not isinstance(estimator, Estimator):
        raise TypeError(f"estimator must be a zoopt estimator (RGE, CGE), got {estimator!r}")
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer must be a zoopt optimizer (SGD, Adam, SignSGD), got {optimizer!r}"
        )
    if optimizer is not None and lr is not None:
        raise ValueError("pass lr to the optimizer, not to both the optimizer and minimize")
    options = dict(options or {})
    fixed_args = {
        "optimizer": optimizer,
        "lr": lr,
        "mu": mu,
        "coords": coords,
    }
    given_fixed = [k for k, v in fixed_args.items() if v is not None]
    names = ["lbfgs", "spsa", *_optimizer_names()]
    if method is None:
        method = "sgd" if given_fixed else "lbfgs"
        if optimizer is not None:
            method = "fixed"
    lbfgs_by_name = (method is None and not given_fixed) or (
        isinstance(method, str) and method.lower() == "lbfgs"
    )
    n_restarts = restarts_for(restarts, max_queries, dim)
    if restarts == "auto" and not lbfgs_by_name:
        n_restarts = 0
    if n_restarts and not lbfgs_by_name:
        raise ValueError(
            f"restarts={restarts!r} are L-BFGS's global phase; method={method!r} has none"
        )
    if noise is not None and not lbfgs_by_name:
        raise ValueError(
            f"noise={noise!r} is L-BFGS's resampling; method={method!r} takes none (SPSA's "
            "decaying gains average noise out by themselves)"
        )
    if not isinstance(method, str):
        if not isinstance(method, Method):
            raise TypeError(
                f"method must be a name ({', '.join(names)}) or an "
                f"object with run(x0, rng=, box=, state=, limits=), got {method!r}"
            )
        extra = given_fixed + [k for k in ("estimator",) if estimator is not None]
        extra += [k for k, v in (("tol", tol),) if v is not None] + list(options)
        if extra:
            raise ValueError(
                f"method={method!r} is a method object: configure it directly, not with "
                f"{', '.join(extra)}"
            )
        return method
    name = method.lower()
    if name == "lbfgs":
        if given_fixed:
            raise ValueError(
                f"method='lbfgs' chooses its own steps and takes no {', '.join(given_fixed)} "
                "(use method='sgd' or 'adam' for a fixed-step optimizer)"
            )
        settings: dict[str, Any] = {"estimator": estimator}
        if noise is not None:
            settings["noise"] = noise
        if tol is not None:
            settings.update(gtol=float(tol), ftol=float(tol))
        local = LBFGS(**(settings | _checked_options(LBFGS, options)))
        return IPOPRestarts(local, max_restarts=n_restarts) if n_restarts else local
    if name == "spsa":
        extra = given_fixed + [k for k in ("estimator",) if estimator is not None]
        if extra:
            raise ValueError(f"method='spsa' takes no {', '.join(extra)}")
        return SPSA(**_checked_options(SPSA, options))
    if name in registry.OPTIMIZERS or name == "fixed":
        if optimizer is None:
            try:
                optimizer = registry.optimizer(
                    "sgd" if name == "fixed" else name, 1e-3 if lr is None else lr, **options
                )
            except TypeError as exc:
                raise ValueError(f"bad options for method={name!r}: {exc}") from exc
        elif options:
            raise ValueError(
                f"options={options!r} given with an optimizer: configure the optimizer"
            )
        elif (
            name in registry.OPTIMIZERS
            and isinstance(registry.OPTIMIZERS[name].factory, type)
            and not isinstance(optimizer, registry.OPTIMIZERS[name].factory)
        ):
            raise ValueError(f"method={name!r} but optimizer is {type(optimizer).__name__}")
        est = estimator if estimator is not None else _default_estimator(dim)
        return FixedStep(ZO(est, mu=mu, coords=coords), optimizer)
    raise ValueError(f"unknown method {method!r}; choose from {names} or pass a method object")


def _checked_options(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    known = {f for f in getattr(cls, "__dataclass_fields__", {})} - {"estimator"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for {cls.__name__}; it takes {sorted(known)}"
        )
    return options


class AskTell:
    """Zeroth-order optimization driven from outside.

    Example::

        at = AskTell(x0, seed=0)                 # L-BFGS on finite differences
        while not at.done:
            X = at.ask()                         # (n, d) points to evaluate
            at.tell([f(p) for p in X])           # values in the same order

    A ``tell`` that completes an iteration returns its gradient :class:`Estimate` (and
    ``nit`` grows); the other tells (f(x0), line-search points) return ``None``. Values may
    be ``inf``/``NaN`` (both read as ``+inf``: "worse than anything"): L-BFGS shrinks its
    step, the fixed-step and SPSA methods stop (:attr:`done`, :attr:`message`).

    Args:
        x0: starting point, shape ``(d,)`` (numpy, torch or CuPy); projected onto ``bounds``.
        estimator, optimizer, method, lr, mu, coords, tol, gtol, options: as for
            :func:`minimize`.
        bounds: ``(low, high)`` pairs or ``scipy.optimize.Bounds``; no point asked for
            leaves them.
        seed: seed of the random directions (int, ``np.random.Generator`` or None).
        restarts: after L-BFGS converges, IPOP-CMA-ES restarts (:mod:`zoopt.restarts`):
            ``True`` (9), an int (that many), ``False`` (default), or ``"auto"`` (on when
            ``limits.max_queries >= AUTO_RESTARTS_BUDGET · d``).
        noise: as for :func:`minimize` (L-BFGS's resampling of differences below the noise).
        limits: the run's :class:`~zoopt.methods.Limits`, handed to the method (SPSA plans
            its gains with ``maxiter``/``max_queries``). ``AskTell`` ends the run when
            ``gtol`` is reached; ``maxiter`` and ``max_queries`` are your loop's to keep.
            ``gtol=`` is a shorthand for ``limits=Limits(gtol=...)``.
    """

    def __init__(
        self,
        x0: Any,
        estimator: Estimator | None = None,
        optimizer: Optimizer | None = None,
        *,
        method: str | Method | None = None,
        lr: float | Schedule | None = None,
        bounds: Any = None,
        seed: int | np.random.Generator | None = None,
        mu: Schedule | None = None,
        coords: Callable[[int], Any] | None = None,
        tol: float | None = None,
        gtol: float | None = None,
        options: Mapping[str, Any] | None = None,
        restarts: bool | int | str = False,
        limits: Limits | None = None,
        noise: float | None = None,
    ):
        if limits is not None and not isinstance(limits, Limits):
            raise TypeError(f"limits must be a zoopt.methods.Limits, got {limits!r}")
        if gtol is not None:
            if limits is not None and limits.gtol is not None and limits.gtol != gtol:
                raise ValueError(f"gtol={gtol!r} given and limits.gtol={limits.gtol!r}")
            limits = Limits(
                limits.maxiter if limits else None, limits.max_queries if limits else None, gtol
            )
        self.limits = limits if limits is not None else Limits()
        self.x = copy_of(as_float_vector(x0))  # the caller's x0 is never written to
        self.dim = int(self.x.shape[0])
        self.box = as_box(bounds, self.dim)
        if self.box is not None:
            self.x = like(self.box.project(to_numpy(self.x).astype(np.float64)), self.x)
        self.method = make_method(
            method,
            self.dim,
            estimator=estimator,
            optimizer=optimizer,
            lr=lr,
            mu=mu,
            coords=coords,
            tol=tol,
            options=options,
            restarts=restarts,
            max_queries=self.limits.max_queries,
            noise=noise,
        )
        self.rng = _make_rng(seed)
        self.nit = 0
        #: the last iteration's gradient estimate, f(x) (``None`` if unknown) and step size
        self.last: Estimate | None = None
        self.fun: float | None = None
        self.lr: float = math.nan
        #: whether the method has finished, and why (``message`` starts with "converged"
        #: when it converged)
        self.done = False
        self.message: str | None = None
        self._run: Run | None = None
        self._resume: Any = None  # the method's state value to resume from
        self._pending: QueryPlan | None = None
        self._snapshot = self._make_snapshot(None)

    # -- the loop ----------------------------------------------------------------------
    def next_plan(self) -> QueryPlan | None:
        """The plan whose values the next :meth:`tell` needs, or ``None`` when finished."""
        while self._pending is None and not self.done:
            self._advance(None)
        return self._pending

    def plan(self) -> QueryPlan:
        """Like :meth:`next_plan`, but a finished run raises ``RuntimeError``."""
        plan = self.next_plan()
        if plan is None:
            raise RuntimeError(f"the method has finished ({self.message}); nothing to ask")
        return plan

    def ask(self) -> Array:
        """The ``(n, d)`` points whose values the next :meth:`tell` needs (same until told)."""
        return self.plan().all_points()

    def tell(self, values: Any) -> Estimate | None:
        """Give the values at the asked points (in order).

        Returns the gradient :class:`Estimate` when these values complete an iteration,
        else ``None``. Raises ``ValueError``/``TypeError`` for values of the wrong count or
        type (nothing changes then).
        """
        plan = self.plan()
        host = _host_values(values, plan.n)
        self._pending = None
        event = self._advance(like(host, self.x, dtype=_value_dtype(self.x)))
        if isinstance(event, Iterate):
            # plan ahead so that ``done`` is current; the state stays that of this iteration
            self.next_plan()
            return event.estimate
        return None

    def discard(self) -> None:
        """Forget the iteration in progress: the next ``ask`` restarts it from the state of
        the last completed iteration (its queries are asked again)."""
        self.load_state_dict(self.state_dict())

    def _advance(self, values: Any) -> Iterate | QueryPlan | None:
        if self._run is None:
            self._run = self.method.run(
                self.x, rng=self.rng, box=self.box, state=self._resume, limits=self.limits
            )
        try:
            event = self._run.send(values)
        except StopIteration as stop:
            self.done, self.message = True, str(stop.value or "the method finished")
            self._pending = None
            return None
        if isinstance(event, Iterate):
            self.x = event.x
            self.nit += 1
            self.last, self.fun, self.lr = event.estimate, event.fun, float(event.lr)
            gtol = self.limits.gtol
            if gtol is not None and self._gradient_measure(event) <= gtol:
                self.done, self.message = True, gtol_message(gtol)
                self._run, self._pending = None, None
            self._snapshot = self._make_snapshot(event.state)
            return event
        if not isinstance(event, QueryPlan):  # pragma: no cover - a broken custom method
            raise TypeError(f"the method yielded {event!r}; expected a QueryPlan or Iterate")
        self._pending = event
        return event

    # -- checkpoints -------------------------------------------------------------------
    def _gradient_measure(self, event: Iterate) -> float:
        """``max|ĝ|`` of the iteration's estimate, projected at the new iterate's bounds
        (the :class:`~zoopt.methods.Limits` ``gtol`` measure)."""
        g = to_numpy(event.estimate.grad).astype(np.float64)
        x = to_numpy(event.x).astype(np.float64)
        return projected_gradient_max(x, g, self.box)

    def _make_snapshot(self, method_state: Any) -> dict[str, Any]:
        """The last completed iteration's state: values (the method's state value is kept
        by reference: it is never written to), serialized only by :meth:`state_dict`."""
        return {
            "x": np.array(to_numpy(self.x), dtype=np.float64, copy=True),
            "nit": self.nit,
            "rng": copy.deepcopy(self.rng.bit_generator.state),
            "method": method_state,
            "done": self.done,
            "message": self.message,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly, as of the last completed iteration: x,
        iteration, method state (L-BFGS memory, a fixed step's optimizer state, ...), RNG
        state; host numbers and arrays. Taken in the middle of an iteration (after an
        ``ask``, between line-search points), a resumed run asks for that iteration's points
        again and continues bit for bit."""
        state = copy.deepcopy({k: v for k, v in self._snapshot.items() if k != "method"})
        method_state = self._snapshot["method"]
        if isinstance(method_state, MethodState):
            state["method"] = method_state.to_dict()
        else:  # a method of your own: its dict (or None)
            state["method"] = copy.deepcopy(method_state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output. Everything is checked before anything
        is changed: a bad state raises ``ValueError`` and leaves this object as it was."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        required = {"x", "nit", "rng", "method"}
        missing = required - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        try:
            x = np.array(state["x"], dtype=np.float64, copy=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"state x is not an array of numbers: {exc}") from exc
        if x.shape != (self.dim,):
            raise ValueError(f"state x has shape {x.shape}, expected ({self.dim},)")
        if not np.all(np.isfinite(x)):
            bad = int(np.flatnonzero(~np.isfinite(x))[0])
            raise ValueError(f"state x must be finite; x[{bad}] = {x[bad]}")
        nit = state["nit"]
        if isinstance(nit, bool) or not isinstance(nit, int | np.integer) or nit < 0:
            raise ValueError(f"state nit must be a non-negative integer, got {nit!r}")
        unknown = set(state) - required - {"done", "message", "optimizer"}
        if unknown:
            raise ValueError(f"state has unknown keys {sorted(map(str, unknown))}")
        done, message = state.get("done", False), state.get("message")
        if not isinstance(done, bool | np.bool_):
            raise ValueError(f"state done must be a bool, got {done!r}")
        if message is not None and not isinstance(message, str):
            raise ValueError(f"state message must be a str or None, got {message!r}")
        method_state = state["method"]
        if "optimizer" in state:
            # the format of zoopt 0.1: a fixed step's optimizer state beside the method's
            if not isinstance(method_state, Mapping):
                raise ValueError("state holds an optimizer state but no method state dict")
            method_state = {**method_state, "optimizer": state["optimizer"]}
        resume = restore_method_state(self.method, method_state, self.dim)
        probe = type(self.rng.bit_generator)()
        try:
            probe.state = state["rng"]
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"state rng is not a {type(probe).__name__} state: {exc}") from exc
        self.x = like(x, self.x)
        self.nit = int(nit)
        self.rng.bit_generator.state = state["rng"]
        self._resume = resume
        self.done, self.message = bool(done), message
        self._run, self._pending = None, None
        self._snapshot = self._make_snapshot(resume)


def _make_rng(seed: Any) -> np.random.Generator:
    """The generator of ``seed`` (None, an int >= 0 or a Generator); else ``ValueError``."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0
    ):
        raise ValueError(f"seed must be None, an integer >= 0 or a numpy Generator, got {seed!r}")
    return np.random.default_rng(seed)


def _host_values(values: Any, n: int) -> np.ndarray:
    """Told values as host float64 ``(n,)``, NaN read as +inf; wrong counts/types raise."""
    if isinstance(values, str | bytes):
        raise TypeError(f"tell got {values!r}; expected {n} numbers")
    try:
        host = np.asarray(to_numpy(values) if hasattr(values, "shape") else values)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"tell got {values!r}; expected {n} numbers") from exc
    # bools are refused as minimize refuses them: True is a bug's answer, not a value
    holds_bool = isinstance(values, list | tuple) and any(
        isinstance(v, bool | np.bool_) for v in values
    )
    if host.dtype.kind not in "biuf":
        raise TypeError(f"tell got values of dtype {host.dtype}; expected {n} real numbers")
    if host.dtype.kind == "b" or holds_bool:
        raise TypeError(f"tell got {values!r}; expected {n} real numbers, not bools")
    if host.shape != (n,):
        raise ValueError(
            f"tell expects {n} values (one per asked point), got shape {tuple(host.shape)}"
        )
    host = host.astype(np.float64)
    return np.where(np.isnan(host), np.inf, host)


def _value_dtype(x: Array) -> Any:
    """Told values keep float64 on numpy/CuPy/torch (finite differences need the digits)."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        return torch.float64
    return np.float64


# ---------------------------------------------------------------------------------------
# minimize
# ---------------------------------------------------------------------------------------
def minimize(
    fun: Callable[..., Any] | BaseOracle,
    x0: Any,
    args: tuple[Any, ...] = (),
    *,
    method: str | Method | None = None,
    estimator: Estimator | None = None,
    optimizer: Optimizer | None = None,
    lr: float | Schedule | None = None,
    bounds: Any = None,
    maxiter: int | None = None,
    max_queries: int | None = None,
    tol: float | None = None,
    options: Mapping[str, Any] | None = None,
    callback: Callable[..., Any] | None = None,
    seed: int | np.random.Generator | None = None,
    mu: Schedule | None = None,
    coords: Callable[[int], Any] | None = None,
    batched: bool = False,
    gtol: float | None = None,
    workers: WorkersSpec = None,
    progress: bool = False,
    restarts: bool | int | str = "auto",
    noise: float | None = None,
) -> OptimizeResult:
    """Minimize a black-box function from its values alone.

    With no settings it runs L-BFGS on finite-difference gradients with a line search on
    function values (no learning rate), until it converges or the budget ends::

        res = zoopt.minimize(f, x0, max_queries=20_000)
        res.x, res.fun            # the best point queried and f there (exactly)

    Args:
        fun: ``fun(x, *args) -> float`` for ``x`` of shape ``(d,)`` (a Python/numpy number,
            0-d or 1-element array; NaN/inf read as +inf; strings and bools raise
            ``TypeError``), or with ``batched=True`` ``fun(X, *args) -> (n,) values``; or an
            oracle (:func:`~zoopt.as_oracle`; its own error policy applies).
        x0: starting point, shape ``(d,)``; numpy, torch or CuPy (kept on its device).
        args: extra positional arguments of ``fun``.
        method: see the module table; ``None``: L-BFGS unless a fixed-step argument is given.
        estimator: the gradient estimator. L-BFGS: adaptive finite differences by default
            (forward, then central near the optimum); fixed steps: RGE(q=min(20, d), μ=1e-3).
        optimizer: a fixed-step optimizer (:class:`~zoopt.SGD`, :class:`~zoopt.Adam`,
            :class:`~zoopt.SignSGD`); lr: its learning rate or schedule (default 1e-3).
        bounds: ``(low, high)`` pairs (``None`` for no bound) or ``scipy.optimize.Bounds``.
            Every queried point lies inside (projection onto the box).
        maxiter: iterations (``None``: no limit; with no ``max_queries`` either, fixed-step
            methods run ``FIXED_STEP_DEFAULT_MAXITER`` = 1000 and SPSA
            ``SPSA_DEFAULT_MAXITER`` = 1000 (neither converges by itself); L-BFGS and
            methods of your own run until they return).
        max_queries: the budget of queries; never exceeded (a plan that would exceed it is
            not started: a line search's point costs 1, a gradient ``d`` or ``2d``). With a
            budget: it is a cap, not a target (a converged run stops and says so), unless
            ``restarts`` spend it.
        tol: L-BFGS's ``gtol`` and ``ftol`` (as scipy's L-BFGS-B).
        options: settings of the method (e.g. ``{"memory": 5}`` for L-BFGS, ``{"c": 0.2}``
            for SPSA, ``{"momentum": 0.9}`` for ``"sgd"``).
        callback: ``callback(intermediate_result)`` after each iteration, with an
            :class:`OptimizeResult` (``x`` the iterate, ``fun``, ``nit``, ``nfev``, ``jac``,
            ``best_x``, ``best_fun``). If its parameter is named ``intermediate_result`` it is
            passed by keyword, as scipy does. Returning ``True`` or raising
            ``StopIteration`` stops (status 99).
        seed: seed for random directions and restarts; runs with the same seed are identical.
        mu: a schedule for the estimator's μ; coords: ``iteration -> coords`` (sparse CGE).
        batched: ``fun`` takes the whole ``(n, d)`` batch.
        gtol: stop (converged) when ``max|ĝ|`` of the projected gradient estimate is at
            most ``gtol`` (scipy L-BFGS-B's ``pgtol``), for every method, given by name or
            as an object (:class:`~zoopt.methods.Limits`).
        workers: evaluate a plan's points in parallel (:mod:`zoopt.executors`): an int
            ``N`` (N worker processes, as scipy's ``workers``; the function travels by
            cloudpickle, the pool is reused), ``"threads:N"`` (functions that wait on I/O or
            release the GIL), a ``concurrent.futures.Executor``, a Dask ``Client``, a
            :class:`~zoopt.executors.QueryExecutor` or any map-like callable
            (``multiprocessing.Pool(4).map``). A point that raises fails the run naming its
            index; a worker that dies fails it at once. Not with ``batched=True`` or an
            oracle.
        progress: show a tqdm progress bar (queries when a budget is set, else iterations).
        restarts: the global phase after L-BFGS converges (:mod:`zoopt.restarts`): IPOP-CMA-ES
            restarts, each polished by L-BFGS. ``"auto"`` (default): on when ``max_queries
            >= 1000·d`` (a budget that large is one to spend), off otherwise (a converged
            run stops); ``True`` (9 restarts), an int (that many) or ``False``. With
            restarts the run ends at the budget (status 1) or after the last restart
            (status 0).
        noise: the standard deviation of ``fun``'s noise, for stochastic objectives
            (simulations, minibatch losses): L-BFGS then takes central differences with
            steps ``max(eps, noise)^(1/3)·max(1, |x_i|)``, resamples (up to 8 times) each
            difference that stays below the noise, and stops (converged) when every one
            does. Without it, L-BFGS's tiny steps read the noise as slope. When the noise is
            unknown or large next to the changes you are after, use ``method="spsa"``.

    Returns:
        :class:`OptimizeResult`; ``x`` is the best point queried and ``fun`` its value.
    """
    if maxiter is not None and (
        isinstance(maxiter, bool) or not isinstance(maxiter, int | np.integer) or maxiter < 0
    ):
        raise ValueError(f"maxiter must be a non-negative integer or None, got {maxiter!r}")
    if max_queries is not None and (
        isinstance(max_queries, bool)
        or not isinstance(max_queries, int | np.integer)
        or max_queries < 1
    ):
        raise ValueError(f"max_queries must be a positive integer or None, got {max_queries!r}")
    for name, value in (("gtol", gtol), ("tol", tol)):
        if value is not None and not (
            isinstance(value, int | float) and value > 0 and math.isfinite(value)
        ):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {callback!r}")
    if not isinstance(args, tuple):
        args = (args,)
    at = AskTell(
        x0,
        estimator,
        optimizer,
        method=method,
        lr=lr,
        bounds=bounds,
        seed=seed,
        mu=mu,
        coords=coords,
        tol=tol,
        options=options,
        restarts=restarts,
        limits=Limits(maxiter, max_queries, None if gtol is None else float(gtol)),
        noise=noise,
    )
    if maxiter is None and max_queries is None:
        # one Limits value for the method (it plans with them), AskTell (gtol), the driver
        at.limits = dataclasses.replace(at.limits, maxiter=default_maxiter(at.method))
    oracle, executor = _make_oracle(fun, at.dim, args, batched, workers)
    driver = _Driver(at, oracle, callback)
    try:
        return driver.run(progress)
    finally:
        if executor is not None and executor is not workers:  # only what minimize made
            executor.close()


def _make_oracle(
    fun: Callable[..., Any] | BaseOracle,
    dim: int,
    args: tuple[Any, ...],
    batched: bool,
    workers: WorkersSpec,
) -> tuple[BaseOracle, QueryExecutor | None]:
    """The oracle minimize queries, and the executor evaluating its points (``None``: in
    turn, in this process)."""
    if isinstance(fun, BaseOracle):
        if args or workers is not None or batched:
            given = [
                n for n, v in (("args", args), ("workers", workers), ("batched", batched)) if v
            ]
            raise ValueError(
                f"minimize got an oracle and {', '.join(given)}: those describe a callable; "
                "set them when you create the oracle"
            )
        if fun.dim != dim:
            raise ValueError(f"x0 has {dim} entries but the oracle has dim={fun.dim}")
        return fun, None
    if not callable(fun):
        raise TypeError(f"fun must be callable or an oracle, got {fun!r}")
    executor: QueryExecutor | None = None
    if workers is not None:
        if batched:
            raise ValueError("workers= evaluates points one by one; it cannot go with batched=True")
        executor = as_executor(workers)
        if isinstance(workers, int) and workers == 1:  # in this process, as without workers
            executor = None
    f = fun if not args else _WithArgs(fun, args)
    mapper = None if executor is None else executor.map
    oracle = FunctionOracle(f, dim, batched=batched, on_nonfinite="inf", workers=mapper)
    return oracle, executor


class _WithArgs:
    """``fun(x, *args)`` as a picklable one-argument callable (for process pools)."""

    def __init__(self, fun: Callable[..., Any], args: tuple[Any, ...]):
        self.fun, self.args = fun, args

    def __call__(self, x: Any) -> Any:
        return self.fun(x, *self.args)


class _Driver:
    """Runs an :class:`AskTell` against an oracle under minimize's limits."""

    def __init__(self, at: AskTell, oracle: BaseOracle, callback: Callable[..., Any] | None):
        self.at, self.oracle = at, oracle
        self.maxiter, self.max_queries = at.limits.maxiter, at.limits.max_queries
        self.callback = callback
        self.by_keyword = callback is not None and _takes_intermediate_result(callback)
        self.start = oracle.queries
        #: what the plan refused for the budget needed (the limit message is made at the end)
        self._limit_next: str | None = None
        self.njev = 0
        self.history: dict[str, list[float]] = {
            "fun": [],
            "fun_at_estimate": [],
            "nfev": [],
            "lr": [],
            "grad_norm": [],
        }

    @property
    def spent(self) -> int:
        return self.oracle.queries - self.start

    # the best point is the oracle's (tracked once, where every value passes: inside
    # run_scope it is this run's)
    @property
    def best_x(self) -> Array | None:
        return self.oracle.best_x

    @property
    def best_fun(self) -> float:
        return float(self.oracle.best_f)

    def _evaluate(self, plan: QueryPlan) -> Array:
        values = plan.evaluate(self.oracle)
        if plan.kind == "gradient":
            self.njev += 1
        return values

    def run(self, progress: bool) -> OptimizeResult:
        """The run, inside the oracle's :meth:`~zoopt.BaseOracle.run_scope`: its budget
        capped at ``max_queries`` more queries, its best point this run's."""
        with self.oracle.run_scope(self.max_queries):
            return self._run(progress)

    def _run(self, progress: bool) -> OptimizeResult:
        t0 = time.perf_counter()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            total, unit = (self.max_queries, "query") if self.max_queries else (self.maxiter, "it")
            bar = tqdm(total=total, desc="zoopt.minimize", unit=unit, mininterval=0.5)
        try:
            status, message = self._loop(bar)
        except KeyboardInterrupt:
            status, message = STATUS_INTERRUPTED, "interrupted (KeyboardInterrupt)"
        except Exception as exc:
            # a raising callback, or a function returning strings or bools: re-raised as
            # scipy does, but the best point so far travels with the exception
            result = self._result(
                STATUS_FAILED, f"stopped by {type(exc).__name__}: {exc}", t0, final_query=False
            )
            try:
                exc.result = result  # type: ignore[attr-defined]
                exc.add_note(
                    "zoopt.minimize: the result so far (best x and f) is this exception's .result"
                )
            except (AttributeError, TypeError):  # an exception class that takes no attributes
                pass
            raise
        finally:
            if bar is not None:
                bar.close()
        return self._result(status, message, t0, final_query=status != STATUS_INTERRUPTED)

    def _loop(self, bar: Any) -> tuple[int, str]:
        """Iterate until a limit, convergence or failure; returns (status, message)."""
        at = self.at
        while True:
            if self.maxiter is not None and at.nit >= self.maxiter:
                return STATUS_LIMIT, f"maxiter={self.maxiter} iterations reached"
            plan = at.next_plan()
            if plan is None:
                message = at.message or "the method finished"
                converged = message.startswith("converged")
                return (STATUS_CONVERGED if converged else STATUS_FAILED), message
            if not self.oracle.budget.fits(plan.n):  # the one budget (capped by run_scope)
                if self.max_queries is None or self.spent + plan.n <= self.max_queries:
                    return STATUS_LIMIT, str(self._oracle_budget_error())
                # the count is filled in at the end: a last query at the final iterate may
                # still fit in the budget (see _result)
                what = "gradient estimate" if plan.kind == "gradient" else "query"
                self._limit_next = f"the next {what} needs {plan.n}"
                return STATUS_LIMIT, ""
            before = self.spent
            try:
                values = self._evaluate(plan)
            except BudgetExceeded as exc:
                return STATUS_LIMIT, str(exc)
            except OracleError as exc:
                if isinstance(exc, TypeError):  # a string, bool or object: a bug, not data
                    raise
                return STATUS_FAILED, f"oracle failed: {exc}"
            est = at.tell(values)
            if bar is not None:
                bar.update(self.spent - before if self.max_queries else int(est is not None))
            if est is None:
                continue
            gnorm = float(np.linalg.norm(to_numpy(est.grad)))
            fun_k = math.nan if at.fun is None else float(at.fun)
            self.history["fun"].append(fun_k)
            self.history["fun_at_estimate"].append(math.nan if est.fx is None else est.fx)
            self.history["nfev"].append(self.spent)
            self.history["lr"].append(at.lr)
            self.history["grad_norm"].append(gnorm)
            if bar is not None:
                bar.set_postfix(best=f"{self.best_fun:.6g}", refresh=False)
            if self.callback is not None and self._call_back(est, fun_k):
                return STATUS_CALLBACK, "stopped by callback"
            gtol = at.limits.gtol
            if gtol is not None and at.done and at.message == gtol_message(gtol):
                return STATUS_CONVERGED, at.message  # AskTell tested it (Limits.gtol)

    def _result(self, status: int, message: str, t0: float, *, final_query: bool) -> OptimizeResult:
        """The result; ``final_query``: f at the last iterate may be asked for (not after
        Ctrl-C or an exception: the function is not called again then)."""
        at = self.at
        last_fun = math.nan if at.fun is None else float(at.fun)
        if final_query and at.fun is None and status != STATUS_FAILED:
            last_fun = self._final_value(at.x, last_fun)
        if final_query and self.best_x is None and status != STATUS_FAILED:  # none queried
            last_fun = self._final_value(at.x, last_fun)
        if status == STATUS_LIMIT and self._limit_next is not None:
            message = (
                f"max_queries={self.max_queries} reached ({self.spent} spent; {self._limit_next})"
            )
        if status == STATUS_INTERRUPTED:
            message += "; returning the best point so far"
        x_best, f_best = self.best_x, self.best_fun
        if x_best is not None:  # the caller's to keep: not the oracle's own array
            x_best = copy_of(x_best)
        if x_best is None:  # stopped before any value came back: f is unknown (NaN)
            x_best, f_best = copy_of(at.x), last_fun
        return OptimizeResult(
            x=x_best,
            fun=f_best,
            jac=None if at.last is None else at.last.grad,
            status=status,
            success=status == STATUS_CONVERGED,
            message=message,
            nit=at.nit,
            nfev=self.spent,
            njev=self.njev,
            best_x=x_best,
            best_fun=f_best,
            last_x=at.x,
            last_fun=last_fun,
            history=self.history,
            wall_seconds=time.perf_counter() - t0,
        )

    def _oracle_budget_error(self) -> BudgetExceeded:
        """The oracle's own budget (below this run's): the error its next query would raise."""
        o = self.oracle
        return BudgetExceeded(o.queries, int(o.max_queries or 0), o.best_x, o.best_f)

    def _final_value(self, x: Array, default: float) -> float:
        """f at the last iterate if the budget allows (it may be the best point)."""
        if self.max_queries is not None and self.spent >= self.max_queries:
            return default
        if self.best_x is not None and bool(np.array_equal(to_numpy(self.best_x), to_numpy(x))):
            return self.best_fun  # already queried there (e.g. x0 when no iteration ran)
        try:
            return float(self.oracle(x))  # the oracle keeps it if it is the best
        except (BudgetExceeded, OracleError, KeyboardInterrupt):
            return default

    def _call_back(self, est: Estimate, fun_k: float) -> bool:
        at = self.at
        # copies: the callback may keep or write into what it gets; the run must not change
        state = OptimizeResult(
            x=copy_of(at.x),
            fun=fun_k,
            jac=copy_of(est.grad),
            nit=at.nit,
            nfev=self.spent,
            best_x=None if self.best_x is None else copy_of(self.best_x),
            best_fun=self.best_fun,
        )
        try:
            answer = (
                self.callback(intermediate_result=state)
                if self.by_keyword
                else self.callback(state)
            )
        except StopIteration:
            return True
        return answer is True


def _takes_intermediate_result(callback: Callable[..., Any]) -> bool:
    try:
        return "intermediate_result" in inspect.signature(callback).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
