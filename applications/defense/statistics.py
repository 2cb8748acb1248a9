"""How far certified accuracies resolve the methods: Clopper-Pearson intervals and paired tests.

Each certified test image is one Bernoulli trial per method and radius: certified correct to
that radius, or not. Over the same images, two methods are compared by what they disagree on
(McNemar's exact test: the discordant images, under the null equally likely either way).
Across seeds that certify the same test photos (the grocery split is fixed; the seed orders
it), images are the unit that is resampled: :func:`image_bootstrap` averages each image over
the seeds that certified it and bootstraps those averages. Everything is scipy's
(``binomtest``, its ``proportion_ci``, ``bootstrap``); nothing here is hand-rolled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np


def correct_at(
    certificates: Sequence[Sequence[float]], labels: Sequence[int], radius: float
) -> np.ndarray:
    """``(m,)`` bool: certificate ``i`` ``(prediction, radius)`` is right about ``labels[i]``
    and certified to at least ``radius``."""
    preds = np.array([int(c[0]) for c in certificates], dtype=np.int64)
    radii = np.array([float(c[1]) for c in certificates], dtype=np.float64)
    truth = np.asarray(labels, dtype=np.int64)
    if preds.shape != truth.shape:
        raise ValueError(f"{preds.size} certificates but {truth.size} labels")
    return (preds == truth) & (radii >= radius)


def clopper_pearson(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) ``level`` interval of a binomial proportion
    (``scipy.stats.binomtest(...).proportion_ci(method="exact")``)."""
    from scipy.stats import binomtest

    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    ci = binomtest(int(successes), int(trials)).proportion_ci(level, method="exact")
    return float(ci.low), float(ci.high)


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test of two methods on the same images: ``a``, ``b`` ``(m,)`` bool
    (certified correct). ``a_only`` / ``b_only``: the discordant images; ``pvalue``: the
    two-sided binomial test of ``a_only`` out of ``a_only + b_only`` at 1/2 (1.0 when they
    never disagree)."""
    from scipy.stats import binomtest

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired samples must match: {a.shape} vs {b.shape}")
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    pvalue = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return {"a_only": a_only, "b_only": b_only, "pvalue": float(pvalue)}


def run_statistics(
    certificates: Mapping[str, Sequence[Sequence[float]]],
    labels: Sequence[int],
    radii: Sequence[float],
    level: float = 0.95,
) -> dict[str, Any]:
    """For one run (every method certified on the same images ``labels``): per method and
    radius the count, the accuracy and its Clopper-Pearson ``level`` interval; per pair of
    methods and radius McNemar's exact test.

    Returns:
        ``{"images", "level", "certified": {method: {radius: {"count", "accuracy",
        "interval"}}}, "paired_tests": [{"a", "b", "radius", "a_only", "b_only",
        "pvalue"}]}`` (radii as the JSON's string keys ``f"{r:g}"``).
    """
    m = len(labels)
    certified: dict[str, dict[str, Any]] = {}
    correct: dict[tuple[str, float], np.ndarray] = {}
    for method, certs in certificates.items():
        certified[method] = {}
        for r in radii:
            hit = correct_at(certs, labels, r)
            correct[method, r] = hit
            k = int(hit.sum())
            certified[method][f"{r:g}"] = {
                "count": k,
                "accuracy": k / m,
                "interval": list(clopper_pearson(k, m, level)),
            }
    tests = [
        {"a": a, "b": b, "radius": f"{r:g}"} | mcnemar_exact(correct[a, r], correct[b, r])
        for a, b in combinations(list(certificates), 2)
        for r in radii
    ]
    return {"images": m, "level": level, "certified": certified, "paired_tests": tests}


def image_bootstrap(
    values: Mapping[str, list[float]], level: float = 0.95, seed: int = 0
) -> tuple[float, tuple[float, float]]:
    """Mean over images of per-image values (``{image id: the values of the seeds that
    certified it}``, each image first averaged over its seeds) and the percentile bootstrap
    ``level`` interval of that mean, images resampled (``scipy.stats.bootstrap``, 9,999
    resamples, ``default_rng(seed)``). For a difference between two methods, give each image's
    paired differences."""
    from scipy.stats import bootstrap

    per_image = np.array([np.mean(v) for v in values.values()], dtype=np.float64)
    if per_image.size == 0:
        raise ValueError("no images to bootstrap")
    mean = float(per_image.mean())
    if per_image.size < 2 or np.all(per_image == per_image[0]):
        return mean, (mean, mean)  # nothing varies: the interval is the point
    res = bootstrap(
        (per_image,), np.mean, confidence_level=level, n_resamples=9999, method="percentile",
        random_state=np.random.default_rng(seed),  # scipy >= 1.11 (``rng`` is 1.15+)
    )  # fmt: skip
    ci = res.confidence_interval
    return mean, (float(ci.low), float(ci.high))
