"""DnCNN (Zhang et al., 2017): the denoiser placed in front of a black-box classifier.

``output = x - noise_estimate(x)`` (residual learning): the network predicts the noise and
subtracts it. Layout: conv+ReLU, then ``depth - 2`` x (conv + BN + ReLU), then a conv back
to the image channels. Module names follow the denoised-smoothing code (Salman et al. 2020):
one ``nn.Sequential`` called ``dncnn``, so its checkpoints' keys (``dncnn.0.weight``, ...)
load as they are.
"""

from __future__ import annotations

import torch
from torch import nn


class DnCNN(nn.Module):
    """Residual denoiser for images ``(n, channels, H, W)`` (any H, W); output has the same shape.

    Args:
        channels: image channels C (1 grey, 3 RGB, ...).
        depth: number of conv layers (17 in the paper), at least 2.
        features: channels of the hidden layers (64 in the paper).
        kernel_size: odd conv kernel size; padding keeps H and W.
        bn_eps, bn_momentum: BatchNorm settings of the denoised-smoothing DnCNN.
    """

    def __init__(
        self,
        channels: int = 3,
        depth: int = 17,
        features: int = 64,
        kernel_size: int = 3,
        *,
        bn_eps: float = 1e-4,
        bn_momentum: float = 0.95,
    ):
        super().__init__()
        for name, value, least in (
            ("channels", channels, 1),
            ("depth", depth, 2),
            ("features", features, 1),
            ("kernel_size", kernel_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep H and W, got {kernel_size}")
        self.channels = channels
        padding = kernel_size // 2

        def conv(c_in: int, c_out: int, bias: bool) -> nn.Conv2d:
            return nn.Conv2d(c_in, c_out, kernel_size, padding=padding, bias=bias)

        layers: list[nn.Module] = [conv(channels, features, bias=True), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [
                conv(features, features, bias=False),  # BN follows: a bias would be redundant
                nn.BatchNorm2d(features, eps=bn_eps, momentum=bn_momentum),
                nn.ReLU(inplace=True),
            ]
        layers.append(conv(features, channels, bias=False))
        self.dncnn = nn.Sequential(*layers)
        self._init_weights()

    def _init_weights(self) -> None:
        # Orthogonal convs keep activations well scaled through 17 layers (as in the paper's code).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.orthogonal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def noise_estimate(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted noise ``(n, C, H, W)`` in ``x``."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"expected images of shape (n, {self.channels}, H, W), got {tuple(x.shape)}"
            )
        return self.dncnn(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoised images ``x - noise_estimate(x)``, shape ``(n, C, H, W)``."""
        return x - self.noise_estimate(x)
