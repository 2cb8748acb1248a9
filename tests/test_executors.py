"""The executor protocol (zoopt/executors.py): ``workers=`` as processes, threads, a
``concurrent.futures`` pool, a Dask client (a real LocalCluster) or a map; failures on a
worker reported with the point's index, dead workers reported without hanging.

Process pools are loky's reusable one: the first test that needs it starts it, the others
find it warm. Functions of this module travel by value (cloudpickle), so the workers need
not import it.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import zoopt
from zoopt.executors import (
    DaskExecutor,
    MapExecutor,
    ProcessExecutor,
    QueryError,
    QueryExecutor,
    SerialExecutor,
    ThreadExecutor,
    WorkerDied,
    as_executor,
    chunk_bounds,
)

cloudpickle = pytest.importorskip("cloudpickle")
cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[1]


def shifted_sphere(x: np.ndarray) -> float:
    return float(np.sum((x - np.linspace(-1.0, 1.0, x.shape[0])) ** 2))


def raises_on_third(x: np.ndarray) -> float:
    if x[0] == 2.0:
        raise ValueError(f"no value at {x[0]}")
    return float(x[0])


def dies_on_third(x: np.ndarray) -> float:
    if x[0] == 2.0:
        os._exit(7)
    return float(x[0])


def killed_on_third(x: np.ndarray) -> float:
    if x[0] == 2.0:
        os.kill(os.getpid(), signal.SIGKILL)
    return float(x[0])


POINTS = [np.array([float(i), 0.0]) for i in range(5)]


def _serial(d: int = 3, budget: int = 30):
    return zoopt.minimize(shifted_sphere, np.zeros(d), max_queries=budget, seed=3)


def _same_run(a, b) -> None:
    np.testing.assert_array_equal(a.x, b.x)
    assert a.fun == b.fun and a.nfev == b.nfev and a.status == b.status


@pytest.fixture(scope="module")
def processes():
    ex = as_executor(2)
    assert isinstance(ex, ProcessExecutor)
    yield ex
    ex.close()


# -- resolving workers= -------------------------------------------------------------------
def test_workers_values_resolve_to_the_protocol():
    assert isinstance(as_executor(None), SerialExecutor)
    assert isinstance(as_executor(1), SerialExecutor)
    assert isinstance(as_executor(3), ProcessExecutor) and as_executor(3).workers == 3
    threads = as_executor("threads:2")
    assert isinstance(threads, ThreadExecutor) and threads.workers == 2
    threads.close()
    assert isinstance(as_executor(map), MapExecutor)
    mine = SerialExecutor()
    assert as_executor(mine) is mine
    for ex in (as_executor(None), as_executor(2), as_executor(map)):
        assert isinstance(ex, QueryExecutor)


@pytest.mark.parametrize(
    "bad, match",
    [
        (0, "workers must be an int >= 1, got 0"),
        (True, "got True"),
        ("processes:2", "'threads:N'"),
        ("threads:0", "'threads:N'"),
        (object(), "map-like callable, got <object"),
    ],
)
def test_bad_workers_values_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        as_executor(bad)
    with pytest.raises(ValueError, match=match):
        zoopt.minimize(shifted_sphere, np.zeros(2), workers=bad, max_queries=10)


@given(st.integers(0, 500), st.integers(1, 64))
def test_chunks_cover_the_batch_in_order_and_near_equal(n, chunks):
    bounds = chunk_bounds(n, chunks)
    assert [i for a, b in bounds for i in range(a, b)] == list(range(n))
    assert len(bounds) == min(n, chunks)
    sizes = [b - a for a, b in bounds]
    assert all(s >= 1 for s in sizes) and (not sizes or max(sizes) - min(sizes) <= 1)


# -- processes ----------------------------------------------------------------------------
def test_process_workers_run_a_lambda_and_give_the_serial_run():
    serial = _serial()
    c = np.linspace(-1.0, 1.0, 3)
    parallel = zoopt.minimize(
        lambda x: float(np.sum((x - c) ** 2)), np.zeros(3), max_queries=30, seed=3, workers=2
    )
    _same_run(serial, parallel)


def test_process_workers_evaluate_in_other_processes(processes):
    pids = processes.map(lambda _: os.getpid(), list(range(16)))
    assert os.getpid() not in pids and 1 <= len(set(pids)) <= 2


def test_process_pool_is_reused_across_batches_and_calls(processes):
    def slow_pid(_):
        time.sleep(0.05)  # every worker gets some of the 8 chunks
        return os.getpid()

    first = set(processes.map(slow_pid, list(range(8))))
    again = set(as_executor(2).map(slow_pid, list(range(8))))  # a new executor, as minimize's
    assert len(first) == 2 and again == first  # the same two worker processes


def test_a_function_of_main_runs_on_process_workers(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(
        textwrap.dedent(
            """
            import json
            import numpy as np
            import zoopt

            def objective(x):  # defined in __main__: the workers cannot import it
                return float(np.sum((x - 0.5) ** 2))

            if __name__ == "__main__":
                par = zoopt.minimize(objective, np.zeros(3), max_queries=40, seed=1, workers=2)
                ser = zoopt.minimize(objective, np.zeros(3), max_queries=40, seed=1)
                print(json.dumps({"par": [par.fun, par.nfev, par.x.tolist(), par.status],
                                  "ser": [ser.fun, ser.nfev, ser.x.tolist(), ser.status],
                                  "message": par.message}))
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["par"] == result["ser"], result
    assert "failed" not in result["message"]


def test_a_raising_point_is_named_by_its_index(processes):
    with pytest.raises(
        QueryError, match=r"point 2 of the batch of 5 .*ValueError: no value at 2"
    ) as info:
        processes.map(raises_on_third, POINTS)
    assert info.value.index == 2 and info.value.error_type == "ValueError"
    assert "raises_on_third" in info.value.remote_traceback
    assert processes.map(raises_on_third, POINTS[:2]) == [0.0, 1.0]  # the pool still works


def test_minimize_reports_the_raising_query(processes):
    def f(x):
        if x[1] > 0.0:  # the second coordinate's finite difference
            raise RuntimeError("simulator crashed")
        return float(np.sum(x**2))

    res = zoopt.minimize(f, np.ones(3) * -1.0, workers=2, max_queries=50, seed=0)
    assert res.status == 2, res.message
    assert "point" in res.message and "RuntimeError: simulator crashed" in res.message
    assert res.nfev >= 1 and res.fun == f(res.x)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fn", [dies_on_third, killed_on_third], ids=["os._exit", "SIGKILL"])
def test_a_dead_worker_is_reported_not_waited_for(processes, fn):
    with pytest.raises(WorkerDied, match="died while evaluating a batch of 5 points"):
        processes.map(fn, POINTS)
    assert processes.map(fn, POINTS[:2]) == [0.0, 1.0]  # the next batch gets a fresh pool


def test_an_unpicklable_function_says_so(processes):
    lock = threading.Lock()
    with pytest.raises(pickle.PicklingError, match="picklable function .* workers='threads:N'"):
        processes.map(lambda x, lock=lock: 0.0, POINTS)


@pytest.mark.timeout(60)
def test_minimize_stops_when_a_worker_dies():
    def f(x):
        if x[0] > 0.5:
            os._exit(3)
        return float(np.sum(x**2))

    res = zoopt.minimize(f, np.full(2, 0.75), workers=2, max_queries=50)
    assert res.status == 2 and "WorkerDied" in res.message and "EXIT(3)" in res.message


# -- threads, concurrent.futures, maps ----------------------------------------------------
def test_threads_and_a_caller_s_executor_give_the_serial_run():
    serial = _serial()
    _same_run(
        serial,
        zoopt.minimize(shifted_sphere, np.zeros(3), max_queries=30, seed=3, workers="threads:2"),
    )
    with ThreadPoolExecutor(2) as pool:
        _same_run(
            serial,
            zoopt.minimize(shifted_sphere, np.zeros(3), max_queries=30, seed=3, workers=pool),
        )
        assert pool.submit(int, "5").result() == 5  # minimize left the caller's pool open


def test_a_map_names_the_raising_point_too():
    with pytest.raises(QueryError, match="point 2 of the batch of 5"):
        MapExecutor(map).map(raises_on_third, POINTS)
    with ThreadPoolExecutor(2) as pool, pytest.raises(QueryError, match="point 2"):
        as_executor(pool).map(raises_on_third, POINTS)
    with pytest.raises(QueryError, match="point 2") as info:
        SerialExecutor().map(raises_on_third, POINTS)
    assert isinstance(info.value.__cause__, ValueError)


def test_an_asktell_loop_evaluates_through_an_executor(processes):
    at = zoopt.AskTell(np.zeros(3), seed=0)
    ref = zoopt.AskTell(np.zeros(3), seed=0)
    for _ in range(6):
        at.tell(processes.map(shifted_sphere, at.ask()))
        ref.tell([shifted_sphere(p) for p in ref.ask()])
    np.testing.assert_array_equal(at.x, ref.x)
    assert at.nit == ref.nit > 0


# -- Dask ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, dashboard_address=None, processes=True
    )
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


def test_a_dask_client_is_an_executor(dask_client):
    ex = as_executor(dask_client)
    assert isinstance(ex, DaskExecutor) and isinstance(ex, QueryExecutor) and ex.workers == 2
    pids = ex.map(lambda _: os.getpid(), list(range(8)))
    assert os.getpid() not in pids
    _same_run(
        _serial(),
        zoopt.minimize(shifted_sphere, np.zeros(3), max_queries=30, seed=3, workers=dask_client),
    )
    assert dask_client.submit(int, "5").result() == 5  # left open


def test_dask_workers_name_the_raising_point(dask_client):
    with pytest.raises(QueryError, match="point 2 of the batch of 5 .*no value at 2"):
        as_executor(dask_client).map(raises_on_third, POINTS)
