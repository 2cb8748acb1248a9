"""The one ZO step (zoopt.step): minimize, ask/tell and the trainer all take the same step."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zoopt
from zoopt.estimators import Estimate
from zoopt.step import ZO, Autograd, GradientSource, step


def quadratic(dim: int, seed: int = 0):
    r = np.random.default_rng(seed)
    A = r.standard_normal((dim, dim)) / dim
    A = A @ A.T + np.eye(dim)
    b = r.standard_normal(dim)

    def f(X):
        return 0.5 * np.einsum("nd,de,ne->n", X, A, X) - X @ b

    return f, A, b


class QuadraticWithGradient(zoopt.BaseOracle):
    """A differentiable oracle: ``loss_and_grad`` as the first-order source needs."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.f, self.A, self.b = quadratic(dim)

    def _evaluate(self, X):
        return self.f(X)

    def loss_and_grad(self, x, *, update_stats: bool = True):
        return float(self.f(x[None])[0]), self.A @ x - self.b


ESTIMATORS = [
    zoopt.RGE(q=3, mu=1e-3),
    zoopt.RGE(q=2, mu=1e-3, scheme="central"),
    zoopt.RGE(q=4, mu=1e-3, dist="sphere"),
    zoopt.CGE(mu=1e-4),
    zoopt.CGE(mu=1e-4, scheme="central"),
]


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
@pytest.mark.parametrize("opt", ["sgd", "adam", "signsgd"])
def test_minimize_takes_exactly_the_one_step(estimator, opt):
    """minimize (ask/tell inside) and a hand-written loop of `step` land on the same bits."""
    dim, iters = 6, 7
    f, _, _ = quadratic(dim)
    x0 = np.linspace(-1, 1, dim)
    res = zoopt.minimize(
        f,
        x0,
        estimator=estimator,
        optimizer=zoopt.make_optimizer(opt, lr=zoopt.Cosine(base=0.05, total=iters)),
        maxiter=iters,
        seed=3,
        batched=True,
    )
    oracle = zoopt.as_oracle(f, dim=dim, batched=True)
    optimizer = zoopt.make_optimizer(opt, lr=zoopt.Cosine(base=0.05, total=iters))
    rng, x = np.random.default_rng(3), x0.copy()
    for t in range(iters):
        x, _ = step(ZO(estimator), optimizer, oracle, x, rng=rng, iteration=t)
    np.testing.assert_array_equal(res.x, x)
    assert res.nfev == oracle.queries + 1  # minimize's closing f(x)


@settings(max_examples=40, deadline=None)
@given(
    dim=st.integers(1, 12),
    which=st.integers(0, len(ESTIMATORS) - 1),
    fx_known=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_queries_per_step_is_what_a_step_spends(dim, which, fx_known, seed):
    f, _, _ = quadratic(dim, seed)
    oracle = zoopt.as_oracle(f, dim=dim, batched=True)
    x = np.random.default_rng(seed).standard_normal(dim)
    source = ZO(ESTIMATORS[which])
    fx = float(f(x[None])[0]) if fx_known else None
    step(source, zoopt.SGD(lr=0.01), oracle, x, fx=fx, rng=np.random.default_rng(seed))
    assert oracle.queries == source.queries_per_step(dim, fx_known=fx_known)


@settings(max_examples=40, deadline=None)
@given(
    dim=st.integers(2, 30),
    data=st.data(),
)
def test_sparse_cge_step_touches_only_its_coordinates(dim, data):
    coords = sorted(data.draw(st.sets(st.integers(0, dim - 1), min_size=1, max_size=dim)))
    f, _, _ = quadratic(dim)
    oracle = zoopt.as_oracle(f, dim=dim, batched=True)
    x = np.zeros(dim)
    source = ZO(zoopt.CGE(mu=1e-4), coords=lambda t: coords)
    x_new, est = step(source, zoopt.SGD(lr=0.1), oracle, x)
    outside = np.setdiff1d(np.arange(dim), coords)
    assert np.all(est.grad[outside] == 0) and np.all(x_new[outside] == 0)
    assert oracle.queries == len(coords) + 1 == source.queries_per_step(dim, iteration=0)


def test_mu_schedule_and_coords_follow_the_iteration():
    dim = 5
    f, _, _ = quadratic(dim)
    seen = []
    source = ZO(zoopt.CGE(mu=1.0), mu=lambda t: 10.0 ** -(t + 2), coords=lambda t: [t])
    for t in range(3):
        plan = source.plan(np.zeros(dim), fx=0.0, iteration=t)
        points = plan.all_points()
        seen.append((float(np.abs(points).max()), int(np.flatnonzero(points[0])[0])))
    assert seen == [(1e-2, 0), (1e-3, 1), (1e-4, 2)]
    with pytest.raises(ValueError, match="coords index 7 out of range for dim=5"):
        ZO(zoopt.CGE(), coords=lambda t: [7]).plan(np.zeros(dim))
    with pytest.raises(ValueError, match="mu"):
        ZO(zoopt.CGE(), mu=lambda t: 0.0).plan(np.zeros(dim))
    with pytest.raises(TypeError, match="estimator must be a zoopt estimator"):
        ZO("cge")  # type: ignore[arg-type]


def test_rge_refuses_coordinates():
    with pytest.raises(ValueError, match="coords"):
        ZO(zoopt.RGE(q=2), coords=lambda t: [0]).plan(np.zeros(3))


def test_zo_refuses_an_oracle_of_another_dimension():
    f, _, _ = quadratic(4)
    with pytest.raises(ValueError, match="x has 3 entries but the oracle has dim=4"):
        step(ZO(zoopt.CGE()), zoopt.SGD(lr=0.1), zoopt.as_oracle(f, dim=4), np.zeros(3))


def test_autograd_source_is_first_order_and_spends_no_queries():
    oracle = QuadraticWithGradient(4)
    x = np.ones(4)
    x_new, est = step(Autograd(), zoopt.SGD(lr=0.1), oracle, x)
    np.testing.assert_allclose(est.grad, oracle.A @ x - oracle.b)
    np.testing.assert_allclose(x_new, x - 0.1 * est.grad)
    assert oracle.queries == 0 and est.queries == 0
    assert est.fx == pytest.approx(float(oracle.f(x[None])[0]))
    assert Autograd().queries_per_step(4) == 0 and not Autograd().wants_base_value


def test_zo_and_autograd_agree_on_a_quadratic():
    oracle = QuadraticWithGradient(6)
    x = np.linspace(-1, 1, 6)
    _, fo = step(Autograd(), zoopt.SGD(lr=0.1), oracle, x)
    _, zo = step(ZO(zoopt.CGE(mu=1e-6, scheme="central")), zoopt.SGD(lr=0.1), oracle, x)
    np.testing.assert_allclose(zo.grad, fo.grad, rtol=1e-6, atol=1e-8)


class ScaledSource:
    """A gradient source of the user's own: half of the first-order gradient."""

    wants_base_value = False

    def queries_per_step(self, dim, *, fx_known=False, iteration=0):
        return 0

    def estimate(self, oracle, x, *, fx=None, rng=None, iteration=0):
        loss, grad = oracle.loss_and_grad(x)
        return Estimate(grad=0.5 * grad, fx=loss, queries=0)


def test_sources_are_declared_protocols():
    assert isinstance(ZO(zoopt.CGE()), GradientSource)
    assert isinstance(Autograd(), GradientSource)
    assert isinstance(ScaledSource(), GradientSource)
    assert not isinstance(zoopt.CGE(), GradientSource)  # an estimator is not a source
    oracle = QuadraticWithGradient(3)
    x_new, _ = step(ScaledSource(), zoopt.SGD(lr=1.0), oracle, np.ones(3))
    np.testing.assert_allclose(x_new, np.ones(3) - 0.5 * (oracle.A @ np.ones(3) - oracle.b))


def test_step_never_writes_to_x():
    f, _, _ = quadratic(4)
    x = np.ones(4)
    oracle = zoopt.as_oracle(f, dim=4, batched=True)
    step(ZO(zoopt.CGE()), zoopt.SGD(lr=0.1, momentum=0.9), oracle, x)
    np.testing.assert_array_equal(x, np.ones(4))
