"""Randomized smoothing certification (Cohen, Rosenfeld & Kolter, ICML 2019).

The smoothed classifier ``g(x) = argmax_c P(f(x + eps) = c)``, ``eps ~ N(0, sigma^2 I)``, is
robust around ``x`` in L2 radius ``sigma * Phi^-1(pA)`` whenever the top class has probability
at least ``pA > 1/2``. :func:`certify` estimates that with Monte Carlo samples of the *base*
classifier ``f`` (any function ``images -> labels``, e.g. a denoiser in front of a black-box
API) and a one-sided Clopper-Pearson bound, so the certificate holds with probability at
least ``1 - alpha`` over the sampling. :func:`predict` is the PREDICT procedure (abstains
unless a binomial test separates the top two classes), :func:`certified_accuracy` the
usual "certified accuracy at radius r" curve.

numpy + scipy only: the base classifier owns any framework conversion.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

#: Label returned when the smoothed classifier abstains.
ABSTAIN = -1

#: Default memory cap of one batch of noisy copies of x (bytes), used when ``batch=None``.
DEFAULT_NOISE_BATCH_BYTES = 64 * 2**20

BaseClassifier = Callable[[np.ndarray], Any]
"""``images (m, *x.shape) -> labels (m,)`` non-negative ints."""


class Certificate(NamedTuple):
    """Result of :func:`certify`: the smoothed prediction (or :data:`ABSTAIN`) and the
    certified L2 radius (0.0 when abstaining), in the units of x."""

    prediction: int
    radius: float


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided ``1 - alpha`` Clopper-Pearson lower confidence bound on a binomial p.

    For ``K ~ Binomial(trials, p)``: ``P(lower(K) <= p) >= 1 - alpha`` for every p. Equal to
    the ``alpha``-quantile of ``Beta(k, n - k + 1)``; 0 when ``k = 0``.
    """
    _check_counts(successes, trials)
    _check_alpha(alpha)
    if successes == 0:
        return 0.0
    from scipy.stats import beta

    return float(beta.ppf(alpha, successes, trials - successes + 1))


def certify(
    base_classifier: BaseClassifier,
    x: Any,
    sigma: float,
    n0: int = 100,
    n: int = 10_000,
    alpha: float = 0.001,
    batch: int | None = None,
    *,
    rng: np.random.Generator | int | None = None,
) -> Certificate:
    """CERTIFY of Cohen et al.: the smoothed prediction at ``x`` and its certified L2 radius.

    ``n0`` noisy samples select the top class cA; ``n`` fresh samples give a Clopper-Pearson
    lower bound pA on ``P(f(x + eps) = cA)``. If ``pA <= 1/2`` it abstains; else the radius is
    ``sigma * Phi^-1(pA)``. With probability ``>= 1 - alpha`` the smoothed classifier predicts
    cA everywhere within that radius (or it abstained).

    Args:
        base_classifier: ``images (m, *x.shape) -> labels (m,)`` non-negative integers.
        x: one input (any shape, e.g. ``(C, H, W)``), real numbers; noise takes its dtype if
            float32 or float64, else x is cast to float64.
        sigma: noise standard deviation (> 0), in the units of x.
        n0: samples to pick the class.
        n: samples to bound its probability.
        alpha: failure probability of the certificate, in (0, 1).
        batch: noisy copies per call of ``base_classifier``; default: as many as fit 64 MiB.
        rng: a ``np.random.Generator`` or a seed; the result is a deterministic function of it.

    Returns:
        :class:`Certificate` ``(prediction, radius)``; ``(ABSTAIN, 0.0)`` when abstaining.
    """
    x, sigma, batch_size, generator = _check_setup(x, sigma, batch, rng)
    _check_sample_count("n0", n0)
    _check_sample_count("n", n)
    _check_alpha(alpha)
    selection = sample_counts(base_classifier, x, sigma, n0, batch_size, generator)
    top = int(np.argmax(selection))
    estimation = sample_counts(base_classifier, x, sigma, n, batch_size, generator)
    count_top = int(estimation[top]) if top < estimation.size else 0
    p_lower = clopper_pearson_lower(count_top, n, alpha)
    if p_lower <= 0.5:
        return Certificate(ABSTAIN, 0.0)
    from scipy.stats import norm

    return Certificate(top, float(sigma * norm.ppf(p_lower)))


def predict(
    base_classifier: BaseClassifier,
    x: Any,
    sigma: float,
    n: int = 1_000,
    alpha: float = 0.001,
    batch: int | None = None,
    *,
    rng: np.random.Generator | int | None = None,
) -> int:
    """PREDICT of Cohen et al.: the smoothed class at ``x``, or :data:`ABSTAIN`.

    Returns the top class of ``n`` noisy samples unless a two-sided binomial test of its count
    against the runner-up's (p = 1/2) has p-value above ``alpha``. It returns a class other
    than the smoothed classifier's with probability at most ``alpha``. Arguments as in
    :func:`certify`.
    """
    x, sigma, batch_size, generator = _check_setup(x, sigma, batch, rng)
    _check_sample_count("n", n)
    _check_alpha(alpha)
    counts = sample_counts(base_classifier, x, sigma, n, batch_size, generator)
    order = np.argsort(counts, kind="stable")[::-1]
    count_top = int(counts[order[0]])
    count_second = int(counts[order[1]]) if counts.size > 1 else 0
    from scipy.stats import binomtest

    if binomtest(count_top, count_top + count_second, 0.5).pvalue > alpha:
        return ABSTAIN
    return int(order[0])


def sample_counts(
    base_classifier: BaseClassifier,
    x: np.ndarray,
    sigma: float,
    num: int,
    batch: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Label counts ``(K,)`` int64 of ``base_classifier`` on ``num`` copies ``x + N(0, sigma^2)``,
    drawn ``batch`` at a time from ``rng`` (K = largest label seen + 1)."""
    counts = np.zeros(0, dtype=np.int64)
    remaining = num
    while remaining > 0:
        m = min(batch, remaining)
        noise = rng.standard_normal((m, *x.shape), dtype=x.dtype)
        noise *= x.dtype.type(sigma)
        noise += x  # the noisy copies, built in place to keep one buffer per batch
        labels = _check_labels(base_classifier(noise), m)
        batch_counts = np.bincount(labels, minlength=counts.size)
        if batch_counts.size > counts.size:
            counts = np.pad(counts, (0, batch_counts.size - counts.size))
        counts += batch_counts
        remaining -= m
    return counts


def certified_accuracy(
    results: Sequence[tuple[int, float]], labels: Sequence[int] | np.ndarray, radii: Iterable[float]
) -> dict[float, float]:
    """Certified accuracy at each radius r: the fraction of inputs whose smoothed prediction
    is correct *and* certified to radius ``>= r``. Abstentions count as wrong.

    Args:
        results: one ``(prediction, radius)`` per input (e.g. :class:`Certificate` s).
        labels: true labels ``(N,)``, non-negative ints.
        radii: the radii r >= 0 to report.

    Returns:
        ``{r: accuracy}`` with accuracy in [0, 1], in the order of ``radii``.
    """
    results = list(results)
    labels_array = np.asarray(labels)
    if labels_array.ndim != 1 or len(results) != labels_array.shape[0]:
        raise ValueError(
            f"need one label per result: {len(results)} results, labels of shape {labels_array.shape}"
        )
    if not results:
        raise ValueError("results is empty; certified accuracy of nothing is undefined")
    if labels_array.dtype.kind not in "iu" or (labels_array < 0).any():
        raise ValueError(f"labels must be non-negative integers, got {labels_array!r}")
    try:
        predictions = np.array([int(p) for p, _ in results], dtype=np.int64)
        certified = np.array([float(r) for _, r in results], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"results must be (prediction, radius) pairs ({exc})") from exc
    correct = predictions == labels_array
    accuracy = {}
    for r in radii:
        r = float(r)
        if not (r >= 0 and math.isfinite(r)):
            raise ValueError(f"radii must be finite and >= 0, got {r}")
        accuracy[r] = float(np.mean(correct & (certified >= r)))
    return accuracy


# -- validation ---------------------------------------------------------------------------
def _check_setup(
    x: Any, sigma: float, batch: int | None, rng: np.random.Generator | int | None
) -> tuple[np.ndarray, float, int, np.random.Generator]:
    try:
        x = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"x must be an array of numbers, got {type(x).__name__}") from exc
    if x.dtype.kind not in "biuf":
        raise TypeError(f"x must hold real numbers, got dtype {x.dtype}")
    if x.dtype not in (np.float32, np.float64):  # the dtypes numpy can draw normals in
        x = x.astype(np.float64)
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"x must be a non-empty finite array, got shape {x.shape}")
    if isinstance(sigma, bool) or not isinstance(sigma, int | float | np.floating | np.integer):
        raise TypeError(f"sigma must be a number, got {sigma!r}")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be positive and finite, got {sigma!r}")
    if batch is None:
        batch = max(1, DEFAULT_NOISE_BATCH_BYTES // (x.size * x.dtype.itemsize))
    elif isinstance(batch, bool) or not isinstance(batch, int | np.integer) or batch < 1:
        raise ValueError(f"batch must be a positive integer or None, got {batch!r}")
    if rng is None or isinstance(rng, int | np.integer):
        generator = np.random.default_rng(rng)
    elif isinstance(rng, np.random.Generator):
        generator = rng
    else:
        raise TypeError(f"rng must be a numpy Generator, an int seed or None, got {rng!r}")
    return x, float(sigma), int(batch), generator


def _check_labels(labels: Any, m: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (m,):
        raise ValueError(
            f"base_classifier returned shape {labels.shape} for {m} images, expected ({m},)"
        )
    if labels.dtype.kind not in "iu":
        raise TypeError(f"base_classifier must return integer labels, got dtype {labels.dtype}")
    if m and labels.min() < 0:
        raise ValueError(f"base_classifier returned a negative label {int(labels.min())}")
    return labels.astype(np.int64, copy=False)


def _check_sample_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_alpha(alpha: Any) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float | np.floating):
        raise TypeError(f"alpha must be a number, got {alpha!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")


def _check_counts(successes: Any, trials: Any) -> None:
    for name, value in (("successes", successes), ("trials", trials)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if trials < 1 or successes > trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
