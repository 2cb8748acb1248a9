"""ZO-GraSP, keep ratios, Smart Ratio and dynamic masks (zoopt.sparsity)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zoopt
from zoopt import sparsity as sp

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Group:
    """Duck-typed stand-in for zoopt.torch's ParamGroup (the module must not import torch)."""

    name: str
    start: int
    stop: int
    kind: str


def layout(specs: list[tuple[int, str]]) -> list[Group]:
    """Contiguous groups from (size, kind) pairs, in order."""
    groups, start = [], 0
    for i, (size, kind) in enumerate(specs):
        groups.append(Group(f"g{i}", start, start + size, kind))
        start += size
    return groups


@st.composite
def group_layouts(draw, max_groups: int = 6, max_size: int = 60) -> list[Group]:
    specs = draw(
        st.lists(
            st.tuples(st.integers(1, max_size), st.sampled_from(["weight", "other"])),
            min_size=1,
            max_size=max_groups,
        )
    )
    if all(kind == "other" for _, kind in specs):
        specs[0] = (specs[0][0], "weight")
    return layout(specs)


def prunable(groups):
    return [g for g in groups if g.kind == "weight"]


def n_prunable(groups) -> int:
    return sum(g.stop - g.start for g in prunable(groups))


def expected_pruned(sparsity: float, total: int) -> int:
    return math.floor(sparsity * total + 0.5)


# -- kept_count --------------------------------------------------------------------------


@given(ratio=st.floats(0.0, 1.0), size=st.integers(1, 10_000))
def test_kept_count_rounds_and_never_cuts_a_layer_off(ratio, size):
    k = sp.kept_count(ratio, size)
    assert 0 <= k <= size
    assert abs(k - ratio * size) <= 0.5 or (k == 1 and ratio > 0)
    assert (k >= 1) == (ratio > 0)


def test_kept_count_rejects_ratios_outside_unit_interval():
    with pytest.raises(ValueError, match="1.5"):
        sp.kept_count(1.5, 10)


# -- keep ratios from scores -------------------------------------------------------------


@SETTINGS
@given(groups=group_layouts(), sparsity=st.floats(0.0, 0.99), seed=st.integers(0, 2**32 - 1))
def test_global_pruning_hits_the_target_and_prunes_the_highest_scores(groups, sparsity, seed):
    dim = groups[-1].stop
    scores = np.random.default_rng(seed).permutation(dim).astype(float)  # distinct scores
    keep = sp.keep_mask_from_scores(scores, groups, sparsity, min_keep=0)
    w_idx = np.concatenate([np.arange(g.start, g.stop) for g in prunable(groups)])
    total = w_idx.size
    assert (~keep[w_idx]).sum() == expected_pruned(sparsity, total)
    for g in groups:
        if g.kind == "other":
            assert keep[g.start : g.stop].all()
    kept_scores, pruned_scores = scores[w_idx][keep[w_idx]], scores[w_idx][~keep[w_idx]]
    if kept_scores.size and pruned_scores.size:
        assert kept_scores.max() < pruned_scores.min()

    ratios = sp.keep_ratios_from_scores(scores, groups, sparsity, min_keep=0)
    assert set(ratios) == {g.name for g in groups}
    for g in groups:
        size = g.stop - g.start
        assert ratios[g.name] == (keep[g.start : g.stop].sum() / size if g.kind == "weight" else 1)


@SETTINGS
@given(groups=group_layouts(), sparsity=st.floats(0.0, 0.99), seed=st.integers(0, 2**32 - 1))
def test_magnitude_rule_prunes_the_smallest(groups, sparsity, seed):
    x = np.random.default_rng(seed).standard_normal(groups[-1].stop)
    scores = sp.magnitude_scores(x)
    np.testing.assert_array_equal(scores, np.abs(x))
    keep = sp.keep_mask_from_scores(scores, groups, sparsity, prune="lowest", min_keep=0)
    w = np.concatenate([np.arange(g.start, g.stop) for g in prunable(groups)])
    kept, pruned = scores[w][keep[w]], scores[w][~keep[w]]
    if kept.size and pruned.size:
        assert kept.min() >= pruned.max()


@SETTINGS
@given(
    groups=group_layouts(),
    sparsity=st.floats(0.0, 0.999),
    min_keep=st.integers(0, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_floors_keep_every_layer_alive_and_the_total_exact(groups, sparsity, min_keep, seed):
    dim = groups[-1].stop
    scores = np.random.default_rng(seed).standard_normal(dim)
    layers = prunable(groups)
    total = n_prunable(groups)
    floors = [min(g.stop - g.start, min_keep) for g in layers]
    if sum(floors) > total - expected_pruned(sparsity, total):
        with pytest.raises(ValueError, match="min_keep"):
            sp.keep_ratios_from_scores(scores, groups, sparsity, min_keep=min_keep)
        return
    ratios = sp.keep_ratios_from_scores(scores, groups, sparsity, min_keep=min_keep)
    counts = [sp.kept_count(ratios[g.name], g.stop - g.start) for g in layers]
    assert all(c >= f for c, f in zip(counts, floors, strict=True))
    assert sum(counts) == total - expected_pruned(sparsity, total)


def test_floor_takes_the_layers_best_weights_and_reprunes_elsewhere():
    # Layer a holds all the highest (worst) scores: plain global pruning at 50% removes it.
    groups = layout([(4, "weight"), (4, "weight")])
    scores = np.array([9.0, 8.0, 7.0, 6.0, 1.0, 2.0, 3.0, 4.0])
    assert sp.keep_ratios_from_scores(scores, groups, 0.5, min_keep=0) == {"g0": 0.0, "g1": 1.0}
    keep = sp.keep_mask_from_scores(scores, groups, 0.5, min_keep=1)
    np.testing.assert_array_equal(keep, [0, 0, 0, 1, 1, 1, 1, 0])
    ratios = sp.keep_ratios_from_scores(scores, groups, 0.5, min_keep_ratio=0.5)
    assert ratios == {"g0": 0.5, "g1": 0.5}


def test_lowest_abs_rule_is_deepzero_reference_convention():
    groups = layout([(4, "weight")])
    keep = sp.keep_mask_from_scores(
        np.array([-5.0, 0.1, 3.0, -0.2]), groups, 0.5, prune="lowest_abs"
    )
    np.testing.assert_array_equal(keep, [True, False, True, False])


# -- ZO-GraSP and FO-GraSP ---------------------------------------------------------------


def quadratic(seed: int, d: int):
    """f(x) = ½ xᵀHx + bᵀx with H symmetric, eigenvalues in [1, 3]; (batched f, grad, H)."""
    r = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(r.standard_normal((d, d)))
    H = Q @ np.diag(r.uniform(1.0, 3.0, d)) @ Q.T
    b = r.standard_normal(d)

    def f(X):
        return 0.5 * np.einsum("ni,ij,nj->n", X, H, X) + X @ b

    return f, (lambda x: H @ x + b), H


def exact_grasp(x, grad, H):
    """GraSP's score of a quadratic: −x ⊙ H∇f(x)."""
    return -x * (H @ grad(x))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), d=st.integers(1, 15), mu=st.floats(1e-4, 1e-1))
def test_fo_grasp_is_exact_on_quadratics(seed, d, mu):
    _, grad, H = quadratic(seed, d)
    x = np.random.default_rng(seed + 1).standard_normal(d)
    exact = exact_grasp(x, grad, H)
    got = sp.fo_grasp_scores(grad, x, mu=mu)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-8 * (1 + np.abs(exact).max()))
    pair = sp.fo_grasp_scores(lambda z: (0.0, grad(z)), x, mu=mu)  # loss_and_grad style
    np.testing.assert_array_equal(pair, got)


@pytest.mark.parametrize("seed", range(8))
def test_zo_grasp_with_many_directions_tracks_the_exact_score(seed):
    # Statistical check with fixed seeds (deterministic). Over 400 random problems of this
    # kind (d in 6..12, q = 4000) the worst correlation was 0.967 and the worst relative
    # error 0.16, so the bounds below hold with a wide margin.
    r = np.random.default_rng(1000 + seed)
    d = int(r.integers(6, 13))
    f, grad, H = quadratic(seed, d)
    x = r.standard_normal(d)
    exact = exact_grasp(x, grad, H)
    zo = sp.zo_grasp_scores(zoopt.as_oracle(f, dim=d, batched=True), x, q=4000, rng=seed)
    assert np.corrcoef(zo, exact)[0, 1] > 0.9
    assert np.linalg.norm(zo - exact) / np.linalg.norm(exact) < 0.5


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    d=st.integers(1, 40),
    q=st.integers(1, 30),
    mu=st.floats(1e-3, 1e-1),
)
def test_zo_grasp_is_zero_on_linear_functions(seed, d, q, mu):
    # H = 0, so the score is 0. With independent directions for the two estimates their
    # noise (of order |b|·sqrt(d/q)/μ) would remain; shared directions cancel it exactly.
    r = np.random.default_rng(seed)
    b, x = r.standard_normal(d), r.standard_normal(d)
    oracle = zoopt.as_oracle(lambda X: X @ b + 1.0, dim=d, batched=True)
    scores = sp.zo_grasp_scores(oracle, x, q=q, mu=mu, rng=seed)
    scale = np.abs(x).max() * np.linalg.norm(b) * (d + q)
    assert np.abs(scores).max() <= 1e-9 * scale / mu


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), d=st.integers(1, 20), q=st.integers(1, 50))
def test_zo_grasp_costs_two_rge_estimates_and_is_seeded(seed, d, q):
    f, _, _ = quadratic(seed, d)
    x = np.random.default_rng(seed).standard_normal(d)
    oracle = zoopt.as_oracle(f, dim=d, batched=True)
    a = sp.zo_grasp_scores(oracle, x, q=q, rng=seed)
    assert oracle.queries == 2 * (q + 1)
    assert a.shape == (d,) and a.dtype == np.float64
    b = sp.zo_grasp_scores(zoopt.as_oracle(f, dim=d, batched=True), x, q=q, rng=seed)
    np.testing.assert_array_equal(a, b)


def test_zo_grasp_accepts_torch_vectors_and_plain_callables():
    torch = pytest.importorskip("torch")
    f, _, _ = quadratic(3, 8)
    x = np.random.default_rng(3).standard_normal(8)
    ref = sp.zo_grasp_scores(zoopt.as_oracle(f, dim=8, batched=True), x, q=64, rng=7)
    oracle_t = zoopt.as_oracle(lambda X: torch.as_tensor(f(X.numpy())), dim=8, batched=True)
    got = sp.zo_grasp_scores(oracle_t, torch.as_tensor(x), q=64, rng=7)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    plain = sp.zo_grasp_scores(lambda z: float(f(z[None])[0]), x, q=64, rng=7)
    np.testing.assert_allclose(plain, ref, rtol=1e-10, atol=1e-12)


def test_zo_grasp_rejects_bad_input():
    oracle = zoopt.as_oracle(lambda X: X.sum(1), dim=3, batched=True)
    with pytest.raises(ValueError, match="q must be"):
        sp.zo_grasp_scores(oracle, np.zeros(3), q=0)
    with pytest.raises(ValueError, match="mu must be"):
        sp.zo_grasp_scores(oracle, np.zeros(3), mu=-1.0)
    with pytest.raises(ValueError, match="1-D"):
        sp.zo_grasp_scores(oracle, np.zeros((3, 1)))
    with pytest.raises(ValueError, match="returned shape \\(2,\\), expected \\(3,\\)"):
        sp.fo_grasp_scores(lambda z: np.zeros(2), np.zeros(3))


# -- uniform, random and smart ratios ----------------------------------------------------


@SETTINGS
@given(groups=group_layouts(), sparsity=st.floats(0.0, 0.99), seed=st.integers(0, 2**32 - 1))
def test_uniform_and_random_ratios(groups, sparsity, seed):
    uni = sp.uniform_ratios(groups, sparsity)
    for g in groups:
        assert uni[g.name] == (1.0 - sparsity if g.kind == "weight" else 1.0)
    total = n_prunable(groups)
    if len(prunable(groups)) > total - expected_pruned(sparsity, total):
        return  # the default floor of one weight per layer does not fit
    a = sp.random_ratios(groups, sparsity, np.random.default_rng(seed))
    assert a == sp.random_ratios(groups, sparsity, np.random.default_rng(seed))
    kept = sum(sp.kept_count(a[g.name], g.stop - g.start) for g in prunable(groups))
    assert kept == total - expected_pruned(sparsity, total)
    assert all(a[g.name] == 1.0 for g in groups if g.kind == "other")


def test_random_ratios_concentrate_around_uniform():
    groups = layout([(20_000, "weight"), (30_000, "weight"), (10, "other")])
    ratios = sp.random_ratios(groups, 0.8, 0)
    assert ratios["g0"] == pytest.approx(0.2, abs=0.02)
    assert ratios["g1"] == pytest.approx(0.2, abs=0.02)


def test_smart_ratio_worked_example():
    # L = 3 prunable layers of 100, 1000, 100 weights (plus a BatchNorm), 90% sparsity:
    # 120 weights kept; the last layer keeps 30% = 30; layers 1, 2 get c·(3²+3), c·(2²+2)
    # with 100·12c + 1000·6c = 90 → c = 0.0125 → 0.15 and 0.075.
    groups = layout([(100, "weight"), (10, "other"), (1000, "weight"), (100, "weight")])
    ratios = sp.smart_ratios(groups, 0.9)
    assert ratios == pytest.approx({"g0": 0.15, "g1": 1.0, "g2": 0.075, "g3": 0.3})


@SETTINGS
@given(
    sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=8),
    sparsity=st.floats(0.0, 0.99),
    last_keep=st.one_of(st.none(), st.floats(0.05, 1.0)),
)
def test_smart_ratios_meet_the_target(sizes, sparsity, last_keep):
    groups = layout([(n, "weight") for n in sizes] + [(7, "other")])
    total, L = sum(sizes), len(sizes)
    target = (1 - sparsity) * total
    if L > 1 and last_keep is not None and last_keep * sizes[-1] >= target:
        with pytest.raises(ValueError, match="last_layer_keep"):
            sp.smart_ratios(groups, sparsity, last_layer_keep=last_keep)
        return
    ratios = sp.smart_ratios(groups, sparsity, last_layer_keep=last_keep)
    r = np.array([ratios[f"g{i}"] for i in range(L)])
    assert np.all((r > 0) & (r <= 1))
    assert ratios[f"g{L}"] == 1.0
    assert float(r @ np.array(sizes)) == pytest.approx(target, rel=1e-9)
    # Unclipped layers follow (L−l+1)² + (L−l+1) (the last one too when last_keep is None);
    # deeper layers never keep more.
    formula = r if last_keep is None else r[:-1]
    w = np.array([(L - k + 1) ** 2 + (L - k + 1) for k in range(1, L + 1)])[: formula.size]
    free = formula < 1.0
    if free.sum() >= 2:
        per_weight = formula[free] / w[free]
        np.testing.assert_allclose(per_weight, per_weight[0], rtol=1e-9)
    assert np.all(np.diff(formula) <= 1e-12)
    # Through DynamicMask the count is within rounding of the target, plus the one
    # coordinate every layer keeps however small its ratio (so each layer is estimated).
    mask = sp.DynamicMask(groups, ratios, reshuffle_every=0, seed=0)
    kept = sum(mask.counts[f"g{i}"] for i in range(L))
    floored = int(np.sum(r * np.array(sizes) < 0.5))
    assert abs(kept - target) <= L / 2 + 1 + floored


def test_smart_ratio_without_fixed_last_layer_for_classifier_heavy_nets():
    # A small CNN: 72 conv weights, 5120 classifier weights; at 90% sparsity 30% of the
    # classifier (1536) exceeds the 519 weights kept.
    groups = layout([(72, "weight"), (8, "other"), (5120, "weight")])
    with pytest.raises(ValueError, match="or None"):
        sp.smart_ratios(groups, 0.9)
    ratios = sp.smart_ratios(groups, 0.9, last_layer_keep=None)
    # weights 2²+2 = 6 and 1²+1 = 2: 72·6c + 5120·2c = 519.2 → c = 519.2 / 10672.
    c = 0.1 * 5192 / (72 * 6 + 5120 * 2)
    assert ratios == pytest.approx({"g0": 6 * c, "g1": 1.0, "g2": 2 * c})


# -- dynamic masks -----------------------------------------------------------------------


@st.composite
def masks(draw):
    groups = draw(group_layouts(max_size=80))
    ratios = {g.name: draw(st.floats(0.0, 1.0)) for g in prunable(groups)}
    every = draw(st.integers(0, 4))
    seed = draw(st.integers(0, 2**63 - 1))
    return groups, ratios, every, seed


def check_mask(coords: np.ndarray, groups, counts) -> None:
    assert coords.dtype == np.int64
    assert np.all(np.diff(coords) > 0)  # sorted and unique
    covered = np.zeros(groups[-1].stop, dtype=bool)
    for g in groups:
        inside = coords[(coords >= g.start) & (coords < g.stop)]
        assert inside.size == counts[g.name]
        covered[g.start : g.stop] = True
    assert covered[coords].all()


@SETTINGS
@given(spec=masks(), steps=st.integers(0, 12))
def test_dynamic_mask_counts_bounds_and_schedule(spec, steps):
    groups, ratios, every, seed = spec
    mask = sp.DynamicMask(groups, ratios, reshuffle_every=every, seed=seed)
    for g in groups:
        size = g.stop - g.start
        want = sp.kept_count(ratios[g.name], size) if g.kind == "weight" else size
        assert mask.counts[g.name] == want
    before = mask.coords().copy()
    check_mask(before, groups, mask.counts)
    for step in range(1, steps + 1):
        redrawn = mask.advance()
        assert redrawn == (every > 0 and step % every == 0)
        now = mask.coords()
        check_mask(now, groups, mask.counts)
        if not redrawn:
            np.testing.assert_array_equal(now, before)
        before = now.copy()
    assert mask.calls == steps
    assert mask.draws == (steps // every if every else 0)
    assert mask.density == pytest.approx(before.size / sum(g.stop - g.start for g in groups))


@SETTINGS
@given(spec=masks(), saved_at=st.integers(0, 8), more=st.integers(1, 8))
def test_dynamic_mask_state_round_trip_reproduces_future_masks(spec, saved_at, more):
    groups, ratios, every, seed = spec
    mask = sp.DynamicMask(groups, ratios, reshuffle_every=every, seed=seed)
    for _ in range(saved_at):
        mask.advance()
    state = mask.state_dict()
    future = []
    for _ in range(more):
        mask.advance()
        future.append(mask.coords().copy())
    resumed = sp.DynamicMask(groups, ratios, reshuffle_every=every, seed=(seed + 1) % 2**63)
    resumed.load_state_dict(state)
    for want in future:
        resumed.advance()
        np.testing.assert_array_equal(resumed.coords(), want)


def test_dynamic_mask_redraws_differ_and_seeds_are_deterministic():
    groups = layout([(200, "weight"), (5, "other"), (300, "weight")])
    ratios = {"g0": 0.5, "g2": 0.1}
    a = sp.DynamicMask(groups, ratios, reshuffle_every=1, seed=11)
    b = sp.DynamicMask(groups, ratios, reshuffle_every=1, seed=11)
    c = sp.DynamicMask(groups, ratios, reshuffle_every=1, seed=12)
    np.testing.assert_array_equal(a.coords(), b.coords())
    assert not np.array_equal(a.coords(), c.coords())
    first = a.coords().copy()
    assert a.advance()
    assert not np.array_equal(a.coords(), first)
    assert a.weight_density == pytest.approx((100 + 30) / 500)
    np.testing.assert_array_equal(np.flatnonzero(a.boolean_mask(510)), a.coords())


def test_dynamic_mask_rejects_bad_input():
    groups = layout([(10, "weight"), (4, "other")])
    with pytest.raises(ValueError, match="reshuffle_every"):
        sp.DynamicMask(groups, {"g0": 0.5}, reshuffle_every=-1, seed=0)
    with pytest.raises(ValueError, match="unknown groups \\['conv9'\\]"):
        sp.DynamicMask(groups, {"g0": 0.5, "conv9": 0.5}, reshuffle_every=1, seed=0)
    with pytest.raises(ValueError, match="lacks the prunable groups \\['g0'\\]"):
        sp.DynamicMask(groups, {"g1": 1.0}, reshuffle_every=1, seed=0)
    with pytest.raises(ValueError, match="not prunable"):
        sp.DynamicMask(groups, {"g0": 0.5, "g1": 0.5}, reshuffle_every=1, seed=0)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        sp.DynamicMask(groups, {"g0": 1.2}, reshuffle_every=1, seed=0)
    with pytest.raises(ValueError, match="seed"):
        sp.DynamicMask(groups, {"g0": 0.5}, reshuffle_every=1, seed=-3)
    mask = sp.DynamicMask(groups, {"g0": 0.5}, reshuffle_every=1, seed=0)
    other = sp.DynamicMask(groups, {"g0": 0.2}, reshuffle_every=1, seed=0)
    with pytest.raises(ValueError, match="other groups or keep ratios"):
        other.load_state_dict(mask.state_dict())


# -- validation and reports ----------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_unit_interval_is_rejected(bad):
    groups = layout([(10, "weight")])
    for call in (
        lambda: sp.keep_ratios_from_scores(np.zeros(10), groups, bad),
        lambda: sp.uniform_ratios(groups, bad),
        lambda: sp.smart_ratios(groups, bad),
        lambda: sp.random_ratios(groups, bad, 0),
    ):
        with pytest.raises(ValueError, match="sparsity must be in"):
            call()


def test_bad_groups_and_scores_are_rejected():
    with pytest.raises(ValueError, match="overlap"):
        sp.uniform_ratios([Group("a", 0, 5, "weight"), Group("b", 3, 8, "weight")], 0.5)
    with pytest.raises(ValueError, match="kind must be"):
        sp.uniform_ratios([Group("a", 0, 5, "bias")], 0.5)
    with pytest.raises(ValueError, match="duplicate group name"):
        sp.uniform_ratios([Group("a", 0, 5, "weight"), Group("a", 5, 8, "weight")], 0.5)
    with pytest.raises(ValueError, match="no prunable group"):
        sp.uniform_ratios([Group("bn", 0, 5, "other")], 0.5)
    with pytest.raises(TypeError, match=".name, .start, .stop and .kind"):
        sp.uniform_ratios([("a", 0, 5, "weight")], 0.5)
    with pytest.raises(ValueError, match="beyond the vector length 4"):
        sp.keep_ratios_from_scores(np.zeros(4), [Group("a", 0, 5, "weight")], 0.5)
    with pytest.raises(ValueError, match="scores\\[2\\] = nan"):
        sp.keep_ratios_from_scores(np.array([0, 1, np.nan]), [Group("a", 0, 3, "weight")], 0.5)
    with pytest.raises(ValueError, match="prune must be"):
        sp.keep_ratios_from_scores(np.zeros(3), [Group("a", 0, 3, "weight")], 0.5, prune="top")


def test_sparsity_report_rows_and_table():
    groups = layout([(100, "weight"), (10, "other"), (1000, "weight")])
    ratios = {"g0": 0.25, "g1": 1.0, "g2": 0.1}
    rows = sp.sparsity_report(groups, ratios)
    assert [r["name"] for r in rows] == ["g0", "g1", "g2", "total"]
    assert [r["kept"] for r in rows] == [25, 10, 100, 125]
    assert rows[-1]["sparsity"] == pytest.approx(1 - 125 / 1100)
    table = sp.format_sparsity_report(rows)
    lines = table.splitlines()
    assert len(lines) == 5 and lines[0].split()[0] == "name"
    assert lines[3].split() == ["g2", "weight", "1000", "100", "0.1000", "0.9000"]
