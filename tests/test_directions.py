"""Seeded directions: any slice regenerated from the seed, the same on numpy and torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zoopt
from zoopt.directions import (
    DirectionCombination,
    DirectionSteps,
    SeededDirections,
    check_seed,
    draw_seed,
)

seeds = st.integers(0, 2**64 - 1)
dists = st.sampled_from(["gaussian", "rademacher"])


@settings(max_examples=40, deadline=None)
@given(seed=seeds, dist=dists, dim=st.integers(1, 300), data=st.data())
def test_any_slice_equals_the_same_entries_of_the_whole_direction(seed, dist, dim, data):
    dirs = SeededDirections(seed, 3, dim, dist)
    host = np.zeros(1)
    whole = dirs.dense(2, host)
    start = data.draw(st.integers(0, dim))
    stop = data.draw(st.integers(start, dim))
    np.testing.assert_array_equal(dirs.chunk(2, start, stop, host), whole[start:stop])


@settings(max_examples=25, deadline=None)
@given(seed=seeds, dist=dists, dim=st.integers(1, 200))
def test_numpy_and_torch_agree(seed, dist, dim):
    torch = pytest.importorskip("torch")
    dirs = SeededDirections(seed, 2, dim, dist)
    a = dirs.dense(1, np.zeros(1))
    b = dirs.dense(1, torch.zeros(1, dtype=torch.float64)).numpy()
    if dist == "rademacher":
        np.testing.assert_array_equal(a, b)  # integer words only: bit-identical
    else:  # log/cos/sin of two libraries may differ in the last unit
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


def test_the_integer_words_cross_key_blocks():
    # counters restart in each 2^31-word block with a new key; a slice across the border
    # equals the two halves
    dirs = SeededDirections(7, 1, 2**37, "rademacher")
    border = 2**31 * 32  # entry index of the first word of block 1
    host = np.zeros(1)
    across = dirs.chunk(0, border - 40, border + 40, host)
    halves = np.concatenate(
        [dirs.chunk(0, border - 40, border, host), dirs.chunk(0, border, border + 40, host)]
    )
    np.testing.assert_array_equal(across, halves)
    assert not np.array_equal(across[:40], across[40:])


def test_gaussian_moments_and_independence():
    d, m = 20000, 32
    dirs = SeededDirections(123, m, d)
    U = np.stack([dirs.dense(i, np.zeros(1)) for i in range(m)])
    assert abs(U.mean()) < 0.01
    assert abs((U**2).mean() - 1) < 0.01
    C = U @ U.T / d
    off = C - np.diag(np.diag(C))
    assert np.abs(off).max() < 5 / math.sqrt(d)  # directions nearly orthogonal
    assert np.abs(U).max() <= math.sqrt(-2 * math.log(0.5 * 2**-16)) + 1e-12


def test_rademacher_entries_are_signs_with_balanced_bits():
    u = SeededDirections(5, 1, 100_000, "rademacher").dense(0, np.zeros(1))
    assert set(np.unique(u)) == {-1.0, 1.0}
    assert abs(u.mean()) < 0.02


def test_distinct_seeds_and_directions_differ():
    host = np.zeros(1)
    a = SeededDirections(1, 2, 64).dense(0, host)
    assert not np.array_equal(a, SeededDirections(2, 2, 64).dense(0, host))
    assert not np.array_equal(a, SeededDirections(1, 2, 64).dense(1, host))


def test_norms_and_combination_are_computed_in_chunks():
    dirs = SeededDirections(9, 4, 1000)
    host = np.zeros(1)
    U = np.stack([dirs.dense(i, host) for i in range(4)])
    np.testing.assert_allclose(dirs.norms(host, chunk=37), np.linalg.norm(U, axis=1), rtol=1e-13)
    coef = np.array([0.5, 0.0, -2.0, 1.25])
    comb = DirectionCombination(dirs, coef, host)
    np.testing.assert_allclose(comb.dense(), coef @ U, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(comb.chunk(100, 300), comb.dense()[100:300])


def test_direction_steps_build_the_points():
    dirs = SeededDirections(3, 2, 50)
    x = np.linspace(-1, 1, 50)
    steps = DirectionSteps(dirs, np.array([1, 0, 1]), np.array([0.1, -0.2, 0.3]))
    P = steps.points(x)
    for r, (i, s) in enumerate([(1, 0.1), (0, -0.2), (1, 0.3)]):
        np.testing.assert_array_equal(P[r], x + s * dirs.dense(i, x))
    np.testing.assert_array_equal(steps.rows(1, 3).points(x), P[1:])


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(seed=-1, count=1, dim=1), "seed must be in"),
        (dict(seed=2**64, count=1, dim=1), "seed must be in"),
        (dict(seed=1.5, count=1, dim=1), "seed must be an integer"),
        (dict(seed=1, count=0, dim=1), "count must be an integer >= 1"),
        (dict(seed=1, count=1, dim=0), "dim must be an integer >= 1"),
        (dict(seed=1, count=1, dim=1, dist="sphere"), "dist must be 'gaussian' or"),
    ],
)
def test_bad_arguments_are_named(kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        SeededDirections(**kwargs)


def test_out_of_range_slices_are_refused():
    dirs = SeededDirections(1, 2, 10)
    with pytest.raises(IndexError, match="direction 2 out of range"):
        dirs.chunk(2, 0, 1, np.zeros(1))
    with pytest.raises(IndexError, match=r"slice \[5, 11\)"):
        dirs.chunk(0, 5, 11, np.zeros(1))


def test_seed_helpers():
    assert check_seed(np.uint64(5)) == 5
    rng = np.random.default_rng(0)
    s = draw_seed(rng)
    assert 0 <= s < 2**63 and s == draw_seed(np.random.default_rng(0))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    dist=st.sampled_from(["gaussian", "sphere", "rademacher"]),
    scheme=st.sampled_from(["forward", "central", "antithetic"]),
    mu_mode=st.sampled_from(["direction", "absolute"]),
    d=st.integers(1, 40),
)
def test_rge_plan_equals_the_materialized_reference(seed, dist, scheme, mu_mode, d):
    # the seeded, lazy estimate equals the formula on the directions as one matrix
    q = 4
    rge = zoopt.RGE(q=q, mu=1e-3, dist=dist, scheme=scheme, mu_mode=mu_mode)
    a = np.linspace(-1, 2, d)
    f = zoopt.as_oracle(lambda X: np.sin(X) @ a + (X**2).sum(axis=1), dim=d, batched=True)
    x = np.linspace(0.3, -0.4, d)
    est = rge.estimate(f, x, rng=np.random.default_rng(seed))
    U = rge.directions(d, np.random.default_rng(seed))
    m = U.shape[0]
    if dist == "sphere" or mu_mode == "absolute":
        h = np.full(m, 1e-3)
    else:
        h = 1e-3 / np.linalg.norm(U, axis=1)
    fx = f(x)
    plus = np.array([f(x + h[i] * U[i]) for i in range(m)])
    if scheme == "forward":
        coef = (plus - fx) / h
    else:
        minus = np.array([f(x - h[i] * U[i]) for i in range(m)])
        coef = (plus - minus) / (2 * h) if scheme == "central" else (plus - minus) / h
    scale = (d if dist == "sphere" else 1.0) / q
    want = scale * coef @ U
    # the plan builds x + (μ/‖raw‖)·raw, the reference x + h·U: the points round apart by
    # ~1e-16·|x| and the quotient divides that by μ = 1e-3
    np.testing.assert_allclose(est.grad, want, rtol=1e-9, atol=1e-10 * np.abs(want).max())


def test_oracles_refuse_directions_of_another_dimension():
    f = zoopt.as_oracle(lambda x: float(x @ x), dim=5)
    steps = DirectionSteps(SeededDirections(1, 2, 6), np.array([0, 1]), np.array([0.1, 0.1]))
    with pytest.raises(ValueError, match="the directions have dim=6 but the oracle has dim=5"):
        f.eval_direction_steps(np.zeros(5), steps)
    with pytest.raises(TypeError, match="steps must be a zoopt DirectionSteps"):
        f.eval_direction_steps(np.zeros(5), [(0, 0.1)])
    assert f.queries == 0
