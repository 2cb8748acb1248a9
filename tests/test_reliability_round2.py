"""Reliability, round two (issue #22): no code runs that the user did not name, no result
is lost, no silent wrong result, no endless wait, and expected failures end in one line.

Everything runs for real: the ``zoopt`` CLI in a subprocess, loopback sockets (127.0.0.1
only, every wait bounded), numpy functions; no mocks of zoopt's code.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zoopt

ROOT = Path(__file__).resolve().parents[1]
# -P: like the installed `zoopt` script, the current folder is not put on sys.path by
# Python itself (`python -m` would put it there before zoopt runs at all)
ZOOPT = [sys.executable, "-P", "-m", "zoopt.cli"]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        ZOOPT + args, capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def one_line_error(out: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Assert a CLI failure is one line ``zoopt: error: ...`` (with ``needles``), exit code 2,
    no traceback; returns that line."""
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("zoopt: error: ")]
    assert len(lines) == 1, out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- code execution --------------------------------------------------------------------
@pytest.mark.parametrize("shadow", ["tqdm", "array_api_compat"])
def test_a_file_in_the_folder_cannot_stand_in_for_our_imports(shadow, tmp_path):
    marker = tmp_path / "RAN"
    (tmp_path / f"{shadow}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    # progress on (no --quiet): tqdm is imported after the user's module
    out = run_cli(["minimize", "math:fsum", "--dim", "3", "--max-queries", "20"], tmp_path)
    assert not marker.exists(), "a file the user did not name was executed"
    assert out.returncode == 0, out.stderr


def test_the_users_own_module_still_imports_from_the_folder(tmp_path):
    (tmp_path / "helper.py").write_text("SHIFT = 2.0\n")
    (tmp_path / "obj.py").write_text(
        "import numpy as np\nfrom helper import SHIFT\n"
        "def f(x):\n    return float(np.sum((x - SHIFT) ** 2))\n"
    )
    out = run_cli(["minimize", "obj:f", "--dim", "2", "--max-queries", "200", "--quiet"], tmp_path)
    assert out.returncode == 0, out.stderr


# -- results lost ----------------------------------------------------------------------
def test_out_in_a_missing_folder_is_refused_before_the_run(tmp_path):
    out = run_cli(["minimize", "sphere", "--dim", "2", "--out", "missing/dir/x.npy"], tmp_path)
    one_line_error(out, "--out missing/dir/x.npy", "does not exist")
    assert out.stdout == ""  # nothing ran
    (tmp_path / "afile").write_text("")
    out = run_cli(["minimize", "sphere", "--dim", "2", "--out", "afile/x.npy"], tmp_path)
    one_line_error(out, "is not a folder")


def test_a_raising_callback_keeps_the_best_point_on_the_exception():
    def f(x):
        return float(np.sum((x - 1.0) ** 2))

    def callback(r):
        if r.nit == 3:
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom") as info:
        zoopt.minimize(f, np.zeros(2), method="sgd", lr=0.1, callback=callback, seed=0)
    res = info.value.result
    assert res.status == zoopt.minimize.__globals__["STATUS_FAILED"]
    assert "ValueError: boom" in res.message and res.nfev > 0
    assert res.fun == f(res.x) < f(np.zeros(2))
    assert any(".result" in note for note in info.value.__notes__)


# -- silent wrong results --------------------------------------------------------------
def test_a_workers_map_returning_fewer_values_fails_instead_of_inventing_them():
    def short_map(fn, rows):
        return list(map(fn, rows))[:-1]

    res = zoopt.minimize(
        lambda x: float(np.sum(x**2)) + 1.0, np.ones(3), workers=short_map, max_queries=50
    )
    assert res.status == 2 and "one value per point" in res.message, res.message
    # no value came back: f is unknown (NaN), not made up (f >= 1 everywhere); not retried
    assert math.isnan(res.fun) and res.nfev == 1


def _trained(method: str) -> zoopt.AskTell:
    kwargs = {"lr": 0.1} if method in ("sgd", "adam") else {}
    at = zoopt.AskTell(np.ones(3), method=method, seed=0, **kwargs)
    while at.nit < 2:
        at.tell([float(p @ p) for p in at.ask()])
    return at


@pytest.mark.parametrize(
    ("source", "target"), [("lbfgs", "spsa"), ("sgd", "lbfgs"), ("spsa", "lbfgs")]
)
def test_a_state_of_another_method_is_refused_whole(source, target):
    at = _trained(target)
    before = at.state_dict()
    with pytest.raises(ValueError, match="state"):
        at.load_state_dict(_trained(source).state_dict())
    assert np.array_equal(at.x, before["x"]) and at.nit == before["nit"]
    at.tell([float(p @ p) for p in at.ask()])  # still usable


def _corrupt(state: dict, which: str) -> dict:
    state = {**state, "method": dict(state["method"])}
    m = state["method"]
    if which == "junk":
        return {"junk": 1}
    if which == "extra_key":
        return {**state, "junk": 1}
    if which == "done_string":
        return {**state, "done": "no"}
    if which == "nan_memory":
        m["S"] = [np.array([np.nan, 0.0, 0.0])]
        m["Y"] = [np.zeros(3)]
        return state
    if which == "wrong_shape":
        m["g"] = np.zeros(4)
        return state
    if which == "missing_method_key":
        m.pop("fx")
        return state
    raise AssertionError(which)


@pytest.mark.parametrize(
    "which", ["junk", "extra_key", "done_string", "nan_memory", "wrong_shape", "missing_method_key"]
)
def test_a_bad_lbfgs_state_is_refused_and_nothing_changes(which):
    at = _trained("lbfgs")
    before = at.state_dict()
    with pytest.raises(ValueError):
        at.load_state_dict(_corrupt(at.state_dict(), which))
    assert np.array_equal(at.x, before["x"]) and at.nit == before["nit"] and not at.done
    at.load_state_dict(before)
    at.tell([float(p @ p) for p in at.ask()])


@settings(max_examples=40, deadline=None)
@given(
    key=st.sampled_from(["x", "fx", "g", "central", "S", "restart_sigma", "best", "stalls"]),
    value=st.one_of(
        st.none(),
        st.booleans(),
        st.text(max_size=3),
        st.floats(allow_nan=True, allow_infinity=True),
        st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=5),
    ),
)
def test_any_bad_value_in_an_lbfgs_state_is_refused_before_anything_changes(key, value):
    at = _trained("lbfgs")
    good = at.state_dict()
    state = {**good, "method": {**good["method"], key: value}}
    try:
        at.load_state_dict(state)
    except ValueError:
        assert np.array_equal(at.x, good["x"]) and at.nit == good["nit"]
        return
    at.tell([float(p @ p) for p in at.ask()])  # accepted: the run goes on without error


def test_the_callback_gets_copies():
    def f(x):
        return float(np.sum((x - 1.0) ** 2))

    def vandal(r):
        r.best_x[:] = -7.0
        r.x[:] = -7.0
        r.jac[:] = 0.0

    res = zoopt.minimize(f, np.zeros(2), callback=vandal, max_queries=300, seed=0)
    assert res.fun == f(res.x) and not np.any(res.x == -7.0)


@settings(max_examples=40, deadline=None)
@given(
    pair=st.tuples(
        st.one_of(st.none(), st.floats(), st.text(max_size=2), st.booleans()),
        st.one_of(st.none(), st.floats(), st.text(max_size=2), st.booleans()),
    )
)
def test_bounds_give_a_finite_box_or_a_clear_error(pair):
    def f(x):
        assert np.all(np.isfinite(x)), x
        return float(np.sum(x**2))

    try:
        res = zoopt.minimize(f, np.zeros(2), bounds=[pair, (0.0, 1.0)], max_queries=20)
    except ValueError as exc:
        assert "bounds" in str(exc)
        return
    assert np.all(np.isfinite(res.x))


def test_bounds_errors_name_the_entry():
    from scipy.optimize import Bounds

    with pytest.raises(ValueError, match=r"bounds\[0\] = \(inf, inf\)"):
        zoopt.minimize(lambda x: 0.0, np.zeros(2), bounds=[(math.inf, math.inf), (0, 1)])
    with pytest.raises(ValueError, match=r"bounds\[0\] low must be a number or None, got 'a'"):
        zoopt.minimize(lambda x: 0.0, np.zeros(2), bounds=[("a", 1), (0, 1)])
    with pytest.raises(ValueError, match=r"bounds.lb has shape \(3,\) but x0 has 2"):
        zoopt.minimize(lambda x: 0.0, np.zeros(2), bounds=Bounds([0, 0, 0], [1, 1, 1]))


@pytest.mark.parametrize("method", ["adam", "sgd", "lbfgs", "spsa"])
@pytest.mark.parametrize("k", [2, 3, 4, 9])
def test_ctrl_c_inside_a_batch_returns_a_value_f_returned(method, k):
    calls, seen = [0], []

    def f(x):
        calls[0] += 1
        if calls[0] == k:
            raise KeyboardInterrupt
        v = float(np.sum((x - 1.0) ** 2))
        seen.append(v)
        return v

    lr = {"lr": 0.1} if method in ("adam", "sgd") else {}
    res = zoopt.minimize(f, np.zeros(3), method=method, seed=0, **lr)
    assert res.status == 3
    assert res.fun in seen and res.fun == min(seen)
    assert res.nfev == calls[0]  # the points never started are not counted


def test_the_limit_message_counts_the_queries_nfev_reports():
    calls = []
    res = zoopt.minimize(lambda x: calls.append(1) or float(x @ x), np.ones(3), max_queries=3)
    assert res.nfev == len(calls) == 1  # x0 once, not twice
    assert "(1 spent;" in res.message


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from([True, False, 1, 2.5]), min_size=3, max_size=3))
def test_tell_refuses_bools_as_minimize_does(values):
    at = zoopt.AskTell(np.ones(2), zoopt.CGE(mu=1e-3), zoopt.SGD(lr=0.1), seed=0)
    assert at.ask().shape[0] == 3
    if any(isinstance(v, bool) for v in values):
        with pytest.raises(TypeError, match="bools"):
            at.tell(values)
        with pytest.raises(TypeError):
            at.tell(np.array(values, dtype=bool))
        assert at.nit == 0
    else:
        at.tell(values)
        assert at.nit == 1


def test_seed_and_callback_are_checked_before_the_first_query():
    calls = []

    def f(x):
        calls.append(1)
        return 0.0

    for seed in ("abc", -1, True):
        with pytest.raises(ValueError, match=f"seed must be .*got {seed!r}"):
            zoopt.minimize(f, np.zeros(2), seed=seed)
    with pytest.raises(TypeError, match="callback must be callable or None, got 5"):
        zoopt.minimize(f, np.zeros(2), callback=5)
    assert calls == []


# -- hangs ------------------------------------------------------------------------------
def _loopback_server(answer: bytes | None) -> Iterator[str]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            held.append(conn)
            if answer is not None:
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        srv.close()


@pytest.fixture
def silent_peer() -> Iterator[str]:
    yield from _loopback_server(None)


@pytest.fixture
def http_peer() -> Iterator[str]:
    yield from _loopback_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def _connect_in_thread(address: str) -> BaseException | None:
    """connect() in a thread, joined with a generous bound: a hang fails the test."""
    from zoopt.parallel import connect

    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            connect(scheduler=address, timeout=1)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(60)
    assert outcome, f"connect({address!r}, timeout=1) still waiting after 60 s"
    return outcome[0]


def test_connect_gives_up_on_a_silent_peer(silent_peer):
    exc = _connect_in_thread(silent_peer)
    assert isinstance(exc, TimeoutError) and "sent no Dask handshake" in str(exc)


def test_connect_refuses_an_http_answer(http_peer):
    exc = _connect_in_thread(http_peer)
    assert isinstance(exc, ConnectionError) and "not a Dask handshake" in str(exc)


def test_connect_to_a_closed_port_ends_at_the_timeout():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nobody listens
    exc = _connect_in_thread(f"tcp://127.0.0.1:{port}")
    assert isinstance(exc, TimeoutError) and "no Dask scheduler answered" in str(exc)


# -- one CLI error path -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "needles"),
    [
        ("def f(x) return 0\n", ["importing module 'bad'", "SyntaxError", "line 1"]),
        ("raise RuntimeError('no config')\n", ["importing module 'bad'", "no config"]),
        ("def f(x):\n    raise KeyError('k')\n", ["bad:f failed at x0", "KeyError"]),
    ],
)
def test_minimize_user_code_failing_is_one_line(source, needles, tmp_path):
    (tmp_path / "bad.py").write_text(source)
    out = run_cli(["minimize", "bad:f", "--dim", "2", "--quiet"], tmp_path)
    one_line_error(out, *needles)


def test_serve_classifier_on_a_port_in_use_is_one_line(tmp_path):
    pytest.importorskip("torch")
    from oracles.resnet import resnet18, save_classifier_checkpoint

    weights = tmp_path / "served.pth"
    model = resnet18(num_classes=10, small_input=True).eval()
    save_classifier_checkpoint(weights, model, "resnet18", input_shape=(3, 16, 16))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        out = run_cli(
            ["serve-classifier", "--weights", str(weights), "--host", "127.0.0.1",
             "--port", str(port), "--quiet"],
            tmp_path,
        )  # fmt: skip
    one_line_error(out, f"cannot listen on 127.0.0.1:{port}")


# -- the copy guard costs nothing on points the plan built ------------------------------
def test_cge_hands_its_fresh_chunks_to_a_batched_function_without_a_copy():
    d, chunk = 1000, 2 * 2**20  # 262 rows of 8 kB per chunk
    oracle = zoopt.FunctionOracle(
        lambda X: np.einsum("ij,ij->i", X, X), d, batched=True, max_batch_bytes=chunk
    )
    x = np.linspace(-1, 1, d)
    zoopt.CGE(mu=1e-4).estimate(oracle, x)  # first-call allocations (caches) out of the count
    tracemalloc.start()
    try:
        est = zoopt.CGE(mu=1e-4).estimate(oracle, x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # one chunk alive at a time; a defensive copy of each chunk would make it two
    assert peak < 1.5 * chunk, peak
    np.testing.assert_allclose(est.grad, 2 * x, atol=1e-3)


def test_a_function_keeping_or_writing_its_chunks_changes_nothing():
    d = 200
    seen = []

    def f(X):
        seen.append(X)  # kept: a later chunk must not overwrite it
        v = np.sum(X**2, axis=1)
        X[:] = 99.0  # and written into: neither the estimate nor the best point may change
        return v

    oracle = zoopt.FunctionOracle(f, d, batched=True, max_batch_bytes=50 * d * 8)
    x = np.linspace(-1, 1, d)
    est = zoopt.CGE(mu=1e-4).estimate(oracle, x)
    np.testing.assert_allclose(est.grad, 2 * x, atol=1e-3)
    assert len(seen) > 2 and len({id(X) for X in seen}) == len(seen)
    i = int(np.argmin(x))  # the best point steps the most negative... toward 0
    expected = x.copy()
    expected[i] += 1e-4
    np.testing.assert_array_equal(oracle.best_x, expected)


def test_the_callers_arrays_are_still_copied():
    x0 = np.ones(3)
    X = np.ones((2, 3))

    def vandal(X):
        X[:] = 0.0
        return np.ones(X.shape[0])

    oracle = zoopt.as_oracle(vandal, dim=3, batched=True)
    oracle.batch(X)
    oracle(x0)
    assert np.all(X == 1.0) and np.all(x0 == 1.0)


# -- an objective unbounded below, no budget --------------------------------------------
UNBOUNDED = {
    "linear": lambda x: float(np.sum(x)),
    "minus-norm": lambda x: float(-np.linalg.norm(x)),
    "minus-square": lambda x: float(-np.sum(x**2)),
    "minus-exp": lambda x: float(-np.exp(x[0]) + x[1] ** 2),
    # f decreases slowly (-1e7 at |x| = 1e15): caught by the iterate running away
    "minus-sqrt": lambda x: float(-np.sqrt(abs(x[0])) + x[1] ** 2),
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name", list(UNBOUNDED))
def test_an_objective_unbounded_below_is_not_reported_as_converged(name):
    res = zoopt.minimize(UNBOUNDED[name], np.ones(3), seed=0)  # no maxiter, no max_queries
    assert res.status == zoopt.minimize.__globals__["STATUS_FAILED"] and not res.success
    assert "unbounded below" in res.message, res.message
    assert res.nfev < 5_000, res.nfev  # not hundreds of thousands of queries
    assert res.fun == UNBOUNDED[name](res.x) < UNBOUNDED[name](np.ones(3))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(
    ("f", "x0"),
    [
        # a huge scale is not divergence: f(x0) ~ 1e20, a minimum at -1e16 far below 0
        (lambda x: float(np.sum((x - 5e7) ** 2) - 1e16), np.zeros(3)),
        (lambda x: float(1e20 * (1 + np.sum((x - 2.0) ** 2))), np.zeros(3)),
        # x0 far out: the iterate's size is measured against x0's
        (lambda x: float(np.sum((x - 1e17) ** 2) / 1e34), np.full(3, 2e16)),
    ],
)
def test_bounded_objectives_of_any_scale_still_converge(f, x0):
    res = zoopt.minimize(f, x0, seed=0, max_queries=3_000)
    assert "unbounded" not in res.message and res.status == 1, res.message
    assert res.fun < f(x0)


def test_the_runaway_guard_survives_a_saved_state():
    at = _trained("lbfgs")
    state = at.state_dict()
    assert {"f0", "xscale0"} <= set(state["method"])
    again = zoopt.AskTell(np.ones(3), method="lbfgs", seed=0)
    again.load_state_dict(state)
    again.tell([float(p @ p) for p in again.ask()])
    with pytest.raises(ValueError, match="f0"):
        again.load_state_dict({**state, "method": {**state["method"], "f0": math.nan}})


# -- the classifier service takes numbers only ------------------------------------------
@pytest.fixture
def classifier_service() -> Iterator[tuple[str, int]]:
    pytest.importorskip("torch")
    for package in ("httpx", "starlette", "uvicorn"):
        pytest.importorskip(package)
    import torch
    from torch import nn

    from oracles.classifier import LocalClassifier
    from oracles.http_service import make_server, serve_in_background

    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    server = make_server(
        LocalClassifier(module, input_shape=(3, 4, 4), name="tiny"), host="127.0.0.1", port=0
    )
    serve_in_background(server)
    try:
        yield server.server_address[:2]
    finally:
        server.shutdown()
        server.server_close()


def _post_json(address: tuple[str, int], data: list, datatype: str = "FP32") -> tuple[int, dict]:
    import http.client
    import json

    document = {"inputs": [{"name": "images", "datatype": datatype, "shape": [1, 3, 4, 4],
                            "data": data}]}  # fmt: skip
    connection = http.client.HTTPConnection(*address, timeout=10)
    try:
        connection.request(
            "POST", "/v2/models/tiny/infer", json.dumps(document),
            {"Content-Type": "application/json"},
        )  # fmt: skip
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize(
    "data",
    [
        [True] + [0.5] * 47,  # one true among numbers (numpy would read 1.0)
        [[False] * 16, [0.5] * 16, [0.25] * 16],  # nested
        [True] * 48,  # all booleans
        [1] * 47 + [False],  # among integers
    ],
    ids=["one-true", "nested-false", "all-bools", "among-ints"],
)
def test_the_service_refuses_json_booleans_as_pixel_values(classifier_service, data):
    status, answer = _post_json(classifier_service, data)
    assert status == 400, answer
    assert "true/false" in answer["error"] and "FP32" in answer["error"], answer
    status, answer = _post_json(classifier_service, [0.5] * 48)  # numbers: still served
    assert status == 200 and answer["outputs"][0]["shape"] == [1, 5], answer
