"""Bias, variance and cost of the gradient estimators (property-based)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zoopt
from zoopt.directions import draw_seed

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_quadratic(seed: int, d: int):
    """f(x) = ½ xᵀHx + bᵀx + c with a random symmetric H; returns (oracle, grad, H)."""
    r = np.random.default_rng(seed)
    A = r.standard_normal((d, d))
    H = (A + A.T) / 2
    b = r.standard_normal(d)

    def f(X):
        return 0.5 * np.einsum("ni,ij,nj->n", X, H, X) + X @ b + 0.7

    return zoopt.as_oracle(f, dim=d, batched=True), (lambda x: H @ x + b), H


dims = st.integers(min_value=1, max_value=12)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


@SETTINGS
@given(seed=seeds, d=dims, mu=st.floats(1e-3, 1.0))
def test_central_cge_is_exact_on_quadratics(seed, d, mu):
    oracle, grad, _ = random_quadratic(seed, d)
    x = np.random.default_rng(seed + 1).standard_normal(d)
    est = zoopt.CGE(mu=mu, scheme="central").estimate(oracle, x)
    np.testing.assert_allclose(
        est.grad, grad(x), rtol=1e-7, atol=1e-7 * (1 + np.abs(grad(x)).max())
    )
    assert est.queries == 2 * d == oracle.queries


@SETTINGS
@given(seed=seeds, d=dims, mu=st.floats(1e-3, 1.0))
def test_forward_cge_error_is_half_mu_diag_h(seed, d, mu):
    oracle, grad, H = random_quadratic(seed, d)
    x = np.random.default_rng(seed + 1).standard_normal(d)
    est = zoopt.CGE(mu=mu).estimate(oracle, x)
    err = est.grad - grad(x)
    np.testing.assert_allclose(
        err, mu / 2 * np.diag(H), rtol=1e-6, atol=1e-6 * (1 + np.abs(grad(x)).max())
    )
    assert est.queries == d + 1 == oracle.queries
    assert est.fx == pytest.approx(oracle(x))


@SETTINGS
@given(seed=seeds, d=st.integers(2, 30), data=st.data())
def test_sparse_cge_exact_on_s_zero_off_s(seed, d, data):
    oracle, grad, _ = random_quadratic(seed, d)
    x = np.random.default_rng(seed + 2).standard_normal(d)
    coords = np.array(sorted(data.draw(st.sets(st.integers(0, d - 1), min_size=1, max_size=d))))
    scheme = data.draw(st.sampled_from(["forward", "central"]))
    as_mask = data.draw(st.booleans())
    mask = np.zeros(d, bool)
    mask[coords] = True
    est = zoopt.CGE(mu=1e-3, scheme=scheme, coords=mask if as_mask else coords).estimate(oracle, x)
    off = np.setdiff1d(np.arange(d), coords)
    assert np.all(est.grad[off] == 0)
    tol = 1e-6 if scheme == "central" else 1e-3 * (1 + np.abs(grad(x)).max())
    np.testing.assert_allclose(est.grad[coords], grad(x)[coords], atol=tol)
    expected = len(coords) + 1 if scheme == "forward" else 2 * len(coords)
    assert est.queries == expected == oracle.queries


@SETTINGS
@given(
    seed=seeds,
    d=dims,
    q=st.integers(1, 8),
    dist=st.sampled_from(["gaussian", "sphere", "rademacher"]),
    scheme=st.sampled_from(["forward", "central", "antithetic"]),
    fx_known=st.booleans(),
)
def test_rge_query_counts_exact(seed, d, q, dist, scheme, fx_known):
    if scheme == "antithetic":
        q = 2 * q
    oracle, _, _ = random_quadratic(seed, d)
    x = np.zeros(d)
    fx = oracle(x) if fx_known else None
    before = oracle.queries
    est = zoopt.RGE(q=q, mu=0.01, dist=dist, scheme=scheme).estimate(oracle, x, rng=seed, fx=fx)
    expected = {"forward": q + (0 if fx_known else 1), "central": 2 * q, "antithetic": q}[scheme]
    assert est.queries == expected == oracle.queries - before
    assert (
        zoopt.RGE(q=q, mu=0.01, dist=dist, scheme=scheme).queries_per_step(d, fx_known) == expected
    )


def _rge_samples(oracle, x, est, n, seed):
    rng = np.random.default_rng(seed)
    return np.stack([est.estimate(oracle, x, rng=rng).grad for _ in range(n)])


@pytest.mark.parametrize("dist", ["gaussian", "sphere", "rademacher"])
@pytest.mark.parametrize("scheme", ["forward", "central", "antithetic"])
@settings(max_examples=4, deadline=None)
@given(seed=seeds, d=st.integers(2, 6))
def test_rge_unbiased_on_quadratics(dist, scheme, seed, d):
    """On a quadratic the smoothed gradient equals the gradient: the sample mean must be
    within a few standard errors of it (each coordinate, Bonferroni-style bound of 5 SE)."""
    oracle, grad, _ = random_quadratic(seed, d)
    x = np.random.default_rng(seed + 3).standard_normal(d)
    est = zoopt.RGE(q=4, mu=0.05, dist=dist, scheme=scheme)
    g = _rge_samples(oracle, x, est, 2000, seed)
    mean, se = g.mean(0), g.std(0, ddof=1) / np.sqrt(len(g))
    assert np.all(np.abs(mean - grad(x)) <= 5 * se + 1e-9), (mean, grad(x), se)


@pytest.mark.parametrize("dist", ["gaussian", "sphere", "rademacher"])
def test_rge_variance_shrinks_like_one_over_q(dist):
    oracle, _, _ = random_quadratic(7, 8)
    x = np.random.default_rng(8).standard_normal(8)
    v = {}
    for q in (2, 16):
        g = _rge_samples(oracle, x, zoopt.RGE(q=q, mu=0.01, dist=dist), 1500, q)
        v[q] = g.var(0, ddof=1).sum()
    ratio = v[2] / v[16]
    assert 5.0 < ratio < 12.8, ratio  # 8 in expectation


def test_numpy_and_torch_give_the_same_estimate():
    torch = pytest.importorskip("torch")
    d = 9
    oracle_np, _, H = random_quadratic(3, d)
    Ht = torch.as_tensor(H)

    def f_torch(X):
        return 0.5 * torch.einsum("ni,ij,nj->n", X, Ht, X)

    oracle_t = zoopt.as_oracle(f_torch, dim=d, batched=True)
    oracle_np = zoopt.as_oracle(
        lambda X: 0.5 * np.einsum("ni,ij,nj->n", X, H, X), dim=d, batched=True
    )
    x = np.linspace(-1, 1, d)
    for est in (
        zoopt.RGE(q=5, mu=0.01),
        zoopt.RGE(q=6, dist="sphere", scheme="antithetic"),
        zoopt.CGE(mu=0.01),
        zoopt.CGE(mu=0.01, scheme="central", coords=[1, 4]),
    ):
        a = est.estimate(oracle_np, x, rng=11)
        b = est.estimate(oracle_t, torch.as_tensor(x), rng=11)
        assert isinstance(b.grad, torch.Tensor)
        np.testing.assert_allclose(a.grad, b.grad.numpy(), rtol=1e-12, atol=1e-12)
        assert a.queries == b.queries


def test_plan_points_match_and_chunking_does_not_change_results():
    d = 50
    oracle, _, _ = random_quadratic(1, d)
    x = np.random.default_rng(0).standard_normal(d)
    full = zoopt.CGE(mu=1e-3).estimate(oracle, x)
    tiny = zoopt.as_oracle(oracle.fn, dim=d, batched=True, max_batch_bytes=3 * d * 8)
    chunked = zoopt.CGE(mu=1e-3).estimate(tiny, x)
    # the oracle itself may round differently per batch size (BLAS), hence not bit-equal
    np.testing.assert_allclose(full.grad, chunked.grad, rtol=1e-9, atol=1e-9)
    assert chunked.queries == full.queries == d + 1
    plan = zoopt.RGE(q=7, mu=0.1).plan(x, rng=0)
    np.testing.assert_array_equal(plan.all_points()[2:5], plan.points(2, 5))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: zoopt.RGE(q=0), "q must be an integer >= 1, got 0"),
        (lambda: zoopt.RGE(q=3, scheme="antithetic"), "even q"),
        (lambda: zoopt.RGE(mu=0.0), "mu must be a finite number > 0, got 0.0"),
        (lambda: zoopt.RGE(mu=-1), "got -1"),
        (lambda: zoopt.RGE(dist="cauchy"), "'cauchy'"),
        (lambda: zoopt.RGE(scheme="backward"), "'backward'"),
        (lambda: zoopt.CGE(mu=float("nan")), "nan"),
        (lambda: zoopt.CGE(scheme="antithetic"), "'antithetic'"),
        (lambda: zoopt.make_estimator("spsa"), "'spsa'"),
    ],
)
def test_bad_estimator_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_bad_coords_and_dim_mismatch():
    oracle = zoopt.as_oracle(lambda x: float(x @ x), dim=4)
    x = np.zeros(4)
    with pytest.raises(ValueError, match="index 4"):
        zoopt.CGE(coords=[0, 4]).estimate(oracle, x)
    with pytest.raises(ValueError, match="index -1"):
        zoopt.CGE(coords=[-1]).estimate(oracle, x)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        zoopt.CGE(coords=np.ones(3, bool)).estimate(oracle, x)
    with pytest.raises(ValueError, match="duplicate"):
        zoopt.CGE(coords=[1, 1]).estimate(oracle, x)
    with pytest.raises(ValueError, match="dim=4"):
        zoopt.RGE().estimate(oracle, np.zeros(5))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    d=st.integers(1, 400),
    q=st.integers(1, 6),
    dist=st.sampled_from(["gaussian", "rademacher", "sphere"]),
    scheme=st.sampled_from(["forward", "central"]),
    mu=st.floats(1e-6, 1.0),
)
def test_rge_direction_mode_perturbs_by_mu_whatever_d(seed, d, q, dist, scheme, mu):
    x = np.random.default_rng(seed).standard_normal(d)
    plan = zoopt.RGE(q=q, mu=mu, dist=dist, scheme=scheme).plan(x, rng=seed, fx=0.0)
    lengths = np.linalg.norm(plan.all_points() - x, axis=1)
    np.testing.assert_allclose(lengths, mu, rtol=1e-6)  # step length μ, not μ·√d
    absolute = zoopt.RGE(q=q, mu=mu, dist=dist, scheme=scheme, mu_mode="absolute")
    u = absolute.directions(d, np.random.default_rng(seed))
    lengths = np.linalg.norm(absolute.plan(x, rng=seed, fx=0.0).all_points() - x, axis=1)
    np.testing.assert_allclose(lengths, mu * np.tile(np.linalg.norm(u, axis=1), 2)[: lengths.size])


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(1, 50), q=st.integers(1, 8))
def test_rge_modes_agree_on_linear_functions(seed, d, q):
    # a forward difference of a linear function is exact at any step: same estimate
    a = np.random.default_rng(seed + 1).standard_normal(d)
    oracle = zoopt.as_oracle(lambda X: X @ a, dim=d, batched=True)
    x = np.random.default_rng(seed).standard_normal(d)
    by_direction = zoopt.RGE(q=q, mu=1e-3).estimate(oracle, x, rng=seed)
    absolute = zoopt.RGE(q=q, mu=1e-3, mu_mode="absolute").estimate(oracle, x, rng=seed)
    np.testing.assert_allclose(by_direction.grad, absolute.grad, rtol=1e-5, atol=1e-7)


def test_rge_mu_mode_is_checked():
    with pytest.raises(ValueError, match="mu_mode must be 'direction' or 'absolute', got 'rel'"):
        zoopt.RGE(mu_mode="rel")


def test_rge_divides_by_the_exact_step_for_float32_points():
    # the quotient uses μ itself, not μ rounded to float32 (5e-3 → 0.0049999999): the
    # DeepZero trainer's ZO-GraSP scores and `make demo` depend on this to the last bit
    d, q, mu = 7, 3, 5e-3
    a = np.linspace(-1, 1, d)
    oracle = zoopt.as_oracle(lambda X: (X.astype(np.float64) ** 2) @ a, dim=d, batched=True)
    x = np.linspace(0.1, 0.7, d).astype(np.float32)
    est = zoopt.RGE(q=q, mu=mu, mu_mode="absolute")
    plan = est.plan(x, rng=0)
    values = oracle.batch(plan.all_points())
    got = plan.finish(values).grad
    # the directions as the plan regenerates them: in x's dtype, from the seed rng=0 draws
    raw = est.seeded(d, draw_seed(np.random.default_rng(0)))
    u = [raw.dense(i, x) for i in range(q)]
    # the lazy Σ cᵢuᵢ: float64 coefficients, accumulated in x's dtype in direction order
    coef = (1.0 / q) * (values[1:].astype(np.float64) - values[0]) / mu
    want = np.zeros(d, dtype=np.float32)
    for c, ui in zip(coef, u, strict=True):
        want += float(c) * ui
    np.testing.assert_array_equal(got, want)
