"""The parallel oracle: one step's queries split across the workers of a Dask cluster.

:class:`ParallelOracle` is a :class:`~zoopt.BaseOracle` over a :class:`ReplicableOracle`
(the *local* oracle, the caller's). Estimators, ``minimize`` and the trainer use it
unchanged; it counts the queries, enforces the budget and takes its error policy from the
local oracle. What it does not evaluate on the workers (``set_batch``, ``base_value``,
``loss_and_grad``) it hands to the local oracle, by name.

What travels (everything scattered is broadcast to all workers once):

* the local oracle's :meth:`~ReplicableOracle.replica_factory` — once, when the parallel
  oracle is created; each worker builds its replica from it on first use and keeps it in
  the worker process, keyed by the parallel oracle's token;
* the batch — once per :meth:`ParallelOracle.set_batch`; workers load it lazily;
* the flat parameter vector ``x`` — once per step (reused while ``x`` does not change);
* the local oracle's :meth:`~ReplicableOracle.model_state` (e.g. BatchNorm running
  statistics) — when it changes, so replicas see exactly what the local oracle would;
* each worker's coordinate chunk — with its task; the values come back;
* seeded directions (:meth:`ParallelOracle.eval_direction_steps`, RGE) — the step's seed
  and, per row, a direction index and a step, with the task: a few bytes per query whatever
  d is. Each worker regenerates its directions from the seed; no point is ever sent.

Every byte sent is accounted in :attr:`ParallelOracle.traffic` (see :func:`wire_bytes`).

A worker that dies mid-step loses only its task: Dask reschedules it on another worker (tasks
prefer a worker but are never pinned to it), and a fresh worker rebuilds its replica from
the factory and the scattered batch, so the step completes with the same values.

Chunks are balanced by measured cost (:mod:`zoopt.parallel.balance`). For oracles with cost
groups (the torch engine's cost per query depends on where in the network a coordinate's
layer sits: early layers cost ~30x more than the head on ResNet-20), a few coordinates of
each group are timed on the workers the first time the group appears, and chunks are cut at
equal estimated time. Every call then times each group on the workers as it evaluates it
(the engine works group by group anyway) and blends that into the estimate, so a new mask
is re-measured by its own first step at no cost. Without groups, chunks have equal sizes.
"""

from __future__ import annotations

import contextlib
import pickle
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np

from .._array import Array, copy_of, device_of, namespace, to_numpy
from .._coords import check_coords
from ..directions import DirectionSteps
from ..oracle import BaseOracle, BudgetExceeded, DifferentiableOracle, OracleError
from . import worker
from .balance import GroupCosts, plan_probes, predict_group_cost, split_by_cost, split_equal
from .cluster import broadcast, check_client, cluster, gather, submit, workers_of
from .protocol import CostClock, ReplicableOracle, check_replicable

Balance = Literal["auto", "cost", "equal"]

__all__ = ["TRAFFIC_KINDS", "Balance", "ParallelOracle", "parallel_oracle", "wire_bytes"]

#: what :attr:`ParallelOracle.traffic` counts, in bytes: the factory, data batches and model
#: state broadcast to the workers, ``x`` broadcast to the workers, the query tasks sent
#: (function reference, keys, policy, the chunk: coordinates, rows or seeded-direction rows)
#: and the values received back
TRAFFIC_KINDS = ("factory", "batch", "state", "x", "tasks", "values")


def wire_bytes(obj: Any) -> int:
    """Bytes ``obj`` takes on the wire: its pickle (protocol 5, as Dask pickles it) plus its
    out-of-band buffers (numpy arrays travel as separate frames, counted at their
    ``nbytes``, without copying them here). Excludes Dask's framing (a few dozen bytes per
    message)."""
    import cloudpickle

    out_of_band = 0

    def count(buffer: pickle.PickleBuffer) -> None:
        nonlocal out_of_band
        out_of_band += buffer.raw().nbytes

    return len(cloudpickle.dumps(obj, protocol=5, buffer_callback=count)) + out_of_band


def _check_picklable(factory: Any) -> int:
    """The factory's :func:`wire_bytes`; ``TypeError`` if it cannot be pickled."""
    try:
        return wire_bytes(factory)
    except Exception as exc:
        raise TypeError(
            f"the oracle factory {factory!r} must be picklable to reach the workers "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def _same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


class ParallelOracle(BaseOracle):
    """An oracle whose queries run on the workers of a Dask cluster.

    Args:
        oracle: the local oracle, a :class:`~zoopt.parallel.ReplicableOracle` (e.g. a
            :class:`~zoopt.torch.ModuleOracle`, or :func:`~zoopt.parallel.replicable` of a
            plain oracle's factory). ``set_batch``, ``base_value`` and ``loss_and_grad`` run
            on it, its model state is sent to the workers, and its budget
            (``max_queries``), policy (``on_error``, ``on_nonfinite``) and
            ``max_batch_bytes`` are this oracle's. It is not modified, except by what runs
            on it (its batch, its model state, its own query counter).
        client: a ``distributed.Client`` (see :func:`~zoopt.parallel.connect`).
        groups: ``(start, stop)`` index ranges for cost balancing (default:
            ``oracle.cost_groups()``).
        balance: ``"cost"`` (time the groups on the workers, cut chunks at equal time),
            ``"equal"`` (equal chunk sizes) or ``"auto"`` (cost when there are groups).
        timeout: seconds one parallel evaluation may take before :class:`OracleTimeout`;
            ``None`` waits as long as the cluster keeps working on it.
        probe_coords: coordinates per group timed when a group is first seen (and 4x as
            many).
        cost_update_weight: weight (0..1] of each call's own per-group timings in the
            running cost estimate; a new mask is re-measured by its first call this way.
        cost_clock: what a cost is: ``"wall"`` seconds, ``"cpu"`` seconds of the worker
            process, or ``"auto"``: ``oracle.cost_clock()`` (CPU time for torch on CPU: the
            work itself, unaffected by other load on shared machines; wall time otherwise).

    The query counter starts where ``oracle.queries`` stands. Cost probes are not charged
    (they are tuning, not estimation); they are counted in ``calibration_queries``.

    ``traffic`` counts the bytes sent and received since creation by kind
    (:data:`TRAFFIC_KINDS`; :func:`wire_bytes` of each message; a broadcast counts once per
    worker it reaches); ``last_call["bytes"]`` has the same for the last query call.
    """

    def __init__(
        self,
        oracle: ReplicableOracle,
        client: Any,
        *,
        groups: Sequence[tuple[int, int]] | None = None,
        balance: Balance = "auto",
        timeout: float | None = None,
        probe_coords: int = 2,
        cost_update_weight: float = 0.5,
        cost_clock: Literal["auto", "wall", "cpu"] = "auto",
    ):
        local = check_replicable(oracle)
        check_client(client)
        if balance not in ("auto", "cost", "equal"):
            raise ValueError(f"balance must be 'auto', 'cost' or 'equal', got {balance!r}")
        if timeout is not None and not (
            isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 0
        ):
            raise ValueError(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")
        if isinstance(probe_coords, bool) or not isinstance(probe_coords, int) or probe_coords < 1:
            raise ValueError(f"probe_coords must be a positive integer, got {probe_coords!r}")
        if cost_clock not in ("auto", "wall", "cpu"):
            raise ValueError(f"cost_clock must be 'auto', 'wall' or 'cpu', got {cost_clock!r}")
        if not 0.0 < cost_update_weight <= 1.0:
            raise ValueError(f"cost_update_weight must be in (0, 1], got {cost_update_weight!r}")
        factory = local.replica_factory()
        factory_bytes = _check_picklable(factory)
        super().__init__(
            int(local.dim),
            max_queries=local.max_queries,
            on_error=local.on_error,
            on_nonfinite=local.on_nonfinite,
            max_batch_bytes=local.max_batch_bytes,
        )
        self.queries = int(local.queries)  # counting goes on where it stood
        self.client = client
        self.local = local
        self.timeout = None if timeout is None else float(timeout)
        self.probe_coords = int(probe_coords)
        self.cost_update_weight = float(cost_update_weight)
        self.token = f"zoopt-{uuid.uuid4().hex}"
        self.calibration_queries = 0
        #: per-call diagnostics of the last parallel evaluation (sizes, seconds, bytes)
        self.last_call: dict[str, Any] = {}
        #: bytes sent to (and, ``"values"``, received from) the workers, by kind
        self.traffic: dict[str, int] = dict.fromkeys(TRAFFIC_KINDS, 0)
        self._traffic_mark = dict(self.traffic)
        groups = local.cost_groups() if groups is None else list(groups)
        if balance == "cost" and not groups:
            raise ValueError("balance='cost' needs cost groups (pass groups=[(start, stop), ...])")
        self.balance = "equal" if balance == "equal" or not groups else "cost"
        # validated now (a bad range is named here, not in the first step)
        self._unmeasured = GroupCosts.unmeasured(groups, self.dim) if groups else None
        self._costs: GroupCosts | None = None
        clock: CostClock = local.cost_clock() if cost_clock == "auto" else cost_clock
        self._policy = worker.Policy(local.on_error, local.on_nonfinite, clock)
        self._calls = 0
        self._closed = False
        self._factory_f = self._broadcast(factory, "the oracle factory", "factory", factory_bytes)
        self._batch: worker.Batch | None = None
        self._batch_f: Any = None
        self._vector: worker.Vector | None = None
        self._vector_f: Any = None
        self._state: worker.ModelState | None = None
        self._state_f: Any = None

    # -- handed to the local oracle ------------------------------------------------------
    def set_batch(self, *arrays: Any) -> None:
        """Use this data batch from now on: loaded by the local oracle now, broadcast to the
        workers once (as host arrays), picked up by each worker with its next task."""
        self.local.set_batch(*arrays)
        version = 0 if self._batch is None else self._batch.version + 1
        self._batch = worker.Batch(version, tuple(np.array(to_numpy(a), copy=True) for a in arrays))
        self._batch_f = self._broadcast(self._batch, "the batch", "batch")

    def base_value(self, x: Array) -> float:
        """f(x) on the local oracle (1 query): the one unperturbed forward of a step, which
        also updates model state (BatchNorm running statistics) there."""
        self._check_point(x)
        value = float(self._on_local(self.local.base_value, x, at_least=1))
        self._track_best(np.array([value]), lambda i: x)
        return value

    def loss_and_grad(self, x: Array, *, update_stats: bool = True) -> tuple[float, Array]:
        """The local oracle's ``loss_and_grad`` (first-order baselines); ``TypeError`` if it
        has none (it is not a :class:`~zoopt.oracle.DifferentiableOracle`)."""
        if not isinstance(self.local, DifferentiableOracle):
            raise TypeError(f"the local oracle {self.local!r} has no loss_and_grad")
        fn = self.local.loss_and_grad
        return self._on_local(lambda v: fn(v, update_stats=update_stats), x, at_least=0)

    def cost_groups(self) -> list[tuple[int, int]]:
        """The local oracle's cost groups."""
        return self.local.cost_groups()

    def _on_local(self, fn: Callable[[Array], Any], x: Array, at_least: int) -> Any:
        # Charge what the local oracle charges, so counts match a single-process run; the
        # queries known in advance are checked against the budget first.
        if not self.budget.fits(at_least):
            raise BudgetExceeded(self.queries, self.max_queries, self.best_x, self.best_f)
        before = self.local.queries
        result = fn(x)
        self.queries += max(at_least, self.local.queries - before)
        return result

    # -- queries on the workers ----------------------------------------------------------
    def batch(self, X: Array) -> Array:
        """f at each row of ``X`` (shape ``(n, d)``) → ``(n,)``, rows split evenly across
        workers; n queries."""
        if getattr(X, "ndim", None) != 2 or X.shape[1] != self.dim:
            raise ValueError(
                f"expected a batch of shape (n, {self.dim}), got {tuple(getattr(X, 'shape', ()))}"
            )
        n = int(X.shape[0])
        first = self._charge(n)
        self._traffic_mark = dict(self.traffic)
        xp = namespace(X)
        if n == 0:
            return xp.zeros((0,), dtype=X.dtype, device=device_of(X))
        host = np.asarray(to_numpy(X))
        workers = self._workers()
        chunks = split_equal(np.arange(n), len(workers))
        state_f = self._sync_state()
        self._calls += 1
        futures = [
            self._submit(
                worker.batch_values, f"batch-{i}", workers[i], self._batch_f, state_f, host[rows]
            )
            for i, rows in enumerate(chunks)
        ]
        results = self._gather(futures, first, [r.size for r in chunks], "batch")
        values = self._values(np.concatenate([r[0] for r in results]), n, X)
        self._track_best(values, lambda i: X[i])
        return values

    def eval_coordinate_steps(self, x: Array, coords: Array, step: float) -> Array:
        """f(x + step e_c) for each c in ``coords`` (shape ``(k,)``) → ``(k,)``; k queries.

        The coordinates are sorted and cut into one contiguous chunk per worker (at equal
        measured cost, or equal size); ``x`` is broadcast once and reused while unchanged.
        Values come back in the caller's order.
        """
        self._check_point(x)
        coords_np = check_coords(coords, self.dim)
        k = int(coords_np.size)
        first = self._charge(k)
        self._traffic_mark = dict(self.traffic)
        xp = namespace(x)
        if k == 0:
            return xp.zeros((0,), dtype=x.dtype, device=device_of(x))
        vector_f = self._sync_vector(x)
        state_f = self._sync_state()
        workers = self._workers()
        # sorted chunks keep each worker within few stages; values return in call order
        order = np.argsort(coords_np, kind="stable")
        chunks = self._split(coords_np[order], len(workers), float(step), vector_f, state_f)
        self._calls += 1
        futures = [
            self._submit(
                worker.coordinate_steps,
                f"coords-{i}",
                workers[i],
                vector_f,
                self._batch_f,
                state_f,
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
        host = np.empty(k, dtype=results[0][0].dtype)
        host[order] = np.concatenate([r[0] for r in results])
        values = self._values(host, k, x)

        def point(i: int) -> Array:
            p = copy_of(x)
            p[int(coords_np[i])] += step
            return p

        self._track_best(values, point)
        return values

    def eval_direction_steps(self, x: Array, steps: DirectionSteps) -> Array:
        """f(x + steps.steps[r]·u_{steps.index[r]}) for each row r → ``(rows,)``; ``rows``
        queries, split into one contiguous run of rows per worker.

        What travels: ``x`` (broadcast once, reused while unchanged, as for coordinate
        steps) and, with each worker's task, the step's seed, count, ``dim`` and ``dist``
        and its rows' direction indices and steps: O(rows) bytes, independent of d. Each
        worker regenerates its directions from the seed (a ``ModuleOracle`` replica perturbs
        its parameters in place). The values come back in row order and equal the local
        oracle's ``eval_direction_steps`` bit for bit, whatever the number of workers. The
        best point, when a value improves it, is rebuilt here from the seed.
        """
        self._check_point(x)
        if not isinstance(steps, DirectionSteps):
            raise TypeError(f"steps must be a zoopt.directions.DirectionSteps, got {steps!r}")
        if steps.directions.dim != self.dim:
            raise ValueError(
                f"the directions have dim={steps.directions.dim} but the oracle has dim={self.dim}"
            )
        rows = len(steps)
        first = self._charge(rows)
        self._traffic_mark = dict(self.traffic)
        xp = namespace(x)
        if rows == 0:
            return xp.zeros((0,), dtype=x.dtype, device=device_of(x))
        vector_f = self._sync_vector(x)
        state_f = self._sync_state()
        workers = self._workers()
        chunks = split_equal(np.arange(rows), len(workers))
        self._calls += 1
        futures = [
            self._submit(
                worker.direction_steps,
                f"directions-{i}",
                workers[i],
                vector_f,
                self._batch_f,
                state_f,
                steps.rows(int(chunk[0]), int(chunk[-1]) + 1),
            )
            for i, chunk in enumerate(chunks)
        ]
        results = self._gather(futures, first, [c.size for c in chunks], "direction steps")
        values = self._values(np.concatenate([r[0] for r in results]), rows, x)
        self._track_best(values, lambda i: steps.rows(i, i + 1).points(x)[0])
        return values

    def _values(self, host: np.ndarray, n: int, like: Array) -> Array:
        # The replicas applied the error and non-finite policy per query, exactly as the
        # local oracle would (they got it from here); applying it again would turn
        # on_error="inf" values into non-finite errors. What is left to check is the count.
        if host.shape != (n,):
            raise OracleError(f"the workers returned {host.shape} values for {n} queries")
        return namespace(like).asarray(host, device=device_of(like))

    # -- load balancing --------------------------------------------------------------------
    def _split(
        self, coords: np.ndarray, parts: int, step: float, vector_f: Any, state_f: Any
    ) -> list[np.ndarray]:
        """Sorted ``coords`` → contiguous chunks, one per worker."""
        if self._unmeasured is None:
            return split_equal(coords, parts)
        if parts > 1:
            self._probe_unmeasured(coords, step, vector_f, state_f)
        elif self._costs is None:  # one worker: nothing to balance, but start measuring
            self._costs = self._unmeasured
        assert self._costs is not None
        return split_by_cost(coords, self._costs.coordinate_costs(coords), parts)

    def calibrate(self, x: Array, coords: Array, step: float) -> GroupCosts | None:
        """Do now the set-up a first call would do: every worker builds its replica and
        loads the batch and model state, and (cost balancing) the groups of ``coords`` are
        probed.

        Optional; useful to keep set-up out of step timings. No queries are charged.
        Returns the cost model (``None`` for equal splits).
        """
        self._check_point(x)
        coords_np = np.sort(check_coords(coords, self.dim))
        vector_f, state_f = self._sync_vector(x), self._sync_state()
        workers = self._workers()
        self._calls += 1
        warm = [
            self._submit(worker.warm_up, f"warm-{i}", w, self._batch_f, state_f)
            for i, w in enumerate(workers)
        ]
        gather(self.client, warm, self.timeout, "warm-up")
        if self._unmeasured is None:
            return None
        if len(workers) == 1:  # nothing to balance yet; calls will time their groups
            self._costs = self._costs or self._unmeasured
            return self._costs
        self._probe_unmeasured(coords_np, float(step), vector_f, state_f)
        return self._costs

    def _probe_unmeasured(
        self, coords: np.ndarray, step: float, vector_f: Any, state_f: Any
    ) -> None:
        """Time the groups of ``coords`` not measured yet (:func:`plan_probes`), spread over
        the workers, and store each group's predicted cost at its size in this call
        (provisional: later calls refine it from their own timings)."""
        if self._costs is None:
            self._costs = self._unmeasured
        assert self._costs is not None
        probes, sizes = plan_probes(self._costs, coords, self.probe_coords)
        if not probes:
            return
        workers = self._workers()
        shares = [probes[i :: len(workers)] for i in range(len(workers))]
        self._calls += 1
        futures = [
            self._submit(
                worker.probe_costs,
                f"probe-{i}",
                workers[i],
                vector_f,
                self._batch_f,
                state_f,
                share,
                step,
                2,
            )
            for i, share in enumerate(shares)
            if share
        ]
        timings: dict[int, list[tuple[int, float]]] = {}
        for spent, share_samples in gather(self.client, futures, self.timeout, "cost probes"):
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
            raise RuntimeError("this ParallelOracle is closed")
        return workers_of(self.client, self.timeout)

    def _broadcast(self, obj: Any, what: str, kind: str, size: int | None = None) -> Any:
        future = broadcast(self.client, obj, self.timeout, what)
        # one copy reaches every worker (Dask routes it through the scheduler and replicates
        # it between workers; what is counted is what each worker receives)
        reached = len(workers_of(self.client, self.timeout))
        self.traffic[kind] += (wire_bytes(obj) if size is None else size) * reached
        return future

    def _sync_vector(self, x: Array) -> Any:
        host = np.asarray(to_numpy(x))
        v = self._vector
        if v is None or v.values.dtype != host.dtype or not np.array_equal(v.values, host):
            version = 0 if v is None else v.version + 1
            self._vector = worker.Vector(version, np.array(host, copy=True))
            self._vector_f = self._broadcast(self._vector, "x", "x")
        return self._vector_f

    def _sync_state(self) -> Any:
        current = self.local.model_state()
        if not current:
            return None
        s = self._state
        if s is None or not _same_state(s.arrays, current):
            version = 0 if s is None else s.version + 1
            self._state = worker.ModelState(version, current)
            self._state_f = self._broadcast(self._state, "the model state", "state")
        return self._state_f

    def _submit(self, fn: Callable[..., Any], name: str, address: str, *args: Any) -> Any:
        key = f"{fn.__name__}-{self.token}-{self._calls}-{name}"
        args = (self.token, self._factory_f, self._policy, *args)
        # the task as Dask sends it: the function by reference, scattered values as their
        # keys, the rest (policy, chunk) by value
        self.traffic["tasks"] += wire_bytes((fn, key, address, args))
        return submit(self.client, fn, key, address, *args)

    def _gather(self, futures: list[Any], first: int, sizes: list[int], what: str) -> list[Any]:
        """Results of the workers' query tasks (in order), recorded in ``last_call``."""
        results = gather(self.client, futures, self.timeout, what, (first, first + sum(sizes) - 1))
        self.traffic["values"] += sum(wire_bytes(r) for r in results)
        mark = self._traffic_mark
        self.last_call = {
            "what": what,
            "chunk_sizes": list(sizes),
            "worker_seconds": [float(r[1]) for r in results],
            "worker_cpu_seconds": [float(r[2]) for r in results],
            "bytes": {kind: self.traffic[kind] - mark.get(kind, 0) for kind in TRAFFIC_KINDS},
        }
        return results

    def worker_queries(self) -> int:
        """Queries evaluated by the current worker replicas, probes included (diagnostics)."""
        return int(sum(self.client.run(worker.replica_queries, self.token).values()))

    def close(self) -> None:
        """Drop the replicas on the workers and release the scattered data. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.client.status == "running":
                self.client.run(worker.drop_replica, self.token, on_error="ignore")
        finally:
            self._factory_f = self._batch_f = self._vector_f = self._state_f = None

    def __enter__(self) -> ParallelOracle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ParallelOracle(dim={self.dim}, balance={self.balance!r}, "
            f"queries={self.queries}, local={self.local!r})"
        )


@contextlib.contextmanager
def parallel_oracle(
    oracle: ReplicableOracle,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    client: Any = None,
    **options: Any,
) -> Iterator[ParallelOracle]:
    """``with parallel_oracle(task.oracle, workers=2) as oracle: Trainer(task, config, out,
    oracle=oracle).fit()``.

    Connects (a local cluster of ``workers`` processes, the cluster at ``scheduler``, or an
    existing ``client``, left open), yields a :class:`ParallelOracle` over ``oracle``
    (``options`` go to it), and on exit forgets the replicas, shuts a local cluster down and
    writes the query count reached into ``oracle.queries``: the one change it makes to
    ``oracle`` besides what runs on it (batches, model state). Nothing is replaced or
    patched: the caller decides who queries the parallel oracle.

    Raises:
        TypeError: ``oracle`` is not a :class:`~zoopt.parallel.ReplicableOracle` (naming what
            it lacks), before any cluster is started.
    """
    check_replicable(oracle)
    with cluster(workers, scheduler, client) as c:
        parallel = ParallelOracle(oracle, c, **options)
        try:
            yield parallel
        finally:
            parallel.close()
            oracle.queries = parallel.queries
