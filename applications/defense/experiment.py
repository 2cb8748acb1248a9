"""The certified-defense experiment end to end: :func:`run` with a :class:`DefenseConfig`.

Load the data; get the owner's classifier (given, trained once, or remote) and reach it only
through its API; label the training images with it; pretrain the shared denoiser (and
ZO-AE-DS's autoencoder); train and certify each method; write and print the report. Outputs
in ``config.out``: ``certified_accuracy.json``, ``table.md``, ``certified_accuracy.png``, the
owner's ``classifier.pt`` and one Trainer folder per training run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oracles.classifier import ClassifierAPI
from zoopt.certify import Certificate

from .certification import certify_defense, format_table, plot_certified_accuracy
from .config import METHOD_NAMES, DefenseConfig, settings_record
from .data import ImageData, load_data
from .models import ConvAutoEncoder
from .owner import api_labels, classifier_api, provide_checkpoint
from .training import (
    autoencoder_fidelity,
    check_deepzero_budget,
    premise_report,
    pretrain_autoencoder,
    pretrain_denoiser,
    train_defense,
)


@dataclass(frozen=True)
class ClassifierLabels:
    """The classifier's own labels of the training images (the defense's targets), its
    accuracy on the certified test images, and the API images both cost."""

    train_labels: np.ndarray
    clean_accuracy: float
    api_images: int


@dataclass(frozen=True)
class MethodResult:
    """One method's certificates, certified accuracy per radius and query accounting."""

    certificates: list[Certificate]
    accuracy: dict[float, float]
    queries: dict[str, Any]


def label_with_api(config: DefenseConfig, data: ImageData, api: ClassifierAPI) -> ClassifierLabels:
    """Ask the API for its labels of the training images and of the test images to certify."""
    count = config.certify.num_certify
    q0 = api.queries
    train_labels = api_labels(api, data.X_train)
    clean = api_labels(api, data.X_test[:count])
    clean_accuracy = float(np.mean(clean == data.y_test[:count]))
    labels = ClassifierLabels(train_labels, clean_accuracy, api.queries - q0)
    print(f"classifier: clean accuracy {clean_accuracy:.4f} on the certified test images")
    return labels


def train_and_certify(
    method: str,
    config: DefenseConfig,
    data: ImageData,
    train_labels: np.ndarray,
    api: ClassifierAPI,
    denoiser_state: dict[str, Any],
    autoencoder: ConvAutoEncoder | None,
    out: Path,
) -> MethodResult:
    """Train ``method`` from the common denoiser init, then certify it."""
    defense = train_defense(
        method, config, data, train_labels, api, denoiser_state, autoencoder, out
    )
    t0 = time.perf_counter()
    certs, accuracy, cert_images = certify_defense(defense, config, data, api)
    queries = defense.accounting | {
        "certification_api_images": cert_images,
        "certify_seconds": time.perf_counter() - t0,
        "final_noisy_accuracy": defense.summary.get("test_accuracy"),
    }
    print(f"{METHOD_NAMES[method]}: " + ", ".join(f"r={r:g}: {a:.3f}" for r, a in accuracy.items()))
    return MethodResult(certs, accuracy, queries)


def print_report(
    config: DefenseConfig, table: str, results: dict[str, MethodResult], out: Path, wall: float
) -> None:
    """The table and each method's training cost, on stdout."""
    cert = config.certify
    print(
        "\ncertified accuracy (%) of the smoothed denoiser -> black-box classifier, "
        f"sigma = {config.training.sigma:g}, N = {cert.n}, {cert.num_certify} test images:"
    )
    print(table)
    for method, result in results.items():
        acc = result.queries
        if acc["queries_per_gradient_estimate"]:
            cost = f"{acc['api_images_per_step']:.0f} API images/step, "
        else:
            cost = "white box, "
        print(
            f"  {METHOD_NAMES[method]}: {acc['steps']} steps, {cost}"
            f"{acc['training_api_images']} training API images, {acc['train_seconds']:.0f} s"
        )
    print(f"results in {out} ({wall:.0f} s)")


def measure_premise(
    config: DefenseConfig, data: ImageData, api: ClassifierAPI, t_start: float
) -> dict[str, Any]:
    """``--premise-only``: pretrain the denoiser and the autoencoder as a full run would,
    measure :func:`~applications.defense.training.premise_report` and write it to
    ``out/premise.json`` (with the settings); no method is trained."""
    denoiser_state = pretrain_denoiser(config, data, config.out)
    autoencoder = pretrain_autoencoder(config, data, config.out)
    result = {
        "premise": premise_report(config, api, data, denoiser_state, autoencoder),
        "settings": settings_record(config) | {"data": data.name, "image_shape": list(data.shape)},
        "wall_seconds": time.perf_counter() - t_start,
    }
    (config.out / "premise.json").write_text(json.dumps(result, indent=2))
    print(f"results in {config.out / 'premise.json'} ({result['wall_seconds']:.0f} s)")
    return result


def run(config: DefenseConfig) -> dict[str, Any]:
    """The whole experiment; returns what it writes to ``out/certified_accuracy.json``
    (with ``config.premise_only``: :func:`measure_premise`, ``out/premise.json``).

    Raises:
        ValueError: a setting the run cannot use (before anything is trained where possible).
    """
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = load_data(config.data, seed=config.seed)
    print(f"data: {data.name}, train {data.X_train.shape}, test {data.X_test.shape}")
    if "deepzero" in config.methods:  # an impossible budget fails now, not after an hour
        check_deepzero_budget(config, data.shape[0])
    checkpoint = provide_checkpoint(config, data, out)
    if "fo-ds" in config.methods and not checkpoint.exists() and not config.premise_only:
        raise ValueError(
            "FO-DS needs the classifier's weights (white box): pass --classifier-weights "
            "or drop fo-ds from --methods"
        )
    torch.manual_seed(config.seed)
    with classifier_api(config, checkpoint) as api:
        if config.premise_only:
            return measure_premise(config, data, api, t_start)
        labels = label_with_api(config, data, api)
        denoiser_state = pretrain_denoiser(config, data, out)
        autoencoder = (
            pretrain_autoencoder(config, data, out) if "zo-ae-ds" in config.methods else None
        )
        bottleneck = (
            autoencoder_fidelity(config, api, autoencoder, data)
            if autoencoder is not None
            else None
        )
        results = {
            method: train_and_certify(
                method, config, data, labels.train_labels, api, denoiser_state, autoencoder, out
            )
            for method in config.methods
        }
    radii = config.certify.radii
    table = format_table({m: r.accuracy for m, r in results.items()}, radii)
    result = {
        "certified_accuracy": {
            m: {f"{r:g}": a for r, a in res.accuracy.items()} for m, res in results.items()
        },
        "clean_accuracy": labels.clean_accuracy,
        "queries": {m: r.queries for m, r in results.items()},
        "label_api_images": labels.api_images,
        "autoencoder_fidelity": bottleneck,
        "settings": settings_record(config) | {"data": data.name, "image_shape": list(data.shape)},
        "wall_seconds": time.perf_counter() - t_start,
    }
    (out / "certified_accuracy.json").write_text(json.dumps(result, indent=2))
    (out / "table.md").write_text(table + "\n")
    plot_certified_accuracy(
        {m: r.certificates for m, r in results.items()},
        data.y_test[: config.certify.num_certify],
        radii,
        config.training.sigma,
        out / "certified_accuracy.png",
    )
    print_report(config, table, results, out, result["wall_seconds"])
    return result
