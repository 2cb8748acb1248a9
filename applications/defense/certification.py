"""Certification: CERTIFY (Cohen et al. 2019) of each method's smoothed classifier through the
API, the certified accuracy at each radius, and the report (table, plot).

The smoothed classifier of a method is ``argmax api(preprocess(x + delta))``, ``delta ~
N(0, sigma^2 I)``: every noisy copy is one API image, ``n0 + n`` per certified image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oracles.classifier import ClassifierAPI, as_label_function
from zoopt.certify import Certificate, certified_accuracy, certify

from .config import METHOD_NAMES, DefenseConfig
from .data import ImageData, check_images_labels
from .training import Defense


def certify_pipeline(
    base_classifier: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    *,
    sigma: float,
    radii: Sequence[float],
    n0: int = 100,
    n: int = 10_000,
    alpha: float = 0.001,
    batch: int | None = None,
    seed: int = 0,
    first_index: int = 0,
    progress: bool = False,
    desc: str = "certify",
) -> tuple[list[Certificate], dict[float, float]]:
    """CERTIFY (Cohen et al.) each image with the smoothed ``base_classifier``.

    ``images[i]`` draws its noise from ``default_rng([seed, first_index + i])``: a test set
    certified in pieces (``first_index`` = the piece's offset) gives the same certificates as
    in one call. ``batch`` noisy copies go to ``base_classifier`` per call (default: all ``n``
    at once, capped at 64 MiB).

    Returns:
        ``(certificates, {radius: certified accuracy})`` against the true ``labels``.
    """
    check_images_labels("images/labels", (images, labels))
    results = []
    indices: Any = range(images.shape[0])
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=desc, unit="img", mininterval=1.0)
    if batch is None:
        batch = max(1, min(n, 64 * 2**20 // max(1, images[0].nbytes)))
    for i in indices:
        results.append(
            certify(
                base_classifier,
                images[i],
                sigma,
                n0=n0,
                n=n,
                alpha=alpha,
                batch=batch,
                rng=np.random.default_rng([seed, first_index + i]),
            )
        )
    return results, certified_accuracy(results, labels, radii)


def certify_defense(
    defense: Defense, config: DefenseConfig, data: ImageData, api: ClassifierAPI
) -> tuple[list[Certificate], dict[float, float], int]:
    """CERTIFY ``defense`` on the first ``config.certify.num_certify`` test images.

    Returns:
        ``(certificates, {radius: certified accuracy}, API images spent)``.
    """
    cert = config.certify
    images, labels = data.X_test[: cert.num_certify], data.y_test[: cert.num_certify]
    before = api.queries
    results, accuracy = certify_pipeline(
        as_label_function(api, preprocess=defense.preprocess),
        images,
        labels,
        sigma=config.training.sigma,
        radii=cert.radii,
        n0=cert.n0,
        n=cert.n,
        alpha=cert.alpha,
        batch=cert.batch,
        seed=config.seed,
        progress=config.progress,
        desc=f"certify[{defense.method}]",
    )
    return results, accuracy, api.queries - before


def format_table(accuracy: dict[str, dict[float, float]], radii: Sequence[float]) -> str:
    """A Markdown table: one row per method, certified accuracy (%) per radius."""
    head = "| method | " + " | ".join(f"r = {r:g}" for r in radii) + " |"
    rule = "|---|" + "---:|" * len(radii)
    rows = [
        f"| {METHOD_NAMES.get(m, m)} | "
        + " | ".join(f"{100 * acc[float(r)]:.2f}" for r in radii)
        + " |"
        for m, acc in accuracy.items()
    ]
    return "\n".join([head, rule, *rows])


def plot_certified_accuracy(
    certificates: dict[str, list[Any]],
    labels: np.ndarray,
    radii: Sequence[float],
    sigma: float,
    path: Path,
) -> None:
    """Certified accuracy vs radius (a fine grid; the reported radii marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max([max(radii)] + [c.radius for cs in certificates.values() for c in cs]) * 1.05
    grid = np.linspace(0.0, max(top, 1e-3), 200)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (method, certs) in enumerate(certificates.items()):
        curve = certified_accuracy(certs, labels, grid)
        ax.plot(grid, [curve[float(r)] for r in grid], color=f"C{i}", label=METHOD_NAMES[method])
        marks = certified_accuracy(certs, labels, radii)
        ax.plot(list(radii), [marks[float(r)] for r in radii], "o", color=f"C{i}")
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_title(f"denoised smoothing through a black-box API (sigma = {sigma:g})")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
