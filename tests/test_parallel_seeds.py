"""Seeded directions in parallel: the workers get a seed and a few numbers per query, never
a point (zoopt.parallel, RGE), on a real Dask LocalCluster (two worker processes, one
thread each).

Oracles are built on the workers from factories defined in this module; cloudpickle ships
them by value, so the workers need not import the test module.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from functools import partial

import numpy as np
import pytest

pytest.importorskip("distributed")
import cloudpickle  # noqa: E402

import zoopt  # noqa: E402
from zoopt.directions import DirectionSteps, SeededDirections  # noqa: E402
from zoopt.oracle import BudgetExceeded, OracleError  # noqa: E402
from zoopt.parallel import ParallelOracle, connect, replicable  # noqa: E402
from zoopt.parallel.oracle import wire_bytes  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])

DIM = 50


# -- factories (run on the workers) ---------------------------------------------------------


def _rowwise(X: np.ndarray, delay: float) -> np.ndarray:
    # each row's value is computed from that row alone (no BLAS blocking that depends on the
    # number of rows), so serial and parallel chunkings give the same bits
    if delay:
        time.sleep(delay * X.shape[0])
    return np.sum((X - 0.5) ** 2, axis=1) + np.sin(3 * X).sum(axis=1)


def smooth_oracle(
    dim: int = DIM, delay: float = 0.0, max_queries: int | None = None
) -> zoopt.BaseOracle:
    return zoopt.as_oracle(
        partial(_rowwise, delay=delay), dim=dim, batched=True, max_queries=max_queries
    )


def _fails_far_out(X: np.ndarray) -> np.ndarray:
    if np.any(X[:, 0] > 0.3):
        raise ZeroDivisionError("first coordinate too large")
    return (X**2).sum(axis=1)


def failing_oracle(on_error: str = "raise") -> zoopt.BaseOracle:
    return zoopt.as_oracle(_fails_far_out, dim=DIM, batched=True, on_error=on_error)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    with connect(2) as c:
        yield c


def _x(dim: int = DIM, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim)


def _bits_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# -- exactness ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "dist", "scheme", "fx_known"),
    [
        (7, "gaussian", "forward", False),  # odd rows: unequal halves; base query as a row
        (8, "rademacher", "central", True),
        (6, "sphere", "antithetic", True),
        (1, "gaussian", "forward", True),  # one row: one worker gets nothing
    ],
)
def test_rge_plan_values_equal_the_serial_oracle_bit_for_bit(client, q, dist, scheme, fx_known):
    x = _x()
    est = zoopt.RGE(q=q, mu=1e-3, dist=dist, scheme=scheme)
    serial = smooth_oracle()
    fx = float(smooth_oracle()(x)) if fx_known else None
    with ParallelOracle(replicable(smooth_oracle), client) as o:
        plan_p = est.plan(x, rng=np.random.default_rng(5), fx=fx)
        plan_s = est.plan(x, rng=np.random.default_rng(5), fx=fx)
        before = serial.queries
        got, want = plan_p.evaluate(o), plan_s.evaluate(serial)
        assert _bits_equal(got, want)
        assert o.queries == plan_p.n == serial.queries - before  # counted at the client
        g_p, g_s = plan_p.finish(got), plan_s.finish(want)
        assert _bits_equal(g_p.grad, g_s.grad)
        # best point: rebuilt on the client from the seed, the same as the serial oracle's
        assert o.best_f == serial.best_f and _bits_equal(o.best_x, serial.best_x)


def test_direction_steps_split_rows_in_order_and_send_x_once_per_distinct_x(client):
    x = _x()
    dirs = SeededDirections(12345, 9, DIM, "gaussian")
    steps = DirectionSteps(dirs, np.array([8, 0, 3, 3, 1, 7, 2], np.int64), np.linspace(-1, 1, 7))
    want = smooth_oracle().eval_direction_steps(x, steps)
    with ParallelOracle(replicable(smooth_oracle), client) as o:
        got = o.eval_direction_steps(x, steps)
        assert _bits_equal(got, want)
        assert o.last_call["chunk_sizes"] == [4, 3]
        first = o.last_call["bytes"]
        assert first["x"] == 2 * wire_bytes(o._vector)  # one copy per worker
        again = o.eval_direction_steps(x, steps)  # same x: not sent again
        assert _bits_equal(again, want)
        assert o.last_call["bytes"]["x"] == 0
        assert o.last_call["bytes"]["tasks"] == first["tasks"]
        o.eval_direction_steps(x + 1.0, steps)  # a new x is broadcast once
        assert o.last_call["bytes"]["x"] == first["x"]
        assert o.queries == 21
        assert o.worker_queries() == 21
        with pytest.raises(ValueError, match="dim=7 but the oracle has dim=50"):
            o.eval_direction_steps(x, DirectionSteps(SeededDirections(1, 2, 7), steps.index[:1],
                                                     steps.steps[:1]))  # fmt: skip
        with pytest.raises(TypeError, match="DirectionSteps"):
            o.eval_direction_steps(x, [(0, 1.0)])
        empty = o.eval_direction_steps(x, steps.rows(0, 0))
        assert empty.shape == (0,) and o.queries == 21


# -- budget and error policy -------------------------------------------------------------------


def test_budget_is_enforced_at_the_client_before_any_work(client):
    x = _x()
    steps = zoopt.RGE(q=8).plan(x, rng=0, fx=0.0).direction_steps
    with ParallelOracle(replicable(partial(smooth_oracle, max_queries=10)), client) as o:
        o.eval_direction_steps(x, steps)
        sent = dict(o.traffic)
        with pytest.raises(BudgetExceeded):
            o.eval_direction_steps(x, steps)
        assert o.queries == 8 and o.worker_queries() == 8
        assert o.traffic == sent  # nothing reached the workers
        assert o.best_x is not None  # the exception carries the best point so far


def test_error_policy_raise_names_the_queries_and_inf_matches_serial(client):
    x = np.zeros(DIM)
    # steps of ±1 along Rademacher directions: first coordinate ±1, so some rows fail
    dirs = SeededDirections(7, 6, DIM, "rademacher")
    steps = DirectionSteps(dirs, np.arange(6, dtype=np.int64), np.full(6, 0.5))
    with ParallelOracle(replicable(failing_oracle), client) as o:
        o.queries = 3
        with pytest.raises(OracleError, match=r"direction steps failed on queries 3\.\.8"):
            o.eval_direction_steps(x, steps)
        assert o.queries == 9  # the failed queries were spent
    serial = failing_oracle(on_error="inf")
    want = serial.eval_direction_steps(x, steps)
    assert np.isinf(want).any() and np.isfinite(want).any()
    with ParallelOracle(replicable(partial(failing_oracle, on_error="inf")), client) as o:
        got = o.eval_direction_steps(x, steps)
    assert _bits_equal(got, want)


# -- what crosses the wire ------------------------------------------------------------------


def test_query_messages_do_not_grow_with_d(client):
    sizes = {}
    for dim in (1_000, 100_000):
        x = _x(dim)
        plan = zoopt.RGE(q=32, mu=1e-3).plan(x, rng=3, fx=0.0)
        with ParallelOracle(replicable(partial(smooth_oracle, dim=dim)), client) as o:
            values = plan.evaluate(o)
            assert _bits_equal(values, plan.evaluate(smooth_oracle(dim)))
            sizes[dim] = o.last_call["bytes"]
    small, large = sizes[1_000], sizes[100_000]
    # the tasks carry the seed and 16 (index, step) rows each: the same bytes for any d, up
    # to the integer d itself (pickled in 2 or 4 bytes) once per task
    assert abs(large["tasks"] - small["tasks"]) <= 16
    assert large["tasks"] < 8 * 1024 and large["values"] < 2 * 1024
    # x itself is O(d): 8 bytes per entry, once per worker (plus a pickle header)
    assert abs((large["x"] - small["x"]) - 2 * 8 * (100_000 - 1_000)) <= 64


# -- torch: a ModuleOracle replica perturbs in place ------------------------------------------

torch = pytest.importorskip("torch")


def _mlp_oracle(training: bool = True):
    from zoopt.torch.oracle import ModuleOracle

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(12, 16),
        torch.nn.BatchNorm1d(16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 4),
    )
    return ModuleOracle(net.train(training), torch.nn.functional.cross_entropy)


def _batch(n: int = 10):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("training", [True, False])
def test_module_oracle_rge_values_equal_serial_bit_for_bit(client, training):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on the workers: one thread, the same reductions
    try:
        local, serial = _mlp_oracle(training), _mlp_oracle(training)
        x = local.view.flatten()
        est = zoopt.RGE(q=6, mu=1e-3)
        with ParallelOracle(local, client) as o:
            for oracle in (o, serial):
                oracle.set_batch(*_batch())
            fx, fs = o.base_value(x), serial.base_value(x)
            assert fx == fs
            plan_p = est.plan(x, rng=np.random.default_rng(2), fx=fx)
            plan_s = est.plan(x, rng=np.random.default_rng(2), fx=fs)
            got, want = plan_p.evaluate(o), plan_s.evaluate(serial)
            assert isinstance(got, torch.Tensor) and got.dtype == want.dtype
            assert torch.equal(got, want)
            assert o.queries == serial.queries == 7
            assert torch.equal(plan_p.finish(got).grad, plan_s.finish(want).grad)
            assert torch.equal(local.view.flatten(), x)  # the local model is untouched
            if o.best_f == serial.best_f:
                assert torch.equal(o.best_x, serial.best_x)
            bytes_ = o.last_call["bytes"]
            assert bytes_["tasks"] < 4 * 1024 and bytes_["x"] == 2 * wire_bytes(o._vector)
    finally:
        torch.set_num_threads(threads)


# -- faults ---------------------------------------------------------------------------------


def test_worker_killed_mid_step_still_gives_the_same_values(client):
    x = _x(seed=3)
    steps = zoopt.RGE(q=12).plan(x, rng=4, fx=0.0).direction_steps
    want = smooth_oracle().eval_direction_steps(x, steps)
    result: dict = {}
    with ParallelOracle(replicable(partial(smooth_oracle, delay=0.1)), client) as o:

        def step():
            try:
                result["values"] = o.eval_direction_steps(x, steps)
            except BaseException as exc:  # pragma: no cover - reported below
                result["error"] = exc

        thread = threading.Thread(target=step)
        thread.start()
        deadline = time.monotonic() + 30
        busy: list[str] = []
        while len(busy) < 2 and time.monotonic() < deadline:
            busy = [w for w, keys in client.processing().items() if keys]
            time.sleep(0.02)
        assert len(busy) == 2, "both workers should be running a share of the step"
        pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
        os.kill(pid, signal.SIGKILL)
        thread.join(timeout=90)
        assert not thread.is_alive(), "the step hung after a worker died"
        assert "error" not in result, result.get("error")
        assert o.queries == 12
    assert _bits_equal(result["values"], want)
    client.wait_for_workers(2, timeout=60)
