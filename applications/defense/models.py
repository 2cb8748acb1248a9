"""The defender's modules: the denoiser, the denoised classifier, ZO-AE-DS's autoencoder.

The experiment's denoiser is a DnCNN (:class:`oracles.dncnn.DnCNN`, Zhang et al. 2017);
images are float32 ``(n, C, H, W)`` pixels in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from oracles.dncnn import DnCNN

from .config import DefenseConfig


def build_denoiser(config: DefenseConfig, channels: int) -> DnCNN:
    """The DnCNN of ``config.denoiser`` (depth x width) for ``channels``-channel images, on
    ``config.device``, initialized from ``config.seed`` (the same init for every method)."""
    torch.manual_seed(config.seed)
    return DnCNN(channels, depth=config.denoiser.depth, features=config.denoiser.width).to(
        config.device
    )


def pipeline_preprocess(
    *modules: nn.Module, device: str | torch.device = "cpu", batch: int = 4096
) -> Callable[[np.ndarray], np.ndarray]:
    """``images (m, C, H, W) float32 -> modules[-1](...modules[0](images))`` as float32 numpy:
    the defender's part of the pipeline, in front of the API.

    Runs under ``torch.no_grad`` in ``batch``-sized pieces with the modules in whatever mode they
    are in (put them in eval mode for evaluation: :func:`zoopt.torch.blackbox.eval_mode`).
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


class DenoisedClassifier(nn.Module):
    """``classifier(denoiser(x))``: ``(n, C, H, W)`` images in, ``(n, K)`` logits out.

    Only the denoiser is trainable: give a frozen classifier (a
    :class:`~zoopt.torch.blackbox.BlackBoxStage` or a
    :class:`~zoopt.torch.blackbox.CountingClassifier`).
    """

    def __init__(self, denoiser: nn.Module, classifier: nn.Module):
        super().__init__()
        self.denoiser = denoiser
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.denoiser(x))


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
