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
    assert res.status == 1 and not res.success and "maxiter=" in res.message  # as scipy
    assert f0 / res.fun > 1000, res.fun
    assert res.nfev == maxiter * estimator.queries_per_step(D) + 1  # +1: final f(x)
    assert res.njev == maxiter and res.fun == plain_quadratic(res.x)
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
    before = b.state_dict()
    b.ask()  # mid-iteration: the state is still that of the last completed iteration
    after = b.state_dict()
    np.testing.assert_array_equal(before["x"], after["x"])
    assert before["rng"] == after["rng"] and after["nit"] == 3


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
    assert not res.success and res.status == 1 and "max_queries=1000" in res.message
    assert res.nit == 4 and res.nfev <= 1000
    assert res.best_fun <= res.history["fun_at_estimate"][-1] and res.fun == res.best_fun
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
    assert res.nit == 3 and res.message == "stopped by callback" and res.status == 99
    res = zoopt.minimize(
        plain_quadratic,
        np.ones(D),
        estimator=zoopt.CGE(mu=1e-6, scheme="central"),
        optimizer=zoopt.SGD(lr=0.15),
        maxiter=500,
        gtol=1e-3,
    )
    assert res.success and "gtol" in res.message and res.nit < 500 and res.status == 0


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
        ({"maxiter": -1}, "maxiter must be a non-negative integer or None, got -1"),
        ({"max_queries": 0}, "max_queries must be a positive integer or None, got 0"),
        ({"estimator": "cge"}, "estimator must be a zoopt estimator"),
        ({"optimizer": "sgd"}, "optimizer must be a zoopt optimizer"),
        ({"gtol": -1.0}, "gtol must be a finite number > 0, got -1.0"),
        ({"tol": float("inf")}, "tol must be a finite number > 0, got inf"),
        ({"method": "newton"}, "unknown method 'newton'"),
        ({"method": "lbfgs", "lr": 0.1}, "method='lbfgs' chooses its own steps and takes no lr"),
        ({"options": {"memroy": 3}}, r"unknown option\(s\) \['memroy'\] for LBFGS"),
        ({"bounds": [(0, 1)] * 2}, "bounds has 2 .* x0 has 3"),
        ({"bounds": [(2, 1)] * 3}, r"bounds\[0\] has low 2.0 > high 1.0"),
        ({"workers": 0}, "workers must be an int >= 1"),
        ({"options": {"memory": 0}}, "memory must be an integer >= 1, got 0"),
        ({"method": "spsa", "options": {"c": 0.0}}, "c must be a finite number > 0, got 0.0"),
        ({"workers": 2, "batched": True}, "cannot go with batched=True"),
    ],
)
def test_bad_minimize_arguments(kwargs, match):
    args = {"x0": np.ones(3)} | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        zoopt.minimize(lambda x: float(np.sum(x)), **args)


def test_tell_rejects_wrong_values():
    at = zoopt.AskTell(np.ones(3), zoopt.CGE(mu=0.1), zoopt.SGD(lr=0.1), seed=0)
    at.ask()
    with pytest.raises(ValueError, match=r"tell expects 4 values .* got shape \(3,\)"):
        at.tell([1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="tell got 'abcd'"):
        at.tell("abcd")
    with pytest.raises(TypeError, match="dtype <U1"):
        at.tell(["a", "b", "c", "d"])
    # NaN reads as +inf: a fixed step cannot use it, so the method stops and says why
    assert at.tell([1.0, 2.0, float("nan"), 1.0]) is None
    assert at.done and "non-finite" in at.message
    with pytest.raises(RuntimeError, match="finished"):
        at.ask()


# -- issue 17: defaults that need no tuning, a scipy-grade result ----------------------------
class Recorder:
    """An independent record of every point and value the optimizer asked for."""

    def __init__(self, fn):
        self.fn, self.points, self.values = fn, [], []

    def __call__(self, x):
        value = self.fn(x)
        self.points.append(np.array(x, copy=True))
        self.values.append(float(value))
        return value


FUNCTIONS = {
    "sphere": lambda x: float(np.sum((x - 0.3) ** 2)),
    "quadratic": lambda x: float(np.sum(np.arange(1, x.size + 1) * x * x)),
    "rosenbrock": lambda x: float(np.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)),
    "rastrigin": lambda x: float(10 * x.size + np.sum(x * x - 10 * np.cos(2 * np.pi * x))),
}


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(sorted(FUNCTIONS)),
    d=st.integers(2, 8),
    budget=st.integers(1, 400),
    seed=st.integers(0, 1000),
)
def test_result_contract_fun_is_f_of_x_best_point_budget_exact(name, d, budget, seed):
    fn = FUNCTIONS[name]
    rec = Recorder(fn)
    x0 = np.random.default_rng(seed).uniform(-2, 2, d)
    res = zoopt.minimize(rec, x0, max_queries=budget, seed=seed)  # defaults: maxiter=None
    assert len(rec.values) == res.nfev <= budget  # never over, counted independently
    assert res.fun == fn(res.x)  # exactly f(x), not an estimate
    assert res.fun == min(rec.values)  # the best point queried is returned
    np.testing.assert_array_equal(res.x, res.best_x)
    assert res.status in (0, 1) and res.success == (res.status == 0)
    assert res.nit == len(res.history["fun"])
    if res.jac is not None:
        assert res.jac.shape == (d,)
    if res.status == 1:  # stopped by the budget: the next plan did not fit
        assert res.nfev > budget - 2 * d


def test_defaults_solve_smooth_problems_without_tuning():
    d = 100
    c = np.linspace(-1, 1, d)
    res = zoopt.minimize(lambda x: float(np.sum((x - c) ** 2)), np.zeros(d), max_queries=20 * d)
    assert res.fun < 1e-12, res  # scipy's L-BFGS-B: ~1e-10 here
    # condition number 1e3, rotated: a fixed-lr method needs a tuned lr for this one
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    H = (Q * np.logspace(0, 3, 30)) @ Q.T
    res = zoopt.minimize(lambda x: float(0.5 * x @ H @ x), np.ones(30), max_queries=200 * 30)
    assert res.fun < 1e-8, res
    # no budget and no maxiter: it runs until it has converged, and says so
    res = zoopt.minimize(FUNCTIONS["rosenbrock"], np.zeros(5))
    assert res.success and res.status == 0 and res.message.startswith("converged"), res
    assert res.fun < 1e-10 and res.njev >= res.nit


def test_the_budget_rules_not_a_hidden_maxiter():
    res = zoopt.minimize(FUNCTIONS["rastrigin"], np.full(4, 2.2), max_queries=5000, seed=0)
    assert res.status == 1 and res.nfev > 5000 - 2 * 4  # restarts spent it all
    assert "max_queries=5000" in res.message


def test_switches_to_central_differences_near_the_optimum():
    sizes = []

    def f(X):
        sizes.append(X.shape[0])
        return np.sum((X - 0.5) ** 2, axis=1)

    res = zoopt.minimize(f, np.zeros(6), batched=True)
    assert 6 in sizes and 12 in sizes  # forward (d) first, then central (2d)
    assert res.success and res.fun < 1e-20


@settings(max_examples=25, deadline=None)
@given(
    method=st.sampled_from(["lbfgs", "spsa", "sgd", "lbfgs-cge", "adam-rge-central"]),
    d=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    budget=st.integers(5, 300),
)
def test_bounds_are_never_violated(method, d, seed, budget):
    rng = np.random.default_rng(seed)
    lb = rng.uniform(-2, 0.5, d)
    ub = lb + rng.uniform(0.0, 2.0, d)  # some boxes are (nearly) flat
    x0 = rng.uniform(-4, 4, d)  # may start outside: projected
    target = rng.uniform(-4, 4, d)
    rec = Recorder(lambda x: float(np.sum((x - target) ** 2)))
    kwargs = {
        "lbfgs": {},
        "spsa": {"method": "spsa"},
        "sgd": {"method": "sgd", "lr": 0.5},
        "lbfgs-cge": {"estimator": zoopt.CGE(mu=0.3)},
        "adam-rge-central": {
            "estimator": zoopt.RGE(q=2, mu=0.5, scheme="central"),
            "optimizer": zoopt.Adam(lr=1.0),
        },
    }[method]
    bounds = list(zip(lb, ub, strict=True))
    res = zoopt.minimize(rec, x0, bounds=bounds, max_queries=budget, seed=seed, **kwargs)
    for p in rec.points:
        assert np.all(p >= lb) and np.all(p <= ub), (p, lb, ub)
    assert np.all(res.x >= lb) and np.all(res.x <= ub)
    assert np.all(res.last_x >= lb) and np.all(res.last_x <= ub)


def test_scipy_bounds_and_an_optimum_on_the_bound():
    from scipy.optimize import Bounds

    res = zoopt.minimize(lambda x: float(np.sum((x - 2.0) ** 2)), np.zeros(3), bounds=Bounds(0, 1))
    np.testing.assert_allclose(res.x, 1.0)
    assert res.success, res.message


def test_callback_stop_iteration_and_intermediate_result():
    seen = []

    def callback(intermediate_result):
        seen.append(intermediate_result)
        if intermediate_result.nit == 2:
            raise StopIteration

    res = zoopt.minimize(FUNCTIONS["sphere"], np.zeros(4), callback=callback)
    assert res.status == 99 and not res.success and res.nit == 2
    assert res.message == "stopped by callback"
    assert isinstance(seen[0], zoopt.OptimizeResult) and seen[0].fun is not None
    assert seen[-1].x.shape == (4,) and seen[-1].jac.shape == (4,)


@pytest.mark.parametrize(
    "value",
    [
        lambda v: v,
        lambda v: np.float32(v),
        lambda v: np.array(v),
        lambda v: np.array([v]),
        lambda v: np.array([[v]]),
    ],
    ids=["float", "float32", "0-d", "1-element", "1x1"],
)
def test_function_values_as_numbers_and_one_element_arrays(value):
    res = zoopt.minimize(lambda x: value(float(np.sum((x - 1) ** 2))), np.zeros(3))
    assert res.fun < 1e-6, res


@pytest.mark.parametrize(
    "bad, match",
    [
        ("1.5", "returned '1.5'"),
        (True, "returned True"),
        (np.array([1.0, 2.0]), r"returned array\(\[1\., 2\.\]\)"),
    ],
)
def test_strings_bools_and_vectors_are_type_errors(bad, match):
    with pytest.raises(TypeError, match=match):
        zoopt.minimize(lambda x: bad, np.zeros(3))


def test_args_workers_and_maplike_give_the_same_run():
    from concurrent.futures import ThreadPoolExecutor

    def f(x, c, scale):
        return float(scale * np.sum((x - c) ** 2))

    c = np.linspace(0, 1, 5)
    serial = zoopt.minimize(f, np.zeros(5), args=(c, 2.0), seed=1)
    threads = zoopt.minimize(f, np.zeros(5), args=(c, 2.0), seed=1, workers=3)
    with ThreadPoolExecutor(2) as pool:
        mapped = zoopt.minimize(f, np.zeros(5), args=(c, 2.0), seed=1, workers=pool.map)
    for other in (threads, mapped):
        np.testing.assert_array_equal(serial.x, other.x)
        assert serial.nfev == other.nfev and serial.fun == other.fun


def test_spsa_for_noisy_objectives():
    noise = np.random.default_rng(5)

    def noisy(x):
        return float(np.sum((x - 1.0) ** 2) + 0.05 * noise.standard_normal())

    res = zoopt.minimize(noisy, np.zeros(10), method="spsa", max_queries=6000, seed=0)
    assert np.linalg.norm(res.last_x - 1.0) < 0.3 * np.linalg.norm(np.ones(10))
    assert res.njev == res.nit  # one simultaneous perturbation (2 queries) per iteration


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), d=st.integers(2, 8), cut=st.integers(1, 40))
def test_default_asktell_resumes_bit_for_bit_mid_iteration(seed, d, cut):
    x0 = np.random.default_rng(seed).uniform(-1.5, 1.5, d)
    f = FUNCTIONS["rosenbrock"]

    def drive(at, tells=10**9, nit=25):
        for _ in range(tells):
            if at.done or at.nit >= nit:
                break
            at.tell([f(p) for p in at.ask()])

    full = zoopt.AskTell(x0, seed=seed)
    drive(full)
    part = zoopt.AskTell(x0, seed=seed)
    drive(part, tells=cut)
    state = part.state_dict()  # usually mid-iteration (line search, gradient)
    resumed = zoopt.AskTell(np.zeros(d), seed=seed + 1)
    resumed.load_state_dict(state)
    drive(resumed)
    assert resumed.nit == full.nit and resumed.done == full.done
    np.testing.assert_array_equal(resumed.x, full.x)


def test_minimize_and_asktell_agree_for_the_default_method():
    f = FUNCTIONS["rosenbrock"]
    xs = []
    zoopt.minimize(f, np.zeros(4), maxiter=15, callback=lambda r: xs.append(np.array(r.x)))
    at = zoopt.AskTell(np.zeros(4))
    while at.nit < 15:
        at.tell([f(p) for p in at.ask()])
        if len(xs) >= at.nit > 0:
            np.testing.assert_array_equal(xs[at.nit - 1], at.x)
    assert len(xs) == 15
