"""Hyperparameters without peeking: a validation split carved from the training images, and
each method's learning rate chosen on it by the same small sweep.

:func:`carve_validation` holds out a fixed share of every class of the training images; the
experiment trains, validates and selects on what it returns, and reads the test split only
to certify. :func:`select_and_train` gives every candidate rate of a method
(:meth:`~applications.defense.config.TrainingConfig.lr_candidates`: the same number for every
method) the first ``sweep_epochs`` epochs of the real schedule, scores each by the noisy
accuracy of its pipeline on the validation images, and continues the best candidate's run
(resumed from its checkpoint, so the schedule is the one a single run would follow) to the
configured epochs. The scores and the choice go to ``DIR/<method>/selection.json`` and the
run's ``certified_accuracy.json``; the chosen run's ``summary.json``, ``metrics.jsonl`` and
``curves.png`` are copied to ``DIR/<method>/``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from oracles.classifier import ClassifierAPI, as_label_function

from .config import DefenseConfig
from .data import ImageData, add_noise
from .models import ConvAutoEncoder
from .training import Defense, train_defense

#: accounting fields that add up over a candidate's sweep epochs and its continuation
_ADDITIVE = (
    "steps",
    "training_api_images",
    "grasp_api_images",
    "validation_api_images",
    "white_box_forward_images",
    "train_seconds",
)


def carve_validation(data: ImageData, fraction: float, seed: int) -> ImageData:
    """The development data: ``data``'s training images without a held-out ``fraction`` of
    every class (rounded; at least one and never all images of a class that has two or more;
    none of a class with one image), and those held-out images in the place of the test
    split. ``data``'s test split is not used.

    The held-out images are drawn with ``default_rng([seed, 2026])``; the remaining training
    images keep their order.

    Raises:
        ValueError: ``fraction`` outside (0, 1), or nothing left to train on.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must lie in (0, 1), got {fraction!r}")
    gen = np.random.default_rng([seed, 2026])
    held: list[np.ndarray] = []
    for c in np.unique(data.y_train):
        members = np.flatnonzero(data.y_train == c)
        size = members.size
        # at least one image of every class that has two, never all of a class
        take = min(max(round(fraction * size), 1), size - 1) if size > 1 else 0
        held.append(gen.choice(members, size=take, replace=False))
    val = gen.permutation(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    keep = np.setdiff1d(np.arange(data.y_train.size), val)  # sorted: the training order kept
    if keep.size == 0 or val.size == 0:
        raise ValueError(
            f"--validation-fraction {fraction:g} leaves {keep.size} training and {val.size} "
            f"validation images of {data.y_train.size}"
        )
    return ImageData(
        data.X_train[keep], data.y_train[keep], data.X_train[val], data.y_train[val], data.name
    )


def validation_score(
    defense: Defense, config: DefenseConfig, dev: ImageData, api: ClassifierAPI
) -> float:
    """Noisy accuracy of ``defense``'s pipeline on the validation images (``dev``'s held-out
    split) against their true labels, over ``sweep_draws`` noise draws per image (the same
    draws for every candidate and method: ``default_rng([seed, 31])``). Costs
    ``sweep_draws * len(validation)`` API images."""
    tr = config.training
    images = np.repeat(dev.X_test, tr.sweep_draws, axis=0)
    truth = np.repeat(dev.y_test, tr.sweep_draws)
    noisy = add_noise(images, tr.sigma, np.random.default_rng([config.seed, 31]))
    labels = as_label_function(api, preprocess=defense.preprocess)(noisy)
    return float(np.mean(labels == truth))


def _combine(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """One accounting for a candidate's sweep epochs followed by its continuation."""
    out = dict(then)
    for key in _ADDITIVE:
        out[key] = (first.get(key) or 0) + (then.get(key) or 0)
    images = out["training_api_images"] - out["grasp_api_images"]
    out["api_images_per_step"] = images / out["steps"] if out["steps"] else None
    return out


def select_and_train(
    method: str,
    config: DefenseConfig,
    dev: ImageData,
    train_labels: np.ndarray,
    api: ClassifierAPI,
    denoiser_state: dict[str, Any],
    autoencoder: ConvAutoEncoder | None,
    out: Path,
) -> tuple[Defense, dict[str, Any]]:
    """Sweep ``method``'s learning rate on the validation split, then finish the best run.

    Candidate ``lr`` trains in ``out/<method>/lr=<lr>/`` (a Trainer folder, resumed when it
    exists); its score is kept in ``score.json`` there, so a rerun of the same command
    neither retrains nor rescores it. Ties go to the smaller rate. A candidate that diverges
    scores nothing.

    Returns:
        ``(the trained defense, the selection record)``; the defense's accounting covers the
        chosen candidate's whole run, and ``selection_api_images`` what every candidate spent
        in the sweep (training, per-epoch validation, scoring).

    Raises:
        FloatingPointError: every candidate diverged (naming the flags to change).
    """
    tr = config.training
    candidates = tr.lr_candidates(method)
    record: dict[str, Any] = {
        "lr_factors": list(tr.lr_factors),
        "sweep_epochs": tr.sweep_epochs,
        "validation_images": int(dev.y_test.size),
        "draws": tr.sweep_draws,
        "candidates": [],
    }
    sweep_images = 0
    best: tuple[float, float, Path, dict[str, Any]] | None = None
    for lr in candidates:
        folder = out / method / f"lr={lr:g}"
        score_file = folder / "score.json"
        if score_file.is_file():
            entry = json.loads(score_file.read_text())
        else:
            entry = {"lr": lr, "score": None, "diverged": None, "accounting": {}}
            try:
                trial = train_defense(
                    method, config, dev, train_labels, api, denoiser_state, autoencoder, out,
                    lr=lr, folder=folder, stop_after_epochs=tr.sweep_epochs,
                )  # fmt: skip
            except FloatingPointError as exc:
                entry["diverged"] = str(exc)
            else:
                before = api.queries
                entry["score"] = validation_score(trial, config, dev, api)
                entry["accounting"] = trial.accounting | {
                    "scoring_api_images": api.queries - before
                }
            folder.mkdir(parents=True, exist_ok=True)
            score_file.write_text(json.dumps(entry, indent=2))
        acc = entry["accounting"]
        sweep_images += int(acc.get("training_api_images") or 0)
        sweep_images += int(acc.get("validation_api_images") or 0)
        sweep_images += int(acc.get("scoring_api_images") or 0)
        score = entry["score"]
        shown = "diverged" if score is None else f"{score:.4f}"
        print(f"{method}: lr {lr:g} -> validation noisy accuracy {shown}")
        record["candidates"].append({k: entry[k] for k in ("lr", "score", "diverged")})
        # a NaN score never wins (comparisons with NaN are false)
        if score is not None and (best is None or score > best[1]):
            best = (lr, score, folder, acc)
    if best is None:
        raise FloatingPointError(
            f"{method}: every learning rate of the sweep diverged "
            f"({', '.join(f'{lr:g}' for lr in candidates)}): lower --lr-{method} or "
            "--lr-factors"
        )
    lr, score, folder, first = best
    record |= {"chosen_lr": lr, "chosen_score": score, "folder": str(folder)}
    print(f"{method}: chose lr {lr:g} (validation noisy accuracy {score:.4f})")
    (out / method).mkdir(parents=True, exist_ok=True)
    (out / method / "selection.json").write_text(json.dumps(record, indent=2))
    final = train_defense(
        method, config, dev, train_labels, api, denoiser_state, autoencoder, out,
        lr=lr, folder=folder,
    )  # fmt: skip
    saved = folder / "accounting.json"
    if final.accounting["steps"] == 0 and saved.is_file():
        # finished by an earlier run of the same command: report what that run spent
        final.accounting = json.loads(saved.read_text())
    else:
        combined = _combine(first, final.accounting) | {
            "lr": lr,
            "selection_api_images": sweep_images,
            "accounting_complete": True,
        }
        total_steps = int(final.summary["steps"])
        if combined["steps"] != total_steps:  # an earlier, interrupted call trained the rest
            combined |= {
                "steps": total_steps,
                "api_images_per_step": None,
                "accounting_complete": False,  # the image counts miss that call's share
            }
        final.accounting = combined
        saved.write_text(json.dumps(final.accounting, indent=2))
    for name in ("summary.json", "metrics.jsonl", "curves.png"):  # where one run keeps them
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / method / name)
    return final, record
