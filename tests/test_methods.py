"""Methods' state values, the one budget and the Limits every method gets (issue 23)."""

import threading
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zoopt
from zoopt.methods import (
    LBFGS,
    SPSA,
    FixedStep,
    LBFGSState,
    Limits,
    SPSAState,
    fd_gradient_plan,
    fd_gradient_steps,
)
from zoopt.oracle import Budget, BudgetExceeded
from zoopt.step import ZO


def sphere(x):
    return float(np.sum((np.asarray(x) - 0.3) ** 2))


def drive(at, n):
    while at.nit < n and not at.done:
        at.tell([sphere(p) for p in at.ask()])


@dataclass
class Wrapped:
    """A method of one's own that holds an optimizer (through a FixedStep) and says how to
    read its saved state back."""

    inner: FixedStep

    def run(self, x0, *, rng, box=None, state=None, limits=None):
        return self.inner.run(x0, rng=rng, box=box, state=state, limits=limits or Limits())

    def state_from_dict(self, state, dim):
        return self.inner.state_from_dict(state, dim)


def wrapped():
    return Wrapped(FixedStep(ZO(zoopt.RGE(q=3, mu=1e-3)), zoopt.Adam(lr=0.05)))


def test_a_custom_method_holding_an_optimizer_resumes_with_its_state():
    x0 = np.linspace(-1, 1, 6)
    full = zoopt.AskTell(x0, method=wrapped(), seed=2)
    drive(full, 8)
    part = zoopt.AskTell(x0, method=wrapped(), seed=2)
    drive(part, 3)
    state = part.state_dict()
    assert state["method"]["optimizer"]["t"] == 3  # Adam's moments travel with the method
    assert state["method"]["optimizer"]["m"].shape == (6,)
    resumed = zoopt.AskTell(np.zeros(6), method=wrapped(), seed=5)
    resumed.load_state_dict(state)
    drive(resumed, 8)
    np.testing.assert_array_equal(resumed.x, full.x)


def test_the_optimizer_object_is_only_the_rule():
    opt = zoopt.SGD(lr=0.1, momentum=0.9)
    at = zoopt.AskTell(np.ones(3), zoopt.CGE(mu=1e-3), opt, seed=0)
    drive(at, 4)
    assert opt.state.t == 0 and at.state_dict()["method"]["optimizer"]["t"] == 4


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(1, 6), memory=st.integers(0, 4))
def test_lbfgs_state_round_trips_through_its_one_serializer(seed, d, memory):
    rng = np.random.default_rng(seed)
    state = LBFGSState(
        x=rng.standard_normal(d),
        fx=float(rng.standard_normal()),
        g=rng.standard_normal(d),
        central=bool(seed % 2),
        S=tuple(rng.standard_normal(d) for _ in range(memory)),
        Y=tuple(rng.standard_normal(d) for _ in range(memory)),
        restart_sigma=0.1,
        best=-1.0,
        stop=None if seed % 3 else "converged: x",
        stalls=seed % 4,
        f0=2.0,
        xscale0=1.5,
    )
    back = LBFGS().state_from_dict(state.to_dict(), d)
    for name in ("fx", "central", "restart_sigma", "best", "stop", "stalls", "f0", "xscale0"):
        assert getattr(back, name) == getattr(state, name)
    for name in ("x", "g"):
        np.testing.assert_array_equal(getattr(back, name), getattr(state, name))
    for a, b in zip(back.S + back.Y, state.S + state.Y, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="expected keys"):
        LBFGS().state_from_dict({**state.to_dict(), "junk": 1}, d)
    with pytest.raises(ValueError, match=r"state method g has shape"):
        LBFGS().state_from_dict({**state.to_dict(), "g": np.zeros(d + 1)}, d)
    spsa = SPSAState(nit=3, a=None, x=np.ones(d))
    assert SPSA().state_from_dict(spsa.to_dict(), d).a is None


def test_gtol_has_one_meaning_by_name_and_as_an_object():
    """max|ĝ| <= gtol ends the run the same way for "sgd" and for the same FixedStep object."""
    f = lambda x: float(np.sum(np.arange(1, 5) * (x - 1.0) ** 2))  # noqa: E731
    by_name = zoopt.minimize(
        f, np.zeros(4), method="sgd", estimator=zoopt.CGE(mu=1e-6), lr=0.1, gtol=1e-2, seed=0
    )
    obj = FixedStep(ZO(zoopt.CGE(mu=1e-6)), zoopt.SGD(lr=0.1))
    as_object = zoopt.minimize(f, np.zeros(4), method=obj, gtol=1e-2, seed=0)
    for res in (by_name, as_object):
        assert res.success and res.status == 0 and "max|projected gradient| <= gtol" in res.message
        assert np.max(np.abs(res.jac)) <= 1e-2
    assert by_name.nit == as_object.nit and by_name.nfev == as_object.nfev
    # L-BFGS by name reads the same limit
    res = zoopt.minimize(f, np.zeros(4), gtol=1e-3, seed=0)
    assert res.success and "gtol=0.001" in res.message


@pytest.mark.parametrize(
    ("limits", "horizon"),
    [(Limits(maxiter=400), 400), (Limits(max_queries=1000), 500), (Limits(), 1000)],
)
def test_spsa_sees_the_limits_for_its_gains(limits, horizon):
    """A = 0.1·N, N the iterations the limits allow: the first gain a_0 = a/(1+A)^0.602 is
    step0/mean|ĝ_0| whatever A, and a_1/a_0 = ((1+A)/(2+A))^0.602 reveals A."""
    at = zoopt.AskTell(np.zeros(3), method="spsa", seed=1, limits=limits)
    lrs = []
    while at.nit < 2:
        if at.tell([sphere(p) for p in at.ask()]) is not None:
            lrs.append(at.lr)
    A = 0.1 * horizon
    assert lrs[1] / lrs[0] == pytest.approx(((1 + A) / (2 + A)) ** 0.602, rel=1e-12)


def test_spsa_without_limits_runs_its_own_documented_default():
    res = zoopt.minimize(sphere, np.zeros(2), method="spsa", seed=0)
    assert res.nit == zoopt.methods.SPSA_DEFAULT_MAXITER and res.status == 1


def test_budget_reservations_are_exact_across_threads():
    budget = Budget(1000)
    got, refused = [], []

    def worker():
        for _ in range(200):
            try:
                budget.reserve(3)
            except BudgetExceeded:
                refused.append(1)
                continue
            budget.settle(2)
            budget.release(1)
            got.append(1)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert budget.reserved == 0 and budget.spent == 2 * len(got)
    assert len(got) + len(refused) == 800 and budget.spent <= 1000


def test_minimize_caps_the_oracles_one_budget_and_restores_it():
    oracle = zoopt.as_oracle(sphere, dim=3, max_queries=10_000)
    oracle(np.full(3, 0.3))  # one query before the run: the minimum, f = 0...
    res = zoopt.minimize(oracle, np.full(3, 5.0), max_queries=6, seed=0)
    assert res.nfev <= 6 and oracle.queries == 1 + res.nfev
    assert oracle.max_queries == 10_000  # the run's cap is gone afterwards
    assert res.fun == sphere(res.x) > 0  # ...is not this run's result
    assert oracle.best_f == 0.0  # but stays the oracle's best
    with pytest.raises(ValueError, match="max_queries must be a non-negative integer"):
        Budget(-1)


def test_finite_difference_points_are_built_lazily_in_chunks():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(7)
    x[2] = -0.0
    for central in (False, True):
        plus, minus = fd_gradient_steps(x, central, None)
        plan = fd_gradient_plan(x, plus, minus, central, None, x)
        dense = [x[None, :] + np.diag(plus)] + ([x[None, :] + np.diag(minus)] if central else [])
        dense = np.concatenate(dense)
        assert plan.n == dense.shape[0]
        pieces = np.concatenate([plan.points(a, min(a + 3, plan.n)) for a in range(0, plan.n, 3)])
        assert pieces.tobytes() == dense.tobytes()  # bit for bit, signed zeros included
