"""Plain-torch models for the DeepZero experiments (no torchvision).

The sparse-CGE engine takes any model (it traces the forward); these are the paper's. Each
is also *staged*: its forward is the composition of an ordered list of modules,
``model.stages()`` (the children of its ``body`` :class:`~torch.nn.Sequential`, with residual
stages expanded into their blocks), which the block-reuse reference (the DeepZero authors'
stage-granular feature reuse) reruns from. Images are ``(batch, channels, height, width)``;
logits ``(batch, classes)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ConvBNAct(nn.Sequential):
    """3x3 conv (→ BatchNorm) → ReLU (→ 2x2 max-pool): one stage of the plain CNNs.

    Without BatchNorm the conv carries a bias (with it the bias would be redundant).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        batch_norm: bool = True,
        pool: bool = False,
    ):
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=not batch_norm)
        ]
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
        if pool:
            layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)


class PadShortcut(nn.Module):
    """Option-A residual shortcut (He et al. 2016, CIFAR): subsample, zero-pad new channels.

    Parameter-free. ``(B, C, H, W) -> (B, C + 2*pad, ceil(H/stride), ceil(W/stride))`` with
    ``pad = (out_channels - in_channels) // 2`` zero channels on each side.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels or (out_channels - in_channels) % 2:
            raise ValueError(
                f"option-A shortcut needs out_channels - in_channels even and >= 0, got "
                f"{in_channels} -> {out_channels}"
            )
        self.pad = (out_channels - in_channels) // 2
        self.stride = int(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return nn.functional.pad(x, (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}, stride={self.stride}"


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN, plus shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:  # option B: projection
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Head(nn.Sequential):
    """Global average pool → flatten → linear classifier."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))


class StagedModel(nn.Module):
    """A model whose forward is ``body``, an :class:`~torch.nn.Sequential` of stages."""

    body: nn.Sequential

    def stages(self) -> list[nn.Module]:
        """The ordered stages; composing them is the forward."""
        return list(self.body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class SmallCNN(StagedModel):
    """A few-thousand-parameter CNN for 8x8 digit images (sklearn ``load_digits``).

    Stages: conv(in→8)-BN-ReLU, conv(8→16, stride 2)-BN-ReLU, flatten-linear. With the
    defaults (1 channel, 8x8, 10 classes) it has 3,842 parameters.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8):
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        side = (image_size + 1) // 2  # stride-2 conv with padding 1
        self.body = nn.Sequential(
            ConvBNAct(in_channels, 8),
            ConvBNAct(8, 16, stride=2),
            nn.Sequential(nn.Flatten(), nn.Linear(16 * side * side, num_classes)),
        )


class ResNet20(StagedModel):
    """ResNet-20 for CIFAR (He et al. 2016): 3 stages x 3 BasicBlocks, 16/32/64 channels.

    ``shortcut="A"`` (default, as in the paper's CIFAR experiments): parameter-free
    subsample + zero-pad shortcut, 0.27M parameters; ``"B"``: 1x1 conv + BN projection.
    Stages for the engine: the stem, each of the 9 blocks, the head.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, shortcut: str = "A"):
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels)
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.shortcut = shortcut
        layers: list[nn.Module] = [ConvBNAct(in_channels, 16)]
        channels = 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [BasicBlock(channels, width, stride, shortcut)]
            blocks += [BasicBlock(width, width, 1, shortcut) for _ in range(2)]
            layers.append(nn.Sequential(*blocks))
            channels = width
        layers.append(Head(channels, num_classes))
        self.body = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stages(self) -> list[nn.Module]:
        """Stem, the nine residual blocks in order, head."""
        out: list[nn.Module] = []
        for child in self.body:  # residual stages are plain Sequentials of blocks
            out.extend(child if type(child) is nn.Sequential else [child])
        return out


class CNN8(StagedModel):
    """The 8-layer CNN of DeepZero's CGE-vs-RGE study, with configurable ``width``.

    Six 3x3 conv stages with ``w, w, 2w, 2w, 4w, 4w`` channels (2x2 max-pool after every
    second), then linear(4w·(s/8)² → 4w)-ReLU and linear(4w → classes). About ``535·w²``
    parameters at 32x32 input, so the dimension grows quadratically with the width.
    ``image_size`` must be divisible by 8.
    """

    def __init__(
        self,
        width: int = 16,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        batch_norm: bool = True,
    ):
        super().__init__()
        _check_positive(
            width=width, num_classes=num_classes, in_channels=in_channels, image_size=image_size
        )
        if image_size % 8:
            raise ValueError(f"CNN8 needs image_size divisible by 8, got {image_size}")
        chans = [in_channels, width, width, 2 * width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = [
            ConvBNAct(chans[i], chans[i + 1], batch_norm=batch_norm, pool=i % 2 == 1)
            for i in range(6)
        ]
        side = image_size // 8
        layers.append(
            nn.Sequential(nn.Flatten(), nn.Linear(4 * width * side * side, 4 * width), nn.ReLU())
        )
        layers.append(nn.Linear(4 * width, num_classes))
        self.body = nn.Sequential(*layers)


MODEL_NAMES = ("smallcnn", "resnet20", "cnn8")


def build_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    **options: object,
) -> StagedModel:
    """Build a model by name: ``"smallcnn"``, ``"resnet20"`` or ``"cnn8"``.

    ``options`` go to the constructor (``width`` and ``batch_norm`` for CNN8, ``shortcut``
    for ResNet-20). ResNet-20 works at any image size (global pooling).
    """
    builders: dict[str, Callable[..., StagedModel]] = {
        "smallcnn": lambda: SmallCNN(num_classes, in_channels, image_size, **options),
        "resnet20": lambda: ResNet20(num_classes, in_channels, **options),
        "cnn8": lambda: CNN8(
            num_classes=num_classes, in_channels=in_channels, image_size=image_size, **options
        ),
    }
    key = name.lower() if isinstance(name, str) else name
    if key not in builders:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    try:
        return builders[key]()
    except TypeError as exc:
        raise TypeError(f"bad options {options!r} for model {name!r}: {exc}") from exc


def stages_of(module: nn.Module) -> list[nn.Module]:
    """``module.stages()`` if it has them, the children of a Sequential, else ``[module]``."""
    if callable(getattr(module, "stages", None)):
        stages = list(module.stages())
    elif isinstance(module, nn.Sequential):
        stages = list(module)
    else:
        stages = [module]
    if not stages or not all(isinstance(s, nn.Module) for s in stages):
        raise TypeError(f"stages of {type(module).__name__} must be a non-empty list of modules")
    return stages
