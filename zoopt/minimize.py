"""``minimize`` and its ask/tell twin.

Both run the same step: plan the queries of a gradient estimate at the current point,
get their values, finish the estimate, apply the optimizer. :class:`AskTell` hands the
points out and takes the values back; :func:`minimize` evaluates them itself — with the
same seed both produce identical iterates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ._array import Array, as_float_vector, copy_of, like, to_numpy
from .estimators import RGE, Estimate, Estimator, QueryPlan
from .optim import SGD, Optimizer
from .oracle import BaseOracle, BudgetExceeded, OracleError, as_oracle
from .schedules import Schedule
from .step import ZO, update


class OptimizeResult(dict):
    """scipy-style result: a dict whose keys are also attributes.

    Keys: ``x`` (final iterate), ``fun`` (f at ``x``, or the last known value), ``nit``,
    ``nfev`` (oracle queries), ``success``, ``message``, ``best_x``/``best_fun`` (best point
    queried), ``history`` (per-iteration lists: ``fun`` f(x_k) or NaN when the scheme did not
    evaluate it, ``nfev`` cumulative queries, ``lr``, ``grad_norm``), ``wall_seconds``.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    def __repr__(self) -> str:
        keys = ("message", "success", "fun", "nit", "nfev")
        return "OptimizeResult(" + ", ".join(f"{k}={self.get(k)!r}" for k in keys) + ")"


def _default_estimator(dim: int) -> Estimator:
    return RGE(q=min(20, dim), mu=1e-3)


class AskTell:
    """Zeroth-order optimization driven from outside.

    Example::

        at = AskTell(x0, estimator=CGE(mu=1e-4), optimizer=SGD(lr=0.1), seed=0)
        for _ in range(100):
            X = at.ask()                 # (n, d) points to evaluate
            at.tell([f(p) for p in X])   # values in the same order

    Args:
        x0: starting point, shape ``(d,)`` (numpy, torch or CuPy).
        estimator: gradient estimator (default: RGE with q=min(20, d), μ=1e-3).
        optimizer: update rule (default: SGD with ``lr``).
        lr: learning rate or schedule for the default optimizer (default 1e-3).
        seed: seed of the random directions (int, ``np.random.Generator`` or None).
        mu: optional schedule for the estimator's μ (a callable of the iteration).
        coords: optional callable ``iteration -> coords`` for dynamic sparse CGE.
    """

    def __init__(
        self,
        x0: Any,
        estimator: Estimator | None = None,
        optimizer: Optimizer | None = None,
        *,
        lr: float | Schedule | None = None,
        seed: int | np.random.Generator | None = None,
        mu: Schedule | None = None,
        coords: Callable[[int], Any] | None = None,
    ):
        self.x = copy_of(as_float_vector(x0))  # the caller's x0 is never written to
        self.dim = int(self.x.shape[0])
        self.estimator = estimator if estimator is not None else _default_estimator(self.dim)
        if not isinstance(self.estimator, Estimator):
            raise TypeError(
                f"estimator must be a zoopt estimator (RGE, CGE), got {self.estimator!r}"
            )
        if optimizer is not None and lr is not None:
            raise ValueError("pass lr to the optimizer, not to both the optimizer and AskTell")
        self.optimizer = optimizer if optimizer is not None else SGD(lr=1e-3 if lr is None else lr)
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a zoopt optimizer (SGD, Adam, SignSGD), got {optimizer!r}"
            )
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.source = ZO(self.estimator, mu=mu, coords=coords)
        self.nit = 0
        self.last: Estimate | None = None
        self._plan: QueryPlan | None = None

    def plan(self) -> QueryPlan:
        """The query plan of the current step (created once per step)."""
        if self._plan is None:
            self._plan = self.source.plan(self.x, rng=self.rng, iteration=self.nit)
        return self._plan

    def discard(self) -> None:
        """Forget the pending plan (its values will not be told); the next ``ask`` plans
        the same iteration again."""
        self._plan = None

    def ask(self) -> Array:
        """The ``(n, d)`` points whose values the next :meth:`tell` needs (same until told)."""
        return self.plan().all_points()

    def tell(self, values: Any) -> Estimate:
        """Give the values at the asked points (in order); performs the update.

        Returns the gradient :class:`Estimate` of this step.
        """
        plan = self.plan()
        if not hasattr(values, "shape"):
            values = np.asarray(values, dtype=np.float64)
        if tuple(values.shape) != (plan.n,):
            raise ValueError(
                f"tell expects {plan.n} values (one per asked point), got shape {tuple(values.shape)}"
            )
        host = to_numpy(values)
        if not np.all(np.isfinite(host)):
            bad = int(np.flatnonzero(~np.isfinite(host))[0])
            raise ValueError(f"tell got a non-finite value {host[bad]} at index {bad}")
        est = plan.finish(like(values, self.x))
        self.x = update(self.optimizer, self.x, est)
        self.last = est
        self.nit += 1
        self._plan = None
        return est

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: x, iteration, optimizer state, RNG state."""
        if self._plan is not None:
            raise RuntimeError(
                "state_dict() between ask() and tell(): tell the pending values first"
            )
        return {
            "x": np.array(to_numpy(self.x), copy=True),
            "nit": self.nit,
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output. Everything is checked before anything
        is changed: a bad state raises ``ValueError`` and leaves this object as it was."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = {"x", "nit", "optimizer", "rng"} - set(state)
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
        self.optimizer.check_state_dict(state["optimizer"], self.dim)
        probe = type(self.rng.bit_generator)()
        try:
            probe.state = state["rng"]
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"state rng is not a {type(probe).__name__} state: {exc}") from exc
        self.x = like(x, self.x)
        self.nit = int(nit)
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        self._plan = None


def minimize(
    fun: Callable[..., Any] | BaseOracle,
    x0: Any,
    *,
    estimator: Estimator | None = None,
    optimizer: Optimizer | None = None,
    lr: float | Schedule | None = None,
    maxiter: int = 1000,
    max_queries: int | None = None,
    callback: Callable[[OptimizeResult], Any] | None = None,
    seed: int | np.random.Generator | None = None,
    mu: Schedule | None = None,
    coords: Callable[[int], Any] | None = None,
    batched: bool = False,
    gtol: float | None = None,
    progress: bool = False,
) -> OptimizeResult:
    """Minimize a black-box function with zeroth-order gradient estimates.

    Args:
        fun: ``fun(x) -> float`` (or ``fun(X) -> values`` with ``batched=True``), or an oracle.
        x0: starting point, shape ``(d,)``; numpy, torch or CuPy (kept on its device).
        estimator: :class:`~zoopt.RGE` (default, q=min(20, d), μ=1e-3) or :class:`~zoopt.CGE`.
        optimizer: :class:`~zoopt.SGD` (default), :class:`~zoopt.Adam`, :class:`~zoopt.SignSGD`.
        lr: learning rate or schedule of the default SGD (default 1e-3).
        maxiter: number of iterations.
        max_queries: stop before a step would exceed this many queries.
        callback: called after each iteration with an :class:`OptimizeResult` of the current
            state (``x``, ``nit``, ``nfev``, ``fun``); returning ``True`` stops.
        seed: seed for the random directions; runs with the same seed are identical.
        mu: optional schedule for μ; coords: optional ``iteration -> coords`` (sparse CGE).
        gtol: stop successfully when the gradient estimate's norm falls below it.
        progress: show a tqdm progress bar.

    Returns:
        :class:`OptimizeResult`. ``success`` is False when the query budget ran out, a
        value was non-finite or the oracle failed; the best point queried is always kept.
    """
    if isinstance(maxiter, bool) or not isinstance(maxiter, int | np.integer) or maxiter < 0:
        raise ValueError(f"maxiter must be a non-negative integer, got {maxiter!r}")
    if max_queries is not None and (
        not isinstance(max_queries, int | np.integer) or max_queries < 1
    ):
        raise ValueError(f"max_queries must be a positive integer or None, got {max_queries!r}")
    if gtol is not None and not gtol > 0:
        raise ValueError(f"gtol must be > 0, got {gtol!r}")
    at = AskTell(x0, estimator, optimizer, lr=lr, seed=seed, mu=mu, coords=coords)
    oracle = as_oracle(fun, dim=at.dim, batched=batched)
    start_queries = oracle.queries
    history: dict[str, list[float]] = {"fun": [], "nfev": [], "lr": [], "grad_norm": []}
    message, success = f"completed maxiter={maxiter} iterations", True
    interrupted = False
    last_fun = math.nan
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=maxiter, desc="zoopt.minimize", unit="it", mininterval=0.5)
    try:
        while at.nit < maxiter:
            plan = at.plan()
            spent = oracle.queries - start_queries
            if max_queries is not None and spent + plan.n > max_queries:
                message, success = f"max_queries={max_queries} reached ({spent} spent)", False
                break
            lr_now = at.optimizer.current_lr()
            try:
                values = plan.evaluate(oracle)
            except BudgetExceeded as exc:
                message, success = str(exc), False
                break
            except OracleError as exc:
                message, success = f"oracle failed: {exc}", False
                break
            if not np.all(np.isfinite(to_numpy(values))):
                message, success = (
                    "a queried value was non-finite (on_nonfinite='inf'); stopped",
                    False,
                )
                at.discard()
                break
            est = at.tell(values)
            gnorm = float(np.linalg.norm(to_numpy(est.grad)))
            last_fun = math.nan if est.fx is None else est.fx
            history["fun"].append(last_fun)
            history["nfev"].append(oracle.queries - start_queries)
            history["lr"].append(lr_now)
            history["grad_norm"].append(gnorm)
            if bar is not None:
                bar.update(1)
                shown = last_fun if math.isfinite(last_fun) else oracle.best_f
                bar.set_postfix(
                    f=f"{shown:.4g}", queries=oracle.queries - start_queries, refresh=False
                )
            if callback is not None:
                state = OptimizeResult(
                    x=at.x, nit=at.nit, nfev=oracle.queries - start_queries, fun=last_fun
                )
                if callback(state) is True:
                    message = "stopped by callback"
                    break
            if gtol is not None and gnorm < gtol:
                message = f"gradient estimate norm {gnorm:.3g} < gtol={gtol}"
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if bar is not None:
            bar.close()
    spent = oracle.queries - start_queries
    fun_x = last_fun
    if not interrupted and (max_queries is None or spent < max_queries):
        try:
            fun_x = oracle(at.x)
        except (BudgetExceeded, OracleError):
            pass
        except KeyboardInterrupt:  # a Ctrl-C during that last query: keep what we have
            interrupted = True
    if interrupted:
        # the function is not called again: the best point queried so far is the answer
        message, success = "interrupted (KeyboardInterrupt); returning the best point so far", False
        x_out, fun_out = at.x, last_fun
        if oracle.best_x is not None:
            x_out, fun_out = oracle.best_x, oracle.best_f
        return OptimizeResult(
            x=x_out,
            fun=fun_out,
            nit=at.nit,
            nfev=oracle.queries - start_queries,
            success=False,
            message=message,
            best_x=x_out,
            best_fun=fun_out,
            history=history,
            wall_seconds=time.perf_counter() - t0,
        )
    best_x, best_fun = oracle.best_x, oracle.best_f
    if best_x is None or fun_x < best_fun:
        best_x, best_fun = at.x, fun_x
    return OptimizeResult(
        x=at.x,
        fun=fun_x,
        nit=at.nit,
        nfev=oracle.queries - start_queries,
        success=success,
        message=message,
        best_x=best_x,
        best_fun=best_fun,
        history=history,
        wall_seconds=time.perf_counter() - t0,
    )
