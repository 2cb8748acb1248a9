"""Forward parallelization (zoopt.parallel) on a real Dask LocalCluster (two worker
processes, one thread each).

Oracles are built on the workers from factories defined in this module; cloudpickle ships
them by value, so the workers need not import the test module.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from functools import partial

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("distributed")
import cloudpickle  # noqa: E402

import zoopt  # noqa: E402
from zoopt.parallel import (  # noqa: E402
    GroupCosts,
    OracleTimeout,
    ParallelOracle,
    ReplicableOracle,
    connect,
    parallel_oracle,
    plan_probes,
    predict_group_cost,
    replicable,
    split_by_cost,
)

cloudpickle.register_pickle_by_value(sys.modules[__name__])

DIM = 40


# -- factories (run on the workers) ---------------------------------------------------------


def _quadratic(X: np.ndarray, A: np.ndarray, delay: float) -> np.ndarray:
    if delay:
        time.sleep(delay * X.shape[0])
    return np.einsum("nd,de,ne->n", X, A, X) + np.sin(X).sum(axis=1)


def quadratic_oracle(
    dim: int = DIM, seed: int = 0, delay: float = 0.0, max_queries: int | None = None
) -> zoopt.BaseOracle:
    """f(x) = x'Ax + sum(sin x) with a fixed random A; ``delay`` seconds of sleep per query."""
    r = np.random.default_rng(seed)
    A = r.standard_normal((dim, dim)) / dim
    return zoopt.as_oracle(
        partial(_quadratic, A=A, delay=delay), dim=dim, batched=True, max_queries=max_queries
    )


def _fails_on_large_first_coordinate(X: np.ndarray) -> np.ndarray:
    if np.any(X[:, 0] > 10):
        raise ZeroDivisionError("first coordinate too large")
    return (X**2).sum(axis=1)


def failing_oracle(on_error: str = "raise") -> zoopt.BaseOracle:
    return zoopt.as_oracle(
        _fails_on_large_first_coordinate, dim=DIM, batched=True, on_error=on_error
    )


class StagedSleepOracle(zoopt.BaseOracle):
    """Coordinates in [0, 20) cost 4 ms per query, [20, 40) cost 1 ms (like early vs late
    stages of a network); values are sum(x**2)."""

    groups = ((0, 20), (20, 40))

    def __init__(self) -> None:
        super().__init__(DIM)

    def _evaluate(self, X):
        return (X**2).sum(axis=1)

    def eval_coordinate_steps(self, x, coords, step):
        coords = np.asarray(coords)
        time.sleep(0.004 * np.sum(coords < 20) + 0.001 * np.sum(coords >= 20))
        self.queries += coords.size
        base = float((x**2).sum())
        return base + 2 * step * x[coords] + step**2


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    with connect(2) as c:
        yield c


@pytest.fixture(scope="module")
def quad(client):
    with ParallelOracle(replicable(quadratic_oracle), client) as o:
        yield o


def _x(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM)


# -- exactness ------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    coords=st.lists(st.integers(0, DIM - 1), unique=True, max_size=DIM),
    step=st.floats(-1.0, 1.0).filter(lambda s: abs(s) > 1e-6),
)
def test_coordinate_steps_equal_single_process_in_caller_order(quad, coords, step):
    x = _x()
    single = quadratic_oracle()
    want = single.eval_coordinate_steps(x, np.array(coords, dtype=np.int64), step)
    got = quad.eval_coordinate_steps(x, np.array(coords, dtype=np.int64), step)
    assert got.shape == (len(coords),)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_sparse_cge_gradient_equals_single_process(client, scheme):
    coords = np.arange(0, DIM, 3)
    est = zoopt.CGE(mu=1e-3, scheme=scheme)
    with ParallelOracle(replicable(quadratic_oracle), client) as o:
        got = est.estimate(o, _x(), coords=coords)
        assert (
            o.queries
            == got.queries
            == zoopt.CGE(scheme=scheme, coords=coords).queries_per_step(DIM)
        )
        assert sum(o.last_call["chunk_sizes"]) == coords.size
        assert len(o.last_call["chunk_sizes"]) == 2  # both workers got a share
    want = est.estimate(quadratic_oracle(), _x(), coords=coords)
    np.testing.assert_allclose(got.grad, want.grad, rtol=1e-12, atol=1e-12)
    assert (got.fx is None) == (want.fx is None)
    if want.fx is not None:
        assert got.fx == pytest.approx(want.fx, rel=1e-13)


def test_batch_splits_rows_and_counts_queries(quad):
    X = np.random.default_rng(2).standard_normal((7, DIM))
    before = quad.queries
    got = quad.batch(X)
    np.testing.assert_allclose(got, quadratic_oracle().batch(X), rtol=1e-13)
    assert quad.queries - before == 7
    assert quad.last_call["chunk_sizes"] == [4, 3]
    assert quad.best_f == pytest.approx(float(got.min()))
    with pytest.raises(ValueError, match=r"shape \(n, 40\)"):
        quad.batch(np.zeros((2, 3)))


# -- budget and errors ----------------------------------------------------------------------


def test_budget_is_enforced_at_the_client_before_any_work(client):
    # the budget is the replicated oracle's own
    with ParallelOracle(replicable(partial(quadratic_oracle, max_queries=10)), client) as o:
        assert o.max_queries == 10
        o.eval_coordinate_steps(_x(), np.arange(6), 0.1)
        evaluated = o.worker_queries()
        with pytest.raises(zoopt.BudgetExceeded) as info:
            o.eval_coordinate_steps(_x(), np.arange(5), 0.1)
        assert info.value.queries == 6 and info.value.max_queries == 10
        assert o.worker_queries() == evaluated == 6  # nothing of the refused call ran
        assert o.remaining == 4


def test_worker_exception_becomes_oracle_error_naming_the_queries(client):
    x = np.zeros(DIM)
    with ParallelOracle(replicable(failing_oracle), client) as o:
        with pytest.raises(zoopt.OracleError, match=r"queries 0\.\.3 .*ZeroDivisionError"):
            o.eval_coordinate_steps(x, np.arange(4), 20.0)
    # the error policy is the replicated oracle's own, applied per query on the workers
    with ParallelOracle(replicable(partial(failing_oracle, on_error="inf")), client) as o:
        assert o.on_error == "inf"
        got = o.eval_coordinate_steps(x, np.array([3, 0, 5]), 20.0)
    np.testing.assert_array_equal(got, [400.0, math.inf, 400.0])


def test_bad_arguments_are_named(client, quad):
    with pytest.raises(TypeError, match="build must be a callable"):
        replicable(42)
    with pytest.raises(TypeError, match="build\\(\\) must return a zoopt.BaseOracle, got 42"):
        replicable(lambda: 42)
    lock = threading.Lock()
    with pytest.raises(TypeError, match="must be picklable"):
        ParallelOracle(replicable(lambda: (lock, quadratic_oracle())[1]), client)
    with pytest.raises(TypeError, match="client must be a distributed.Client"):
        ParallelOracle(replicable(quadratic_oracle), "tcp://localhost:8786")
    with pytest.raises(ValueError, match="balance must be"):
        ParallelOracle(replicable(quadratic_oracle), client, balance="fast")
    with pytest.raises(ValueError, match="timeout must be"):
        ParallelOracle(replicable(quadratic_oracle), client, timeout=-1)
    with pytest.raises(ValueError, match="needs cost groups"):
        ParallelOracle(replicable(quadratic_oracle), client, balance="cost")
    with pytest.raises(ValueError, match="groups overlap at index 5"):
        ParallelOracle(replicable(quadratic_oracle), client, groups=[(0, 10), (5, 20)])
    with pytest.raises(TypeError, match="takes no data batch"):
        quad.set_batch(np.zeros(3))
    with pytest.raises(ValueError, match="index 40 out of range for dim=40"):
        quad.eval_coordinate_steps(_x(), np.array([1, 40]), 0.1)
    with pytest.raises(TypeError, match="coords must be integers"):
        quad.eval_coordinate_steps(_x(), np.array([0.5]), 0.1)
    with pytest.raises(TypeError, match="has no loss_and_grad"):
        quad.loss_and_grad(_x())
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        connect(workers=0)
    with pytest.raises(ValueError, match="scheduler must be an address"):
        connect(scheduler="localhost")


# -- faults and timeouts --------------------------------------------------------------------


def _processing_workers(client) -> list[str]:
    return [w for w, keys in client.processing().items() if keys]


def test_worker_killed_mid_step_still_gives_the_same_values(client):
    x, coords = _x(3), np.arange(16)
    want = quadratic_oracle().eval_coordinate_steps(x, coords, 0.01)
    result: dict = {}
    # 0.1 s per query: each worker is busy for 0.8 s with its half of the step
    with ParallelOracle(replicable(partial(quadratic_oracle, delay=0.1)), client) as o:

        def step():
            try:
                result["values"] = o.eval_coordinate_steps(x, coords, 0.01)
            except BaseException as exc:  # pragma: no cover - reported below
                result["error"] = exc

        thread = threading.Thread(target=step)
        thread.start()
        deadline = time.monotonic() + 30
        while len(_processing_workers(client)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        busy = _processing_workers(client)
        assert len(busy) == 2, "both workers should be running a share of the step"
        pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
        os.kill(pid, signal.SIGKILL)  # a hard crash of one worker process
        thread.join(timeout=90)
        assert not thread.is_alive(), "the step hung after a worker died"
        assert "error" not in result, result.get("error")
        assert o.queries == 16
    np.testing.assert_allclose(result["values"], want, rtol=1e-13)
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it; later tests want two


def test_timeout_is_a_clear_error(client):
    slow = replicable(partial(quadratic_oracle, delay=0.3))
    with ParallelOracle(slow, client, timeout=0.2) as o:
        with pytest.raises(OracleTimeout, match=r"timeout=0\.2 s") as info:
            o.eval_coordinate_steps(_x(), np.arange(4), 0.1)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, zoopt.OracleError)


# -- load balancing -------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    fixed=st.floats(0.0, 10.0),
    per_coord=st.floats(0.0, 1.0),
    n1=st.integers(1, 50),
    extra=st.integers(1, 200),
    n=st.integers(1, 10_000),
)
def test_probe_fit_recovers_a_fixed_plus_linear_cost(fixed, per_coord, n1, extra, n):
    n2 = n1 + extra
    noisy_repeat = [(n1, fixed + per_coord * n1 + 1.0), (n2, fixed + per_coord * n2 + 5.0)]
    timings = [(n1, fixed + per_coord * n1), (n2, fixed + per_coord * n2), *noisy_repeat]
    want = fixed + per_coord * n
    assert math.isclose(predict_group_cost(timings, n), want, rel_tol=1e-6, abs_tol=1e-9)
    # a single size: its per-coordinate rate, which overstates groups with a fixed part
    one = predict_group_cost(timings[:1], n)
    assert math.isclose(one, (fixed / n1 + per_coord) * n, rel_tol=1e-9, abs_tol=1e-12)


def test_probe_fit_rejects_no_timings():
    with pytest.raises(ValueError, match="no probe timings"):
        predict_group_cost([], 3)
    with pytest.raises(ValueError, match=r"size >= 1.*\(0, 1\.0\)"):
        predict_group_cost([(0, 1.0)], 3)
    with pytest.raises(ValueError, match=r"seconds >= 0.*\(2, nan\)"):
        predict_group_cost([(2, math.nan)], 3)
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        predict_group_cost([(2, 1.0)], -1)


def test_measured_costs_give_the_expensive_group_fewer_coordinates(client):
    x = _x()
    staged = replicable(StagedSleepOracle, groups=StagedSleepOracle.groups)
    with ParallelOracle(staged, client, probe_coords=2) as o:
        assert o.balance == "cost"  # groups read from the oracle's cost_groups()
        o.eval_coordinate_steps(x, np.arange(20, DIM), 0.1)  # only the cheap group: probed
        probed = o.calibration_queries
        assert probed == 2 * (2 + 8)  # best of two runs of 2 and of 8 coordinates
        assert np.isnan(o.group_costs.per_coord[0])
        got = o.eval_coordinate_steps(x, np.arange(DIM), 0.1)  # the new group gets probed
        assert o.calibration_queries == 2 * probed
        costs = o.group_costs.per_coord
        assert costs[0] > 2 * costs[1]  # 4 ms vs 1 ms per query
        first, second = o.last_call["chunk_sizes"]
        assert first < second  # the expensive coordinates [0, 20) are split over fewer
        o.eval_coordinate_steps(x, np.arange(1, DIM), 0.1)  # seen groups: timed in the call
        assert o.calibration_queries == 2 * probed
        assert o.queries == 20 + DIM + DIM - 1  # probes are counted apart, never charged
    want = StagedSleepOracle().eval_coordinate_steps(x, np.arange(DIM), 0.1)
    np.testing.assert_allclose(got, want)


def test_group_costs_blend_in_new_timings():
    costs = GroupCosts(np.array([0, 10, 30]), np.array([10, 30, 40]), np.array([2.0, np.nan, 5.0]))
    costs = costs.updated([(2, 1, 9.0)], weight=1.0, provisional=True)  # a probe
    new = costs.updated([(0, 4, 4.0), (1, 2, 1.0), (1, 3, 2.0), (2, 4, 4.0)], weight=0.5)
    # blended: 0.5*2 + 0.5*1; first seen: 3/5; a provisional probe value is replaced: 4/4
    np.testing.assert_allclose(new.per_coord, [1.5, 0.6, 1.0])
    assert not new.provisional.any()
    np.testing.assert_array_equal(new.group_of(np.array([0, 9, 10, 39, 40])), [0, 0, 1, 2, -1])
    np.testing.assert_allclose(new.coordinate_costs(np.array([3, 12, 45])), [1.5, 0.6, 3.1 / 3])


@given(
    costs=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=60),
    parts=st.integers(1, 6),
)
def test_split_by_cost_is_contiguous_and_balanced(costs, parts):
    costs = np.array(costs)
    coords = np.arange(costs.size) * 3
    chunks = split_by_cost(coords, costs, parts)
    assert 1 <= len(chunks) <= parts
    assert all(c.size for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), coords)
    if costs.sum() > 0:
        target = costs.sum() / min(parts, costs.size)
        position = 0
        for c in chunks:
            chunk_cost = costs[position : position + c.size].sum()
            assert abs(chunk_cost - target) <= costs.max() + 1e-9
            position += c.size
    else:
        assert len(chunks) == min(parts, costs.size)


def test_split_by_cost_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        split_by_cost(np.arange(3), np.ones(2), 2)
    with pytest.raises(ValueError, match="parts must be a positive integer"):
        split_by_cost(np.arange(3), np.ones(3), 0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        split_by_cost(np.arange(3), np.array([1.0, -1.0, 1.0]), 2)


def test_balancing_is_pure_numpy():
    import subprocess

    code = (
        "import sys, zoopt.parallel.balance\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'dask', 'distributed'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@settings(max_examples=50, deadline=None)
@given(
    per_coord=st.lists(st.one_of(st.just(math.nan), st.floats(0.0, 5.0)), min_size=3, max_size=3),
    samples=st.lists(
        st.tuples(st.integers(-1, 2), st.integers(0, 5), st.floats(0.0, 10.0)), max_size=8
    ),
    weight=st.floats(0.01, 1.0),
    provisional=st.booleans(),
)
def test_group_costs_updates_return_a_new_model_and_leave_the_old_one(
    per_coord, samples, weight, provisional
):
    costs = GroupCosts(np.array([0, 10, 30]), np.array([10, 30, 40]), np.array(per_coord))
    frozen = costs.per_coord.copy()
    new = costs.updated(samples, weight=weight, provisional=provisional)
    np.testing.assert_array_equal(costs.per_coord, frozen)  # the old model is untouched
    assert costs.provisional is None
    seen = {g for g, n, _ in samples if g >= 0 and n > 0}
    for g in range(3):
        if g in seen:
            assert math.isfinite(new.per_coord[g]) and new.provisional[g] == provisional
        else:  # a group without samples keeps its value and flag
            np.testing.assert_array_equal(new.per_coord[g], frozen[g])
            assert not new.provisional[g]
    coords = np.arange(45)
    assert np.all(np.isfinite(new.coordinate_costs(coords)))
    assert np.all(new.coordinate_costs(coords) >= 0)


def test_probes_cover_each_unmeasured_group_at_two_sizes():
    costs = GroupCosts(np.array([0, 20]), np.array([20, 40]), np.array([math.nan, 0.5]))
    coords = np.arange(0, 40)
    probes, sizes = plan_probes(costs, coords, probe_coords=2)
    assert sizes == {0: 20}  # group 1 is measured: not probed again
    assert [(g, c.size) for g, c in probes] == [(0, 2), (0, 8)]
    assert all(np.all((c >= 0) & (c < 20)) and np.unique(c).size == c.size for _, c in probes)
    few, sizes = plan_probes(costs, np.array([3, 5, 30]), probe_coords=2)
    assert sizes == {0: 2} and [c.tolist() for _, c in few] == [[3, 5]]  # capped, once
    with pytest.raises(ValueError, match="probe_coords must be a positive integer, got 0"):
        plan_probes(costs, coords, probe_coords=0)


# -- cluster handling -----------------------------------------------------------------------


def test_connect_to_an_existing_cluster_by_address(client):
    address = client.scheduler.address
    with connect(workers=2, scheduler=address) as other:
        assert len(other.scheduler_info()["workers"]) == 2
        with ParallelOracle(replicable(quadratic_oracle), other) as o:
            np.testing.assert_allclose(
                o.eval_coordinate_steps(_x(), np.arange(4), 0.1),
                quadratic_oracle().eval_coordinate_steps(_x(), np.arange(4), 0.1),
            )
    assert client.status == "running"  # closing a client by address leaves the cluster up


# -- the replicable protocol ----------------------------------------------------------------


def test_a_plain_oracle_is_refused_naming_what_it_lacks(client):
    plain = quadratic_oracle()
    with pytest.raises(TypeError, match=r"FunctionOracle lacks set_batch, base_value, "
                       r"replica_factory, model_state, .*use_threads.*replicable\(build\)"):  # fmt: skip
        ParallelOracle(plain, client)
    # refused before a cluster is started (workers=10**6 would take a while)
    with pytest.raises(TypeError, match="lacks set_batch"):
        with parallel_oracle(plain, workers=10**6):
            pass  # pragma: no cover - never reached
    assert plain.queries == 0


def test_replicable_declares_no_batch_no_state_and_its_groups():
    oracle = replicable(StagedSleepOracle, groups=StagedSleepOracle.groups)
    assert isinstance(oracle, ReplicableOracle)
    assert oracle.model_state() == {} and oracle.cost_groups() == [(0, 20), (20, 40)]
    assert oracle.cost_clock() == "wall"  # a black box may wait: its cost is wall time
    with pytest.raises(ValueError, match=r"no state to load, got \['w'\]"):
        oracle.load_model_state({"w": np.zeros(1)})
    replica = cloudpickle.loads(cloudpickle.dumps(oracle.replica_factory()))()
    assert isinstance(replica.oracle, StagedSleepOracle) and replica.oracle is not oracle.oracle
    oracle.queries = 7  # counter and policy are the wrapped oracle's
    assert oracle.oracle.queries == 7


def test_parallel_oracle_leaves_the_oracle_as_it_was_but_for_the_query_count(client):
    local = replicable(quadratic_oracle)
    local.oracle.queries = 5
    wrapped = local.oracle
    before, local_before = dict(vars(wrapped)), dict(vars(local))
    with parallel_oracle(local, client=client) as o:
        assert o.local is local and o.queries == 5  # counting goes on where it stood
        o.eval_coordinate_steps(_x(), np.arange(6), 0.1)
        assert local.queries == 5  # the workers' queries are counted here only
    assert client.status == "running"  # a given client is left open
    assert local.oracle is wrapped and local.queries == 11
    after = dict(vars(wrapped))
    # the count lives in the oracle's one budget (the same object before and after)
    assert "queries" not in before and wrapped.budget.spent == 11
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before), "an attribute was replaced"
    assert vars(local) == local_before
    with pytest.raises(RuntimeError, match="closed"):
        o.eval_coordinate_steps(_x(), np.arange(2), 0.1)


def test_nothing_of_the_local_oracle_is_forwarded_implicitly(quad):
    assert not hasattr(quad, "oracle")  # no attribute of the local oracle leaks through
    assert not hasattr(quad, "factory")
    assert quad.cost_groups() == []


# -- torch models ---------------------------------------------------------------------------

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _small_cnn_oracle(training: bool = True):
    from zoopt.torch.models import SmallCNN
    from zoopt.torch.oracle import ModuleOracle

    torch.manual_seed(0)
    return ModuleOracle(SmallCNN().train(training), F.cross_entropy)


def _digits_like_batch(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _float32_grad_tolerance(values: torch.Tensor, mu: float) -> float:
    # Workers run torch with one thread, which may round a value differently by an ulp or
    # two from a multi-threaded run; a forward difference divides that by mu.
    return 4 * torch.finfo(torch.float32).eps * float(values.abs().max()) / mu


def test_module_oracle_is_replicable_and_its_replica_is_the_same_function():
    from zoopt.torch.oracle import ModuleOracleFactory

    local = _small_cnn_oracle(training=False)
    assert isinstance(local, ReplicableOracle)
    assert local.cost_groups() == [(g.start, g.stop) for g in local.view.groups]
    assert local.cost_clock() == "cpu"
    state = local.model_state()
    assert set(state) == {k for k, _ in local.module.named_buffers()}
    factory = cloudpickle.loads(cloudpickle.dumps(local.replica_factory()))
    assert isinstance(factory, ModuleOracleFactory) and factory.training is False
    replica = factory()
    assert replica.module is not local.module and not replica.module.training
    with torch.no_grad():  # the replica takes the local running statistics by name
        for name, b in local.module.named_buffers():
            if "running" in name:
                b.mul_(1.5).add_(0.3)
    replica.load_model_state(local.model_state())
    for (name, a), b in zip(local.module.named_buffers(), replica.module.buffers(), strict=True):
        assert torch.equal(a, b), name
    x, coords = local.view.flatten(), np.arange(0, 300, 11)
    for o in (local, replica):
        o.set_batch(*_digits_like_batch())
    torch.testing.assert_close(
        replica.eval_coordinate_steps(x.numpy(), coords, 1e-2),
        local.eval_coordinate_steps(x, coords, 1e-2).numpy(),
    )
    with pytest.raises(KeyError, match="does not: \\['nope'\\]"):
        replica.load_model_state({"nope": np.zeros(1)})
    with pytest.raises(TypeError, match="expected a ModuleOracle"):
        ModuleOracleFactory.from_oracle(quadratic_oracle())


def test_module_oracle_factory_keeps_every_constructor_keyword():
    # the factory reads the oracle's own record of its keywords: a keyword added to
    # ModuleOracle reaches the workers' replicas without anyone listing it again
    import inspect

    from zoopt.oracle import DEFAULT_MAX_BATCH_BYTES
    from zoopt.torch import ModuleOracle, SmallCNN
    from zoopt.torch.oracle import ModuleOracleFactory

    keywords = {
        name
        for name, p in inspect.signature(ModuleOracle.__init__).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    given = dict(
        engine=True,
        max_batch_bytes=1 << 22,
        memory_format="contiguous",
        loss_dtype=torch.float32,
        per_sample_modules=(torch.nn.Identity,),
        max_cache_bytes=1 << 20,
        on_nonfinite="inf",
    )
    assert keywords <= set(given), f"test does not set {sorted(keywords - set(given))}"
    local = ModuleOracle(SmallCNN(), F.cross_entropy, **given)
    assert local.options == given
    factory = cloudpickle.loads(cloudpickle.dumps(local.replica_factory()))
    assert isinstance(factory, ModuleOracleFactory) and factory.options == given
    replica = factory()
    assert replica.options == given and replica.on_nonfinite == "inf"
    assert replica.engine.max_cache_bytes == 1 << 20 and replica.loss_dtype == torch.float32
    assert replica.engine.memory_format == "contiguous"
    assert replica.engine.per_sample_modules == (torch.nn.Identity,)
    no_engine = ModuleOracleFactory.from_oracle(
        ModuleOracle(SmallCNN(), F.cross_entropy, engine=False)
    )()
    assert no_engine.engine is None and no_engine.max_batch_bytes == DEFAULT_MAX_BATCH_BYTES


def test_torch_model_with_batchnorm_gradient_equals_single_process(client):
    local, single = _small_cnn_oracle(), _small_cnn_oracle()
    coords = np.sort(np.random.default_rng(0).choice(local.dim, 300, replace=False))
    x, mu = local.view.flatten(), 5e-3
    with ParallelOracle(local, client) as o:
        assert o.balance == "cost"  # groups come from the ModuleOracle's cost_groups()
        for oracle in (o, single):
            oracle.set_batch(*_digits_like_batch())
        fx, fs = o.base_value(x), single.base_value(x)
        assert fx == fs and o.queries == 1
        got = zoopt.CGE(mu=mu).estimate(o, x, fx=fx, coords=coords)
        want = zoopt.CGE(mu=mu).estimate(single, x, fx=fs, coords=coords)
        assert o.queries == single.queries == 1 + coords.size
        # BN running statistics were updated once, by the local base forward only
        for (name, a), b in zip(local.module.named_buffers(), single.module.buffers(), strict=True):
            assert torch.equal(a, b), name
        o.set_batch(*_digits_like_batch(seed=1))  # a new batch reaches the workers
        single.set_batch(*_digits_like_batch(seed=1))
        v = o.eval_coordinate_steps(x, coords[:50], mu)
        w = single.eval_coordinate_steps(x, coords[:50], mu)
        # first order through the local oracle (no ZO query charged)
        loss, grad = o.loss_and_grad(x, update_stats=False)
        want_loss, want_grad = single.loss_and_grad(x, update_stats=False)
        assert loss == want_loss and o.queries == 1 + coords.size + 50
        torch.testing.assert_close(grad, want_grad)
    assert isinstance(got.grad, torch.Tensor) and got.grad.dtype == torch.float32
    tol = _float32_grad_tolerance(torch.tensor([fs]), mu)
    torch.testing.assert_close(got.grad, want.grad, atol=tol, rtol=0)
    torch.testing.assert_close(v, w, atol=1e-6, rtol=1e-6)


def test_worker_replicas_see_the_local_batchnorm_buffers(client):
    """In eval mode BN uses running statistics: workers must use the client's current ones."""
    local = _small_cnn_oracle(training=False)
    coords, x, mu = np.arange(0, 200, 7), local.view.flatten(), 1e-2
    with ParallelOracle(local, client) as o:
        o.set_batch(*_digits_like_batch())
        stale = o.eval_coordinate_steps(x, coords, mu)
        with torch.no_grad():  # e.g. a base forward in training mode moved the statistics
            for name, b in local.module.named_buffers():
                if "running" in name:
                    b.mul_(1.5).add_(0.3)
        got = o.eval_coordinate_steps(x, coords, mu)
    single = _small_cnn_oracle(training=False)
    single.module.load_state_dict(local.module.state_dict())
    single.set_batch(*_digits_like_batch())
    want = single.eval_coordinate_steps(x, coords, mu)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert float((stale - want).abs().max()) > 1e-3  # the change mattered


def test_parallel_oracle_trains_like_the_single_process_trainer(client, tmp_path):
    from zoopt.torch.models import SmallCNN
    from zoopt.torch.tasks import ClassificationTask
    from zoopt.torch.train import TrainConfig, Trainer

    r = np.random.default_rng(0)
    data = (r.standard_normal((64, 1, 8, 8)).astype(np.float32), r.integers(0, 10, 64))
    config = TrainConfig(
        method="deepzero", epochs=1, max_steps_per_epoch=2, ratios="uniform", sparsity=0.9,
        progress=False, plots=False,
    )  # fmt: skip

    def make_task():
        torch.manual_seed(0)
        return ClassificationTask(SmallCNN(), data, data, batch_size=32)

    single = make_task()
    single_trainer = Trainer(single, config, tmp_path / "single")
    want = single_trainer.fit()

    task = make_task()
    own_oracle = task.oracle
    task_before = dict(vars(task))
    # the CLI path: --scheduler tcp://... (here: the test cluster's address)
    with parallel_oracle(task.oracle, scheduler=client.scheduler.address) as oracle:
        assert oracle.local is own_oracle
        trainer = Trainer(task, config, tmp_path / "parallel", oracle=oracle)
        got = trainer.fit()
        assert oracle.last_call["what"] == "coordinate steps"
        assert len(oracle.last_call["chunk_sizes"]) == 2
    # the task was never patched: same attributes, same objects; the count is on its oracle
    assert vars(task).keys() == task_before.keys()
    assert all(vars(task)[k] is v for k, v in task_before.items())
    assert type(task.oracle) is type(own_oracle) and "local" not in vars(own_oracle)
    assert own_oracle.queries == got["queries"]
    assert got["queries"] == want["queries"] > 0
    torch.testing.assert_close(trainer.x, single_trainer.x, atol=1e-5, rtol=0)
    for name, value in single.buffers_state().items():
        torch.testing.assert_close(task.buffers_state()[name], value, atol=1e-5, rtol=1e-5)


def test_cli_train_workers_2_matches_workers_1(tmp_path):
    """`zoopt train --workers 2` takes the same first step as `--workers 1`, end to end."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    xs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        cmd = [
            sys.executable,
            "-m",
            "zoopt.cli",
            "train",
            "--dataset",
            "digits",
            "--method",
            "deepzero",
            "--workers",
            str(workers),
            "--epochs",
            "1",
            "--max-steps",
            "1",
            "--grasp-q",
            "16",
            "--out",
            str(out),
            "--no-progress",
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        xs.append(torch.load(out / "checkpoint.pt", weights_only=False)["x"])
    assert torch.allclose(xs[0], xs[1], rtol=0, atol=1e-6)
