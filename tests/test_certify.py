"""Randomized-smoothing certification against base classifiers whose smoothed behaviour is
known in closed form.

A linear base classifier ``f(z) = [w.z + b > 0]`` under noise ``N(0, sigma^2 I)`` picks class 1
with probability ``pA = Phi(m / sigma)``, ``m = (w.x + b) / |w|`` the signed distance of x to
the decision boundary, so the smoothed classifier's true L2 radius is ``sigma Phi^-1(pA) = m``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom, norm

from zoopt.certify import (
    ABSTAIN,
    Certificate,
    certified_accuracy,
    certify,
    clopper_pearson_lower,
    predict,
    sample_counts,
)

IMAGE_SHAPE = (3, 4, 4)


def linear_classifier(w: np.ndarray, bias: float, labels: tuple[int, int] = (0, 1)):
    """images (m, *w.shape) -> labels[1] where w.z + bias > 0, else labels[0]."""
    negative, positive = labels

    def classify(images: np.ndarray) -> np.ndarray:
        scores = images.reshape(images.shape[0], -1) @ w.ravel() + bias
        return np.where(scores > 0, positive, negative).astype(np.int64)

    return classify


def point_at_margin(w: np.ndarray, bias: float, margin: float, seed: int = 0) -> np.ndarray:
    """A random point whose signed distance to {w.z + bias = 0} is ``margin``."""
    x = np.random.default_rng(seed).normal(size=w.shape)
    distance = (np.vdot(w, x) + bias) / np.linalg.norm(w)
    return x + (margin - distance) * w / np.linalg.norm(w)


@pytest.fixture
def plane():
    w = np.random.default_rng(1).normal(size=IMAGE_SHAPE)
    return w, 0.3


# -- Clopper-Pearson ----------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    trials=st.integers(1, 200),
    p=st.floats(0.01, 0.99),
    alpha=st.floats(1e-4, 0.3),
)
def test_clopper_pearson_lower_bound_covers_p_with_probability_at_least_1_minus_alpha(
    trials, p, alpha
):
    # Exact coverage: sum the binomial pmf over the outcomes k whose bound lands above p.
    bounds = np.array([clopper_pearson_lower(k, trials, alpha) for k in range(trials + 1)])
    miss_probability = binom.pmf(np.flatnonzero(bounds > p), trials, p).sum()
    assert miss_probability <= alpha + 1e-9


@settings(max_examples=60, deadline=None)
@given(data=st.data(), trials=st.integers(1, 500), alpha=st.floats(1e-6, 0.5))
def test_clopper_pearson_lower_solves_the_tail_equation(data, trials, alpha):
    # The CP bound is the p at which seeing >= k successes has probability exactly alpha.
    k = data.draw(st.integers(1, trials))
    lower = clopper_pearson_lower(k, trials, alpha)
    assert 0 < lower <= k / trials
    assert binom.sf(k - 1, trials, lower) == pytest.approx(alpha, rel=1e-6)


def test_clopper_pearson_lower_is_zero_without_successes_and_monotone():
    assert clopper_pearson_lower(0, 50, 0.01) == 0.0
    bounds = [clopper_pearson_lower(k, 50, 0.01) for k in range(51)]
    assert np.all(np.diff(bounds) > 0)
    assert bounds[-1] == pytest.approx(0.01 ** (1 / 50))  # Beta(n, 1) quantile


@pytest.mark.parametrize(
    ("successes", "trials", "alpha"),
    [(-1, 10, 0.1), (11, 10, 0.1), (1, 0, 0.1), (1, 10, 0.0), (1, 10, 1.0), (1.5, 10, 0.1)],
)
def test_clopper_pearson_rejects_bad_arguments(successes, trials, alpha):
    with pytest.raises(ValueError):
        clopper_pearson_lower(successes, trials, alpha)


# -- CERTIFY ------------------------------------------------------------------------------
@pytest.mark.parametrize("margin_over_sigma", [0.5, 1.0, 2.0])
def test_certify_radius_is_close_to_and_below_the_true_radius(plane, margin_over_sigma):
    w, bias = plane
    sigma = 0.5
    margin = margin_over_sigma * sigma
    x = point_at_margin(w, bias, margin)
    prediction, radius = certify(linear_classifier(w, bias), x, sigma, n=10_000, rng=7)
    assert prediction == 1
    assert radius < margin  # conservative
    # The CP bound from n=10^4 samples costs a few percent of the radius at these pA.
    assert radius > 0.85 * margin


def test_certify_abstains_at_the_decision_boundary(plane):
    w, bias = plane
    x = point_at_margin(w, bias, 0.0)
    assert certify(linear_classifier(w, bias), x, 0.5, n=10_000, rng=3) == (ABSTAIN, 0.0)


def test_certify_abstains_just_outside_the_boundary_where_pA_is_barely_above_half(plane):
    w, bias = plane
    sigma = 0.5
    x = point_at_margin(w, bias, sigma * norm.ppf(0.505))  # pA = 0.505: needs ~10^5 samples
    result = certify(linear_classifier(w, bias), x, sigma, n=2_000, rng=11)
    assert result == Certificate(ABSTAIN, 0.0)


def test_certify_on_a_constant_classifier_gives_the_all_successes_radius():
    sigma, n, alpha = 0.25, 500, 0.001
    always_seven = lambda images: np.full(images.shape[0], 7)  # noqa: E731
    prediction, radius = certify(always_seven, np.zeros(IMAGE_SHAPE), sigma, n=n, alpha=alpha)
    assert prediction == 7
    assert radius == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)))


def test_certificate_fails_at_most_alpha_of_the_time(plane):
    # Over many independent certifications the radius may exceed the true one (a false
    # certificate) in at most an alpha fraction (plus sampling slack) of them.
    w, bias = plane
    sigma, margin, alpha, runs = 0.5, 0.4, 0.1, 300
    x = point_at_margin(w, bias, margin)
    classify = linear_classifier(w, bias)
    rng = np.random.default_rng(2024)
    false_certificates = sum(
        certify(classify, x, sigma, n0=20, n=200, alpha=alpha, rng=rng).radius > margin
        for _ in range(runs)
    )
    allowed = alpha * runs + 3 * math.sqrt(runs * alpha * (1 - alpha))
    assert false_certificates <= allowed
    assert false_certificates > 0  # the test can see failures: the bound is not vacuous


def test_certify_is_deterministic_given_a_seed_and_batches_the_noise(plane):
    w, bias = plane
    x = point_at_margin(w, bias, 0.3).astype(np.float32)
    seen: list[np.ndarray] = []

    def recording(images: np.ndarray) -> np.ndarray:
        seen.append(images.copy())
        return linear_classifier(w, bias)(images)

    first = certify(recording, x, 0.5, n0=100, n=300, batch=64, rng=5)
    first_batches = seen[:]
    seen.clear()
    second = certify(recording, x, 0.5, n0=100, n=300, batch=64, rng=np.random.default_rng(5))
    assert first == second
    assert [b.shape[0] for b in first_batches] == [64, 36, 64, 64, 64, 64, 44]
    assert all(b.dtype == np.float32 and b.shape[1:] == x.shape for b in first_batches)
    assert all(np.array_equal(a, b) for a, b in zip(first_batches, seen, strict=True))
    # The noise really is N(0, sigma^2) around x.
    noise = np.concatenate(first_batches) - x
    assert abs(noise.mean()) < 0.02
    assert noise.std() == pytest.approx(0.5, rel=0.02)


def test_certify_labels_can_be_any_non_negative_ints(plane):
    w, bias = plane
    x = point_at_margin(w, bias, -1.0)  # deep on the negative side
    prediction, radius = certify(linear_classifier(w, bias, labels=(9, 3)), x, 0.5, n=2_000, rng=0)
    assert prediction == 9
    assert 0 < radius < 1.0


@pytest.mark.parametrize(
    ("classifier", "error"),
    [
        (lambda images: np.zeros(images.shape[0] + 1, dtype=np.int64), ValueError),
        (lambda images: np.zeros((images.shape[0], 2), dtype=np.int64), ValueError),
        (lambda images: np.zeros(images.shape[0]), TypeError),
        (lambda images: -np.ones(images.shape[0], dtype=np.int64), ValueError),
    ],
    ids=["too-many-labels", "logits-not-labels", "float-labels", "negative-labels"],
)
def test_certify_rejects_a_misbehaving_base_classifier(classifier, error):
    with pytest.raises(error, match="base_classifier"):
        certify(classifier, np.zeros(IMAGE_SHAPE), 0.5, n0=10, n=10)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sigma": 0.0}, ValueError, "sigma"),
        ({"sigma": float("nan")}, ValueError, "sigma"),
        ({"n0": 0}, ValueError, "n0"),
        ({"n": -5}, ValueError, "n must"),
        ({"alpha": 1.5}, ValueError, "alpha"),
        ({"batch": 0}, ValueError, "batch"),
        ({"rng": "seed"}, TypeError, "rng"),
        ({"x": np.array([np.nan, 0.0])}, ValueError, "finite"),
        ({"x": np.array(["a"])}, TypeError, "real numbers"),
    ],
)
def test_certify_rejects_bad_arguments(kwargs, error, match):
    arguments = {"x": np.zeros(3), "sigma": 0.5, "n0": 10, "n": 10, **kwargs}
    with pytest.raises(error, match=match):
        certify(lambda images: np.zeros(images.shape[0], dtype=np.int64), **arguments)


def test_sample_counts_counts_every_sample():
    x = np.zeros(2)
    sign = lambda images: (images[:, 0] > 0).astype(np.int64) * 2  # noqa: E731 - labels 0 and 2
    counts = sample_counts(sign, x, 1.0, 1_001, 100, np.random.default_rng(0))
    assert counts.sum() == 1_001 and counts[1] == 0 and counts.shape == (3,)
    assert counts[2] == pytest.approx(500, abs=4 * math.sqrt(250))


# -- PREDICT ------------------------------------------------------------------------------
def test_predict_returns_the_class_far_from_the_boundary_and_abstains_on_it(plane):
    w, bias = plane
    classify = linear_classifier(w, bias, labels=(4, 1))
    assert predict(classify, point_at_margin(w, bias, 1.0), 0.5, rng=0) == 1
    assert predict(classify, point_at_margin(w, bias, -1.0), 0.5, rng=0) == 4
    assert predict(classify, point_at_margin(w, bias, 0.0), 0.5, rng=0) == ABSTAIN


# -- certified accuracy -------------------------------------------------------------------
def test_certified_accuracy_on_a_worked_example():
    results = [Certificate(1, 0.5), Certificate(2, 0.2), Certificate(ABSTAIN, 0.0), (0, 1.0)]
    labels = [1, 1, 0, 0]
    # correct: inputs 0 (radius 0.5) and 3 (radius 1.0); input 1 is wrong, input 2 abstained.
    assert certified_accuracy(results, labels, [0.0, 0.25, 0.5, 0.75, 1.0, 1.5]) == {
        0.0: 0.5,
        0.25: 0.5,
        0.5: 0.5,
        0.75: 0.25,
        1.0: 0.25,
        1.5: 0.0,
    }


@settings(max_examples=50, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.integers(-1, 3), st.floats(0, 3), st.integers(0, 3)), min_size=1, max_size=30
    ),
    radii=st.lists(st.floats(0, 4), min_size=1, max_size=8),
)
def test_certified_accuracy_is_a_non_increasing_fraction_of_correct_predictions(data, radii):
    results = [(p, r if p != ABSTAIN else 0.0) for p, r, _ in data]
    labels = np.array([y for _, _, y in data])
    accuracy = certified_accuracy(results, labels, sorted(radii))
    values = list(accuracy.values())
    assert all(0 <= a <= 1 for a in values)
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    top1 = np.mean([p == y for p, _, y in data])
    assert certified_accuracy(results, labels, [0.0])[0.0] == pytest.approx(top1)


@pytest.mark.parametrize(
    ("results", "labels", "radii", "error"),
    [
        ([(1, 0.5)], [1, 2], [0.0], ValueError),
        ([], [], [0.0], ValueError),
        ([(1, 0.5)], [-1], [0.0], ValueError),
        ([(1, 0.5)], [1.5], [0.0], ValueError),
        ([(1, 0.5)], [1], [-0.1], ValueError),
        ([("a", 0.5)], [1], [0.0], TypeError),
    ],
)
def test_certified_accuracy_rejects_bad_input(results, labels, radii, error):
    with pytest.raises(error):
        certified_accuracy(results, labels, radii)
