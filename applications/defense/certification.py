"""Certification: CERTIFY (Cohen et al. 2019) of each method's smoothed classifier through the
API, the certified accuracy at each radius, and the report (table, plot).

The smoothed classifier of a method is ``argmax api(preprocess(x + delta))``, ``delta ~
N(0, sigma^2 I)``: every noisy copy is one API image, ``n0 + n`` per certified image.

:func:`certify_blocks` sends the ``n0 + n`` noisy copies of a block of images through the
denoiser and the API in one pass (the same noise and the same certificates as CERTIFY of each
image alone: image ``i`` draws from ``default_rng([seed, i])``). :func:`certify_defense` keeps
the certificates per image in ``DIR/<method>/certificates.json``, written after every block,
so an interrupted run, or a rerun with a larger ``--num-certify``, certifies only the rest.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oracles.classifier import ClassifierAPI, as_label_function
from zoopt.certify import Certificate, certified_accuracy, certify, clopper_pearson_lower

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


def certify_blocks(
    base_classifier: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    *,
    sigma: float,
    n0: int = 100,
    n: int = 10_000,
    alpha: float = 0.001,
    seed: int = 0,
    first_index: int = 0,
) -> list[Certificate]:
    """CERTIFY (Cohen et al.) every image of ``images`` ``(k, C, H, W)`` float32 with one call
    of ``base_classifier`` on all ``k (n0 + n)`` noisy copies (one pass per block).

    Image ``i`` draws its ``n0`` selection and then its ``n`` estimation copies from
    ``default_rng([seed, first_index + i])``, exactly as :func:`zoopt.certify.certify` with
    that generator does, so the certificates are the same as image by image (up to the base
    classifier giving another label to the same image in another batch composition).
    """
    check_images_labels("images", (images, np.zeros(images.shape[0], dtype=np.int64)))
    k, shape = images.shape[0], images.shape[1:]
    noisy = np.empty((k, n0 + n, *shape), dtype=np.float32)
    for i in range(k):
        rng = np.random.default_rng([seed, first_index + i])
        noisy[i, :n0] = rng.standard_normal((n0, *shape), dtype=np.float32)
        noisy[i, n0:] = rng.standard_normal((n, *shape), dtype=np.float32)
    noisy *= np.float32(sigma)
    noisy += images[:, None]
    labels = np.asarray(base_classifier(noisy.reshape(k * (n0 + n), *shape)), dtype=np.int64)
    labels = labels.reshape(k, n0 + n)
    from scipy.stats import norm

    results = []
    for row in labels:
        top = int(np.argmax(np.bincount(row[:n0])))
        p_lower = clopper_pearson_lower(int(np.count_nonzero(row[n0:] == top)), n, alpha)
        if p_lower <= 0.5:
            results.append(Certificate(-1, 0.0))
        else:
            results.append(Certificate(top, float(sigma * norm.ppf(p_lower))))
    return results


def image_ids(images: np.ndarray) -> list[str]:
    """A short content hash of each image (the first 16 hex digits of the SHA-256 of its
    float32 pixels): which test image a certificate belongs to, across seeds that order the
    same test split differently."""
    return [
        hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()[:16]
        for x in images
    ]


def defense_fingerprint(modules: Sequence[torch.nn.Module]) -> str:
    """SHA-256 of the parameters and buffers of the defender's modules: certificates on file
    are reused only for the very defense that made them."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def certify_defense(
    defense: Defense, config: DefenseConfig, data: ImageData, api: ClassifierAPI, out: Path
) -> tuple[list[Certificate], dict[str, Any]]:
    """CERTIFY ``defense`` on the first ``config.certify.num_certify`` test images (all of
    them if the test split is smaller), ``config.certify.block`` images per pass.

    The certificates go to ``out/<method>/certificates.json`` after every block; those already
    there for the same defense, seed and CERTIFY settings are reused, so only the rest is
    certified.

    Returns:
        ``(certificates, record)``: the record is what ``certificates.json`` holds
        (``certificates`` as ``[prediction, radius]``, true ``labels``, ``image_ids``) and this
        call's ``api_images``, ``seconds`` and ``images_per_second`` (noisy images through
        the denoiser and the API per second).
    """
    cert = config.certify
    count = min(cert.num_certify, data.X_test.shape[0])
    images, labels = data.X_test[:count], data.y_test[:count]
    key = {
        "seed": config.seed,
        "sigma": config.training.sigma,
        "n0": cert.n0,
        "n": cert.n,
        "alpha": cert.alpha,
        "defense": defense_fingerprint(defense.modules),
    }
    path = out / defense.method / "certificates.json"
    done: list[Certificate] = []
    if path.is_file():
        saved = json.loads(path.read_text())
        if all(saved.get(k) == v for k, v in key.items()):
            done = [Certificate(int(p), float(r)) for p, r in saved["certificates"]][:count]
            print(f"{defense.method}: {len(done)} certificates reused from {path}")
        else:
            print(f"{defense.method}: {path} was made by another defense or setting; redoing it")
    base = as_label_function(api, preprocess=defense.preprocess)
    before, t0 = api.queries, time.perf_counter()
    starts: Any = range(len(done), count, cert.block)
    if config.progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"certify[{defense.method}]", unit="block", mininterval=1.0)

    def record() -> dict[str, Any]:
        return key | {
            "certificates": [[c.prediction, c.radius] for c in done],
            "labels": [int(y) for y in labels[: len(done)]],
            "image_ids": image_ids(images[: len(done)]),
        }

    for start in starts:
        stop = min(start + cert.block, count)
        done += certify_blocks(
            base, images[start:stop], sigma=config.training.sigma, n0=cert.n0, n=cert.n,
            alpha=cert.alpha, seed=config.seed, first_index=start,
        )  # fmt: skip
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record()))
        tmp.replace(path)  # never a half-written file
    seconds = time.perf_counter() - t0
    spent = api.queries - before
    result = record() | {
        "api_images": spent,
        "seconds": seconds,
        "images_per_second": spent / seconds if spent else None,
    }
    return done, result


def format_table(stats: dict[str, Any], radii: Sequence[float]) -> str:
    """Markdown: one row per method, certified accuracy (%) per radius with its
    Clopper-Pearson interval; then McNemar's exact test of every pair of methods per radius
    (:func:`applications.defense.statistics.run_statistics`'s record)."""
    level = f"{100 * stats['level']:g} %"
    head = "| method | " + " | ".join(f"r = {r:g}" for r in radii) + " |"
    rule = "|---|" + "---:|" * len(radii)
    rows = []
    for m, cells in stats["certified"].items():
        shown = []
        for r in radii:
            c = cells[f"{r:g}"]
            lo, hi = c["interval"]
            shown.append(f"{100 * c['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]")
        rows.append(f"| {METHOD_NAMES.get(m, m)} | " + " | ".join(shown) + " |")
    table = [head, rule, *rows, "",
             f"(certified accuracy in % of {stats['images']} test images, [{level} "
             "Clopper-Pearson interval].)"]  # fmt: skip
    if stats["paired_tests"]:
        table += ["", "| pair (A vs B) | radius | only A | only B | McNemar exact p |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        for t in stats["paired_tests"]:
            pair = f"{METHOD_NAMES.get(t['a'], t['a'])} vs {METHOD_NAMES.get(t['b'], t['b'])}"
            table.append(
                f"| {pair} | {t['radius']} | {t['a_only']} | {t['b_only']} | {t['pvalue']:.3g} |"
            )
    return "\n".join(table)


def plot_certified_accuracy(
    certificates: dict[str, list[Any]],
    labels: np.ndarray,
    radii: Sequence[float],
    sigma: float,
    path: Path,
    stats: dict[str, Any] | None = None,
) -> None:
    """Certified accuracy vs radius (a fine grid; the reported radii marked, with their
    Clopper-Pearson intervals from ``stats`` when given)."""
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
        shift = (i - 1) * 0.01  # keep the bars apart
        xs = [float(r) + shift for r in radii]
        ys = [marks[float(r)] for r in radii]
        if stats is None:
            ax.plot(xs, ys, "o", color=f"C{i}")
        else:
            cells = stats["certified"][method]
            low = [y - cells[f"{r:g}"]["interval"][0] for r, y in zip(radii, ys, strict=True)]
            high = [cells[f"{r:g}"]["interval"][1] - y for r, y in zip(radii, ys, strict=True)]
            ax.errorbar(xs, ys, yerr=[low, high], fmt="o", capsize=3, color=f"C{i}")
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    title = f"denoised smoothing through a black-box API (sigma = {sigma:g})"
    if stats is not None:
        title += f"\n{labels.size} test images; bars: {100 * stats['level']:g} % Clopper-Pearson"
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
