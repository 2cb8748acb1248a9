"""What runs on the workers: a replica per parallel oracle, cached in the worker process.

Each task names its parallel oracle by ``token`` and carries the oracle's factory (a
scattered future, resolved by Dask) and policy, so a fresh worker (e.g. one restarted after
a crash) builds its replica on first use. Before evaluating, a task brings its replica up to
the client's data batch and model state, which travel as versioned, scattered values: a
replica loads each version once.

Replicas receive host numpy arrays (``x``, rows, the batch) and return host numpy values.
Seeded directions travel as their seed and a few numbers per row
(:class:`~zoopt.directions.DirectionSteps`): each worker regenerates its directions.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .._array import to_numpy
from ..directions import DirectionSteps
from .protocol import CostClock, OracleFactory, ReplicableOracle

# What is scattered is wrapped in frozen dataclasses, so Dask does not split tuples and
# dicts into many futures, and so a replica can tell a new version from one it has.


@dataclass(frozen=True)
class Vector:
    """The flat parameter vector ``x``, shape ``(dim,)``, host numpy."""

    version: int
    values: np.ndarray


@dataclass(frozen=True)
class Batch:
    """The data batch: the arguments of ``set_batch``, host arrays."""

    version: int
    arrays: tuple


@dataclass(frozen=True)
class ModelState:
    """The local oracle's ``model_state()``: host arrays by name."""

    version: int
    arrays: dict


@dataclass(frozen=True)
class Policy:
    """The client's error policy (replicas apply it per query) and the cost clock."""

    on_error: str
    on_nonfinite: str
    cost_clock: CostClock


@dataclass
class _Replica:
    oracle: ReplicableOracle
    lock: threading.Lock = field(default_factory=threading.Lock)
    batch_version: int = -1
    state_version: int = -1


_REPLICAS: dict[str, _Replica] = {}
_REPLICAS_LOCK = threading.Lock()

#: (values ``(k,)``, wall seconds, CPU seconds, ``[(group, coordinates, cost seconds)]``)
StepsResult = tuple[np.ndarray, float, float, list[tuple[int, int, float]]]


def _worker_threads() -> int:
    from distributed import get_worker

    try:
        return max(1, int(get_worker().state.nthreads))
    except ValueError:  # not on a worker (called directly, e.g. in a test)
        return 1


def replica_for(token: str, factory: OracleFactory, policy: Policy) -> _Replica:
    """This process's replica of the parallel oracle ``token`` (built on first use)."""
    with _REPLICAS_LOCK:
        replica = _REPLICAS.get(token)
        if replica is None:
            oracle = factory()
            # the client owns counting, budget and policy; the replica must never refuse
            oracle.max_queries = None
            oracle.on_error = policy.on_error
            oracle.on_nonfinite = policy.on_nonfinite
            oracle.use_threads(_worker_threads())
            replica = _REPLICAS[token] = _Replica(oracle)
    return replica


def _synced(replica: _Replica, batch: Batch | None, state: ModelState | None) -> ReplicableOracle:
    """The replica's oracle, brought up to the client's batch and model state."""
    oracle = replica.oracle
    if batch is not None and replica.batch_version != batch.version:
        oracle.set_batch(*batch.arrays)
        replica.batch_version = batch.version
    if state is not None and replica.state_version != state.version:
        oracle.load_model_state(state.arrays)
        replica.state_version = state.version
    return oracle


def _clock(choice: CostClock) -> Callable[[], float]:
    return time.process_time if choice == "cpu" else time.perf_counter


def coordinate_steps(
    token: str,
    factory: OracleFactory,
    policy: Policy,
    vector: Vector,
    batch: Batch | None,
    state: ModelState | None,
    coords: np.ndarray,
    step: float,
    group_ids: np.ndarray | None,
) -> StepsResult:
    """f(x + step e_c) for c in sorted ``coords`` (shape ``(k,)``); k queries.

    With ``group_ids`` (group of each coordinate, shape ``(k,)``) every group is evaluated
    and timed on its own, which costs nothing extra (the engine works group by group anyway)
    and gives the client the cost of each group at its real size.

    Returns:
        values ``(k,)``, wall seconds, CPU seconds, and ``[(group, coordinates, cost
        seconds), ...]`` on the policy's cost clock.
    """
    replica = replica_for(token, factory, policy)
    samples: list[tuple[int, int, float]] = []
    clock = _clock(policy.cost_clock)
    with replica.lock:
        oracle = _synced(replica, batch, state)
        if group_ids is None:
            pieces = [np.arange(coords.size)]
        else:
            pieces = np.split(np.arange(coords.size), np.flatnonzero(np.diff(group_ids)) + 1)
        parts = []
        wall, cpu = time.perf_counter(), time.process_time()
        for rows in pieces:
            t0 = clock()
            values = oracle.eval_coordinate_steps(vector.values, coords[rows], step)
            parts.append(np.array(to_numpy(values), copy=True))
            if group_ids is not None:
                samples.append((int(group_ids[rows[0]]), rows.size, clock() - t0))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return np.concatenate(parts), wall, cpu, samples


def batch_values(
    token: str,
    factory: OracleFactory,
    policy: Policy,
    batch: Batch | None,
    state: ModelState | None,
    X: np.ndarray,
) -> tuple[np.ndarray, float, float]:
    """f at each row of ``X`` (shape ``(n, dim)``); n queries.

    Returns values ``(n,)``, wall seconds, CPU seconds.
    """
    replica = replica_for(token, factory, policy)
    with replica.lock:
        oracle = _synced(replica, batch, state)
        wall, cpu = time.perf_counter(), time.process_time()
        values = oracle.batch(X)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return np.array(to_numpy(values), copy=True), wall, cpu


def direction_steps(
    token: str,
    factory: OracleFactory,
    policy: Policy,
    vector: Vector,
    batch: Batch | None,
    state: ModelState | None,
    steps: DirectionSteps,
) -> tuple[np.ndarray, float, float]:
    """f(x + steps.steps[r]·u_{steps.index[r]}) for this worker's rows; ``len(steps)``
    queries.

    ``steps`` holds the step's seed, the direction count, ``dim`` and ``dist`` and, per row,
    a direction index and a step: O(rows) numbers whatever d is. The replica regenerates the
    directions itself (a :class:`~zoopt.torch.ModuleOracle` perturbs its parameters in place
    and restores them exactly; other oracles build the points in chunks).

    Returns values ``(rows,)``, wall seconds, CPU seconds.
    """
    replica = replica_for(token, factory, policy)
    with replica.lock:
        oracle = _synced(replica, batch, state)
        wall, cpu = time.perf_counter(), time.process_time()
        values = oracle.eval_direction_steps(vector.values, steps)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return np.array(to_numpy(values), copy=True), wall, cpu


def probe_costs(
    token: str,
    factory: OracleFactory,
    policy: Policy,
    vector: Vector,
    batch: Batch | None,
    state: ModelState | None,
    probes: list[tuple[int, np.ndarray]],
    step: float,
    repeats: int,
) -> tuple[int, list[tuple[int, int, float]]]:
    """Time ``eval_coordinate_steps`` on a few coordinates ``(group, coords)`` of each group.

    Returns:
        (queries spent, ``[(group, coordinates, seconds), ...]``); each time is on the
        policy's cost clock and the best of ``repeats`` (the first run of a new shape pays
        one-off kernel set-up).
    """
    replica = replica_for(token, factory, policy)
    clock = _clock(policy.cost_clock)
    samples = []
    spent = 0
    with replica.lock:
        oracle = _synced(replica, batch, state)
        for group, coords in probes:
            best = math.inf
            for _ in range(repeats):
                t0 = clock()
                oracle.eval_coordinate_steps(vector.values, coords, step)
                best = min(best, clock() - t0)
                spent += coords.size
            samples.append((group, coords.size, best))
    return spent, samples


def warm_up(
    token: str,
    factory: OracleFactory,
    policy: Policy,
    batch: Batch | None,
    state: ModelState | None,
) -> None:
    """Build this worker's replica and load the current batch and model state."""
    replica = replica_for(token, factory, policy)
    with replica.lock:
        _synced(replica, batch, state)


def replica_queries(token: str) -> int:
    """Queries this worker's replica of ``token`` has evaluated (0 without one)."""
    replica = _REPLICAS.get(token)
    return 0 if replica is None else int(replica.oracle.queries)


def drop_replica(token: str) -> bool:
    """Forget this worker's replica of ``token``; whether there was one."""
    with _REPLICAS_LOCK:
        return _REPLICAS.pop(token, None) is not None
