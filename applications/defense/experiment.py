"""The certified-defense experiment end to end: :func:`run` with a :class:`DefenseConfig`.

Load the data and carve a validation split out of the training images; get the owner's
classifier (given, trained once on the training images, or remote) and reach it only through
its API; label the training images with it; pretrain the shared denoiser (and ZO-AE-DS's
autoencoder); choose each method's learning rate on the validation split and train it; only
then read the test split, to certify each method; write and print the report with
Clopper-Pearson intervals and paired tests. Outputs in ``config.out``:
``certified_accuracy.json``, ``table.md``, ``certified_accuracy.png``, the owner's
``classifier.pt``, one Trainer folder per training run and per learning-rate candidate
(``<method>/lr=<lr>/``), ``<method>/selection.json`` and ``<method>/certificates.json``.

Every stage resumes from what a previous run of the same command left in ``config.out``
(Trainer checkpoints, candidate scores, certificates), so an interrupted run, or one with a
larger ``--num-certify``, only does the rest.
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
from .owner import api_labels, classifier_api, provide_checkpoint
from .selection import carve_validation, select_and_train
from .statistics import run_statistics
from .training import (
    autoencoder_fidelity,
    check_deepzero_budget,
    premise_report,
    pretrain_autoencoder,
    pretrain_denoiser,
)


@dataclass(frozen=True)
class MethodResult:
    """One method's certificates, learning-rate selection and query accounting."""

    certificates: list[Certificate]
    selection: dict[str, Any]
    queries: dict[str, Any]


def print_report(
    config: DefenseConfig, table: str, results: dict[str, MethodResult], out: Path, wall: float
) -> None:
    """The table and each method's training cost, on stdout."""
    print(
        "\ncertified accuracy of the smoothed denoiser -> black-box classifier, "
        f"sigma = {config.training.sigma:g}, N = {config.certify.n}:"
    )
    print(table)
    for method, result in results.items():
        acc = result.queries
        per_step = acc["api_images_per_step"]
        if not acc["queries_per_gradient_estimate"]:
            cost = "white box, "
        elif per_step is None:  # trained partly by an earlier, interrupted call
            cost = "API images/step not recorded, "
        else:
            cost = f"{per_step:.0f} API images/step, "
        rate = acc.get("certify_images_per_second")
        print(
            f"  {METHOD_NAMES[method]}: lr {acc['lr']:g} (validation), {acc['steps']} steps, "
            f"{cost}{acc['training_api_images']} training API images, "
            f"{acc['train_seconds']:.0f} s; certification "
            + ("reused" if rate is None else f"{rate:.0f} images/s")
        )
    print(f"results in {out} ({wall:.0f} s)")


def measure_premise(
    config: DefenseConfig, dev: ImageData, data: ImageData, api: ClassifierAPI, t_start: float
) -> dict[str, Any]:
    """``--premise-only``: pretrain the denoiser and the autoencoder as a full run would (on
    the development split ``dev``), measure
    :func:`~applications.defense.training.premise_report` on ``data``'s test images (a
    diagnostic: nothing is selected by it) and write it to ``out/premise.json`` (with the
    settings); no method is trained."""
    denoiser_state = pretrain_denoiser(config, dev, config.out)
    autoencoder = pretrain_autoencoder(config, dev, config.out)
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
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    threads = torch.get_num_threads()
    data = load_data(config.data, seed=config.seed)
    dev = carve_validation(data, config.training.validation_fraction, config.seed)
    print(
        f"data: {data.name}, train {dev.X_train.shape}, validation {dev.X_test.shape} (from the "
        f"training images), test {data.X_test.shape}; torch threads {threads}"
    )
    if "deepzero" in config.methods:  # an impossible budget fails now, not after an hour
        check_deepzero_budget(config, data.shape[0])
    checkpoint = provide_checkpoint(config, dev, out)
    if "fo-ds" in config.methods and not checkpoint.exists() and not config.premise_only:
        raise ValueError(
            "FO-DS needs the classifier's weights (white box): pass --classifier-weights "
            "or drop fo-ds from --methods"
        )
    torch.manual_seed(config.seed)
    with classifier_api(config, checkpoint) as api:
        if config.premise_only:
            return measure_premise(config, dev, data, api, t_start)
        q0 = api.queries
        train_labels = api_labels(api, dev.X_train)  # the defense's targets
        label_images = api.queries - q0
        denoiser_state = pretrain_denoiser(config, dev, out)
        autoencoder = (
            pretrain_autoencoder(config, dev, out) if "zo-ae-ds" in config.methods else None
        )
        bottleneck = (
            autoencoder_fidelity(config, api, autoencoder, dev)  # on validation images
            if autoencoder is not None
            else None
        )
        trained = {
            method: select_and_train(
                method, config, dev, train_labels, api, denoiser_state, autoencoder, out
            )
            for method in config.methods
        }
        # the test split is read from here on, and only to certify
        count = min(config.certify.num_certify, data.X_test.shape[0])
        if count < config.certify.num_certify:
            print(f"certify: the test split holds {count} images (--num-certify capped)")
        test_labels = data.y_test[:count]
        clean = api_labels(api, data.X_test[:count])
        clean_accuracy = float(np.mean(clean == test_labels))
        print(f"classifier: clean accuracy {clean_accuracy:.4f} on the {count} certified images")
        results: dict[str, MethodResult] = {}
        for method, (defense, selection) in trained.items():
            certs, record = certify_defense(defense, config, data, api, out)
            queries = defense.accounting | {
                "certification_api_images": record["api_images"],
                "certify_seconds": record["seconds"],
                "certify_images_per_second": record["images_per_second"],
                "final_noisy_accuracy": defense.summary.get("test_accuracy"),
            }
            results[method] = MethodResult(certs, selection, queries)
            print(f"{METHOD_NAMES[method]}: certified {len(certs)} images")
    radii = config.certify.radii
    stats = run_statistics(
        {m: [[c.prediction, c.radius] for c in r.certificates] for m, r in results.items()},
        test_labels,
        radii,
    )
    table = format_table(stats, radii)
    result = {
        "certified_accuracy": {
            m: {key: cell["accuracy"] for key, cell in cells.items()}
            for m, cells in stats["certified"].items()
        },
        "certified_images": stats["images"],
        "intervals": {
            m: {key: cell["interval"] for key, cell in cells.items()}
            for m, cells in stats["certified"].items()
        },
        "certified_counts": {
            m: {key: cell["count"] for key, cell in cells.items()}
            for m, cells in stats["certified"].items()
        },
        "interval_level": stats["level"],
        "paired_tests": stats["paired_tests"],
        "clean_accuracy": clean_accuracy,
        "learning_rates": {m: r.selection for m, r in results.items()},
        "queries": {m: r.queries for m, r in results.items()},
        "label_api_images": label_images,
        "autoencoder_fidelity": bottleneck,
        "split": {
            "train": int(dev.y_train.size),
            "validation": int(dev.y_test.size),
            "test": int(data.y_test.size),
            "certified": count,
        },
        "settings": settings_record(config)
        | {"data": data.name, "image_shape": list(data.shape), "torch_threads": threads},
        "wall_seconds": time.perf_counter() - t_start,
    }
    (out / "certified_accuracy.json").write_text(json.dumps(result, indent=2))
    (out / "table.md").write_text(table + "\n")
    plot_certified_accuracy(
        {m: r.certificates for m, r in results.items()},
        test_labels,
        radii,
        config.training.sigma,
        out / "certified_accuracy.png",
        stats,
    )
    print_report(config, table, results, out, result["wall_seconds"])
    return result
