"""Forward parallelization on Dask: the queries of one sparse-CGE step, split across workers.

The coordinate-wise finite differences of sparse CGE (DeepZero eq. 5) are independent, so a
step's coordinates are cut into one chunk per worker and each worker evaluates its chunk with
its own replica of the oracle. :class:`DistributedOracle` is a :class:`~zoopt.BaseOracle`, so
estimators, ``minimize`` and the trainer use it unchanged; counting, budget and error policy
stay at the client.

What travels, per step (everything scattered is broadcast to all workers once):

* the oracle *factory* — once, when the oracle is created; each worker builds its replica
  from it on first use and keeps it in the worker process, keyed by the oracle's token;
* the batch — once per :meth:`DistributedOracle.set_batch`; workers load it lazily;
* the flat parameter vector ``x`` — once per step (reused while ``x`` does not change);
* buffers of the local replica's model (BatchNorm running statistics) — when they change,
  so worker replicas see exactly what the single-process oracle would;
* the coordinate chunk of each worker — with its task; the values come back.

A worker that dies mid-step loses only its task: Dask reschedules it on another worker (tasks
prefer a worker but are never pinned to it), and a fresh worker rebuilds its replica from
the factory and the scattered batch, so the step completes with the same values.

Chunks are balanced by measured cost. For oracles with parameter groups (the torch engine's
cost per query depends on where in the network a coordinate's layer sits: early layers cost
~30x more than the head on ResNet-20), a few coordinates of each group are timed on the
workers the first time the group appears, and chunks are cut at equal estimated time. Every
call then times each group on the workers as it evaluates it (the engine works group by
group anyway) and blends that into the estimate, so a new mask is re-measured by its own
first step at no cost. Without groups, chunks have equal sizes.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ._array import Array, device_of, namespace, to_numpy
from .oracle import DEFAULT_MAX_BATCH_BYTES, BaseOracle, BudgetExceeded, ErrorPolicy, OracleError

Balance = Literal["auto", "cost", "equal"]

__all__ = [
    "DistributedOracle",
    "GroupCosts",
    "ModuleOracleFactory",
    "OracleTimeout",
    "connect",
    "distribute_task",
    "distributed_training",
    "split_by_cost",
]


class OracleTimeout(OracleError, TimeoutError):
    """A distributed evaluation did not finish within the oracle's ``timeout``."""


# ---------------------------------------------------------------------------------------
# Cluster
# ---------------------------------------------------------------------------------------


def connect(
    workers: int | None = None,
    scheduler: str | None = None,
    *,
    timeout: float = 60.0,
) -> Any:
    """A Dask ``Client``: a new local cluster, or an existing cluster by address.

    Args:
        workers: local cluster: number of worker processes (default: one per CPU core), each
            with one thread (so one torch thread: the workers are the parallelism).
            With ``scheduler``: wait until at least this many workers have joined.
        scheduler: address of a running scheduler, e.g. ``"tcp://10.0.0.5:8786"``.
        timeout: seconds to wait for the scheduler / the workers.

    Returns:
        ``distributed.Client``; use it as a context manager. Closing a client made for a
        local cluster also shuts the cluster down.
    """
    from distributed import Client

    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int | np.integer) or workers < 1
    ):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    if not (isinstance(timeout, int | float) and timeout > 0):
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    if scheduler is None:
        import dask

        n = int(workers) if workers is not None else max(1, os.cpu_count() or 1)
        # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers, which also turns off
        # glibc's adaptive mmap threshold: every large activation tensor is then mmapped and
        # page-faulted afresh. That measured ~35 % slower (wall) on the torch engine here;
        # our workers run few, long tasks, so they keep glibc's defaults instead.
        # Keyword arguments (not a LocalCluster object) make the client own the cluster,
        # so closing the client also stops the workers.
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            return Client(
                n_workers=n,
                threads_per_worker=1,
                dashboard_address=None,
                processes=True,
                timeout=timeout,
            )
    if not isinstance(scheduler, str) or "://" not in scheduler:
        raise ValueError(f"scheduler must be an address like 'tcp://host:8786', got {scheduler!r}")
    client = Client(scheduler, timeout=timeout)
    if workers is not None:
        try:
            client.wait_for_workers(int(workers), timeout=timeout)
        except BaseException:
            client.close()
            raise
    return client


# ---------------------------------------------------------------------------------------
# Load balancing (pure functions)
# ---------------------------------------------------------------------------------------


def split_by_cost(coords: np.ndarray, costs: np.ndarray, parts: int) -> list[np.ndarray]:
    """Cut ``coords`` into at most ``parts`` contiguous, non-empty chunks of near-equal cost.

    Args:
        coords: shape ``(k,)``, in the order the chunks should follow (sorted indices keep
            each worker's coordinates within few stages, which the torch engine reuses).
        costs: shape ``(k,)``, estimated seconds of each coordinate (>= 0).
        parts: number of chunks wanted (workers).

    Returns:
        chunks whose concatenation is ``coords``; each chunk's cost differs from
        ``sum(costs) / parts`` by at most the largest single cost.
    """
    coords = np.asarray(coords)
    costs = np.asarray(costs, dtype=np.float64)
    if coords.ndim != 1 or costs.shape != coords.shape:
        raise ValueError(
            f"coords and costs must be 1-D of the same length, got {coords.shape} and {costs.shape}"
        )
    if isinstance(parts, bool) or not isinstance(parts, int | np.integer) or parts < 1:
        raise ValueError(f"parts must be a positive integer, got {parts!r}")
    if costs.size and (not np.all(np.isfinite(costs)) or costs.min() < 0):
        raise ValueError("costs must be finite and >= 0")
    k = coords.shape[0]
    if k == 0:
        return []
    parts = min(int(parts), k)
    cum = np.cumsum(costs)
    total = cum[-1]
    if parts == 1 or total <= 0:
        return [c for c in np.array_split(coords, parts) if c.size]
    # Chunk j ends after the coordinate where the running cost crosses total * j / parts;
    # of the two candidate cut points around each crossing, take the closer one.
    targets = total * np.arange(1, parts) / parts
    hi = np.searchsorted(cum, targets, side="left") + 1  # first cut with cum[cut-1] >= target
    lo = hi - 1
    lo_cost = np.where(lo > 0, cum[np.maximum(lo - 1, 0)], 0.0)
    hi_cost = cum[np.minimum(hi, k) - 1]
    cuts = np.unique(np.where(targets - lo_cost < hi_cost - targets, lo, hi))
    # a cut at 0 or k, or two equal cuts, leave an empty chunk: dropped (fewer workers busy)
    return [c for c in np.split(coords, cuts) if c.size]


def predict_group_cost(timings: Sequence[tuple[int, float]], n: int) -> float:
    """Seconds for one call on ``n`` coordinates of a group, from probe ``timings`` ``[(size,
    seconds), ...]``: the line ``a + b size`` through the two sizes (``a, b >= 0``), or the
    per-coordinate rate of a single size."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    by_size: dict[int, float] = {}
    for size, seconds in timings:
        if size < 1 or not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(
                f"probe timings need a size >= 1 and finite seconds >= 0, got {(size, seconds)!r}"
            )
        by_size[size] = min(seconds, by_size.get(size, math.inf))
    if not by_size:
        raise ValueError("no probe timings")
    if len(by_size) == 1:
        ((size, seconds),) = by_size.items()
        return seconds / size * n
    ordered = sorted(by_size.items())
    (n1, t1), (n2, t2) = ordered[0], ordered[-1]
    per_coord = max((t2 - t1) / (n2 - n1), 0.0)
    fixed = max(t1 - per_coord * n1, 0.0)
    return fixed + per_coord * n


@dataclass(frozen=True)
class GroupCosts:
    """Measured cost of the coordinates of each parameter group.

    ``starts``/``stops`` (shape ``(G,)``): index range ``[start, stop)`` of each group;
    ``per_coord`` (shape ``(G,)``): seconds per coordinate when the group is evaluated in one
    call (group overheads amortized), NaN where not measured yet; ``provisional`` (shape
    ``(G,)``, bool): the value comes from a small probe only (per-call overhead inflates it),
    so the first timing of the group at its real size replaces it.
    """

    starts: np.ndarray
    stops: np.ndarray
    per_coord: np.ndarray
    provisional: np.ndarray | None = None

    def group_of(self, coords: np.ndarray) -> np.ndarray:
        """Group index of each coordinate (-1 outside every group), shape ``(k,)``."""
        g = np.searchsorted(self.starts, coords, side="right") - 1
        inside = (g >= 0) & (coords < self.stops[np.maximum(g, 0)])
        return np.where(inside, g, -1)

    def coordinate_costs(self, coords: np.ndarray) -> np.ndarray:
        """Estimated seconds of each coordinate, shape ``(k,)`` (unmeasured: the mean)."""
        measured = np.isfinite(self.per_coord)
        default = float(np.mean(self.per_coord[measured])) if measured.any() else 1.0
        known = np.where(measured, self.per_coord, default)
        g = self.group_of(coords)
        return np.where(g >= 0, known[np.maximum(g, 0)], default)

    def updated(
        self, samples: Sequence[tuple[int, int, float]], weight: float, provisional: bool = False
    ) -> GroupCosts:
        """Blend in timings ``(group, coordinates, seconds)``: new = (1-w) old + w measured;
        groups without a value, or with a provisional one, take the measurement."""
        per_coord = self.per_coord.copy()
        flags = (
            np.zeros(per_coord.shape, dtype=bool)
            if self.provisional is None
            else self.provisional.copy()
        )
        seconds = np.zeros_like(per_coord)
        counts = np.zeros_like(per_coord)
        for g, n, t in samples:
            if g >= 0 and n > 0:
                seconds[g] += t
                counts[g] += n
        seen = counts > 0
        measured = seconds[seen] / counts[seen]
        old = per_coord[seen]
        keep_old = np.isfinite(old) & ~flags[seen]
        per_coord[seen] = np.where(keep_old, (1 - weight) * old + weight * measured, measured)
        flags[seen] = provisional
        return GroupCosts(self.starts, self.stops, per_coord, flags)


def _group_bounds(groups: Sequence[Any], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``groups`` (objects with ``start``/``stop`` or ``(start, stop)`` pairs) → sorted arrays."""
    bounds = []
    for g in groups:
        if hasattr(g, "start") and hasattr(g, "stop"):
            start, stop = g.start, g.stop
        else:
            try:
                start, stop = g
            except (TypeError, ValueError) as exc:
                raise TypeError(
                    f"a group must have .start/.stop or be a (start, stop) pair, got {g!r}"
                ) from exc
        start, stop = int(start), int(stop)
        if not 0 <= start < stop <= dim:
            raise ValueError(f"group range [{start}, {stop}) is not inside [0, dim={dim})")
        bounds.append((start, stop))
    bounds.sort()
    for (_, stop), (start, _) in zip(bounds, bounds[1:], strict=False):
        if start < stop:
            raise ValueError(f"groups overlap at index {start}")
    starts = np.array([b[0] for b in bounds], dtype=np.int64)
    stops = np.array([b[1] for b in bounds], dtype=np.int64)
    return starts, stops


# ---------------------------------------------------------------------------------------
# What is scattered (wrapped so Dask does not split tuples/dicts into many futures)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Vector:
    """The flat parameter vector as host numpy, plus how to rebuild the caller's type."""

    version: int
    values: np.ndarray
    kind: str  # "numpy" or "torch"


@dataclass(frozen=True)
class _Batch:
    version: int
    arrays: tuple


@dataclass(frozen=True)
class _Buffers:
    version: int
    tensors: dict


@dataclass(frozen=True)
class _Policy:
    on_error: str
    on_nonfinite: str
    cost_clock: str = "auto"


# ---------------------------------------------------------------------------------------
# Worker side: replicas cached in the worker process
# ---------------------------------------------------------------------------------------


@dataclass
class _Replica:
    oracle: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    batch_version: int = -1
    buffers_version: int = -1
    x_version: int = -1
    x_native: Any = None


_REPLICAS: dict[str, _Replica] = {}
_REPLICAS_LOCK = threading.Lock()


def _worker_threads() -> int:
    try:
        from distributed import get_worker

        return max(1, int(get_worker().nthreads))
    except (ImportError, ValueError, AttributeError):
        return 1


def _replica_for(token: str, factory: Callable[[], Any], policy: _Policy) -> _Replica:
    with _REPLICAS_LOCK:
        replica = _REPLICAS.get(token)
        if replica is None:
            oracle = factory()
            if isinstance(oracle, BaseOracle):
                # the client owns counting, budget and policy; the replica must never refuse
                oracle.max_queries = None
                oracle.on_error = policy.on_error
                oracle.on_nonfinite = policy.on_nonfinite
            replica = _REPLICAS[token] = _Replica(oracle)
    import sys

    if "torch" in sys.modules:
        # one torch thread per worker thread: the workers themselves are the parallelism
        import torch

        torch.set_num_threads(_worker_threads())
    return replica


def _device_of_oracle(oracle: Any) -> Any:
    """Where the replica wants its tensors (``oracle.device`` or ``oracle.view.device``)."""
    device = getattr(oracle, "device", None)
    return getattr(getattr(oracle, "view", None), "device", None) if device is None else device


def _to_native(values: np.ndarray, kind: str, device: Any) -> Any:
    if kind == "torch":
        import torch

        t = torch.from_numpy(np.ascontiguousarray(values))
        return t if device is None else t.to(device)
    return values


def _sync_replica(
    replica: _Replica, batch: _Batch | None, buffers: _Buffers | None, vector: _Vector | None
) -> Any:
    """Bring the replica up to the client's batch/buffers; returns x in the replica's type."""
    oracle = replica.oracle
    device = _device_of_oracle(oracle)
    if batch is not None and replica.batch_version != batch.version:
        arrays = tuple(_move(a, device) for a in batch.arrays)
        oracle.set_batch(*arrays)
        replica.batch_version = batch.version
    if buffers is not None and replica.buffers_version != buffers.version:
        _load_buffers(oracle, buffers.tensors)
        replica.buffers_version = buffers.version
    if vector is not None and replica.x_version != vector.version:
        replica.x_native = _to_native(vector.values, vector.kind, device)
        replica.x_version = vector.version
    return replica.x_native


def _cost_clock(oracle: Any, choice: str) -> Callable[[], float]:
    """The clock that measures cost: CPU time of this worker process for torch on CPU (the
    work done, unaffected by other load on a shared machine), else wall time (black boxes
    that wait on I/O, GPUs)."""
    if choice == "auto":
        device = _device_of_oracle(oracle)
        choice = "cpu" if getattr(device, "type", None) == "cpu" else "wall"
    return time.process_time if choice == "cpu" else time.perf_counter


def _move(a: Any, device: Any) -> Any:
    if device is not None and hasattr(a, "to") and type(a).__module__.startswith("torch"):
        return a.to(device)
    return a


def _worker_coordinate_steps(
    token: str,
    factory: Callable[[], Any],
    policy: _Policy,
    vector: _Vector,
    batch: _Batch | None,
    buffers: _Buffers | None,
    coords: np.ndarray,
    step: float,
    group_ids: np.ndarray | None,
) -> tuple[np.ndarray, float, list[tuple[int, int, float]]]:
    """f(x + step e_c) for c in sorted ``coords`` on this worker.

    With ``group_ids`` (group of each coordinate) every group is evaluated and timed on its
    own, which costs nothing extra (the engine works group by group anyway) and gives the
    client the cost of each group at its real size.

    Returns (values ``(k,)``, wall seconds, CPU seconds, ``[(group, coordinates, cost
    seconds), ...]``) with cost seconds on the policy's cost clock.
    """
    replica = _replica_for(token, factory, policy)
    samples: list[tuple[int, int, float]] = []
    clock = _cost_clock(replica.oracle, policy.cost_clock)
    with replica.lock:
        x = _sync_replica(replica, batch, buffers, vector)
        if group_ids is None:
            pieces = [np.arange(coords.size)]
        else:
            pieces = np.split(np.arange(coords.size), np.flatnonzero(np.diff(group_ids)) + 1)
        parts = []
        wall, cpu = time.perf_counter(), time.process_time()
        for rows in pieces:
            t0 = clock()
            values = replica.oracle.eval_coordinate_steps(x, coords[rows], step)
            parts.append(np.array(to_numpy(values), copy=True))
            if group_ids is not None:
                samples.append((int(group_ids[rows[0]]), rows.size, clock() - t0))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return np.concatenate(parts), wall, cpu, samples


def _worker_batch(
    token: str,
    factory: Callable[[], Any],
    policy: _Policy,
    kind: str,
    batch: _Batch | None,
    buffers: _Buffers | None,
    X: np.ndarray,
) -> tuple[np.ndarray, float]:
    """f at each row of ``X`` on this worker → (values ``(n,)``, wall seconds, CPU seconds)."""
    replica = _replica_for(token, factory, policy)
    with replica.lock:
        _sync_replica(replica, batch, buffers, None)
        Xn = _to_native(X, kind, _device_of_oracle(replica.oracle))
        wall, cpu = time.perf_counter(), time.process_time()
        values = replica.oracle.batch(Xn)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return np.array(to_numpy(values), copy=True), wall, cpu


def _worker_probe_costs(
    token: str,
    factory: Callable[[], Any],
    policy: _Policy,
    vector: _Vector,
    batch: _Batch | None,
    buffers: _Buffers | None,
    probes: list[tuple[int, np.ndarray]],
    step: float,
    repeats: int,
) -> tuple[int, list[tuple[int, int, float]]]:
    """Time ``eval_coordinate_steps`` on a few coordinates ``(group, coords)`` of each group.

    Returns (queries spent, ``[(group, coordinates, seconds), ...]``); each time is on the
    policy's cost clock and the best of ``repeats`` (the first run of a new shape pays
    one-off kernel set-up).
    """
    replica = _replica_for(token, factory, policy)
    clock = _cost_clock(replica.oracle, policy.cost_clock)
    samples = []
    spent = 0
    with replica.lock:
        x = _sync_replica(replica, batch, buffers, vector)
        for group, coords in probes:
            best = math.inf
            for _ in range(repeats):
                t0 = clock()
                replica.oracle.eval_coordinate_steps(x, coords, step)
                best = min(best, clock() - t0)
                spent += coords.size
            samples.append((group, coords.size, best))
    return spent, samples


def _worker_warm_up(
    token: str,
    factory: Callable[[], Any],
    policy: _Policy,
    batch: _Batch | None,
    buffers: _Buffers | None,
) -> None:
    """Build this worker's replica and load the current batch and buffers."""
    replica = _replica_for(token, factory, policy)
    with replica.lock:
        _sync_replica(replica, batch, buffers, None)


def _worker_queries(token: str) -> int:
    replica = _REPLICAS.get(token)
    return 0 if replica is None else int(getattr(replica.oracle, "queries", 0))


def _drop_replica(token: str) -> bool:
    with _REPLICAS_LOCK:
        return _REPLICAS.pop(token, None) is not None


# ---------------------------------------------------------------------------------------
# Buffers of torch models (BatchNorm running statistics)
# ---------------------------------------------------------------------------------------


def _module_of(oracle: Any) -> Any:
    """The torch module behind an oracle (``.module``, ``.model`` or ``.view.module``)."""
    for m in (
        getattr(oracle, "module", None),
        getattr(oracle, "model", None),
        getattr(getattr(oracle, "view", None), "module", None),
    ):
        if m is not None and hasattr(m, "named_buffers"):
            return m
    return None


def _read_buffers(oracle: Any) -> dict[str, np.ndarray] | None:
    module = _module_of(oracle)
    if module is None:
        return None
    return {k: v.detach().cpu().numpy().copy() for k, v in module.named_buffers()}


def _load_buffers(oracle: Any, tensors: dict[str, np.ndarray]) -> None:
    module = _module_of(oracle)
    if module is None:
        return
    import torch

    own = dict(module.named_buffers())
    for name, value in tensors.items():
        if name in own:
            own[name].copy_(torch.from_numpy(value).to(own[name].device))


def _same_buffers(a: dict[str, np.ndarray] | None, b: dict[str, np.ndarray] | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------
# The client side
# ---------------------------------------------------------------------------------------


def _kind_of(x: Any) -> str:
    mod = type(x).__module__
    if mod.startswith("torch"):
        return "torch"
    if isinstance(x, np.ndarray):
        return "numpy"
    raise TypeError(
        f"DistributedOracle handles numpy and torch arrays, got {type(x).__module__}."
        f"{type(x).__name__}"
    )


def _check_picklable(factory: Any) -> None:
    import cloudpickle

    try:
        cloudpickle.dumps(factory)
    except Exception as exc:
        raise TypeError(
            f"the oracle factory {factory!r} must be picklable to reach the workers "
            f"({type(exc).__name__}: {exc})"
        ) from exc


class DistributedOracle(BaseOracle):
    """An oracle whose queries run on the workers of a Dask cluster.

    Args:
        factory: picklable callable returning the oracle to replicate (a
            :class:`~zoopt.BaseOracle`, e.g. a :class:`~zoopt.torch.oracle.ModuleOracle`
            built from a model and its state). Every worker calls it once and keeps the
            replica; it should build the same function every time.
        client: a ``distributed.Client`` (see :func:`connect`).
        local: the client-side replica (default: ``factory()``). ``base_value``,
            ``loss_and_grad`` and ``set_batch`` run on it, its model's buffers are sent to
            the workers, and attributes this class lacks (e.g. ``view``) are read from it.
        groups: parameter groups for cost balancing (objects with ``start``/``stop`` or
            ``(start, stop)`` pairs); default: ``local.view.groups`` or ``local.groups``.
        balance: ``"cost"`` (time the groups on the workers, cut chunks at equal time),
            ``"equal"`` (equal chunk sizes) or ``"auto"`` (cost when groups are known).
        timeout: seconds one distributed evaluation may take before :class:`OracleTimeout`;
            ``None`` waits as long as the cluster keeps working on it.
        probe_coords: coordinates per group timed when a group is first seen.
        cost_update_weight: weight (0..1] of each call's own per-group timings in the
            running cost estimate; a new mask is re-measured by its first call this way.
        cost_clock: what a cost is: ``"wall"`` seconds, ``"cpu"`` seconds of the worker
            process, or ``"auto"``: CPU time for torch replicas on CPU (the work itself,
            unaffected by other load on shared machines), wall time otherwise.
        max_queries, on_error, on_nonfinite, max_batch_bytes: see :class:`~zoopt.BaseOracle`;
            counted and enforced here, at the client. Cost probes are not charged (they are
            tuning, not estimation); they are counted in ``calibration_queries``.
    """

    def __init__(
        self,
        factory: Callable[[], Any],
        client: Any,
        *,
        local: Any = None,
        groups: Sequence[Any] | None = None,
        balance: Balance = "auto",
        timeout: float | None = None,
        probe_coords: int = 2,
        cost_update_weight: float = 0.5,
        cost_clock: Literal["auto", "wall", "cpu"] = "auto",
        max_queries: int | None = None,
        on_error: ErrorPolicy = "raise",
        on_nonfinite: ErrorPolicy = "raise",
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ):
        if not callable(factory):
            raise TypeError(f"factory must be a callable returning an oracle, got {factory!r}")
        if not (hasattr(client, "submit") and hasattr(client, "scatter")):
            raise TypeError(f"client must be a distributed.Client, got {client!r}")
        if balance not in ("auto", "cost", "equal"):
            raise ValueError(f"balance must be 'auto', 'cost' or 'equal', got {balance!r}")
        if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")
        if isinstance(probe_coords, bool) or not isinstance(probe_coords, int) or probe_coords < 1:
            raise ValueError(f"probe_coords must be a positive integer, got {probe_coords!r}")
        if cost_clock not in ("auto", "wall", "cpu"):
            raise ValueError(f"cost_clock must be 'auto', 'wall' or 'cpu', got {cost_clock!r}")
        if not 0.0 < cost_update_weight <= 1.0:
            raise ValueError(f"cost_update_weight must be in (0, 1], got {cost_update_weight!r}")
        _check_picklable(factory)
        local = factory() if local is None else local
        dim = getattr(local, "dim", None)
        if not isinstance(dim, int | np.integer) or not hasattr(local, "eval_coordinate_steps"):
            raise TypeError(
                f"the factory must build an oracle with .dim and .eval_coordinate_steps "
                f"(a zoopt.BaseOracle), got {local!r}"
            )
        super().__init__(
            int(dim),
            max_queries=max_queries,
            on_error=on_error,
            on_nonfinite=on_nonfinite,
            max_batch_bytes=max_batch_bytes,
        )
        self.client = client
        self.local = local
        self.timeout = None if timeout is None else float(timeout)
        self.probe_coords = int(probe_coords)
        self.cost_update_weight = float(cost_update_weight)
        self.token = f"zoopt-{uuid.uuid4().hex}"
        self.calibration_queries = 0
        #: per-call diagnostics of the last distributed evaluation (sizes, seconds, workers)
        self.last_call: dict[str, Any] = {}
        if groups is None:
            groups = getattr(getattr(local, "view", None), "groups", None)
            groups = getattr(local, "groups", None) if groups is None else groups
        if balance == "cost" and not groups:
            raise ValueError("balance='cost' needs parameter groups (pass groups=...)")
        self.balance = "equal" if balance == "equal" or not groups else "cost"
        self._bounds = _group_bounds(groups, self.dim) if self.balance == "cost" else None
        self._costs: GroupCosts | None = None
        self._policy = _Policy(on_error, on_nonfinite, cost_clock)
        self._calls = 0
        self._factory_f = self._scatter(factory)
        self._batch: _Batch | None = None
        self._batch_f: Any = None
        self._vector: _Vector | None = None
        self._vector_f: Any = None
        self._buffers: _Buffers | None = None
        self._buffers_f: Any = None
        self._closed = False

    # -- what the trainer uses -------------------------------------------------------
    def set_batch(self, *arrays: Any) -> None:
        """Use this data batch from now on: loaded by the local replica now, scattered to the
        workers once (broadcast), picked up by each worker with its next task."""
        if not hasattr(self.local, "set_batch"):
            raise TypeError(f"the oracle {self.local!r} has no set_batch: it takes no data batch")
        self.local.set_batch(*arrays)
        host = tuple(a.detach().cpu() if hasattr(a, "detach") else a for a in arrays)
        version = 0 if self._batch is None else self._batch.version + 1
        self._batch = _Batch(version, host)
        self._batch_f = self._scatter(self._batch)

    def base_value(self, x: Array) -> float:
        """f(x) on the local replica (1 query); the one unperturbed forward of a step, which
        also updates BatchNorm running statistics. Without ``local.base_value``: ``self(x)``."""
        fn = getattr(self.local, "base_value", None)
        if fn is None:
            return self(x)
        self._check_point(x)
        value = float(self._delegate(fn, x, at_least=1))
        self._track_best(np.array([value]), lambda i: x)
        return value

    def loss_and_grad(self, x: Array, **options: Any) -> tuple[float, Array]:
        """The local replica's ``loss_and_grad(x, **options)`` (first-order baselines)."""
        fn = getattr(self.local, "loss_and_grad", None)
        if fn is None:
            raise TypeError(f"the local oracle {self.local!r} has no loss_and_grad")
        return self._delegate(lambda v: fn(v, **options), x, at_least=0)

    def _delegate(self, fn: Callable[[Array], Any], x: Array, at_least: int) -> Any:
        # Charge what the local replica charges, so counts match a single-process run;
        # the queries known in advance are checked against the budget first.
        if self.max_queries is not None and self.queries + at_least > self.max_queries:
            raise BudgetExceeded(self.queries, self.max_queries, self.best_x, self.best_f)
        before = getattr(self.local, "queries", 0)
        result = fn(x)
        self.queries += max(at_least, getattr(self.local, "queries", 0) - before)
        return result

    # -- queries ---------------------------------------------------------------------
    def batch(self, X: Array) -> Array:
        """f at each row of ``X`` (shape ``(n, d)``), rows split evenly across workers."""
        if getattr(X, "ndim", None) != 2 or X.shape[1] != self.dim:
            raise ValueError(
                f"expected a batch of shape (n, {self.dim}), got {tuple(getattr(X, 'shape', ()))}"
            )
        n = int(X.shape[0])
        first = self._charge(n)
        if n == 0:
            return namespace(X).zeros((0,), dtype=X.dtype, device=device_of(X))
        kind = _kind_of(X)
        host = np.asarray(to_numpy(X))
        workers = self._workers()
        chunks = [r for r in np.array_split(np.arange(n), min(n, len(workers))) if r.size]
        buffers_f = self._sync_buffers()
        self._calls += 1
        futures = [
            self._submit(
                _worker_batch,
                f"batch-{i}",
                workers[i % len(workers)],
                kind,
                self._batch_f,
                buffers_f,
                host[rows],
            )
            for i, rows in enumerate(chunks)
        ]
        results = self._gather(futures, first, [r.size for r in chunks], "batch")
        xp = namespace(X)
        values = xp.asarray(np.concatenate([r[0] for r in results]), device=device_of(X))
        values = self._checked(values, n, first, X)
        self._track_best(values, lambda i: X[i])
        return values

    def eval_coordinate_steps(self, x: Array, coords: Array, step: float) -> Array:
        """f(x + step e_c) for each c in ``coords`` (shape ``(k,)``) → ``(k,)``; k queries.

        The coordinates are sorted and cut into one contiguous chunk per worker (at equal
        measured cost, or equal size); ``x`` is scattered once and reused while unchanged.
        """
        self._check_point(x)
        coords_np = self._check_coords(coords)
        k = int(coords_np.size)
        first = self._charge(k)
        xp = namespace(x)
        if k == 0:
            return xp.zeros((0,), dtype=x.dtype, device=device_of(x))
        vector_f = self._sync_vector(x)
        buffers_f = self._sync_buffers()
        workers = self._workers()
        # sorted chunks keep each worker within few stages; values return in call order
        order = np.argsort(coords_np, kind="stable")
        chunks = self._split(coords_np[order], len(workers), float(step), vector_f, buffers_f)
        self._calls += 1
        futures = [
            self._submit(
                _worker_coordinate_steps,
                f"coords-{i}",
                workers[i % len(workers)],
                vector_f,
                self._batch_f,
                buffers_f,
                chunk,
                float(step),
                None if self._costs is None else self._costs.group_of(chunk),
            )
            for i, chunk in enumerate(chunks)
        ]
        results = self._gather(futures, first, [c.size for c in chunks], "coordinate steps")
        if self._costs is not None:
            samples = [sample for *_, per_group in results for sample in per_group]
            self._costs = self._costs.updated(samples, weight=self.cost_update_weight)
        values = np.empty(k, dtype=results[0][0].dtype)
        values[order] = np.concatenate([r[0] for r in results])
        values = xp.asarray(values, device=device_of(x))
        values = self._checked(values, k, first, xp.reshape(x, (1, -1)))

        def point(i: int) -> Array:
            p = x.clone() if hasattr(x, "clone") else x.copy()
            p[int(coords_np[i])] += step
            return p

        self._track_best(values, point)
        return values

    def _check_coords(self, coords: Array) -> np.ndarray:
        coords_np = np.asarray(to_numpy(coords))
        if coords_np.ndim != 1 or (
            coords_np.size and not np.issubdtype(coords_np.dtype, np.integer)
        ):
            raise ValueError(
                f"coords must be a 1-D array of integer indices, got {coords_np.dtype} "
                f"of shape {coords_np.shape}"
            )
        coords_np = coords_np.astype(np.int64)
        if coords_np.size and (coords_np.min() < 0 or coords_np.max() >= self.dim):
            bad = coords_np[(coords_np < 0) | (coords_np >= self.dim)][0]
            raise ValueError(f"coords out of range for dim={self.dim}: index {bad}")
        return coords_np

    def _checked(self, values: Array, n: int, first: int, X: Array) -> Array:
        # Replicas that are BaseOracles already applied this oracle's error and non-finite
        # policy (set from the client), exactly as a single-process oracle would; applying
        # it again would turn on_error="inf" values into non-finite errors.
        if isinstance(self.local, BaseOracle):
            if values.shape[0] != n:
                raise OracleError(f"the workers returned {values.shape[0]} values for {n} queries")
            return values
        return self._apply_nonfinite_policy(values, n, first, X)

    # -- load balancing ----------------------------------------------------------------
    def _split(
        self, coords: np.ndarray, parts: int, step: float, vector_f: Any, buffers_f: Any
    ) -> list[np.ndarray]:
        """Sorted ``coords`` → contiguous chunks, one per worker."""
        if self.balance == "equal":
            return [c for c in np.array_split(coords, min(parts, coords.size)) if c.size]
        if parts > 1:
            self._probe_unmeasured(coords, step, vector_f, buffers_f)
        elif self._costs is None:  # one worker: nothing to balance, but start measuring
            self._costs = self._empty_costs()
        return split_by_cost(coords, self._costs.coordinate_costs(coords), parts)

    def calibrate(self, x: Array, coords: Array, step: float) -> GroupCosts | None:
        """Do now the set-up a first call would do: every worker builds its replica and
        loads the batch, and (``balance="cost"``) the groups of ``coords`` are probed.

        Optional; useful to keep set-up out of step timings. No queries are charged.
        Returns the cost model (``None`` for equal splits).
        """
        self._check_point(x)
        coords_np = np.sort(self._check_coords(coords))
        vector_f, buffers_f = self._sync_vector(x), self._sync_buffers()
        workers = self._workers()
        self._calls += 1
        warm = [
            self._submit(_worker_warm_up, f"warm-{i}", w, self._batch_f, buffers_f)
            for i, w in enumerate(workers)
        ]
        self._wait_all(warm, "warm-up")
        if self.balance == "equal":
            return None
        if len(workers) == 1:  # nothing to balance yet; calls will time their groups
            self._costs = self._costs or self._empty_costs()
            return self._costs
        self._probe_unmeasured(coords_np, float(step), vector_f, buffers_f)
        return self._costs

    def _empty_costs(self) -> GroupCosts:
        starts, stops = self._bounds
        return GroupCosts(starts, stops, np.full(starts.size, np.nan))

    def _probe_unmeasured(
        self, coords: np.ndarray, step: float, vector_f: Any, buffers_f: Any
    ) -> None:
        """Time two small probes of every group of ``coords`` not measured yet, spread over
        the workers, and predict each group's cost at its size in this call.

        A group's call costs ``a + b n`` (a fixed part, e.g. the cached forward up to the
        layer, plus a part per coordinate), so one tiny probe overstates the per-coordinate
        cost of groups with a large fixed part. Probing ``n1 = probe_coords`` and ``n2 = 4
        n1`` coordinates fits both parts; the prediction ``a + b m`` for the group's ``m``
        coordinates is stored (provisional). Later calls refine it from their own timings.
        """
        if self._costs is None:
            self._costs = self._empty_costs()
        group_ids = self._costs.group_of(coords)
        present = np.unique(group_ids[group_ids >= 0])
        todo = present[~np.isfinite(self._costs.per_coord[present])]
        if todo.size == 0:
            return
        probes, sizes = [], {}
        for g in todo:
            members = coords[group_ids == g]
            sizes[int(g)] = members.size
            for n in sorted(
                {min(self.probe_coords, members.size), min(4 * self.probe_coords, members.size)}
            ):
                probes.append(
                    (int(g), members[np.linspace(0, members.size - 1, n).astype(np.int64)])
                )
        workers = self._workers()
        shares = [probes[i :: len(workers)] for i in range(len(workers))]
        self._calls += 1
        futures = [
            self._submit(
                _worker_probe_costs,
                f"probe-{i}",
                workers[i],
                vector_f,
                self._batch_f,
                buffers_f,
                share,
                step,
                2,
            )
            for i, share in enumerate(shares)
            if share
        ]
        timings: dict[int, list[tuple[int, float]]] = {}
        for spent, share_samples in self._wait_all(futures, "cost probes"):
            self.calibration_queries += spent
            for g, n, seconds in share_samples:
                timings.setdefault(g, []).append((n, seconds))
        samples = [(g, sizes[g], predict_group_cost(timings[g], sizes[g])) for g in timings]
        self._costs = self._costs.updated(samples, weight=1.0, provisional=True)

    @property
    def group_costs(self) -> GroupCosts | None:
        """The cost model (``None`` before the first cost-balanced call)."""
        return self._costs

    # -- plumbing ----------------------------------------------------------------------
    def _workers(self) -> list[str]:
        if self._closed:
            raise RuntimeError("this DistributedOracle is closed")
        workers = sorted(self.client.scheduler_info(n_workers=-1)["workers"])
        if not workers:
            self.client.wait_for_workers(1, timeout=self.timeout)
            workers = sorted(self.client.scheduler_info(n_workers=-1)["workers"])
        return workers

    def _scatter(self, obj: Any) -> Any:
        """Put ``obj`` on every worker once; a future for the tasks that need it."""
        kwargs = {} if self.timeout is None else {"timeout": self.timeout}
        try:
            return self.client.scatter(obj, broadcast=True, hash=False, **kwargs)
        except TimeoutError:
            raise OracleTimeout(
                f"scattering {type(obj).__name__.lstrip('_').lower()} to the workers did not "
                f"finish within timeout={self.timeout} s"
            ) from None

    def _sync_vector(self, x: Array) -> Any:
        host = np.asarray(to_numpy(x))
        kind = _kind_of(x)
        v = self._vector
        if (
            v is None
            or v.kind != kind
            or v.values.dtype != host.dtype
            or not np.array_equal(v.values, host)
        ):
            version = 0 if v is None else v.version + 1
            self._vector = _Vector(version, np.array(host, copy=True), kind)
            self._vector_f = self._scatter(self._vector)
        return self._vector_f

    def _sync_buffers(self) -> Any:
        current = _read_buffers(self.local)
        if current is None:
            return None
        b = self._buffers
        if b is None or not _same_buffers(b.tensors, current):
            version = 0 if b is None else b.version + 1
            self._buffers = _Buffers(version, current)
            self._buffers_f = self._scatter(self._buffers)
        return self._buffers_f

    def _submit(self, fn: Callable[..., Any], name: str, worker: str, *args: Any) -> Any:
        # The worker is a preference, not a pin: if it dies the task runs elsewhere.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ll]arge graph.*")
            return self.client.submit(
                fn,
                self.token,
                self._factory_f,
                self._policy,
                *args,
                key=f"{fn.__name__.lstrip('_')}-{self.token}-{self._calls}-{name}",
                workers=[worker],
                allow_other_workers=True,
                pure=False,
            )

    def _wait_all(
        self, futures: list[Any], what: str, queries: tuple[int, int] | None = None
    ) -> list[Any]:
        """Results of the tasks, in order. A timeout raises :class:`OracleTimeout`, any task
        failure :class:`OracleError` (naming the query range); unfinished tasks are
        cancelled when the wait ends early (timeout, failure, Ctrl-C)."""
        from distributed import wait

        try:
            try:
                wait(futures, timeout=self.timeout)
            except TimeoutError:
                done = sum(f.done() for f in futures)
                raise OracleTimeout(
                    f"distributed {what} did not finish within timeout={self.timeout} s "
                    f"({done} of {len(futures)} worker tasks done); "
                    "raise DistributedOracle(timeout=...) or check the cluster"
                ) from None
            return self.client.gather(futures)
        except (OracleTimeout, KeyboardInterrupt):
            self.client.cancel(futures)
            raise
        except Exception as exc:
            self.client.cancel(futures)
            where = "" if queries is None else f" on queries {queries[0]}..{queries[1]}"
            raise OracleError(
                f"the distributed {what} failed{where} ({type(exc).__name__}: {exc})"
            ) from exc

    def _gather(self, futures: list[Any], first: int, sizes: list[int], what: str) -> list[Any]:
        """Results of the workers' query tasks (in order), recorded in ``last_call``."""
        results = self._wait_all(futures, what, (first, first + sum(sizes) - 1))
        self.last_call = {
            "what": what,
            "chunk_sizes": list(sizes),
            "worker_seconds": [float(r[1]) for r in results],
            "worker_cpu_seconds": [float(r[2]) for r in results],
        }
        return results

    def worker_queries(self) -> int:
        """Queries evaluated by the current worker replicas, probes included (diagnostics)."""
        return int(sum(self.client.run(_worker_queries, self.token).values()))

    def close(self) -> None:
        """Drop the replicas on the workers and release the scattered data."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.client.status == "running":
                self.client.run(_drop_replica, self.token, on_error="ignore")
        finally:
            self._factory_f = self._batch_f = self._vector_f = self._buffers_f = None

    def __enter__(self) -> DistributedOracle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes this object lacks: read them from the local replica
        # (e.g. ``view`` for tasks that flatten parameters through ``oracle.view``).
        if name.startswith("_") or "local" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["local"], name)

    def __repr__(self) -> str:
        return (
            f"DistributedOracle(dim={self.dim}, balance={self.balance!r}, "
            f"queries={self.queries}, local={type(self.local).__name__})"
        )


# ---------------------------------------------------------------------------------------
# Torch models and the trainer's tasks
# ---------------------------------------------------------------------------------------


@dataclass
class ModuleOracleFactory:
    """Picklable recipe for a :class:`~zoopt.torch.oracle.ModuleOracle` replica.

    Attributes:
        model: an ``nn.Module`` to copy (its parameters and buffers travel with it), or a
            picklable constructor ``() -> nn.Module`` (e.g. ``partial(build_model, "resnet20")``).
        loss_fn: picklable ``loss_fn(logits, targets) -> scalar`` (e.g. ``F.cross_entropy``).
        state: optional ``state_dict`` loaded into the built model.
        options: keyword arguments of ``ModuleOracle`` (``engine``, ``max_batch_bytes``,
            ``memory_format``, ``per_sample_modules``).
        device: where the replica lives (``"cpu"`` or ``"cuda"``).
        training: the replica's train/eval mode (BatchNorm uses batch statistics in training).
    """

    model: Any
    loss_fn: Callable[..., Any]
    state: dict | None = None
    options: dict = field(default_factory=dict)
    device: str = "cpu"
    training: bool = True

    def __call__(self) -> Any:
        import copy

        import torch

        from .torch.oracle import ModuleOracle

        model = (
            copy.deepcopy(self.model) if isinstance(self.model, torch.nn.Module) else self.model()
        )
        if self.state is not None:
            model.load_state_dict(self.state)
        model = model.to(self.device).train(self.training)
        return ModuleOracle(model, self.loss_fn, **self.options)

    @classmethod
    def from_oracle(cls, oracle: Any) -> ModuleOracleFactory:
        """A recipe that rebuilds ``oracle`` (a ModuleOracle): same model, loss and engine."""
        import copy

        module = getattr(oracle, "module", None)
        if module is None or not hasattr(oracle, "loss_fn"):
            raise TypeError(f"expected a ModuleOracle (with .module and .loss_fn), got {oracle!r}")
        engine = getattr(oracle, "engine", None)
        options: dict[str, Any] = {"engine": engine is not None}
        if engine is not None:
            options.update(
                max_batch_bytes=engine.chunk_bytes_option,
                max_cache_bytes=engine.max_cache_bytes,
                memory_format=engine.memory_format,
                per_sample_modules=engine.per_sample_modules,
            )
        else:
            options.update(max_batch_bytes=oracle.max_batch_bytes)
        device = str(oracle.view.device)
        cpu_copy = copy.deepcopy(module).to("cpu")
        return cls(
            cpu_copy, oracle.loss_fn, options=options, device=device, training=module.training
        )


def distribute_task(task: Any, client: Any, **options: Any) -> DistributedOracle:
    """Make the trainer's task query through ``client``'s workers; returns the new oracle.

    ``task`` is a :class:`~zoopt.torch.tasks.ClassificationTask` (anything with a
    ModuleOracle ``.oracle`` and ``.groups``). ``task.oracle`` is replaced, in place, by a
    :class:`DistributedOracle` whose local replica is the old oracle, so the task's model
    stays the one that ``base_value`` updates and ``evaluate`` reads. ``options`` go to
    :class:`DistributedOracle` (``timeout``, ``balance``, ``max_queries``, ...).
    Close the returned oracle (or the client) when training ends.
    """
    local = task.oracle
    if isinstance(local, DistributedOracle):
        raise ValueError("the task's oracle is already distributed")
    factory = ModuleOracleFactory.from_oracle(local)
    options.setdefault("groups", getattr(task, "groups", None))
    oracle = DistributedOracle(factory, client, local=local, **options)
    oracle.queries = int(getattr(local, "queries", 0))  # counting goes on where it stood
    task.oracle = oracle
    return oracle


@contextlib.contextmanager
def distributed_training(
    task: Any, workers: int | None = None, scheduler: str | None = None, **options: Any
) -> Iterator[DistributedOracle]:
    """``with distributed_training(task, workers=2): Trainer(task, ...).fit()``.

    Connects (a local cluster of ``workers`` processes, or the cluster at ``scheduler``),
    makes ``task.oracle`` distributed (:func:`distribute_task`, ``options`` go to
    :class:`DistributedOracle`), and on exit puts the task's own oracle back (with the query
    count reached) and shuts a local cluster down.
    """
    with connect(workers, scheduler) as client:
        oracle = distribute_task(task, client, **options)
        try:
            yield oracle
        finally:
            oracle.close()
            oracle.local.queries = oracle.queries
            task.oracle = oracle.local
