"""The oracles of FO-DS and DeepZero, and DeepZero's query budget.

- **FO-DS** (white box, the upper reference): :func:`fo_ds_oracle`, autograd through the
  owner's classifier; trainer method ``"fo"``.
- **DeepZero**: :func:`deepzero_oracle`, sparse CGE over the denoiser's own weights with the
  black box a downstream :class:`~zoopt.torch.blackbox.BlackBoxStage`; trainer method
  ``"deepzero"``, its mask sized by :func:`deepzero_budget`.
- **ZO-AE-DS**: :mod:`applications.defense.zo_ae_ds` (its own oracle and gradient source).

Query accounting (both ZO methods): one *query* is one evaluation of the loss on the batch,
i.e. ``B`` images sent to the classifier API; a step costs ``q + 1`` queries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch.nn.functional as F
from torch import nn

from zoopt.torch.blackbox import BlackBoxStage, CountingClassifier, PredictionAPI
from zoopt.torch.oracle import ModuleOracle
from zoopt.torch.params import ParamGroup

from .models import DenoisedClassifier


def fo_ds_oracle(denoiser: nn.Module, classifier: nn.Module) -> ModuleOracle:
    """The white-box oracle: ``CE(classifier(denoiser(inputs)), targets)`` with autograd through
    the (frozen, eval-mode) classifier. Trainer method ``"fo"``. The classifier's forward images
    are counted in ``oracle.module.classifier.images``."""
    model = DenoisedClassifier(denoiser, CountingClassifier(classifier))
    return ModuleOracle(model, F.cross_entropy, engine=False)


def deepzero_oracle(
    denoiser: nn.Module,
    api: PredictionAPI,
    *,
    chunk_bytes: int | None = None,
    max_queries: int | None = None,
) -> ModuleOracle:
    """The DeepZero oracle: ``CE(api(denoiser(inputs)), targets)`` over the denoiser's weights.

    A :class:`~zoopt.torch.ModuleOracle` over :class:`DenoisedClassifier` ``(denoiser,
    BlackBoxStage(api))``. Its engine reuses features inside the denoiser and declares the black
    box per-sample (``per_sample_modules``), so all ``Q * B`` perturbed images of a chunk reach
    the API in one ``predict`` call instead of ``Q`` calls of ``B``. ``chunk_bytes`` caps the
    engine's activation memory per chunk. Each query sends ``B`` images to the API.
    """
    model = DenoisedClassifier(denoiser, BlackBoxStage(api))
    return ModuleOracle(
        model,
        F.cross_entropy,
        max_batch_bytes=chunk_bytes,
        max_queries=max_queries,
        per_sample_modules=(BlackBoxStage,),
    )


def deepzero_budget(
    groups: Sequence[ParamGroup], coords: int, *, estimate_other: bool | None = None
) -> tuple[list[ParamGroup], float]:
    """DeepZero's mask groups and the sparsity at which its mask holds exactly ``coords``
    coordinates per step.

    As in the DeepZero reference code, biases and BatchNorm parameters (kind ``"other"``)
    are estimated at every step and the rest of the budget goes to the prunable weights, of
    which global pruning keeps exactly ``N - round(s * N)``. That needs ``coords >= other +
    one weight per layer``; the paper's DnCNN 17 x 64 has 1,984 such parameters against
    ``q = 1152``. Then (``estimate_other=None``, automatic) or when ``estimate_other=False``,
    every group is made prunable (``kind="weight"``), so that ZO-GraSP's layer ratios split
    the budget over weights, biases and BatchNorm alike.

    Args:
        groups: ``ParamView.groups``.
        coords: coordinates per step, ``q``.
        estimate_other: True: biases / BatchNorm always in the mask (an error if they do not
            fit); False: sampled like the weights; None: True when they fit.

    Returns:
        ``(mask_groups, sparsity)``: the groups to give the mask (``DenoiserTask(groups=...)``)
        and the sparsity of their prunable part.
    """
    if isinstance(coords, bool) or not isinstance(coords, int | np.integer) or coords < 1:
        raise ValueError(f"coords must be a positive integer, got {coords!r}")
    other = sum(g.size for g in groups if g.kind != "weight")
    layers = [g.size for g in groups if g.kind == "weight"]
    fits = len(layers) <= coords - other <= sum(layers)
    if estimate_other is None:
        estimate_other = fits or other == 0
    if estimate_other:
        if not fits:
            raise ValueError(
                f"coords={coords} must cover the {other} non-prunable coordinates plus between "
                f"{len(layers)} (one per layer) and {sum(layers)} weights; choose q in "
                f"[{other + len(layers)}, {other + sum(layers)}] or sample the biases / "
                "BatchNorm parameters too (estimate_other=False)"
            )
        return list(groups), (sum(layers) - (coords - other)) / sum(layers)
    mask_groups = [ParamGroup(g.name, g.start, g.stop, g.shape, "weight") for g in groups]
    total = sum(g.size for g in mask_groups)
    if not len(mask_groups) <= coords <= total:
        raise ValueError(
            f"coords={coords} must lie between {len(mask_groups)} (one per parameter tensor) "
            f"and {total} (all parameters)"
        )
    return mask_groups, (total - coords) / total
