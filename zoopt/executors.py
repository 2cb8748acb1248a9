"""Where a batch of points is evaluated: one protocol for threads, processes, Dask and maps.

``minimize(workers=...)``, a loop around :class:`~zoopt.AskTell` and :mod:`zoopt.parallel`
all hand a function and a batch of points to a :class:`QueryExecutor` and get one value per
point back, in order::

    with as_executor(2) as ex:                   # 2 loky worker processes (cloudpickle)
        while not at.done:
            at.tell(ex.map(f, at.ask()))

What ``workers`` may be (:func:`as_executor`):

==============================  ==============================================================
``None``, ``1``                 in this process, one point after another
``N`` (int > 1)                 ``N`` worker processes (loky: the function travels by
                                cloudpickle, so lambdas and functions of ``__main__`` work;
                                the pool is kept and reused across batches and calls)
``"threads:N"``                 ``N`` threads (I/O-bound functions, or ones releasing the GIL)
a ``concurrent.futures``        its ``submit``; never shut down here (it is the caller's)
``Executor``
a Dask ``distributed.Client``   its ``submit`` / ``gather`` (never closed here)
a :class:`QueryExecutor`        used as it is
any other callable              a map-like ``workers(fn, points) -> iterable``
                                (``multiprocessing.Pool(4).map``); called once per batch
==============================  ==============================================================

Failures are reported, never hung on: a point whose call raises gives :class:`QueryError`
naming its index in the batch (and the worker's traceback as a note); a worker process that
dies (``os._exit``, a segfault, the OOM killer) gives :class:`WorkerDied` at once; the next
batch starts a fresh pool.

Process pools come from ``loky`` (the process pool joblib runs on, by the same maintainers):
its reusable executor restarts dead workers, pickles with cloudpickle, and answers a submit in
about 0.5 ms where a ``joblib.Parallel`` call costs about 10 ms, which a line search's
one-point batches would pay at every step. Dask is never imported here: a ``Client`` can only
exist if its module already is.
"""

from __future__ import annotations

import pickle
import sys
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor, Future, ThreadPoolExecutor
from concurrent.futures import Executor as FuturesExecutorType
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "DaskExecutor",
    "FuturesExecutor",
    "MapExecutor",
    "ProcessExecutor",
    "QueryError",
    "QueryExecutor",
    "SerialExecutor",
    "ThreadExecutor",
    "WorkerDied",
    "WorkersSpec",
    "as_executor",
    "chunk_bounds",
]

#: chunks per worker a batch is cut into (few: each chunk is one round trip; more than one:
#: a slow point does not leave the other workers idle for a whole batch)
CHUNKS_PER_WORKER = 4


class QueryError(RuntimeError):
    """A point's call raised on a worker.

    Attributes: ``index`` (the point's position in the batch), ``error_type`` (the
    exception's class name), ``remote_traceback`` (its traceback text, from the worker).
    """

    def __init__(self, index: int, n: int, error_type: str, message: str, remote_traceback: str):
        super().__init__(
            f"point {index} of the batch of {n} (0-based) raised {error_type}: {message}"
        )
        self.index, self.error_type, self.remote_traceback = index, error_type, remote_traceback


class WorkerDied(RuntimeError):
    """A worker died while evaluating a batch (killed, crashed, out of memory)."""


@runtime_checkable
class QueryExecutor(Protocol):
    """Evaluates a function on a batch of points.

    ``map(fn, points)``: ``[fn(p) for p in points]`` (``points`` a sequence, or an ``(n, d)``
    array: its rows), in order; n calls of ``fn``. Raises :class:`QueryError` (with the
    point's index) if a call raises, :class:`WorkerDied` if a worker dies. ``close()``
    releases what the executor made itself (never what it was handed). The executors of this
    module are also context managers (``with as_executor(4) as ex``).
    """

    workers: int

    def map(self, fn: Callable[[Any], Any], points: Sequence[Any]) -> list[Any]: ...

    def close(self) -> None: ...


def chunk_bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of ``chunks`` (at most ``n``) contiguous near-equal chunks of ``n``."""
    chunks = max(1, min(n, chunks))
    cuts = [n * k // chunks for k in range(chunks + 1)]
    return [(cuts[k], cuts[k + 1]) for k in range(chunks) if cuts[k + 1] > cuts[k]]


@dataclass(frozen=True)
class _Failure:
    """What a worker sends back for a point whose call raised (text only: any exception,
    picklable or not, arrives)."""

    index: int
    error_type: str
    message: str
    remote_traceback: str


def _evaluate_chunk(fn: Callable[[Any], Any], start: int, points: Sequence[Any]) -> list[Any]:
    """``fn`` on each point, on a worker; a raising call ends the chunk with a
    :class:`_Failure` naming its batch index ``start + i``."""
    out: list[Any] = []
    for i, p in enumerate(points):
        try:
            out.append(fn(p))
        except Exception as exc:
            out.append(_Failure(start + i, type(exc).__name__, str(exc), traceback.format_exc()))
            break
    return out


def _collect(chunks: list[list[Any]], n: int) -> list[Any]:
    values = [v for chunk in chunks for v in chunk]
    for v in values:
        if isinstance(v, _Failure):
            error = QueryError(v.index, n, v.error_type, v.message, v.remote_traceback)
            error.add_note(f"traceback on the worker:\n{v.remote_traceback}")
            raise error
    return values


class _Closing:
    workers: int

    def close(self) -> None:
        """Nothing to release (subclasses that own a pool release it)."""

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SerialExecutor(_Closing):
    """In this process, one point after another (what ``workers=None`` means)."""

    workers = 1

    def map(self, fn: Callable[[Any], Any], points: Sequence[Any]) -> list[Any]:
        out = []
        for i, p in enumerate(points):
            try:
                out.append(fn(p))
            except Exception as exc:
                raise QueryError(
                    i, len(points), type(exc).__name__, str(exc), traceback.format_exc()
                ) from exc
        return out

    def __repr__(self) -> str:
        return "SerialExecutor()"


class FuturesExecutor(_Closing):
    """A ``concurrent.futures.Executor``: the batch in chunks, one ``submit`` each.

    Args:
        executor: the pool (a ``ProcessPoolExecutor`` pickles with the standard pickle: the
            function must be importable, unlike with :class:`ProcessExecutor`).
        workers: how many run at once (only sets how finely a batch is cut).
        owned: shut the pool down on :meth:`close` (``False``: it is the caller's).
    """

    def __init__(self, executor: FuturesExecutorType, workers: int = 4, *, owned: bool = False):
        if not isinstance(executor, FuturesExecutorType):
            raise TypeError(f"executor must be a concurrent.futures.Executor, got {executor!r}")
        self.executor, self.workers, self.owned = executor, _positive(workers, "workers"), owned

    def _pool(self) -> FuturesExecutorType:
        return self.executor

    def map(self, fn: Callable[[Any], Any], points: Sequence[Any]) -> list[Any]:
        n = len(points)
        if n == 0:
            return []
        pool = self._pool()
        bounds = chunk_bounds(n, self.workers * CHUNKS_PER_WORKER)
        futures: list[Future[list[Any]]] = []
        try:
            for a, b in bounds:
                futures.append(pool.submit(_evaluate_chunk, fn, a, list(points[a:b])))
            results = [f.result() for f in futures]
        except pickle.PicklingError as exc:
            raise pickle.PicklingError(
                f"{self!r} could not send the function or its points to the workers ({exc}): "
                "processes need a picklable function (no locks, open files or connections "
                "inside); workers='threads:N' runs it in this process"
            ) from exc
        except BrokenExecutor as exc:
            raise WorkerDied(
                f"a worker of {self!r} died while evaluating a batch of {n} points "
                f"({type(exc).__name__}: {exc}); the points' values are lost. A function that "
                "exits its process, crashes or runs out of memory does this"
            ) from exc
        finally:
            for f in futures:  # after a failure: the chunks not started are not run
                f.cancel()
        return _collect(results, n)

    def close(self) -> None:
        if self.owned:
            self.executor.shutdown(wait=False, cancel_futures=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.executor).__name__}, workers={self.workers})"


class ThreadExecutor(FuturesExecutor):
    """``workers`` threads (``workers="threads:N"``): for functions that wait (a remote API)
    or release the GIL; a pure-Python function gains nothing."""

    def __init__(self, workers: int):
        n = _positive(workers, "workers")
        super().__init__(
            ThreadPoolExecutor(max_workers=n, thread_name_prefix="zoopt-worker"), n, owned=True
        )

    def __repr__(self) -> str:
        return f"ThreadExecutor({self.workers})"


class ProcessExecutor(FuturesExecutor):
    """``workers`` processes (``workers=N``), from loky's reusable pool.

    The function and points travel by cloudpickle (lambdas, closures and functions of
    ``__main__`` work); each worker runs one point at a time. The pool outlives this object:
    the next executor with the same ``workers`` (the next ``minimize`` call) finds it warm, and
    its idle workers exit after ``idle_timeout`` seconds. A dead worker breaks the pool for
    the batch in flight (:class:`WorkerDied`); the next batch gets a fresh one. The function
    travels with every chunk: a function holding large data is better off loading it on the
    worker (a module-level cache) than carrying it in its closure.
    """

    def __init__(self, workers: int, *, idle_timeout: float = 300.0):
        n = _positive(workers, "workers")
        self.idle_timeout = float(idle_timeout)
        super().__init__(self._pool_of(n), n, owned=False)

    def _pool_of(self, n: int) -> FuturesExecutorType:
        from loky import get_reusable_executor

        return get_reusable_executor(max_workers=n, timeout=self.idle_timeout)

    def _pool(self) -> FuturesExecutorType:
        # the same pool while it lives; a new one after a worker died (loky replaces a broken
        # reusable executor) or after another size was asked for in between
        self.executor = self._pool_of(self.workers)
        return self.executor

    def __repr__(self) -> str:
        return f"ProcessExecutor({self.workers})"


class DaskExecutor(_Closing):
    """A Dask ``distributed.Client``: one task per chunk (``pure=False``: points are not
    cached as results). The client is the caller's: :meth:`close` leaves it open. A task
    whose worker dies is retried on another (Dask's ``allowed-failures``); one that kills
    every worker it meets ends as :class:`WorkerDied`."""

    def __init__(self, client: Any):
        self.client = client
        workers = client.scheduler_info(n_workers=-1).get("workers", {})
        self.workers = max(1, len(workers))

    def map(self, fn: Callable[[Any], Any], points: Sequence[Any]) -> list[Any]:
        n = len(points)
        if n == 0:
            return []
        from distributed import KilledWorker

        bounds = chunk_bounds(n, self.workers * CHUNKS_PER_WORKER)
        futures = [
            self.client.submit(_evaluate_chunk, fn, a, list(points[a:b]), pure=False)
            for a, b in bounds
        ]
        try:
            results = self.client.gather(futures)
        except KilledWorker as exc:
            raise WorkerDied(
                f"Dask workers kept dying while evaluating a batch of {n} points ({exc})"
            ) from exc
        finally:
            for f in futures:
                f.release()
        return _collect(list(results), n)

    def __repr__(self) -> str:
        return f"DaskExecutor({self.client!r})"


class MapExecutor(_Closing):
    """A map-like callable ``workers(fn, points) -> iterable`` (``multiprocessing.Pool.map``,
    ``executor.map``, your own), called once per batch with a wrapper of ``fn`` that returns
    a failure record instead of raising, so the failing point's index is known."""

    workers = 1

    def __init__(self, mapper: Callable[..., Any]):
        if not callable(mapper):
            raise TypeError(f"mapper must be callable, got {mapper!r}")
        self.mapper = mapper

    def map(self, fn: Callable[[Any], Any], points: Sequence[Any]) -> list[Any]:
        n = len(points)
        values = list(self.mapper(_IndexedCall(fn), list(enumerate(points))))
        if len(values) != n:
            raise ValueError(
                f"workers={self.mapper!r} returned {len(values)} values for {n} points; it "
                "must return one value per point, in order (like map)"
            )
        return _collect([values], n)

    def __repr__(self) -> str:
        return f"MapExecutor({self.mapper!r})"


class _IndexedCall:
    """``fn`` on ``(index, point)``; a raising call returns a :class:`_Failure` (picklable,
    for process maps)."""

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn

    def __call__(self, item: tuple[int, Any]) -> Any:
        index, point = item
        return _evaluate_chunk(self.fn, index, [point])[0]


def _positive(n: Any, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be an int >= 1, got {n!r}")
    return int(n)


def _is_dask_client(obj: Any) -> bool:
    distributed = sys.modules.get("distributed")  # a Client exists only if this is loaded
    return distributed is not None and isinstance(obj, distributed.Client)


WorkersSpec = int | str | FuturesExecutorType | QueryExecutor | Callable[..., Any] | None


def as_executor(workers: WorkersSpec) -> QueryExecutor:
    """The :class:`QueryExecutor` for a ``workers=`` value (see the module's table).

    A :class:`QueryExecutor` passed in is returned as it is; every other value gives a new
    executor whose :meth:`~QueryExecutor.close` releases only what it made (threads; the
    process pool is kept warm for the next call, see :class:`ProcessExecutor`).
    """
    if workers is None:
        return SerialExecutor()
    if isinstance(workers, bool):
        raise ValueError(
            f"workers must be an int, 'threads:N', an executor or a map, got {workers!r}"
        )
    if isinstance(workers, int):
        _positive(workers, "workers")
        return SerialExecutor() if workers == 1 else ProcessExecutor(workers)
    if isinstance(workers, str):
        kind, _, count = workers.partition(":")
        if kind != "threads" or not count.isdigit() or int(count) < 1:
            raise ValueError(
                f"workers={workers!r}: a string must be 'threads:N' with N >= 1 "
                "(processes: pass the int N)"
            )
        return ThreadExecutor(int(count))
    # pools first: a Dask Client also has map and close (whose map returns futures)
    if isinstance(workers, FuturesExecutorType):
        return FuturesExecutor(workers)
    if _is_dask_client(workers):
        return DaskExecutor(workers)
    if isinstance(workers, QueryExecutor):
        return workers
    if callable(workers):
        return MapExecutor(workers)
    raise ValueError(
        f"workers must be an int, 'threads:N', a concurrent.futures.Executor, a Dask Client, "
        f"a QueryExecutor or a map-like callable, got {workers!r}"
    )
