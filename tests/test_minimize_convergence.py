"""minimize stops when converged and says so; max_queries is a cap (issue 24)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zoopt
from zoopt.restarts import AUTO_RESTARTS_BUDGET


class Counted:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, x):
        self.n += 1
        return self.fn(x)


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(1, 12),
    seed=st.integers(0, 10_000),
    log_cond=st.floats(0.0, 3.0),
    offset=st.floats(-100.0, 100.0),
)
def test_a_converged_run_stops_with_success_and_fun_is_f_of_x(d, seed, log_cond, offset):
    rng = np.random.default_rng(seed)
    scales = np.logspace(0, log_cond, d)
    c = rng.uniform(-2, 2, d)
    f = Counted(lambda x: float(np.sum(scales * (x - c) ** 2) + offset))
    budget = 500 * d  # below AUTO_RESTARTS_BUDGET·d: a cap, not a target
    res = zoopt.minimize(f, rng.uniform(-2, 2, d), max_queries=budget, seed=seed)
    assert res.success and res.status == 0 and res.message.startswith("converged"), res
    assert res.nfev == f.n < budget  # stopped before the cap: the cap was not spent
    assert res.fun == f.fn(res.x)  # exactly f(x)
    # converged to the minimum, to the precision finite differences allow
    assert res.fun - offset <= 1e-7 * max(1.0, abs(offset)) * 10**log_cond


def test_the_readme_example_stops_converged_well_within_twice_scipys_queries():
    def loss(x):
        return float(np.sum((x - 3.0) ** 2) + np.abs(x).sum())

    f = Counted(loss)
    res = zoopt.minimize(f, x0=np.zeros(200), max_queries=100_000)
    assert res.success and res.status == 0, res
    assert res.nfev == f.n <= 2_500  # scipy's L-BFGS-B: 1,206 queries
    assert res.fun == pytest.approx(550.0, abs=1e-9) and res.fun == loss(res.x)


def test_restarts_spend_a_large_budget_and_find_a_better_basin():
    """Rastrigin: L-BFGS alone stops in the basin it starts in; the global phase (on by
    default from AUTO_RESTARTS_BUDGET·d queries) spends the budget and finds a better one."""

    def rastrigin(x):
        return float(10 * x.size + np.sum(x * x - 10 * np.cos(2 * np.pi * x)))

    d, x0 = 3, np.full(3, 2.2)
    local = zoopt.minimize(rastrigin, x0, max_queries=500 * d, seed=0)
    assert local.success and local.nfev < 500 * d
    budget = AUTO_RESTARTS_BUDGET * d
    f = Counted(rastrigin)
    res = zoopt.minimize(f, x0, max_queries=budget, seed=0)
    assert res.status == 1 and res.nfev == f.n <= budget and res.nfev > budget - 2 * d
    assert res.fun < local.fun and res.fun == rastrigin(res.x)
    off = zoopt.minimize(rastrigin, x0, max_queries=budget, seed=0, restarts=False)
    assert off.success and off.nfev == local.nfev and off.fun == local.fun


def test_restarts_without_a_budget_end_after_the_last_restart():
    f = Counted(lambda x: float(np.sum((x - 1.0) ** 2)))
    res = zoopt.minimize(f, np.zeros(2), restarts=2, seed=1)
    assert res.success and "2 IPOP-CMA-ES restarts" in res.message, res.message
    assert res.fun == f.fn(res.x) and res.fun < 1e-12


def test_restarts_are_refused_for_fixed_step_methods():
    with pytest.raises(ValueError, match="restarts=True are L-BFGS's global phase"):
        zoopt.minimize(lambda x: float(x @ x), np.ones(2), method="sgd", restarts=True)
    with pytest.raises(ValueError, match="restarts must be True, False, an integer"):
        zoopt.minimize(lambda x: float(x @ x), np.ones(2), restarts="always")


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 1000), cut=st.integers(1, 150))
def test_a_run_with_restarts_resumes_bit_for_bit(seed, cut):
    def f(x):
        return float(np.sum(x * x - 3 * np.cos(3 * x)))

    x0 = np.full(2, 1.7)

    def drive(at, tells):
        for _ in range(tells):
            if at.next_plan() is None:  # finished (a resumed run may finish at once)
                break
            at.tell([f(p) for p in at.ask()])

    full = zoopt.AskTell(x0, seed=seed, restarts=2)
    drive(full, 250)
    part = zoopt.AskTell(x0, seed=seed, restarts=2)
    drive(part, cut)
    resumed = zoopt.AskTell(x0, seed=seed + 1, restarts=2)
    resumed.load_state_dict(part.state_dict())
    drive(resumed, 250)
    assert resumed.done == full.done and resumed.nit == full.nit
    np.testing.assert_array_equal(resumed.x, full.x)


@pytest.mark.parametrize("sigma", [1e-4, 1e-2])
def test_noise_option_resamples_differences_below_the_noise(sigma):
    """A noisy quadratic: L-BFGS's default steps read the noise as slope; with noise=σ the
    differences are sized for it and resampled, and the run stops converged near x*."""
    c = np.linspace(-1, 1, 10)
    scales = np.arange(1, 11)

    def f_true(x):
        return float(np.sum(scales * (x - c) ** 2))

    results = {}
    for noise in (None, sigma):
        rng = np.random.default_rng(0)
        f = Counted(lambda x, rng=rng: f_true(x) + sigma * rng.standard_normal())
        res = zoopt.minimize(f, np.zeros(10), max_queries=5000, seed=0, noise=noise)
        assert res.nfev == f.n <= 5000
        results[noise] = (res, f_true(res.last_x))
    res, err = results[sigma]
    assert res.success and res.message.startswith("converged"), res.message
    assert err < 0.02 and err < results[None][1] / 50  # f* = 0; σ-level accuracy


def test_noise_is_refused_where_it_means_nothing():
    with pytest.raises(ValueError, match="noise=0.1 is L-BFGS's resampling"):
        zoopt.minimize(lambda x: float(x @ x), np.ones(2), method="spsa", noise=0.1)
    with pytest.raises(ValueError, match="noise must be a finite number >= 0"):
        zoopt.minimize(lambda x: float(x @ x), np.ones(2), noise=-1.0)
