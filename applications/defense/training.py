"""The defender's training: the shared MSE-pretrained start, then each method by the Trainer.

All three methods start from the same denoiser (:func:`pretrain_denoiser`) and train through
the one :class:`~zoopt.torch.train.Trainer` at matched settings (same data, noise draws,
batch, steps and schedule); only the gradient differs (:func:`method_setup`):

- FO-DS: autograd through the owner's classifier (``TrainConfig(method="fo")``);
- ZO-AE-DS: latent-code CGE, its own gradient source
  (``TrainConfig(method="custom")``, ``Trainer(source=LatentCGE(...))``);
- DeepZero: sparse CGE over the denoiser's weights on a ZO-GraSP mask
  (``TrainConfig(method="deepzero")``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oracles.classifier import ClassifierAPI, as_label_function
from oracles.resnet import load_classifier
from zoopt.oracle import BudgetExceeded
from zoopt.step import GradientSource
from zoopt.torch.blackbox import CountingClassifier, FrozenModule, eval_mode
from zoopt.torch.callbacks import Callback, TrainerView, default_callbacks
from zoopt.torch.oracle import ModuleOracle
from zoopt.torch.params import ParamGroup, ParamView
from zoopt.torch.train import Trainer

from .config import METHODS, DefenseConfig
from .data import ImageData
from .methods import deepzero_budget, deepzero_oracle, fo_ds_oracle
from .models import ConvAutoEncoder, build_denoiser, pipeline_preprocess
from .owner import CHECKPOINT_NAME, api_labels
from .recipe import fit, train_config
from .tasks import DenoiserTask, ReconstructionTask
from .zo_ae_ds import AutoencoderZOOracle, LatentCGE


# -- the common start ---------------------------------------------------------------------
def deepzero_mask_budget(
    config: DefenseConfig, groups: list[ParamGroup]
) -> tuple[list[ParamGroup], float]:
    """DeepZero's mask groups and sparsity for ``config.training.q`` coordinates per step and
    ``config.deepzero.other`` (:func:`~applications.defense.methods.deepzero_budget`)."""
    return deepzero_budget(groups, config.training.q, estimate_other=config.deepzero.estimate_other)


def check_deepzero_budget(config: DefenseConfig, channels: int) -> None:
    """Raise now (``ValueError``) if DeepZero's mask cannot hold exactly ``q`` coordinates of
    the configured denoiser, instead of after an hour of pretraining."""
    deepzero_mask_budget(config, ParamView(build_denoiser(config, channels)).groups)


def pretrain_denoiser(config: DefenseConfig, data: ImageData, out: Path) -> dict[str, Any]:
    """The common starting point of all three methods: a DnCNN trained (white box, on the
    defender's own images, no classifier) to map ``x + delta`` to ``x`` (MSE), as in denoised
    smoothing. ``denoiser.init="random"`` skips it. Returns the state dict.

    Raises:
        RuntimeError: the pretrained denoiser is no better than returning its noisy input.
    """
    sigma = config.training.sigma
    denoiser = build_denoiser(config, data.shape[0])
    if config.denoiser.init == "mse":
        task = ReconstructionTask(
            denoiser, data.X_train, data.X_test[:256], sigma=sigma,
            batch_size=config.training.batch_size, device=config.device, seed=config.seed,
        )  # fmt: skip
        recipe = train_config(
            config,
            "fo",
            config.denoiser.pretrain_lr,
            epochs=config.training.pretrain_epochs,
            max_steps_per_epoch=None,
        )
        trainer = Trainer(task, recipe, out / "denoiser_mse", resume=True)
        summary = fit(trainer, "--pretrain-lr")
        print(f"denoiser: MSE pretraining, held-out MSE {summary['test_mse']:.5f}")
        # returning the noisy input scores sigma^2; a denoiser near that has collapsed (dead
        # ReLUs after a too-large step: seen with DnCNN 5 x 32 at lr 0.05) and would make
        # the three methods' comparison meaningless, so stop before spending the hour
        identity_mse = sigma**2
        if not summary["test_mse"] < 0.9 * identity_mse:
            raise RuntimeError(
                f"denoiser MSE pretraining did not learn to denoise: held-out MSE "
                f"{summary['test_mse']:.5f}, while returning the noisy input scores "
                f"{identity_mse:.5f} (sigma^2); lower --pretrain-lr (now "
                f"{config.denoiser.pretrain_lr:g}) or raise --pretrain-epochs"
            )
    return {k: v.detach().clone() for k, v in denoiser.state_dict().items()}


def pretrain_autoencoder(config: DefenseConfig, data: ImageData, out: Path) -> ConvAutoEncoder:
    """ZO-AE-DS stage 1: the autoencoder (latent ``q / 2``) trained white-box to reconstruct
    clean images (MSE)."""
    latent_dim = config.training.q // 2  # DefenseConfig checks that q is even for ZO-AE-DS
    torch.manual_seed(config.seed)
    channels, side = data.shape[0], data.shape[1]
    ae = ConvAutoEncoder(channels, side, latent_dim, width=config.zo_ae_ds.ae_width)
    ae = ae.to(config.device)
    task = ReconstructionTask(
        ae, data.X_train, data.X_test[:256], batch_size=config.training.batch_size,
        device=config.device, seed=config.seed,
    )  # fmt: skip
    recipe = train_config(
        config, "fo", config.zo_ae_ds.ae_lr, epochs=config.training.pretrain_epochs,
        weight_decay=0.0, max_steps_per_epoch=None,
    )  # fmt: skip
    summary = fit(Trainer(task, recipe, out / "autoencoder", resume=True), "--ae-lr")
    print(f"autoencoder: latent {latent_dim}, held-out MSE {summary['test_mse']:.5f}")
    return ae


def autoencoder_fidelity(
    config: DefenseConfig,
    api: ClassifierAPI,
    autoencoder: ConvAutoEncoder,
    data: ImageData,
    count: int = 500,
) -> dict[str, float]:
    """How much of the image survives ZO-AE-DS's bottleneck, on ``count`` clean held-out images
    (``data``'s test part: the validation split in the experiment):
    the classifier's accuracy on them and on their reconstructions (through the API, ``2 *
    count`` images), and the reconstruction MSE over the pixel variance (1: no better than
    the mean image)."""
    images, truth = data.X_test[:count], data.y_test[:count]
    with eval_mode(autoencoder):
        recon = pipeline_preprocess(autoencoder, device=config.device)(images)
    clean, through = api_labels(api, images), api_labels(api, recon)
    report = {
        "images": int(images.shape[0]),
        "clean_accuracy": float(np.mean(clean == truth)),
        "reconstruction_accuracy": float(np.mean(through == truth)),
        "label_agreement": float(np.mean(through == clean)),
        "relative_mse": float(np.mean((recon - images) ** 2) / np.var(images)),
    }
    print(
        f"autoencoder: classifier accuracy {report['clean_accuracy']:.3f} on clean, "
        f"{report['reconstruction_accuracy']:.3f} on reconstructed held-out images; "
        f"MSE / pixel variance {report['relative_mse']:.3f}"
    )
    return report


def premise_report(
    config: DefenseConfig,
    api: ClassifierAPI,
    data: ImageData,
    denoiser_state: dict[str, Any],
    autoencoder: ConvAutoEncoder,
) -> dict[str, Any]:
    """What ZO-AE-DS's code costs, next to what the noise costs, on all test images: the
    classifier's accuracy (through the API) on clean images, on their autoencoder
    reconstructions (the premise of the paper's Table 2: the code is lossy), on noisy images
    (one draw, ``sigma``), on noisy images after the MSE-pretrained denoiser, and after the
    denoiser and the autoencoder; and the reconstruction MSE over the pixel variance."""
    from .data import add_noise

    images, truth = data.X_test, data.y_test
    denoiser = build_denoiser(config, data.shape[0])
    denoiser.load_state_dict(denoiser_state)
    noisy = add_noise(images, config.training.sigma, np.random.default_rng(config.seed))
    with eval_mode(denoiser), eval_mode(autoencoder):
        recon = pipeline_preprocess(autoencoder, device=config.device)(images)
        denoised = pipeline_preprocess(denoiser, device=config.device)(noisy)
        both = pipeline_preprocess(denoiser, autoencoder, device=config.device)(noisy)

    def accuracy(x: np.ndarray) -> float:
        return float(np.mean(api_labels(api, x) == truth))

    report = {
        "images": int(images.shape[0]),
        "latent_dim": int(autoencoder.latent_dim),
        "clean_accuracy": accuracy(images),
        "reconstruction_accuracy": accuracy(recon),
        "noisy_accuracy": accuracy(noisy),
        "denoised_accuracy": accuracy(denoised),
        "denoised_reconstruction_accuracy": accuracy(both),
        "relative_mse": float(np.mean((recon - images) ** 2) / np.var(images)),
    }
    report["code_cost_points"] = 100 * (
        report["clean_accuracy"] - report["reconstruction_accuracy"]
    )
    print(
        "premise: classifier accuracy "
        + ", ".join(
            f"{k.removesuffix('_accuracy')} {v:.3f}"
            for k, v in report.items()
            if k.endswith("accuracy")
        )
        + f"; the code (latent {report['latent_dim']}) costs {report['code_cost_points']:.1f} points"
    )
    return report


# -- one method ---------------------------------------------------------------------------
@dataclass
class MethodSetup:
    """What the Trainer needs for one method.

    Attributes:
        oracle: over the trained parameters.
        model: the module holding them and their buffers (checkpointed, mode-switched).
        pipeline: the defender's modules in front of the API, in order (evaluation,
            certification).
        trainer_method: ``TrainConfig.method``.
        source: the gradient source for ``trainer_method="custom"``.
        overrides: further :class:`~zoopt.torch.train.TrainConfig` fields.
        mask_groups: the parameter groups DeepZero's mask and ZO-GraSP see.
        white_box: FO-DS's classifier, counting its forward images.
    """

    oracle: ModuleOracle | AutoencoderZOOracle
    model: nn.Module
    pipeline: list[nn.Module]
    trainer_method: str
    source: GradientSource | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    mask_groups: list[ParamGroup] | None = None
    white_box: CountingClassifier | None = None


def fo_ds_setup(config: DefenseConfig, denoiser: nn.Module, checkpoint: Path) -> MethodSetup:
    """FO-DS: autograd through the owner's weights at ``checkpoint`` (the white box)."""
    classifier, _ = load_classifier(checkpoint)
    oracle = fo_ds_oracle(denoiser, classifier.to(config.device))
    counting = oracle.module.classifier
    assert isinstance(counting, CountingClassifier)
    # the update rule is FO-DS's own (--fo-ds-optimizer); lr, schedule and the rest are shared
    overrides = {"optimizer": config.training.fo_ds_optimizer}
    return MethodSetup(oracle, denoiser, [denoiser], "fo", overrides=overrides, white_box=counting)


def zo_ae_ds_setup(
    config: DefenseConfig, denoiser: nn.Module, autoencoder: ConvAutoEncoder, api: ClassifierAPI
) -> MethodSetup:
    """ZO-AE-DS stage 2: a copy of the pretrained autoencoder, its decoder frozen into the
    black box; trains denoiser + encoder (``trained="whole"``) or the denoiser only, with
    :class:`~applications.defense.zo_ae_ds.LatentCGE` (``2 * latent_dim + 1 = q + 1``
    queries per step)."""
    ae = copy.deepcopy(autoencoder)
    # ZO-AE-DS's --train_method: "whole" trains denoiser + encoder, "denoiser" only D
    whole = config.zo_ae_ds.trained == "whole"
    encoder = ae.encoder if whole else FrozenModule(ae.encoder)
    oracle = AutoencoderZOOracle(
        denoiser, encoder, ae.decoder, api, chunk_images=config.zo_ae_ds.chunk_images
    )
    source = LatentCGE(ae.latent_dim, mu=config.training.mu)
    return MethodSetup(
        oracle, oracle.trainable, [denoiser, encoder, ae.decoder], "custom", source=source
    )


def deepzero_setup(config: DefenseConfig, denoiser: nn.Module, api: ClassifierAPI) -> MethodSetup:
    """DeepZero: sparse CGE over exactly ``q`` coordinates of the denoiser per step, ZO-GraSP
    layer ratios, a new random mask every ``reshuffle_every`` epochs."""
    oracle = deepzero_oracle(denoiser, api)
    mask_groups, sparsity = deepzero_mask_budget(config, oracle.view.groups)
    sampled_other = any(
        a.kind != b.kind for a, b in zip(mask_groups, oracle.view.groups, strict=True)
    )
    print(
        f"DeepZero: {config.training.q} coordinates per step; biases / BatchNorm "
        + ("sampled like the weights" if sampled_other else "estimated at every step")
    )
    overrides = dict(
        sparsity=sparsity,
        ratios="zo-grasp",
        grasp_q=config.deepzero.grasp_q,
        reshuffle_every=config.deepzero.reshuffle_every,
    )
    return MethodSetup(
        oracle, denoiser, [denoiser], "deepzero", overrides=overrides, mask_groups=mask_groups
    )


class CountingLabels:
    """Wraps a label function ``images (m, ...) -> labels (m,)``; ``images`` counts the
    images it was asked about."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray]):
        self.fn = fn
        self.images = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.images += int(images.shape[0])
        return self.fn(images)


class StopAfterEpochs(Callback):
    """Stops a run (with its checkpoint, at the step boundary) once ``epochs`` epochs are
    done, so that a resumed run continues the same schedule: how a learning-rate candidate
    trains the first epochs of the real run (:mod:`applications.defense.selection`)."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def before_step(self, trainer: TrainerView) -> None:
        if trainer.state.epoch >= self.epochs:
            # the Trainer's one way to stop early and resumably (its summary then reads
            # "query budget exhausted"): no budget is spent, the queries so far are the cap
            spent = trainer.state.queries
            raise BudgetExceeded(spent, spent, None, math.nan)


@dataclass
class Defense:
    """A trained method: the numpy preprocessing in front of the API and its accounting
    (of the training done by this call: a resumed run counts only the steps it added)."""

    method: str
    preprocess: Callable[[np.ndarray], np.ndarray]
    modules: list[nn.Module]
    summary: dict[str, Any]
    accounting: dict[str, Any]


def method_setup(
    method: str,
    config: DefenseConfig,
    denoiser: nn.Module,
    api: ClassifierAPI,
    autoencoder: ConvAutoEncoder | None,
    out: Path,
) -> MethodSetup:
    """The :class:`MethodSetup` of ``method`` around ``denoiser``."""
    if method == "fo-ds":
        return fo_ds_setup(config, denoiser, out / CHECKPOINT_NAME)
    if method == "zo-ae-ds":
        if autoencoder is None:
            raise ValueError("ZO-AE-DS needs the pretrained autoencoder (pretrain_autoencoder)")
        return zo_ae_ds_setup(config, denoiser, autoencoder, api)
    if method == "deepzero":
        return deepzero_setup(config, denoiser, api)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def train_defense(
    method: str,
    config: DefenseConfig,
    data: ImageData,
    train_labels: np.ndarray,
    api: ClassifierAPI,
    denoiser_state: dict[str, Any],
    autoencoder: ConvAutoEncoder | None,
    out: Path,
    *,
    lr: float | None = None,
    folder: Path | None = None,
    stop_after_epochs: int | None = None,
) -> Defense:
    """Train one method through the Trainer from the common denoiser init, with the
    classifier's own labels ``train_labels`` as targets; count the API images it spends
    (training, ZO-GraSP, the per-epoch validation on ``data``'s held-out images).

    ``lr``: the learning rate (default ``config.training.lr(method)``); ``folder``: the
    Trainer's folder (default ``out/<method>``), resumed from its checkpoint when there is one
    (a finished run is not trained again); ``stop_after_epochs``: stop there, resumable.
    """
    lr = config.training.lr(method) if lr is None else lr
    folder = out / method if folder is None else folder
    denoiser = build_denoiser(config, data.shape[0])
    denoiser.load_state_dict(denoiser_state)
    setup = method_setup(method, config, denoiser, api, autoencoder, out)
    preprocess = pipeline_preprocess(*setup.pipeline, device=config.device)
    eval_labels = CountingLabels(as_label_function(api, preprocess=preprocess))
    val = slice(0, config.training.num_validate)
    task = DenoiserTask(
        setup.model,
        setup.oracle,
        (data.X_train, train_labels),
        (data.X_test[val], data.y_test[val]),
        sigma=config.training.sigma,
        batch_size=config.training.batch_size,
        evaluate_labels=eval_labels,
        grasp_per_class=config.deepzero.grasp_per_class,
        device=config.device,
        seed=config.seed,
        groups=setup.mask_groups,
    )
    recipe = train_config(
        config,
        setup.trainer_method,
        lr,
        warmup_epochs=config.training.warmup_epochs,
        **setup.overrides,
    )
    before = api.queries
    t0 = time.perf_counter()
    extra = {"defense_method": method}
    callbacks = default_callbacks(recipe, folder, extra)
    if stop_after_epochs is not None:
        callbacks.append(StopAfterEpochs(stop_after_epochs))
    trainer = Trainer(
        task, recipe, folder, resume=True, extra_summary=extra, callbacks=callbacks,
        source=setup.source,
    )  # fmt: skip
    steps_before = trainer.state.global_step
    scored_before = trainer.mask is not None or bool(trainer.state.grasp)
    summary = fit(trainer, f"--lr-{method}")
    wall = time.perf_counter() - t0
    api_images = api.queries - before - eval_labels.images
    steps = summary["steps"] - steps_before
    grasp_images = 0
    if method == "deepzero" and not scored_before:
        # ZO-GraSP: 2(q + 1) RGE queries on a class-balanced batch of the classifier's labels
        classes = np.unique(train_labels).size
        grasp_images = 2 * (config.deepzero.grasp_q + 1) * config.deepzero.grasp_per_class * classes
    accounting: dict[str, Any] = {
        "trainer_method": setup.trainer_method,
        "steps": steps,
        "queries_per_gradient_estimate": None if method == "fo-ds" else config.training.q,
        "training_api_images": api_images,
        "grasp_api_images": grasp_images,
        "api_images_per_step": (api_images - grasp_images) / steps if steps else None,
        "validation_api_images": eval_labels.images,
        "white_box_forward_images": 0 if setup.white_box is None else setup.white_box.images,
        "train_seconds": wall,
    }
    if method == "deepzero":
        accounting["sparsity"] = setup.overrides["sparsity"]
    for m in setup.pipeline:
        m.eval()
    return Defense(method, preprocess, setup.pipeline, summary, accounting)
