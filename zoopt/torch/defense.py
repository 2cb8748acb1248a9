"""Denoised smoothing in front of a black-box classifier API: FO-DS, ZO-AE-DS and DeepZero.

The defender trains a denoiser ``D`` so that ``classifier(D(x + delta))``, ``delta ~ N(0,
sigma^2 I)``, predicts the classifier's own label of the clean ``x`` (cross-entropy); randomized
smoothing of ``classifier o D`` is then certifiably robust (Salman et al. 2020). Three ways to
get the gradient, all trained by :class:`zoopt.torch.train.Trainer`:

- **FO-DS** (white box, the upper reference): :func:`fo_ds_oracle`, a
  :class:`~zoopt.torch.ModuleOracle` over ``classifier(D(x))`` with autograd through the
  classifier (trainer method ``"fo"``).
- **ZO-AE-DS** (Zhang et al. 2022): :class:`AutoencoderZOOracle`. An autoencoder sits between
  ``D`` and the black box; the gradient w.r.t. the encoder's latent code is estimated per sample
  by central coordinate-wise differences (``2 * latent_dim`` queries), then backpropagated
  through encoder and denoiser. Its ``loss_and_grad`` supplies that gradient, so it trains with
  trainer method ``"fo"``.
- **DeepZero**: :func:`deepzero_oracle`, a ModuleOracle whose module is ``D`` followed by a
  :class:`BlackBoxStage` (parameter-free, no autograd, calls the API). Sparse CGE over D's own
  weights; the engine treats the black box as a per-sample stage and sends all perturbed images
  of one chunk to the API in one ``predict`` call (trainer method ``"deepzero"``).

Query accounting (both ZO methods): one *query* is one evaluation of the loss on the batch,
i.e. ``B`` images sent to the classifier API. A step costs ``q + 1`` queries: ``q`` perturbed
evaluations (DeepZero: ``q`` coordinates of D; ZO-AE-DS: ``q / 2`` latent coordinates, two
signs) plus the unperturbed one. :func:`deepzero_budget` picks the mask groups and
the sparsity that make DeepZero's mask exactly ``q`` coordinates.

Images are float32 ``(n, C, H, W)`` in the classifier's input units (pixels in [0, 1]).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import data as zdata
from ..certify import Certificate, certified_accuracy, certify
from ..oracle import BaseOracle
from .oracle import ModuleOracle
from .params import ParamGroup, ParamView, preserved_buffers
from .tasks import ModuleTaskMixin

METHODS = ("fo-ds", "zo-ae-ds", "deepzero")


# -- the black box as a torch stage ---------------------------------------------------------
class BlackBoxStage(nn.Module):
    """A classifier API as a parameter-free, non-differentiable torch stage.

    ``forward(images (n, C, H, W)) -> logits (n, K)`` in the images' dtype and device; every call
    is one ``api.predict`` (which splits it into requests of at most its ``max_batch``). There is
    no autograd through it: only zeroth-order methods can train what lies in front of it.

    Args:
        api: any :class:`oracles.classifier.ClassifierAPI` (``predict`` + ``queries``).
    """

    def __init__(self, api: Any):
        super().__init__()
        if not callable(getattr(api, "predict", None)):
            raise TypeError(f"api must have a predict method, got {type(api).__name__}")
        self.api = api

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.fx.Proxy):
            # Not traceable on purpose: the engine then sees the stage as one opaque node, which
            # per_sample_modules=(BlackBoxStage,) lets it feed all queries of a chunk at once.
            raise TypeError("BlackBoxStage calls a remote API and cannot be traced")
        host = images.detach().to("cpu", torch.float32).contiguous().numpy()
        logits = np.asarray(self.api.predict(host), dtype=np.float32)
        return torch.from_numpy(logits).to(device=images.device, dtype=images.dtype)

    def extra_repr(self) -> str:
        return f"api={type(self.api).__name__}"


class FrozenModule(nn.Module):
    """A module used as a fixed function: always in eval mode (BatchNorm uses its running
    statistics, whatever mode the surrounding model is put in), its parameters frozen.
    Autograd still flows through it to whatever lies in front of it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenModule:
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class CountingClassifier(FrozenModule):
    """A white-box classifier module that stays in eval mode and counts the images it sees.

    For FO-DS: autograd flows through it to the denoiser; its own weights are frozen (the
    owner's BatchNorm statistics never move). ``images`` counts forward images (a white-box
    forward, not an API query).
    """

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self.images = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.images += int(images.shape[0])
        return self.module(images)


class DenoisedClassifier(nn.Module):
    """``classifier(denoiser(x))``.

    Only the denoiser is trainable (give a frozen classifier: a :class:`BlackBoxStage` or a
    :class:`CountingClassifier`). ``(n, C, H, W)`` images in, ``(n, K)`` logits out.
    """

    def __init__(self, denoiser: nn.Module, classifier: nn.Module):
        super().__init__()
        self.denoiser = denoiser
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.denoiser(x))


# -- DeepZero -------------------------------------------------------------------------------
def deepzero_oracle(
    denoiser: nn.Module,
    api: Any,
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
    groups: Sequence[Any], coords: int, *, estimate_other: bool | None = None
) -> tuple[list[Any], float]:
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
        groups: ``ParamView.groups`` (``.name``, ``.start``, ``.stop``, ``.kind``).
        coords: coordinates per step, ``q``.
        estimate_other: True: biases / BatchNorm always in the mask (an error if they do not
            fit); False: sampled like the weights; None: True when they fit.

    Returns:
        ``(mask_groups, sparsity)``: the groups to give the mask (``DenoiserTask(groups=...)``)
        and the sparsity of their prunable part.
    """
    if isinstance(coords, bool) or not isinstance(coords, int | np.integer) or coords < 1:
        raise ValueError(f"coords must be a positive integer, got {coords!r}")
    other = sum(g.stop - g.start for g in groups if g.kind != "weight")
    layers = [g.stop - g.start for g in groups if g.kind == "weight"]
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
    mask_groups = [
        ParamGroup(
            g.name, g.start, g.stop, tuple(getattr(g, "shape", (g.stop - g.start,))), "weight"
        )
        for g in groups
    ]
    total = sum(g.stop - g.start for g in mask_groups)
    if not len(mask_groups) <= coords <= total:
        raise ValueError(
            f"coords={coords} must lie between {len(mask_groups)} (one per parameter tensor) "
            f"and {total} (all parameters)"
        )
    return mask_groups, (total - coords) / total


# -- FO-DS ----------------------------------------------------------------------------------
def fo_ds_oracle(denoiser: nn.Module, classifier: nn.Module) -> ModuleOracle:
    """The white-box oracle: ``CE(classifier(denoiser(inputs)), targets)`` with autograd through
    the (frozen, eval-mode) classifier. Trainer method ``"fo"``. The classifier's forward images
    are counted in ``oracle.module.classifier.images``."""
    model = DenoisedClassifier(denoiser, CountingClassifier(classifier))
    return ModuleOracle(model, F.cross_entropy, engine=False)


# -- ZO-AE-DS -------------------------------------------------------------------------------
class ConvAutoEncoder(nn.Module):
    """A small convolutional autoencoder with a flat latent code of ``latent_dim`` numbers.

    Encoder: conv3x3(C -> w)-BN-ReLU, then stride-2 conv4x4-BN-ReLU stages (channels doubling,
    at most ``8w``) until the side is at most ``min_side``, flatten, linear -> ``latent_dim``.
    Decoder: the mirror image, ending in a sigmoid (pixels in [0, 1]).
    ``image_size`` must be divisible by ``2**stages``.

    Args:
        channels: image channels C.
        image_size: image side H = W.
        latent_dim: length of the code (ZO-AE-DS estimates its gradient coordinate-wise).
        width: channels w of the first conv.
        min_side: stop downsampling at this side (default 4).
        batch_norm: BatchNorm after the hidden convs (False: conv-ReLU only).
    """

    def __init__(
        self,
        channels: int,
        image_size: int,
        latent_dim: int,
        width: int = 16,
        min_side: int = 4,
        *,
        batch_norm: bool = True,
    ):
        super().__init__()
        for name, value in (
            ("channels", channels),
            ("image_size", image_size),
            ("latent_dim", latent_dim),
            ("width", width),
            ("min_side", min_side),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        side, chans = image_size, [width]
        while side > min_side and side % 2 == 0:
            side //= 2
            chans.append(min(2 * chans[-1], 8 * width))

        # BatchNorm after every hidden conv: without it, on mostly-black images (MNIST) the
        # ReLUs can all die early and the decoder collapses to one constant image.
        def act(c: int) -> list[nn.Module]:
            return [nn.BatchNorm2d(c), nn.ReLU()] if batch_norm else [nn.ReLU()]

        enc: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), *act(width)]
        dec: list[nn.Module] = []
        for c_in, c_out in zip(chans, chans[1:], strict=False):
            enc += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), *act(c_out)]
            dec = [nn.ConvTranspose2d(c_out, c_in, 4, stride=2, padding=1), *act(c_in), *dec]
        flat = chans[-1] * side * side
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(flat, latent_dim))
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, flat),
            nn.ReLU(),
            nn.Unflatten(1, (chans[-1], side, side)),
            *dec,
            nn.Conv2d(width, channels, 3, padding=1),
            nn.Sigmoid(),
        )
        self.latent_dim = latent_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``(n, C, H, W)`` of images ``(n, C, H, W)``."""
        return self.decoder(self.encoder(x))


class AutoencoderZOOracle(BaseOracle):
    """ZO-AE-DS: ``f(x) = mean_i CE(api(decoder(encoder(denoiser(inputs_i)))), targets_i)``.

    ``x`` is the flat vector of the denoiser's then the encoder's parameters (the decoder is
    frozen, as in ZO-AE-DS's end-to-end stage). :meth:`loss_and_grad` estimates the per-sample
    gradient w.r.t. the latent code ``z_i`` by central differences over its ``d`` coordinates,
    ``g_i[k] = (l_i(z_i + mu e_k) - l_i(z_i - mu e_k)) / (2 mu)``, then backpropagates the
    surrogate ``mean_i <z_i, g_i>`` through encoder and denoiser.

    Costs ``2 d + 1`` queries per gradient (each query: the batch's ``B`` images sent to the API).

    Args:
        denoiser, encoder, decoder: torch modules; ``encoder(denoiser(x))`` is ``(B, d)``.
        api: the classifier API (``predict``).
        mu: finite-difference step in latent units (ZO-AE-DS: 0.005).
        chunk_images: most perturbed images decoded and sent per ``predict`` call.
        max_queries: query budget (see :class:`~zoopt.BaseOracle`).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        encoder: nn.Module,
        decoder: nn.Module,
        api: Any,
        *,
        mu: float = 5e-3,
        chunk_images: int = 4096,
        max_queries: int | None = None,
    ):
        if not (isinstance(mu, int | float) and mu > 0 and math.isfinite(mu)):
            raise ValueError(f"mu must be a positive finite number, got {mu!r}")
        if isinstance(chunk_images, bool) or not isinstance(chunk_images, int) or chunk_images < 1:
            raise ValueError(f"chunk_images must be a positive integer, got {chunk_images!r}")
        if not callable(getattr(api, "predict", None)):
            raise TypeError(f"api must have a predict method, got {type(api).__name__}")
        self.trainable = nn.Sequential(denoiser, encoder)
        self.view = ParamView(self.trainable)
        super().__init__(self.view.dim, max_queries=max_queries)
        self.decoder = decoder.eval().requires_grad_(False)
        self.api = api
        self.mu = float(mu)
        self.chunk_images = chunk_images
        self.inputs: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        self.grad_evaluations = 0

    def __repr__(self) -> str:
        return f"AutoencoderZOOracle(dim={self.dim}, mu={self.mu}, queries={self.queries})"

    def set_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Use ``inputs (B, C, H, W)`` and integer ``targets (B,)`` for the following queries."""
        if inputs.ndim != 4 or targets.ndim != 1 or inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"need inputs (B, C, H, W) and targets (B,), got {tuple(inputs.shape)} and "
                f"{tuple(targets.shape)}"
            )
        self.inputs = inputs.to(self.view.device, self.view.dtype)
        self.targets = targets.to(self.view.device)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inputs is None or self.targets is None:
            raise ValueError("no minibatch: call set_batch(inputs, targets) first")
        return self.inputs, self.targets

    def sample_losses(self, latents: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-image CE ``(m,)`` float64 of ``api(decoder(latents))`` against ``targets`` (m,);
        sends m images, ``chunk_images`` per call. No autograd. float64 so that the differences
        divided by ``2 mu`` are not float32 rounding noise."""
        out = []
        with torch.no_grad():
            for s in range(0, latents.shape[0], self.chunk_images):
                images = self.decoder(latents[s : s + self.chunk_images])
                host = images.detach().to("cpu", torch.float32).contiguous().numpy()
                logits = torch.from_numpy(np.asarray(self.api.predict(host), dtype=np.float32))
                logits = logits.to(latents.device, torch.float64)
                out.append(
                    F.cross_entropy(logits, targets[s : s + self.chunk_images], reduction="none")
                )
        return torch.cat(out)

    def latent_gradients(self, latents: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Central-difference CGE of each sample's loss w.r.t. its latent code: ``(B, d)``.

        Sends ``2 d B`` images: row ``k`` of the query block shifts coordinate ``k`` of every
        sample's code by ``+mu`` (first half) or ``-mu`` (second half).
        """
        b, d = latents.shape
        eye = torch.eye(d, dtype=latents.dtype, device=latents.device)
        steps = torch.cat([eye, -eye]) * self.mu  # (2d, d)
        shifted = latents.unsqueeze(0) + steps.unsqueeze(1)  # (2d, B, d)
        losses = self.sample_losses(shifted.reshape(2 * d * b, d), targets.repeat(2 * d))
        losses = losses.view(2, d, b)
        grads = (losses[0] - losses[1]) / (2 * self.mu)
        return grads.T.to(latents.dtype).contiguous()

    def base_value(self, x: torch.Tensor) -> float:
        """``f(x)``: the training forward (updates BatchNorm running statistics); 1 query."""
        x = self.view.check_flat(x, "x")
        inputs, targets = self._batch()
        self._charge(1)
        with torch.no_grad(), self.view.loaded(x):
            latents = self.trainable(inputs)
            value = float(self.sample_losses(latents, targets).mean())
        self._track_best(torch.tensor([value]), lambda i: x)
        return value

    def loss_and_grad(
        self, x: torch.Tensor, *, update_stats: bool = True
    ) -> tuple[float, torch.Tensor]:
        """``(f(x), ZO-AE-DS gradient (dim,))``; ``2 d + 1`` queries (charged before sending)."""
        x = self.view.check_flat(x, "x")
        inputs, targets = self._batch()
        stats = contextlib.nullcontext() if update_stats else preserved_buffers(self.trainable)
        with self.view.loaded(x), stats, torch.enable_grad():
            latents = self.trainable(inputs)
            if latents.ndim != 2:
                raise ValueError(
                    f"the encoder must return codes (B, d), got {tuple(latents.shape)}"
                )
            self._charge(2 * latents.shape[1] + 1)
            code = latents.detach()
            value = float(self.sample_losses(code, targets).mean())
            grads_z = self.latent_gradients(code, targets)
            surrogate = (latents * grads_z).sum() / latents.shape[0]
            grads = torch.autograd.grad(surrogate, self.view.params, allow_unused=True)
        flat = torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).reshape(-1)
                for p, g in zip(self.view.params, grads, strict=True)
            ]
        )
        self.grad_evaluations += 1
        self._track_best(torch.tensor([value]), lambda i: x)
        return value, flat.detach()

    def _evaluate(self, X: Any) -> Any:
        """Loss at each row of ``X`` ``(n, dim)`` (B images each); running statistics untouched."""
        inputs, targets = self._batch()
        as_numpy = isinstance(X, np.ndarray)
        Xt = torch.as_tensor(X, device=self.view.device, dtype=self.view.dtype)
        out = torch.empty(Xt.shape[0], dtype=torch.float64)
        with torch.no_grad(), preserved_buffers(self.trainable):
            for i in range(Xt.shape[0]):
                with self.view.loaded(Xt[i]):
                    out[i] = self.sample_losses(self.trainable(inputs), targets).mean()
        return out.numpy() if as_numpy else out


# -- tasks for the trainer ------------------------------------------------------------------
def add_noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``images + N(0, sigma^2)``, float32, same shape."""
    noise = rng.standard_normal(images.shape, dtype=np.float32)
    noise *= np.float32(sigma)
    return noise + images


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode and restore its previous mode on exit."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _check_images_labels(name: str, pair: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = pair
    if X.ndim != 4 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise ValueError(f"{name} must be (X (n, C, H, W), y (n,)), got {X.shape} and {y.shape}")


class _TaskBase(ModuleTaskMixin):
    """Batching shared by the tasks below; parameters and buffers (BatchNorm statistics in
    checkpoints) come from :class:`~zoopt.torch.tasks.ModuleTaskMixin`."""

    X_train: np.ndarray
    batch_size: int
    device: torch.device

    def steps_per_epoch(self) -> int:
        return -(-self.X_train.shape[0] // self.batch_size)

    def _tensor(self, a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(a, device=self.device, dtype=dtype)


class DenoiserTask(_TaskBase):
    """Denoised-smoothing training for :class:`~zoopt.torch.train.Trainer`.

    A batch is ``(x + delta, y)``: clean images ``x`` with one Gaussian noise draw ``delta``
    (``sigma``), drawn from the trainer's per-epoch generator, so every query of a step sees the
    same noise; ``y`` is the classifier's own label of the clean ``x``.

    Args:
        model: the module holding the trained parameters and buffers (e.g. the denoiser, or
            denoiser + encoder); switched between train and eval mode by this task.
        oracle: a ModuleOracle or :class:`AutoencoderZOOracle` over the trained parameters.
        train: ``(X, y)``: clean images ``(n, C, H, W)`` float32 and the classifier's labels.
        test: ``(X, y)`` for the per-epoch check.
        sigma: noise standard deviation, in pixel units.
        batch_size: B.
        evaluate_labels: ``images (m, C, H, W) -> labels (m,)`` of the defended pipeline (through
            the API: each epoch's check costs ``len(test)`` queries of one image).
        grasp_per_class: images per class in the ZO-GraSP scoring batch.
        device: where the trained modules live.
        groups: the parameter groups DeepZero's mask and ZO-GraSP see (default the oracle's
            ``view.groups``; :func:`deepzero_budget` may relabel them all prunable).
    """

    def __init__(
        self,
        model: nn.Module,
        oracle: Any,
        train: tuple[np.ndarray, np.ndarray],
        test: tuple[np.ndarray, np.ndarray],
        *,
        sigma: float,
        batch_size: int,
        evaluate_labels: Callable[[np.ndarray], np.ndarray],
        grasp_per_class: int = 2,
        device: str | torch.device = "cpu",
        seed: int = 0,
        groups: Sequence[Any] | None = None,
    ):
        _check_images_labels("train", train)
        _check_images_labels("test", test)
        if not (isinstance(sigma, int | float) and sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = model.train()
        self.oracle = oracle
        self.groups = list(oracle.view.groups if groups is None else groups)
        self.X_train, self.y_train = train
        self.X_test, self.y_test = test
        self.sigma = float(sigma)
        self.batch_size = batch_size
        self.evaluate_labels = evaluate_labels
        self.grasp_per_class = int(grasp_per_class)
        self.device = torch.device(device)
        # one fixed noise draw for the per-epoch check, so epochs are comparable
        self._test_noisy = add_noise(self.X_test, self.sigma, np.random.default_rng([seed, 7]))

    def _noisy_batch(self, X: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple:
        noisy = add_noise(X, self.sigma, rng)
        return self._tensor(noisy, torch.float32), self._tensor(y, torch.long)

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[tuple]:
        for Xb, yb in zdata.batches(self.X_train, self.y_train, self.batch_size, rng):
            yield self._noisy_batch(Xb, yb, rng)

    def scoring_batch(self, rng: np.random.Generator) -> tuple:
        Xs, ys = zdata.class_balanced_sample(self.X_train, self.y_train, self.grasp_per_class, rng)
        return self._noisy_batch(Xs, ys, rng)

    def evaluate(self) -> dict[str, float]:
        """Accuracy of the defended pipeline on the noisy test images (eval mode)."""
        with eval_mode(self.model):
            labels = np.asarray(self.evaluate_labels(self._test_noisy))
        # "test_accuracy" is the key the trainer's progress bar shows
        return {"test_accuracy": float(np.mean(labels == self.y_test))}


class ReconstructionTask(_TaskBase):
    """Mean-squared-error training of an image-to-image module (no classifier involved).

    Batches are ``(x + delta, x)`` (``delta ~ N(0, sigma^2)``; ``sigma = 0``: plain
    reconstruction): MSE pretraining of the denoiser (Salman et al.) and of ZO-AE-DS's
    autoencoder, both white-box on the defender's own modules, trained by the same Trainer
    (method ``"fo"``).

    Args:
        model: maps ``(n, C, H, W)`` to ``(n, C, H, W)``.
        train, test: clean images ``(n, C, H, W)`` float32.
        sigma: input noise (0 for none).
        batch_size: B.
        device: where ``model`` lives.
    """

    def __init__(
        self,
        model: nn.Module,
        train: np.ndarray,
        test: np.ndarray,
        *,
        sigma: float = 0.0,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ):
        for name, X in (("train", train), ("test", test)):
            if X.ndim != 4:
                raise ValueError(f"{name} must be images (n, C, H, W), got shape {X.shape}")
        if not (isinstance(sigma, int | float) and sigma >= 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).train()
        self.oracle = ModuleOracle(self.model, F.mse_loss, engine=False)
        self.groups = self.oracle.view.groups
        self.X_train, self.X_test = train, test
        self.sigma = float(sigma)
        self.batch_size = int(batch_size)
        rng = np.random.default_rng([seed, 7])
        self._test_inputs = add_noise(test, self.sigma, rng) if self.sigma else test

    def _pair(self, X: np.ndarray, rng: np.random.Generator) -> tuple:
        inputs = add_noise(X, self.sigma, rng) if self.sigma else X
        return self._tensor(inputs, torch.float32), self._tensor(X, torch.float32)

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[tuple]:
        labels = np.zeros(self.X_train.shape[0], dtype=np.int64)
        for Xb, _ in zdata.batches(self.X_train, labels, self.batch_size, rng):
            yield self._pair(Xb, rng)

    def scoring_batch(self, rng: np.random.Generator) -> tuple:
        idx = rng.choice(self.X_train.shape[0], size=min(64, self.X_train.shape[0]), replace=False)
        return self._pair(self.X_train[idx], rng)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        with eval_mode(self.model):
            out = self.model(self._tensor(self._test_inputs, torch.float32))
            mse = float(F.mse_loss(out, self._tensor(self.X_test, torch.float32)))
        return {"test_mse": mse}


# -- the defended pipeline as a numpy function (evaluation, certification) ------------------
def pipeline_preprocess(
    *modules: nn.Module, device: str | torch.device = "cpu", batch: int = 4096
) -> Callable[[np.ndarray], np.ndarray]:
    """``images (m, C, H, W) float32 -> modules[-1](...modules[0](images))`` as float32 numpy.

    Runs under ``torch.no_grad`` in ``batch``-sized pieces with the modules in whatever mode they
    are in (put them in eval mode for evaluation: :func:`eval_mode`).
    """
    dev = torch.device(device)

    def run(images: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for s in range(0, images.shape[0], batch):
                h = torch.as_tensor(np.ascontiguousarray(images[s : s + batch]), device=dev)
                for m in modules:
                    h = m(h)
                out.append(h.to("cpu", torch.float32).contiguous().numpy())
        return np.concatenate(out) if len(out) > 1 else out[0]

    return run


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
    _check_images_labels("images/labels", (images, labels))
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
