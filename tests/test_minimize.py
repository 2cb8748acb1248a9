"""minimize and ask/tell: convergence, identical iterates, resume, budgets, bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zoopt
from zoopt.testfunctions import quadratic

D = 200


def plain_quadratic(x):
    """A plain (non-vectorized) Python function of 200 variables, as a user would write it."""
    return float(quadratic(np.asarray(x)[None, :])[0])


@pytest.mark.parametrize(
    "estimator, optimizer, maxiter",
    [
        (zoopt.CGE(mu=1e-4), zoopt.SGD(lr=0.15), 60),
        (zoopt.RGE(q=20, mu=1e-4), zoopt.SGD(lr=0.015), 1500),
    ],
    ids=["cge", "rge"],
)
def test_reduces_convex_quadratic_gap_1000x(estimator, optimizer, maxiter):
    x0 = np.ones(D)
    f0 = plain_quadratic(x0)
    res = zoopt.minimize(
        plain_quadratic, x0, estimator=estimator, optimizer=optimizer, maxiter=maxiter, seed=0
    )
    assert res.success, res.message
    assert f0 / res.fun > 1000, res.fun
    assert res.nfev == maxiter * estimator.queries_per_step(D) + 1  # +1: final f(x)
    assert len(res.history["fun"]) == maxiter


def _run_asktell(f, x0, make_est, make_opt, n, seed):
    at = zoopt.AskTell(x0, make_est(), make_opt(), seed=seed)
    xs = []
    for _ in range(n):
        X = at.ask()
        np.testing.assert_array_equal(X, at.ask())  # asking twice gives the same points
        at.tell(np.array([f(p) for p in X]))
        xs.append(np.array(at.x))
    return xs


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    which=st.sampled_from(["rge", "rge-central", "cge", "cge-sparse"]),
    d=st.integers(2, 10),
)
def test_minimize_and_asktell_identical_iterates(seed, which, d):
    make_est = {
        "rge": lambda: zoopt.RGE(q=3, mu=1e-3),
        "rge-central": lambda: zoopt.RGE(q=4, mu=1e-3, dist="sphere", scheme="central"),
        "cge": lambda: zoopt.CGE(mu=1e-3),
        "cge-sparse": lambda: zoopt.CGE(mu=1e-3, scheme="central", coords=[0, d - 1]),
    }[which]
    make_opt = lambda: zoopt.Adam(lr=0.05)  # noqa: E731
    x0 = np.random.default_rng(seed).standard_normal(d)
    xs_min = []
    zoopt.minimize(
        plain_quadratic,
        x0,
        estimator=make_est(),
        optimizer=make_opt(),
        maxiter=5,
        seed=seed,
        callback=lambda r: xs_min.append(np.array(r.x)),
    )
    xs_at = _run_asktell(plain_quadratic, x0, make_est, make_opt, 5, seed)
    for a, b in zip(xs_min, xs_at, strict=True):
        np.testing.assert_array_equal(a, b)


def test_asktell_state_dict_resumes_exactly():
    x0 = np.linspace(-1, 1, 12)

    def make():
        return zoopt.AskTell(x0, zoopt.RGE(q=4, mu=1e-3), zoopt.SGD(lr=0.05, momentum=0.9), seed=3)  # noqa: E731

    a = make()
    for _ in range(8):
        a.tell(np.array([plain_quadratic(p) for p in a.ask()]))
    b = make()
    for _ in range(3):
        b.tell(np.array([plain_quadratic(p) for p in b.ask()]))
    state = b.state_dict()
    c = zoopt.AskTell(
        np.zeros(12), zoopt.RGE(q=4, mu=1e-3), zoopt.SGD(lr=0.05, momentum=0.9), seed=99
    )
    c.load_state_dict(state)
    for _ in range(5):
        c.tell(np.array([plain_quadratic(p) for p in c.ask()]))
    np.testing.assert_array_equal(a.x, c.x)
    b.ask()
    with pytest.raises(RuntimeError, match="between ask"):
        b.state_dict()


def test_deterministic_for_a_seed_and_torch_input():
    torch = pytest.importorskip("torch")
    x0 = np.ones(20)
    f_np = lambda X: quadratic(X)  # noqa: E731
    f_t = lambda X: 0.5 * (torch.linspace(1, 10, 20, dtype=X.dtype) * X * X).sum(1)  # noqa: E731
    kw = dict(
        estimator=zoopt.RGE(q=5, mu=1e-3), optimizer=None, lr=0.01, maxiter=20, seed=4, batched=True
    )
    r1 = zoopt.minimize(f_np, x0, **kw)
    r2 = zoopt.minimize(f_np, x0, **kw)
    r3 = zoopt.minimize(f_t, torch.ones(20, dtype=torch.float64), **kw)
    np.testing.assert_array_equal(r1.x, r2.x)
    assert isinstance(r3.x, torch.Tensor)
    np.testing.assert_allclose(r1.x, r3.x.numpy(), rtol=1e-10)


def test_budget_exhaustion_returns_best_point():
    res = zoopt.minimize(
        plain_quadratic,
        np.ones(D),
        estimator=zoopt.CGE(mu=1e-4),
        optimizer=zoopt.SGD(lr=0.15),
        maxiter=100,
        max_queries=1000,
    )
    assert not res.success and "max_queries=1000" in res.message
    assert res.nit == 4 and res.nfev <= 1000
    assert res.best_fun <= res.history["fun"][-1]
    # an oracle's own budget also ends the run cleanly
    oracle = zoopt.as_oracle(plain_quadratic, dim=D, max_queries=500)
    res = zoopt.minimize(
        oracle, np.ones(D), estimator=zoopt.CGE(mu=1e-4), optimizer=zoopt.SGD(lr=0.15)
    )
    assert not res.success and "budget" in res.message
    assert res.best_x is not None and res.best_fun < plain_quadratic(np.ones(D))


def test_callback_can_stop_and_gtol():
    res = zoopt.minimize(
        plain_quadratic,
        np.ones(D),
        estimator=zoopt.CGE(mu=1e-4),
        optimizer=zoopt.SGD(lr=0.15),
        maxiter=50,
        callback=lambda r: r.nit >= 3,
    )
    assert res.nit == 3 and res.message == "stopped by callback"
    res = zoopt.minimize(
        plain_quadratic,
        np.ones(D),
        estimator=zoopt.CGE(mu=1e-6, scheme="central"),
        optimizer=zoopt.SGD(lr=0.15),
        maxiter=500,
        gtol=1e-3,
    )
    assert res.success and "gtol" in res.message and res.nit < 500


def test_nonfinite_values_stop_with_a_message():
    f = lambda x: float("inf") if x[0] > 1.05 else float(x @ x)  # noqa: E731
    oracle = zoopt.as_oracle(f, dim=2, on_nonfinite="inf")
    res = zoopt.minimize(oracle, np.array([1.0, 1.0]), estimator=zoopt.CGE(mu=0.1), lr=-0.0 + 0.01)
    assert not res.success and "non-finite" in res.message


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"x0": [1.0, float("nan")]}, r"x0 must be finite; x0\[1\] = nan"),
        ({"x0": np.ones((2, 2))}, r"x0 must be 1-D .* shape \(2, 2\)"),
        ({"x0": []}, "must not be empty"),
        ({"x0": ["a", "b"]}, "x0 must be a 1-D array of numbers"),
        ({"maxiter": -1}, "maxiter must be a non-negative integer, got -1"),
        ({"max_queries": 0}, "max_queries must be a positive integer or None, got 0"),
        ({"estimator": "cge"}, "estimator must be a zoopt estimator"),
        ({"optimizer": "sgd"}, "optimizer must be a zoopt optimizer"),
        ({"gtol": -1.0}, "gtol must be > 0"),
    ],
)
def test_bad_minimize_arguments(kwargs, match):
    args = {"x0": np.ones(3)} | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        zoopt.minimize(lambda x: float(np.sum(x)), **args)


def test_tell_rejects_wrong_values():
    at = zoopt.AskTell(np.ones(3), zoopt.CGE(mu=0.1), seed=0)
    at.ask()
    with pytest.raises(ValueError, match=r"tell expects 4 values .* got shape \(3,\)"):
        at.tell([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="non-finite value nan at index 2"):
        at.tell([1.0, 2.0, float("nan"), 1.0])
