"""The correction network ``N(s, Re)`` and the scaling it is fitted with."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from .config import check_network_shape

if TYPE_CHECKING:
    from .config import SolSettings


@dataclass(frozen=True)
class Normalization:
    """Input/output scaling of :class:`CorrectionCNN`, fitted on the training data.

    Attributes:
        velocity_mean, velocity_std: per velocity channel (u_x, u_y) of the states.
        log_re_mean, log_re_std: of ``ln Re`` over the training simulations (the Re input
            channel is ``(ln Re - mean) / std``: Re values are spread geometrically).
        correction_std: per channel, the RMS of the ideal one-step corrections; the network's
            output is multiplied by it and the losses divide errors by it.
    """

    velocity_mean: tuple[float, float]
    velocity_std: tuple[float, float]
    log_re_mean: float
    log_re_std: float
    correction_std: tuple[float, float]

    def __post_init__(self) -> None:
        for name in ("velocity_std", "correction_std"):
            if not all(math.isfinite(v) and v > 0 for v in getattr(self, name)):
                raise ValueError(f"{name} must be positive and finite, got {getattr(self, name)}")
        if not (math.isfinite(self.log_re_std) and self.log_re_std > 0):
            raise ValueError(f"log_re_std must be positive, got {self.log_re_std}")

    @classmethod
    def fit(
        cls, states: np.ndarray, reynolds: Sequence[float] | np.ndarray, corrections: np.ndarray
    ) -> Normalization:
        """From states ``(..., 2, H, W)``, the training Re and corrections ``(..., 2, H, W)``."""
        s = np.asarray(states, dtype=np.float64)
        c = np.asarray(corrections, dtype=np.float64)
        if s.ndim < 3 or s.shape[-3] != 2 or c.ndim < 3 or c.shape[-3] != 2:
            raise ValueError(
                f"states and corrections need shape (..., 2, H, W), got {s.shape} and {c.shape}"
            )
        s = np.moveaxis(s, -3, 0).reshape(2, -1)
        c = np.moveaxis(c, -3, 0).reshape(2, -1)
        log_re = np.log(np.asarray(reynolds, dtype=np.float64))
        # one Re: the channel is constant, so any positive std just centres it
        log_re_std = float(log_re.std()) if log_re.size > 1 and log_re.std() > 0 else 1.0
        return cls(
            velocity_mean=tuple(float(v) for v in s.mean(axis=1)),
            velocity_std=tuple(float(max(v, 1e-6)) for v in s.std(axis=1)),
            log_re_mean=float(log_re.mean()),
            log_re_std=log_re_std,
            correction_std=tuple(float(max(v, 1e-8)) for v in np.sqrt((c**2).mean(axis=1))),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class CorrectionModel(Protocol):
    """What the correction oracles need from a network: ``model(states (B, 2, H, W),
    reynolds (B,)) -> corrections (B, 2, H, W)`` and the per-channel scale the losses divide
    errors by, a ``correction_std`` buffer ``(1, 2, 1, 1)`` (a buffer, so a checkpoint
    restores it). :class:`CorrectionCNN` is one."""

    correction_std: torch.Tensor

    def __call__(self, states: torch.Tensor, reynolds: torch.Tensor) -> torch.Tensor: ...


class CorrectionCNN(nn.Module):
    """A small fully convolutional correction network ``N(s, Re) -> corrections``.

    Input: the normalized velocity (2 channels) and the normalized ``ln Re`` as a constant
    third channel; ``depth`` 'same'-padded ``kernel_size`` convolutions with ``width``
    channels and tanh in between (smooth, so finite differences see no kinks); output: 2
    channels times :attr:`Normalization.correction_std`, added to the velocity *values*. The
    top row of u_y (the top wall, ignored by the solver) is always 0.

    Args:
        normalization: see :class:`Normalization` (kept in buffers, so checkpoints carry it).
        width: hidden channels.
        depth: number of convolutions (>= 2).
        kernel_size: odd kernel size.
        final_gain: scale of the last convolution's initial weights (its bias starts at 0).
            Keep the default 1 for ZO-GraSP: its scores are ``-θ ⊙ Hg``, so a shrunken output
            layer scores ~0 and gets almost no coordinates (0.1 left 1 of 144 weights).

    With 8 channels, 3 layers and 5x5 kernels it has 2,618 parameters (3x3: 954).
    """

    correction_std: torch.Tensor

    def __init__(
        self,
        normalization: Normalization,
        *,
        width: int = 8,
        depth: int = 3,
        kernel_size: int = 5,
        final_gain: float = 1.0,
    ):
        super().__init__()
        check_network_shape(width, depth, kernel_size)
        if not isinstance(normalization, Normalization):
            raise TypeError(f"normalization must be a Normalization, got {normalization!r}")
        self.normalization = normalization
        pad = kernel_size // 2
        channels = [3] + [width] * (depth - 1) + [2]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
            layers.append(nn.Conv2d(c_in, c_out, kernel_size, padding=pad))
            if i < depth - 1:
                layers.append(nn.Tanh())
        self.body = nn.Sequential(*layers)
        with torch.no_grad():
            last = self.body[-1]
            last.weight.mul_(final_gain)
            last.bias.zero_()
        n = normalization
        self.register_buffer("velocity_mean", _channel_tensor(n.velocity_mean))
        self.register_buffer("velocity_std", _channel_tensor(n.velocity_std))
        self.register_buffer("correction_std", _channel_tensor(n.correction_std))
        self.register_buffer("log_re", torch.tensor([n.log_re_mean, n.log_re_std]))

    def forward(self, states: torch.Tensor, reynolds: torch.Tensor) -> torch.Tensor:
        """Corrections ``(B, 2, H, W)`` for states ``(B, 2, H, W)`` and Re ``(B,)``."""
        b, _, h, w = states.shape
        velocity = (states - self.velocity_mean) / self.velocity_std
        re = (torch.log(reynolds.to(states.dtype)) - self.log_re[0]) / self.log_re[1]
        re = re.reshape(b, 1, 1, 1).expand(b, 1, h, w)
        out = self.body(torch.cat([velocity, re], dim=1)) * self.correction_std
        # u_y's top row is the top wall: the solver ignores it, so the loss should too
        u_y = nn.functional.pad(out[:, 1:, :-1], (0, 0, 0, 1))
        return torch.cat([out[:, :1], u_y], dim=1)


def _channel_tensor(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32).reshape(1, 2, 1, 1)


def build_model(settings: SolSettings, normalization: Normalization) -> CorrectionCNN:
    """The correction CNN of ``settings`` with initial weights seeded by ``settings.seed``
    (so every trained method starts from the same network)."""
    torch.manual_seed(settings.seed)
    return CorrectionCNN(
        normalization,
        width=settings.width,
        depth=settings.depth,
        kernel_size=settings.kernel_size,
    )
