"""Oracles: functions we may only query.

An oracle maps a flat parameter vector ``x`` of shape ``(d,)`` to a float, and a batch
``X`` of shape ``(n, d)`` to values of shape ``(n,)``. :class:`BaseOracle` adds what every
adapter needs: query counting, a query budget, an error policy for exceptions and
non-finite values, and tracking of the best point seen.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from ._array import Array, copy_of, device_of, itemsize, namespace, to_numpy
from .directions import DirectionSteps

ErrorPolicy = Literal["raise", "inf"]

#: Default cap on the memory of one batch of perturbed points handed to an oracle (bytes).
#: 16 MiB: the batches are built fresh for each call (no defensive copy), and glibc's
#: allocator recycles freed blocks below its 32 MiB mmap threshold instead of handing out
#: new pages to fault in: a CGE estimate costs 1.08x its raw oracle calls with 16 MiB
#: chunks, 1.15x with 64 MiB (benchmarks/estimator_overhead.py, quiet 2-core machine).
DEFAULT_MAX_BATCH_BYTES = 16 * 2**20


class OracleError(RuntimeError):
    """The user's function raised, or returned a non-finite or malformed value."""


class _MalformedValues(OracleError, TypeError):
    """The function returned something that is not one real number per query."""


class BudgetExceeded(RuntimeError):
    """A query would exceed ``max_queries``. Carries the best point seen so far.

    Attributes: ``queries`` (queries spent), ``max_queries``, ``best_x`` and ``best_f``
    (``None`` if no finite value was seen).
    """

    def __init__(self, queries: int, max_queries: int, best_x: Array | None, best_f: float):
        super().__init__(
            f"query budget exhausted: {queries} queries spent of max_queries={max_queries}; "
            f"best value seen {best_f:.6g}"
        )
        self.queries = queries
        self.max_queries = max_queries
        self.best_x = best_x
        self.best_f = best_f


class Budget:
    """The one query budget: queries spent, queries reserved by calls in progress, the cap.

    Every layer that limits queries consults one of these (:class:`BaseOracle` holds one;
    ``minimize`` caps it for a run; the classifier clients reserve from one): a check and
    the reservation it allows happen together under a lock, so callers on many threads can
    never overspend it. ``max_queries=None`` is unlimited.

    * :meth:`charge` — ``n`` queries counted now (an oracle about to evaluate them);
    * :meth:`reserve` then :meth:`settle` / :meth:`release` — ``n`` queries held while a
      call is in flight, counted as their answers come back, the rest given back;
    * :meth:`fits` — whether ``n`` more would fit (a driver's look-ahead: a plan that does
      not fit is not started).
    """

    def __init__(self, max_queries: int | None = None, *, spent: int = 0):
        self._lock = threading.Lock()
        self.max_queries = _check_max_queries(max_queries)
        self.spent = int(spent)
        self.reserved = 0

    @property
    def remaining(self) -> int | None:
        """Queries that may still be reserved (``None`` if unlimited)."""
        if self.max_queries is None:
            return None
        return self.max_queries - self.spent - self.reserved

    def fits(self, n: int) -> bool:
        """Whether ``n`` more queries fit (spent + reserved + n <= max_queries)."""
        remaining = self.remaining
        return remaining is None or n <= remaining

    def reserve(self, n: int) -> int:
        """Hold ``n`` queries for a call in flight; returns the index of the first.

        Raises:
            BudgetExceeded: they do not fit (nothing is reserved then).
        """
        with self._lock:
            self._check_fits(n)
            first = self.spent + self.reserved
            self.reserved += n
            return first

    def settle(self, n: int) -> None:
        """``n`` reserved queries were answered: they count as spent."""
        with self._lock:
            self.reserved -= n
            self.spent += n

    def release(self, n: int) -> None:
        """Give back ``n`` reserved queries that were never answered."""
        with self._lock:
            self.reserved -= n

    def charge(self, n: int) -> int:
        """Count ``n`` queries now (reserve and settle at once); returns the first's index.

        Raises:
            BudgetExceeded: they do not fit (nothing is counted then).
        """
        with self._lock:
            self._check_fits(n)
            first = self.spent
            self.spent += n
            return first

    def _check_fits(self, n: int) -> None:
        # under the lock: the check and the count that follows it are one step
        if not self.fits(n):
            raise BudgetExceeded(
                self.spent + self.reserved, int(self.max_queries or 0), None, math.inf
            )

    def refund(self, n: int) -> None:
        """Uncount ``n`` charged queries that never ran (a batch cut by Ctrl-C)."""
        with self._lock:
            self.spent -= n

    @contextmanager
    def capped(self, n: int | None) -> Iterator[Budget]:
        """Within the block at most ``n`` more queries fit (``None``: no further cap); the
        cap before is restored afterwards. ``minimize`` runs under this, so its
        ``max_queries`` and the oracle's own budget are one budget."""
        before = self.max_queries
        if n is not None:
            with self._lock:
                cap = self.spent + self.reserved + int(n)
                self.max_queries = cap if before is None else min(before, cap)
        try:
            yield self
        finally:
            self.max_queries = before


def _check_max_queries(max_queries: Any) -> int | None:
    if max_queries is not None and (
        isinstance(max_queries, bool)
        or not isinstance(max_queries, int | np.integer)
        or max_queries < 0
    ):
        raise ValueError(f"max_queries must be a non-negative integer or None, got {max_queries!r}")
    return None if max_queries is None else int(max_queries)


@runtime_checkable
class Oracle(Protocol):
    """What estimators need from a black box."""

    dim: int

    def __call__(self, x: Array) -> float: ...

    def batch(self, X: Array) -> Array: ...


@runtime_checkable
class TrainableOracle(Protocol):
    """An oracle over a model's flat parameters and a data batch: what the trainer drives.

    ``set_batch(*batch)`` takes one item of the task's ``train_batches`` (unpacked; each
    oracle documents its arrays); ``base_value(x)`` is f(x) by the one forward per step that
    may update model state (BatchNorm running statistics) and costs one query;
    ``eval_coordinate_steps`` and ``batch`` are :class:`BaseOracle`'s.
    """

    dim: int
    queries: int

    def set_batch(self, *batch: Any) -> None: ...

    def base_value(self, x: Array) -> float: ...

    def batch(self, X: Array) -> Array: ...

    def eval_coordinate_steps(self, x: Array, coords: Array, step: float) -> Array: ...


@runtime_checkable
class DifferentiableOracle(Protocol):
    """An oracle that can also give its exact gradient (first-order baselines, FO-GraSP)."""

    def loss_and_grad(self, x: Array, *, update_stats: bool = True) -> tuple[float, Array]: ...


def _check_policy(name: str, value: str) -> str:
    if value not in ("raise", "inf"):
        raise ValueError(f"{name} must be 'raise' or 'inf', got {value!r}")
    return value


class BaseOracle:
    """Counting, budget, error policy and best-point tracking around ``_evaluate``.

    Subclasses implement ``_evaluate(X) -> values`` for ``X`` of shape ``(n, d)``; they may
    also override :meth:`eval_coordinate_steps` with a faster path (the torch engine does).

    Args:
        dim: length of the parameter vector.
        max_queries: budget; a batch that would exceed it raises :class:`BudgetExceeded`
            before anything is evaluated. ``None`` means unlimited.
        on_error: ``"raise"`` wraps an exception of the function in :class:`OracleError`
            naming the query; ``"inf"`` records ``+inf`` for that query.
        on_nonfinite: the same choice for NaN/inf values returned by the function.
        max_batch_bytes: memory cap for one batch of points built by the default
            :meth:`eval_coordinate_steps`.
        track_best: keep a copy of the best point queried in ``best_x`` (``best_f`` is
            always tracked). ``False`` for models whose parameters fill the memory: the copy
            (and the point built to take it) would be two more copies of θ.
    """

    def __init__(
        self,
        dim: int,
        *,
        max_queries: int | None = None,
        on_error: ErrorPolicy = "raise",
        on_nonfinite: ErrorPolicy = "raise",
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        track_best: bool = True,
    ):
        if not isinstance(dim, int | np.integer) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if max_batch_bytes <= 0:
            raise ValueError(f"max_batch_bytes must be positive, got {max_batch_bytes!r}")
        self.dim = int(dim)
        #: the query counter and the cap (``queries``, ``max_queries`` and ``remaining`` read
        #: and write it)
        self.budget = Budget(max_queries)
        self.on_error = _check_policy("on_error", on_error)
        self.on_nonfinite = _check_policy("on_nonfinite", on_nonfinite)
        self.max_batch_bytes = int(max_batch_bytes)
        self.best_f = math.inf
        self.best_x: Array | None = None
        if not isinstance(track_best, bool):
            raise TypeError(f"track_best must be True or False, got {track_best!r}")
        self.track_best = track_best

    # -- to implement ---------------------------------------------------------------
    def _evaluate(self, X: Array) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- public API -----------------------------------------------------------------
    def __call__(self, x: Array) -> float:
        """f(x) for one point ``x`` of shape ``(d,)``; costs one query."""
        self._check_point(x)
        xp = namespace(x)
        return float(self.batch(xp.reshape(x, (1, self.dim)))[0])

    def batch(self, X: Array) -> Array:
        """f at each row of ``X`` (shape ``(n, d)``); returns shape ``(n,)``; costs n queries."""
        if getattr(X, "ndim", None) != 2 or X.shape[1] != self.dim:
            raise ValueError(
                f"expected a batch of shape (n, {self.dim}), got {tuple(getattr(X, 'shape', ()))}"
            )
        return self._batch(X, owned=False, point_of=lambda i: X[i])

    def _batch(self, X: Array, *, owned: bool, point_of: Callable[[int], Array]) -> Array:
        """:meth:`batch` for ``X`` checked by the caller. ``owned``: ``X`` was built by this
        oracle for this one call and nobody else holds it, so no defensive copy is needed;
        ``point_of(i)``: query ``i``'s point as built (not as the function may have left
        ``X``)."""
        n = int(X.shape[0])
        first = self._charge(n)
        values = self._evaluate_checked(X, first, owned=owned)
        self._track_best(values, point_of)
        return values

    def eval_coordinate_steps(self, x: Array, coords: Array, step: float) -> Array:
        """f(x + step * e_c) for each index c in ``coords`` (shape ``(k,)``) → shape ``(k,)``.

        Costs ``k`` queries. The default builds the points in chunks under
        ``max_batch_bytes`` and calls :meth:`batch`; oracles with structure override it.
        """
        xp = namespace(x)
        coords_np = np.asarray(to_numpy(coords), dtype=np.int64)
        k = coords_np.shape[0]
        rows = max(1, self.max_batch_bytes // max(1, self.dim * itemsize(x)))
        out = []
        dev = device_of(x)
        for start in range(0, k, rows):
            idx = coords_np[start : start + rows]
            m = idx.shape[0]
            # a fresh buffer per chunk: the function may keep (or write into) what it was
            # handed, so nobody else holds these points and they need no defensive copy
            buf = xp.empty((m, self.dim), dtype=x.dtype, device=dev)
            buf[...] = x[None, :]
            r = xp.arange(m, device=dev)
            c = xp.asarray(idx, device=dev)
            buf[r, c] = buf[r, c] + step
            point_of = _coordinate_step_point(x, idx, step)
            out.append(self._batch(buf, owned=True, point_of=point_of))
            del buf  # one chunk alive at a time
        if not out:
            return xp.zeros((0,), dtype=x.dtype, device=dev)
        return xp.concat(out) if len(out) > 1 else out[0]

    def eval_direction_steps(self, x: Array, steps: DirectionSteps) -> Array:
        """f(x + steps.steps[r] · u_{steps.index[r]}) for each row r → shape ``(rows,)``.

        Costs ``rows`` queries. The default builds the points from their seeds in chunks
        under ``max_batch_bytes`` and calls :meth:`batch`; oracles that can perturb in place
        (``ModuleOracle``) or ship seeds (``ParallelOracle``) override it.
        """
        self._check_point(x)
        self.check_direction_steps(steps)
        xp = namespace(x)
        rows = max(1, self.max_batch_bytes // max(1, self.dim * itemsize(x)))
        out = []
        for s in range(0, len(steps), rows):
            # points built fresh for this one call: no defensive copy needed
            P = steps.rows(s, min(s + rows, len(steps))).points(x)
            # the best point is rebuilt from its seed: the function may have written into P
            rebuilt = lambda i, s=s: steps.rows(s + i, s + i + 1).points(x)[0]  # noqa: E731
            out.append(self._batch(P, owned=True, point_of=rebuilt))
            del P  # one chunk alive at a time
        if not out:
            return xp.zeros((0,), dtype=x.dtype, device=device_of(x))
        return xp.concat(out) if len(out) > 1 else out[0]

    def check_direction_steps(self, steps: DirectionSteps) -> None:
        """Raise unless ``steps`` are seeded rows for this oracle's dimension."""
        if not isinstance(steps, DirectionSteps):
            raise TypeError(f"steps must be a zoopt DirectionSteps, got {type(steps).__name__}")
        if steps.directions.dim != self.dim:
            raise ValueError(
                f"the directions have dim={steps.directions.dim} but the oracle has dim={self.dim}"
            )

    @contextmanager
    def run_scope(self, max_queries: int | None = None) -> Iterator[None]:
        """One optimization run on this oracle (``minimize``'s): within the block at most
        ``max_queries`` more queries fit (the one budget, capped; ``None``: the oracle's own
        cap only) and ``best_f``/``best_x`` are the block's best point, kept even with
        ``track_best=False`` (a run returns it). Afterwards the cap is restored and the
        oracle's best is the better of the one before and the block's."""
        before = (self.best_f, self.best_x, self.track_best)
        self.best_f, self.best_x, self.track_best = math.inf, None, True
        try:
            with self.budget.capped(max_queries):
                yield
        finally:
            self.track_best = before[2]
            if not self.best_f < before[0]:
                self.best_f, self.best_x = before[0], before[1]
            elif not self.track_best:
                self.best_x = None

    @property
    def queries(self) -> int:
        """Queries counted so far (the budget's ``spent``)."""
        return self.budget.spent

    @queries.setter
    def queries(self, value: int) -> None:  # a replica's count, a restored checkpoint's
        self.budget.spent = int(value)

    @property
    def max_queries(self) -> int | None:
        """The budget's cap (``None``: unlimited)."""
        return self.budget.max_queries

    @max_queries.setter
    def max_queries(self, value: int | None) -> None:
        self.budget.max_queries = _check_max_queries(value)

    @property
    def remaining(self) -> int | None:
        """Queries left in the budget (``None`` if unlimited)."""
        return self.budget.remaining

    # -- helpers for subclasses -----------------------------------------------------
    def _check_point(self, x: Array) -> None:
        if getattr(x, "ndim", None) != 1 or x.shape[0] != self.dim:
            raise ValueError(
                f"expected a point of shape ({self.dim},), got {tuple(getattr(x, 'shape', ()))}"
            )

    def _charge(self, n: int) -> int:
        """Reserve ``n`` queries (raising :class:`BudgetExceeded` first if they don't fit).

        Returns the global index of the first of them.
        """
        try:
            return self.budget.charge(n)
        except BudgetExceeded as exc:  # the oracle knows the best point the error carries
            raise BudgetExceeded(exc.queries, exc.max_queries, self.best_x, self.best_f) from None

    #: what the error messages call the thing being queried
    _what = "function"

    def guarded(
        self,
        evaluate: Callable[[], Any],
        n: int,
        first: int,
        points: Array | None,
        fallback: Callable[[], Array] | None = None,
    ) -> Array:
        """The one guarded call every evaluation goes through: ``evaluate()`` for queries
        ``first..first+n-1`` under the error policy (``on_error``: raise an ``OracleError``
        naming the queries, or use ``fallback()``, default all ``+inf``) and the value checks
        (real numbers, ``n`` of them, ``on_nonfinite``). ``points``: ``(n or 1, d)`` of the
        queries' array type, for the result's namespace and device."""
        try:
            values = _real_values(evaluate(), n, first)
        except (BudgetExceeded, KeyboardInterrupt):
            raise
        except Exception as exc:
            if self.on_error == "raise":
                if isinstance(exc, _MalformedValues):
                    raise
                raise OracleError(
                    f"the {self._what} raised on queries {first}..{first + n - 1} "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
            if fallback is not None:
                return fallback()
            values = np.full(n, math.inf)
        return self._apply_nonfinite_policy(values, n, first, points)

    def _evaluate_owned(self, X: Array) -> Any:
        """``_evaluate`` for points only this call holds (see :meth:`_batch`); oracles that
        copy the points before handing them to user code may skip that copy here."""
        return self._evaluate(X)

    def _evaluate_checked(self, X: Array, first: int, *, owned: bool = False) -> Array:
        evaluate = self._evaluate_owned if owned else self._evaluate
        return self.guarded(
            lambda: evaluate(X),
            X.shape[0],
            first,
            X,
            fallback=lambda: self._evaluate_rowwise_inf(X, first),
        )

    def _evaluate_rowwise_inf(self, X: Array, first: int) -> Array:
        """Under ``on_error='inf'``: row by row, so one failing query doesn't poison the batch."""
        xp = namespace(X)
        out = []
        for i in range(X.shape[0]):
            try:
                v = _real_values(self._evaluate(X[i : i + 1]), 1, first + i)
            except (BudgetExceeded, KeyboardInterrupt):
                raise
            except Exception:
                v = xp.asarray([math.inf], dtype=X.dtype, device=device_of(X))
                out.append(v)
                continue
            out.append(self._apply_nonfinite_policy(v, 1, first + i, X))
        return xp.concat(out)

    def _apply_nonfinite_policy(self, values: Any, n: int, first: int, X: Array | None) -> Array:
        xp = namespace(X) if X is not None else np
        if not hasattr(values, "shape"):
            values = np.asarray(values, dtype=np.float64)
        values = xp.asarray(values, device=device_of(X)) if X is not None else values
        values = xp.reshape(values, (-1,)) if values.ndim != 1 else values
        if values.shape[0] != n:
            raise OracleError(
                f"the function returned {values.shape[0]} values for a batch of {n} queries"
            )
        finite = xp.isfinite(values)
        if not bool(xp.all(finite)):
            bad = int(np.flatnonzero(~to_numpy(finite))[0])
            if self.on_nonfinite == "raise":
                raise OracleError(
                    f"the function returned a non-finite value {float(values[bad])} at query "
                    f"{first + bad} (set on_nonfinite='inf' to treat such values as +inf)"
                )
            values = xp.where(
                finite, values, xp.asarray(math.inf, dtype=values.dtype, device=device_of(values))
            )
        return values

    def _track_best(self, values: Array, point_of: Callable[[int], Array]) -> None:
        host = to_numpy(values)
        if host.size == 0:
            return
        i = int(np.argmin(host))
        if host[i] < self.best_f:
            self.best_f = float(host[i])
            if self.track_best:
                p = point_of(i)
                self.best_x = p.clone() if hasattr(p, "clone") else p.copy()


class FunctionOracle(BaseOracle):
    """An oracle around a Python callable (see :func:`as_oracle`)."""

    def __init__(
        self,
        fn: Callable[..., Any],
        dim: int,
        *,
        batched: bool = False,
        workers: Callable[..., Any] | None = None,
        **policy: Any,
    ):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        if workers is not None and (batched or not callable(workers)):
            raise ValueError("workers must be a map-like callable, and only without batched=True")
        super().__init__(dim, **policy)
        self.fn = fn
        self.batched = bool(batched)
        #: a map-like callable evaluating the rows of a batch in parallel (``None``: in turn)
        self.workers = workers

    def _evaluate(self, X: Array) -> Any:
        # X may be the caller's (x0, an iterate, a user's batch): the function gets a copy,
        # so writing into its argument cannot change them
        return self._call(copy_of(X) if self.batched else X)

    def _evaluate_owned(self, X: Array) -> Any:
        # X was built for this call alone: a batched function may have it as it is (a copy
        # of every chunk cost a quarter of a CGE estimate); single points are still copied
        # one by one in _call, which is cheap next to one Python call per point
        return self._call(X)

    def _call(self, X: Array) -> Any:
        if self.batched:
            return self.fn(X)
        # every row its own array: a function may keep or modify what it was handed
        rows = [copy_of(X[i]) for i in range(X.shape[0])]
        results = map(self.fn, rows) if self.workers is None else self.workers(self.fn, rows)
        values: list[float] = []
        try:
            for i, v in enumerate(results):
                values.append(_real_values(v, 1, i, single=True)[0])
        except KeyboardInterrupt:
            self._keep_before_interrupt(rows, values)
            raise
        if len(values) != len(rows):
            # a map that drops or invents points must not turn into made-up function values
            raise OracleError(
                f"workers={self.workers!r} returned {len(values)} values for {len(rows)} "
                "points; it must return one value per point, in order (like map)"
            )
        return np.asarray(values, dtype=np.float64)

    def _keep_before_interrupt(self, rows: list[Array], values: list[float]) -> None:
        """Ctrl-C in the middle of a batch: the values that came back are real answers, so
        the best of them is kept, and the points never started are not counted as queries
        (the one interrupted is: the function was running on it)."""
        self.budget.refund(max(0, len(rows) - len(values) - 1))
        if values:
            finite = np.where(np.isfinite(values), values, math.inf)
            self._track_best(finite, lambda i: rows[i])

    def __repr__(self) -> str:
        name = getattr(self.fn, "__name__", type(self.fn).__name__)
        return f"FunctionOracle({name}, dim={self.dim}, batched={self.batched}, queries={self.queries})"


def _coordinate_step_point(x: Array, coords: np.ndarray, step: float) -> Callable[[int], Array]:
    """Query ``i``'s point ``x + step * e_coords[i]``, rebuilt from ``x``."""

    def point(i: int) -> Array:
        p = copy_of(x)
        c = int(coords[i])
        p[c] = p[c] + step
        return p

    return point


def _real_values(values: Any, n: int, first: int, single: bool = False) -> Any:
    """``values`` as real numbers; a string, object or complex value is a malformed return.

    Raises:
        _MalformedValues: naming the queries and the offending value.
    """
    where = f"query {first}" if n == 1 else f"queries {first}..{first + n - 1}"
    hint = " (on_error='inf' records +inf for such queries)"
    if single:
        if isinstance(values, bool | str | bytes) or (
            hasattr(values, "dtype") and getattr(values.dtype, "kind", "f") not in "biuf"
        ):
            raise _MalformedValues(
                f"the function returned {values!r} for {where}; expected a number{hint}"
            )
        try:
            if hasattr(values, "shape") and getattr(values, "ndim", 0) > 0:
                if int(np.prod(values.shape)) != 1:  # a 1-element array is one number (scipy)
                    raise ValueError(f"{int(np.prod(values.shape))} values for one point")
                values = values.reshape(())
            return np.asarray([float(values)])
        except (TypeError, ValueError) as exc:
            raise _MalformedValues(
                f"the function returned {values!r} for {where}; expected a number{hint}"
            ) from exc
    if not hasattr(values, "dtype"):
        try:
            values = np.asarray(values)
        except (TypeError, ValueError) as exc:
            raise _MalformedValues(f"the function returned {values!r} for {where}{hint}") from exc
    kind = getattr(values.dtype, "kind", None)
    if kind is None:  # torch: bool, int and floating dtypes are fine, complex is not
        if values.is_complex():
            raise _MalformedValues(f"the function returned complex values for {where}{hint}")
        return values
    if kind not in "biuf":
        sample = np.asarray(values).reshape(-1)[:1]
        raise _MalformedValues(
            f"the function returned values of dtype {values.dtype} (e.g. {sample[0]!r}) for "
            f"{where}; expected real numbers{hint}"
        )
    return values


def as_oracle(
    fn: Callable[..., Any] | BaseOracle,
    dim: int | None = None,
    *,
    batched: bool = False,
    max_queries: int | None = None,
    on_error: ErrorPolicy = "raise",
    on_nonfinite: ErrorPolicy = "raise",
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
) -> BaseOracle:
    """Wrap a callable as a counted oracle.

    Args:
        fn: ``fn(x) -> float`` for ``x`` of shape ``(d,)``, or with ``batched=True``
            ``fn(X) -> values`` for ``X`` of shape ``(n, d)``. An existing oracle is returned
            as is (``dim`` must then match).
        dim: d, the length of the parameter vector (required for callables).
        batched: whether ``fn`` evaluates a whole batch at once.
        max_queries, on_error, on_nonfinite, max_batch_bytes: see :class:`BaseOracle`.
    """
    if isinstance(fn, BaseOracle):
        if dim is not None and dim != fn.dim:
            raise ValueError(f"dim={dim} does not match the oracle's dim={fn.dim}")
        given = {
            "batched": (batched, False),
            "max_queries": (max_queries, None),
            "on_error": (on_error, "raise"),
            "on_nonfinite": (on_nonfinite, "raise"),
            "max_batch_bytes": (max_batch_bytes, DEFAULT_MAX_BATCH_BYTES),
        }
        ignored = [f"{k}={v!r}" for k, (v, default) in given.items() if v != default]
        if ignored:
            raise ValueError(
                f"as_oracle got an existing oracle and {', '.join(ignored)}: those settings "
                "belong to the oracle; set them when you create it"
            )
        return fn
    if dim is None:
        raise ValueError("dim is required to wrap a callable (the length of its input vector)")
    return FunctionOracle(
        fn,
        dim,
        batched=batched,
        max_queries=max_queries,
        on_error=on_error,
        on_nonfinite=on_nonfinite,
        max_batch_bytes=max_batch_bytes,
    )
