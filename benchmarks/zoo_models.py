"""A zoo of classifiers written in *other people's* PyTorch habits, to test the engine on them.

The models in :mod:`zoopt.torch.models` are written the way our engine likes them: staged,
out-of-place, an ``nn.Sequential`` body. Models users bring along are not. This module
re-creates, from scratch and in plain torch, the coding habits of widely used public PyTorch
code (akamaster's CIFAR ResNet with its ``LambdaLayer``, kuangliu's pytorch-cifar ResNet,
torchvision's ResNet/VGG/MobileNetV2, timm's ViT and MLP-Mixer) plus a few hand-made models
with habits that break naive assumptions: data-dependent Python control flow in ``forward``
(not ``torch.fx``-traceable), in-place tensor ops (``F.relu_``, ``add_``, ``mul_``, ``+=``),
and less common layers (GroupNorm, SiLU, Hardswish, ``padding="same"``, reflect padding,
grouped and depthwise-multiplier convs, branch concatenation).

None of the code is copied; each model imitates the *style* of its namesake. Every entry of
:data:`ZOO` builds a benchmark-size model (CPU-friendly at batch 32) and a tiny test-size one
(at most ~20k parameters, except ``ours_resnet20``). Factories never seed: the caller does.

    python benchmarks/zoo_models.py     # build everything, check it, print a table
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------
# 0. Shared building blocks: what the styles below have in common. Each style keeps its own
#    forward and its own habits (the option-A pad, ``+=``, ``F.relu_``, a reused inplace ReLU,
#    ``view`` vs ``flatten``...): those are what the engine is tested on.
# --------------------------------------------------------------------------------------------


def conv3x3(
    in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1
) -> nn.Conv2d:
    """3x3 convolution with padding"""
    return nn.Conv2d(
        in_planes,
        out_planes,
        kernel_size=3,
        stride=stride,
        padding=dilation,
        groups=groups,
        bias=False,
        dilation=dilation,
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def conv1x1_bn(in_planes: int, out_planes: int, stride: int = 1) -> nn.Sequential:
    """The projection shortcut of the residual blocks: 1x1 conv (no bias), then BatchNorm."""
    return nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


class TwoConvBody(nn.Module):
    """``conv1`` (3x3, ``stride``) → ``bn1`` → ``conv2`` (3x3) → ``bn2``: the body of every basic
    residual block here. Subclasses add their shortcut and write their own ``forward``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)


def make_stage(
    block: Callable[[int, int, int], nn.Module],
    in_planes: int,
    planes: int,
    num_blocks: int,
    stride: int,
    expansion: int = 1,
) -> tuple[list[nn.Module], int]:
    """``num_blocks`` blocks ``block(in, planes, stride)``, the first with ``stride``, the rest
    with 1; returns them and the stage's output width ``planes * expansion``."""
    layers = []
    for s in [stride] + [1] * (num_blocks - 1):
        layers.append(block(in_planes, planes, s))
        in_planes = planes * expansion
    return layers, in_planes


def torchvision_init(model: nn.Module, *, linear: bool) -> None:
    """torchvision's weight init: Kaiming-normal convs (fan-out, ReLU gain), zero conv biases,
    norm layers at weight 1 / bias 0, and with ``linear`` Linear weights N(0, 0.01), biases 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif linear and isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def timm_norm_and_head(embed_dim: int, num_classes: int) -> tuple[nn.LayerNorm, nn.Module]:
    """timm's final LayerNorm (eps 1e-6) and classifier head (``nn.Identity`` without classes)."""
    head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
    return nn.LayerNorm(embed_dim, eps=1e-6), head


# --------------------------------------------------------------------------------------------
# 1. akamaster/pytorch_resnet_cifar10 style: LambdaLayer option-A shortcut, kaiming init
# --------------------------------------------------------------------------------------------


def _weights_init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight)


class LambdaLayer(nn.Module):
    """Wraps an arbitrary Python callable as a module (akamaster style)."""

    def __init__(self, lambd: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.lambd = lambd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lambd(x)


class AkamasterBasicBlock(TwoConvBody):
    """CIFAR basic block with the option-A (``LambdaLayer`` pad) or option-B shortcut
    (``nn.Sequential()`` when the shape does not change)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "A"):
        super().__init__(in_planes, planes, stride)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if option == "A":
                # subsample spatially, zero-pad the new channels half on each side
                self.shortcut = LambdaLayer(
                    lambda x: F.pad(
                        x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0
                    )
                )
            elif option == "B":
                self.shortcut = conv1x1_bn(in_planes, self.expansion * planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class AkamasterResNet(nn.Module):
    """akamaster-style CIFAR ResNet whose blocks sit in one ``nn.ModuleList`` looped in forward."""

    def __init__(
        self, block: type[nn.Module], num_blocks: list[int], num_classes: int = 10, width: int = 16
    ):
        super().__init__()
        self.in_planes = width

        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks = []
        for i, planes in enumerate((width, 2 * width, 4 * width)):
            stage, self.in_planes = make_stage(
                block, self.in_planes, planes, num_blocks[i], 1 if i == 0 else 2, block.expansion
            )
            blocks += stage
        self.blocks = nn.ModuleList(blocks)
        self.linear = nn.Linear(4 * width, num_classes)

        self.apply(_weights_init)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        for blk in self.blocks:
            out = blk(out)
        out = F.avg_pool2d(out, out.size(3))
        out = out.reshape(out.size(0), -1)
        out = self.linear(out)
        return out


def akamaster_resnet20(num_classes: int = 10, width: int = 16) -> nn.Module:
    """ResNet-20 for CIFAR (3 x 3 basic blocks, widths w/2w/4w), akamaster style.

    ``width`` must be even (the option-A shortcut pads ``planes // 4`` channels per side).
    """
    if width < 2 or width % 2:
        raise ValueError(f"width must be even and >= 2, got {width}")
    return AkamasterResNet(AkamasterBasicBlock, [3, 3, 3], num_classes=num_classes, width=width)


# --------------------------------------------------------------------------------------------
# 2. kuangliu/pytorch-cifar style
# --------------------------------------------------------------------------------------------


class KuangliuBasicBlock(AkamasterBasicBlock):
    """pytorch-cifar basic block: ``nn.Sequential()`` identity or 1x1 conv + BN projection
    (akamaster's option B; the same forward)."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__(in_planes, planes, stride, option="B")


class KuangliuResNet(nn.Module):
    """pytorch-cifar ResNet: four ``layerN`` Sequentials, ``F.avg_pool2d(out, 4)``, ``view``."""

    def __init__(self, block, num_blocks, num_classes=10, width=64):
        super().__init__()
        self.in_planes = width

        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 2 * width, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, num_blocks[3], stride=2)
        self.linear = nn.Linear(8 * width * block.expansion, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
        layers, self.in_planes = make_stage(
            block, self.in_planes, planes, num_blocks, stride, block.expansion
        )
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = F.avg_pool2d(out, 4)
        out = out.view(out.size(0), -1)
        out = self.linear(out)
        return out


def kuangliu_resnet18(
    num_classes: int = 10, width: int = 64, num_blocks: tuple[int, ...] = (2, 2, 2, 2)
) -> nn.Module:
    """ResNet-18 for 32x32 inputs (widths w/2w/4w/8w), kuangliu pytorch-cifar style.

    The head's ``F.avg_pool2d(out, 4)`` assumes 32x32 inputs, as in the original.
    """
    return KuangliuResNet(KuangliuBasicBlock, list(num_blocks), num_classes, width)


# --------------------------------------------------------------------------------------------
# 3. torchvision.models.resnet style (Bottleneck, downsample, inplace ReLU reused)
# --------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """torchvision-style bottleneck (stride on the 3x3 conv, one inplace ReLU used 3 times)."""

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        # Both self.conv2 and self.downsample layers downsample the input when stride != 1
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class TorchvisionResNet(nn.Module):
    """torchvision-style ResNet: 7x7/2 stem + max-pool, ``_make_layer``, ``_forward_impl``."""

    def __init__(
        self,
        block: type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        width: int = 64,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer

        self.inplanes = width
        self.dilation = 1
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)

        torchvision_init(self, linear=False)

        # Zero-initialize the last BN in each residual branch, so that each block starts
        # as an identity.
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)

    def _make_layer(
        self, block: type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )

        layers = []
        layers.append(
            block(
                self.inplanes,
                planes,
                stride,
                downsample,
                self.groups,
                self.base_width,
                self.dilation,
                norm_layer,
            )
        )
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(
                    self.inplanes,
                    planes,
                    groups=self.groups,
                    base_width=self.base_width,
                    dilation=self.dilation,
                    norm_layer=norm_layer,
                )
            )

        return nn.Sequential(*layers)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)

        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_impl(x)


def torchvision_resnet50(
    num_classes: int = 10,
    width: int = 64,
    layers: tuple[int, int, int, int] = (3, 4, 6, 3),
    zero_init_residual: bool = False,
) -> nn.Module:
    """ResNet-50 (bottleneck blocks, ImageNet stem), torchvision style; any input >= 32x32."""
    return TorchvisionResNet(
        Bottleneck,
        list(layers),
        num_classes=num_classes,
        width=width,
        zero_init_residual=zero_init_residual,
    )


# --------------------------------------------------------------------------------------------
# 4. torchvision.models.vgg style
# --------------------------------------------------------------------------------------------

VGG11_CFG: list[str | int] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def make_layers(cfg: list[str | int], batch_norm: bool = False) -> nn.Sequential:
    """The VGG feature extractor from a config list (ints: conv widths, "M": max-pool)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            v = int(v)
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """torchvision-style VGG: ``features``, ``avgpool``, dropout ``classifier``."""

    def __init__(
        self,
        features: nn.Module,
        num_classes: int = 1000,
        in_features: int = 512,
        hidden: int = 4096,
        init_weights: bool = True,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        if init_weights:
            torchvision_init(self, linear=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def vgg11_bn(
    num_classes: int = 10, width: int = 64, image_size: int = 32, hidden: int = 512
) -> nn.Module:
    """VGG-11 with BatchNorm, channels scaled by ``width / 64``, torchvision style.

    Five 2x2 max-pools: ``image_size`` must be a multiple of 32.
    """
    if image_size < 32 or image_size % 32:
        raise ValueError(f"vgg11_bn needs image_size a multiple of 32, got {image_size}")
    cfg = [v if v == "M" else max(1, int(v) * width // 64) for v in VGG11_CFG]
    last = [v for v in cfg if v != "M"][-1]
    return VGG(
        make_layers(cfg, batch_norm=True),
        num_classes=num_classes,
        in_features=int(last),
        hidden=hidden,
    )


# --------------------------------------------------------------------------------------------
# 5. torchvision.models.mobilenetv2 style
# --------------------------------------------------------------------------------------------


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` without going down by more than 10%."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU(nn.Sequential):
    """Conv2d (optionally grouped) → BatchNorm → ReLU6, as an ``nn.Sequential`` subclass."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(
                in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1 → depthwise 3x3 → linear 1x1 (+ residual if shapes match)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        self.stride = stride
        assert stride in [1, 2]

        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = self.stride == 1 and inp == oup

        layers: list[nn.Module] = []
        if expand_ratio != 1:
            # pw
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1))
        layers.extend(
            [
                # dw
                ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
                # pw-linear
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            ]
        )
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        else:
            return self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision-style MobileNetV2 (``features`` Sequential, functional pooling)."""

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        inverted_residual_setting: list[list[int]] | None = None,
        round_nearest: int = 8,
        image_size: int = 224,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        block = InvertedResidual
        input_channel = 32
        last_channel = 1280
        # CIFAR-sized inputs: no stride in the stem nor in the first stride-2 stage
        small_input = image_size <= 64

        if inverted_residual_setting is None:
            inverted_residual_setting = [
                # t, c, n, s
                [1, 16, 1, 1],
                [6, 24, 2, 1 if small_input else 2],
                [6, 32, 3, 2],
                [6, 64, 4, 2],
                [6, 96, 3, 1],
                [6, 160, 3, 2],
                [6, 320, 1, 1],
            ]

        if len(inverted_residual_setting) == 0 or len(inverted_residual_setting[0]) != 4:
            raise ValueError(
                "inverted_residual_setting should be non-empty and a 4-element list, "
                f"got {inverted_residual_setting}"
            )

        # building first layer
        input_channel = _make_divisible(input_channel * width_mult, round_nearest)
        self.last_channel = _make_divisible(last_channel * width_mult, round_nearest)
        features: list[nn.Module] = [ConvBNReLU(3, input_channel, stride=1 if small_input else 2)]
        # building inverted residual blocks
        for t, c, n, s in inverted_residual_setting:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(block(input_channel, output_channel, stride, expand_ratio=t))
                input_channel = output_channel
        # building last several layers
        features.append(ConvBNReLU(input_channel, self.last_channel, kernel_size=1))
        # make it nn.Sequential
        self.features = nn.Sequential(*features)

        # building classifier
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(self.last_channel, num_classes),
        )

        # weight initialization (kaiming_normal_'s default leaky_relu gain at a=0 is ReLU's)
        torchvision_init(self, linear=True)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        # Cannot use "squeeze" as batch-size can be 1
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_impl(x)


# --------------------------------------------------------------------------------------------
# 6. timm vision_transformer style
# --------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """2D image to patch embedding: strided conv, then ``flatten(2).transpose(1, 2)``."""

    def __init__(
        self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768
    ) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        torch._assert(H == self.img_size[0], f"Input height ({H}) doesn't match model.")
        torch._assert(W == self.img_size[1], f"Input width ({W}) doesn't match model.")
        x = self.proj(x)
        x = x.flatten(2).transpose(1, 2)  # NCHW -> NLC
        x = self.norm(x)
        return x


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` linear (SDPA, or the explicit softmax)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        assert dim % num_heads == 0, "dim should be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = (
            self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        q, k, v = qkv.unbind(0)

        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v

        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class Mlp(nn.Module):
    """fc1 → act → dropout → fc2 → dropout (timm's ``Mlp``, also used by the Mixer)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop1(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x


class Block(nn.Module):
    """Pre-norm transformer block; ``attention="mha"`` swaps in ``nn.MultiheadAttention``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        attention: str = "sdpa",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.use_mha = attention == "mha"
        self.attn: nn.Module
        if self.use_mha:
            self.attn = nn.MultiheadAttention(
                dim, num_heads, dropout=attn_drop, bias=qkv_bias, batch_first=True
            )
        else:
            self.attn = Attention(
                dim,
                num_heads=num_heads,
                qkv_bias=qkv_bias,
                attn_drop=attn_drop,
                proj_drop=drop,
                fused_attn=attention == "sdpa",
            )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_mha:
            y = self.norm1(x)
            x = x + self.attn(y, y, y, need_weights=False)[0]
        else:
            x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class VisionTransformer(nn.Module):
    """timm-style ViT: class token, learned position embedding, ``forward_features``/``head``."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        attention: str = "sdpa",
    ) -> None:
        super().__init__()
        if attention not in ("sdpa", "mha", "manual"):
            raise ValueError(f"attention must be 'sdpa', 'mha' or 'manual', got {attention!r}")
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
        )
        num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

        self.blocks = nn.Sequential(
            *[
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    attention=attention,
                )
                for _ in range(depth)
            ]
        )
        self.norm, self.head = timm_norm_and_head(embed_dim, num_classes)

        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        x = self.patch_embed(x)
        cls = self.cls_token.expand(B, -1, -1)
        x = torch.cat((cls, x), dim=1)
        x = x + self.pos_embed
        x = self.pos_drop(x)
        x = self.blocks(x)
        x = self.norm(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


# --------------------------------------------------------------------------------------------
# 7. MLP-Mixer (timm mlp_mixer style)
# --------------------------------------------------------------------------------------------


class MixerBlock(nn.Module):
    """Token-mixing MLP (over the transposed sequence) then channel-mixing MLP, both residual."""

    def __init__(
        self, dim: int, seq_len: int, tokens_hidden: int, channels_hidden: int, drop: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_tokens = Mlp(seq_len, tokens_hidden, act_layer=nn.GELU, drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, channels_hidden, act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.mlp_channels(self.norm2(x))
        return x


class MlpMixer(nn.Module):
    """timm-style MLP-Mixer: conv patch stem, Mixer blocks, LayerNorm, token mean, head."""

    def __init__(
        self,
        num_classes: int = 1000,
        img_size: int = 224,
        in_chans: int = 3,
        patch_size: int = 16,
        num_blocks: int = 8,
        embed_dim: int = 512,
        tokens_hidden: int = 256,
        channels_hidden: int = 2048,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim

        self.stem = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
        )
        self.blocks = nn.Sequential(
            *[
                MixerBlock(
                    embed_dim,
                    self.stem.num_patches,
                    tokens_hidden,
                    channels_hidden,
                    drop=drop_rate,
                )
                for _ in range(num_blocks)
            ]
        )
        self.norm, self.head = timm_norm_and_head(embed_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.blocks(x)
        x = self.norm(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = x.mean(dim=1)
        x = self.head(x)
        return x


# --------------------------------------------------------------------------------------------
# 8. Data-dependent control flow in the top-level forward (not fx-traceable as a whole)
# --------------------------------------------------------------------------------------------


class ResBlock(TwoConvBody):
    """conv-BN-ReLU-conv-BN + (projection) shortcut, ReLU, out of place. fx-traceable on its
    own."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__(in_ch, out_ch, stride)
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = conv1x1_bn(in_ch, out_ch, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class EarlyExitNet(nn.Module):
    """A CNN whose root ``forward`` has a data-dependent ``if`` (a "safety" rescale) and a loop.

    The children run as a chain: ``stem``, ``blocks[0..3]``, ``pool``, a ``view`` reshape,
    ``head``. Each child traces with ``torch.fx``; the root does not.
    """

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        self.blocks = nn.ModuleList(
            [
                ResBlock(w, w),
                ResBlock(w, 2 * w, stride=2),
                nn.Sequential(
                    nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False),
                    nn.BatchNorm2d(2 * w),
                    nn.ReLU(),
                ),
                ResBlock(2 * w, 4 * w, stride=2),
            ]
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        # guard against exploding activations; never fires for sane inputs, but it reads a
        # value out of the tensor, which symbolic tracing cannot do
        if x.abs().mean().item() > 1e4:
            x = x / x.abs().mean()
        for blk in self.blocks:
            x = blk(x)
        x = self.pool(x)
        x = x.view(x.size(0), -1)
        return self.head(x)


# --------------------------------------------------------------------------------------------
# 9. In-place tensor ops, as found in a lot of public code
# --------------------------------------------------------------------------------------------


class InplaceBlock(TwoConvBody):
    """``F.relu_`` with its result dropped, ``mul_`` residual scaling, ``add_`` identity."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, scale: float = 0.5) -> None:
        super().__init__(inplanes, planes, stride)
        self.relu = nn.ReLU(inplace=True)
        self.scale = scale
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = conv1x1_bn(inplanes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        F.relu_(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out.mul_(self.scale)
        if self.downsample is not None:
            identity = self.downsample(x)
        out.add_(identity)
        return self.relu(out)


class InplaceIaddBlock(TwoConvBody):
    """Plain ``out += identity`` residual with a reused ``nn.ReLU(inplace=True)``."""

    def __init__(self, planes: int) -> None:
        super().__init__(planes, planes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)
        return out


class InplaceStyleNet(nn.Module):
    """Small CNN built from blocks that mutate their activations in place."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        w = width
        self.conv1 = conv3x3(3, w)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(InplaceBlock(w, w), InplaceIaddBlock(w))
        self.layer2 = nn.Sequential(InplaceBlock(w, 2 * w, stride=2), InplaceIaddBlock(2 * w))
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


# --------------------------------------------------------------------------------------------
# 10. GroupNorm / SiLU / Hardswish, unusual conv options, two concatenated branches
# --------------------------------------------------------------------------------------------


class GNSiLUNet(nn.Module):
    """GroupNorm + SiLU/Hardswish/LeakyReLU CNN with "same" and reflect padding, a grouped and
    a depthwise-multiplier conv branch joined by ``torch.cat``, mean pooling, ``Dropout2d``."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        if width < 2 or width % 2:
            raise ValueError(f"width must be even and >= 2, got {width}")
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 3, padding="same", bias=False),
            nn.GroupNorm(2, w),
            nn.SiLU(),
        )
        self.reflect = nn.Sequential(
            nn.Conv2d(w, w, 3, padding=1, padding_mode="reflect", bias=False),
            nn.GroupNorm(2, w),
            nn.SiLU(inplace=True),
        )
        self.branch_a = nn.Sequential(  # grouped conv
            nn.Conv2d(w, w, 3, stride=2, padding=1, groups=2, bias=False),
            nn.GroupNorm(2, w),
            nn.Hardswish(),
        )
        self.branch_b = nn.Sequential(  # depthwise, channel multiplier 2
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, groups=w, bias=False),
            nn.GroupNorm(2, 2 * w),
            nn.LeakyReLU(0.1),
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(3 * w, 4 * w, 1),
            nn.GroupNorm(4, 4 * w),
            nn.Hardswish(inplace=True),
            nn.Dropout2d(0.1),
        )
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.reflect(x)
        a = self.branch_a(x)
        b = self.branch_b(x)
        x = torch.cat([a, b], dim=1)
        x = self.fuse(x)
        x = x.mean((2, 3))
        return self.fc(x)


# --------------------------------------------------------------------------------------------
# Our own model, as the baseline
# --------------------------------------------------------------------------------------------


def ours_resnet20(num_classes: int = 10) -> nn.Module:
    """:class:`zoopt.torch.models.ResNet20` (imported lazily: importing the zoo needs no zoopt)."""
    from zoopt.torch.models import ResNet20

    return ResNet20(num_classes=num_classes)


# --------------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------------


_C32 = (3, 32, 32)
_C16 = (3, 16, 16)


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo: ``build(num_classes, **options)`` at benchmark size,
    ``build(num_classes, **small_options)`` at test size, and the inputs of each.

    ``kind``: "cnn", "transformer" or "untraceable" (root ``forward`` not fx-traceable).
    """

    name: str
    kind: str
    style: str
    build: Callable[..., nn.Module]
    options: dict[str, Any]
    small_options: dict[str, Any]
    input_shape: tuple[int, ...] = _C32
    small_input_shape: tuple[int, ...] = _C16
    num_classes: int = 10

    def factory(self) -> nn.Module:
        """The benchmark-size model."""
        return self.build(num_classes=self.num_classes, **self.options)

    def small(self) -> nn.Module:
        """The tiny test-size model (at most ~20k parameters, except ``ours_resnet20``)."""
        return self.build(num_classes=self.num_classes, **self.small_options)


_SMALL_MBV2_SETTING = [[1, 16, 1, 1], [6, 24, 1, 2], [6, 32, 1, 2], [6, 64, 1, 2]]
#: What makes the ViTs tiny: 4x4 patches, MLP width twice the embedding.
_VIT_TINY = {"patch_size": 4, "mlp_ratio": 2}

ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            "akamaster_resnet20",
            "cnn",
            "akamaster/pytorch_resnet_cifar10: LambdaLayer pad shortcut, ModuleList loop",
            akamaster_resnet20,
            {"width": 16},
            {"width": 4},
        ),
        ZooEntry(
            "kuangliu_resnet18",
            "cnn",
            "kuangliu/pytorch-cifar: BasicBlock, nn.Sequential() shortcut, avg_pool2d(4), view",
            kuangliu_resnet18,
            {"width": 16},
            {"width": 4, "num_blocks": (1, 1, 1, 1)},
            small_input_shape=_C32,  # avg_pool2d(out, 4) needs 32x32
        ),
        ZooEntry(
            "torchvision_resnet50",
            "cnn",
            "torchvision.models.resnet: Bottleneck, downsample, reused inplace ReLU, flatten",
            torchvision_resnet50,
            {"width": 16},
            {"width": 2, "layers": (1, 1, 1, 1)},
            small_input_shape=_C32,
        ),
        ZooEntry(
            "vgg11_bn",
            "cnn",
            "torchvision.models.vgg: make_layers(cfg), AdaptiveAvgPool2d, dropout classifier",
            vgg11_bn,
            {"width": 32, "hidden": 512},
            {"width": 2, "hidden": 16},
            small_input_shape=_C32,  # five max-pools
        ),
        ZooEntry(
            "mobilenet_v2",
            "cnn",
            "torchvision.models.mobilenetv2: ConvBNReLU(Sequential), InvertedResidual, ReLU6",
            MobileNetV2,
            {"width_mult": 0.5, "image_size": 32},
            {
                "width_mult": 0.25,
                "image_size": 16,
                "inverted_residual_setting": _SMALL_MBV2_SETTING,
                "round_nearest": 4,
            },
        ),
        ZooEntry(
            "vit_tiny",
            "transformer",
            "timm vision_transformer: PatchEmbed, cls token, fused qkv + SDPA, pre-norm Block",
            VisionTransformer,
            _VIT_TINY | {"img_size": 32, "embed_dim": 64, "depth": 4, "num_heads": 4},
            _VIT_TINY | {"img_size": 16, "embed_dim": 16, "depth": 2, "num_heads": 2},
        ),
        ZooEntry(
            "vit_tiny_mha",
            "transformer",
            "timm-style ViT with nn.MultiheadAttention(batch_first=True), need_weights=False",
            VisionTransformer,
            _VIT_TINY
            | {"img_size": 32, "embed_dim": 64, "depth": 4, "num_heads": 4, "attention": "mha"},
            _VIT_TINY
            | {"img_size": 16, "embed_dim": 16, "depth": 2, "num_heads": 2, "attention": "mha"},
        ),
        ZooEntry(
            "mlp_mixer_tiny",
            "transformer",
            "timm mlp_mixer: transposed token-mixing Mlp, channel Mlp, LayerNorm, token mean",
            MlpMixer,
            {
                "img_size": 32,
                "patch_size": 4,
                "num_blocks": 2,
                "embed_dim": 64,
                "tokens_hidden": 64,
                "channels_hidden": 128,
            },
            {
                "img_size": 16,
                "patch_size": 4,
                "num_blocks": 2,
                "embed_dim": 16,
                "tokens_hidden": 8,
                "channels_hidden": 32,
            },
        ),
        ZooEntry(
            "early_exit_net",
            "untraceable",
            "data-dependent `if x.abs().mean().item() > 1e4` + ModuleList loop in root forward",
            EarlyExitNet,
            {"width": 16},
            {"width": 4},
        ),
        ZooEntry(
            "inplace_style_net",
            "cnn",
            "in-place habits: F.relu_(out) result dropped, out.mul_, out.add_, out +=",
            InplaceStyleNet,
            {"width": 16},
            {"width": 8},
        ),
        ZooEntry(
            "gn_silu_net",
            "cnn",
            "GroupNorm/SiLU/Hardswish, padding='same', reflect pad, grouped + depthwise x2, cat",
            GNSiLUNet,
            {"width": 16},
            {"width": 8},
        ),
        ZooEntry(
            "ours_resnet20",
            "cnn",
            "zoopt.torch.models.ResNet20: staged nn.Sequential body (our own style)",
            ours_resnet20,
            {},
            {},
            small_input_shape=(3, 8, 8),
        ),
    )
}
"""All zoo entries by name (12 models; ``vit_tiny_mha`` is ``vit_tiny`` with
``attention="mha"``)."""


# --------------------------------------------------------------------------------------------
# Self-check
# --------------------------------------------------------------------------------------------


def num_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fx_children_chain(model: nn.Module) -> list[nn.Module]:
    """The children of ``model`` in registration order, ``nn.ModuleList``s expanded."""
    out: list[nn.Module] = []
    for child in model.children():
        out.extend(child if isinstance(child, nn.ModuleList) else [child])
    return out


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _check_forward_backward(model: nn.Module, shape: tuple[int, ...], classes: int) -> None:
    x = torch.randn(4, *shape)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (4, classes), f"logits {tuple(out.shape)} != {(4, classes)}"
        assert torch.isfinite(out).all(), "non-finite logits"
    model.train()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), torch.randint(classes, (4,)))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:3]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _first_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return text.strip().splitlines()[0]


def _check_fx(entry: ZooEntry, model: nn.Module, shape: tuple[int, ...]) -> str:
    """Trace ``model`` with plain ``torch.fx.symbolic_trace``; on success compare outputs."""
    x = torch.randn(4, *shape)
    model.eval()
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 - any failure is a finding, reported
        root = f"FAILS ({_first_line(err)})"
        if entry.kind != "untraceable":
            return root
        # the root may not trace, but each child must, and they must form the forward chain
        h = x
        with torch.no_grad():
            for child in fx_children_chain(model):
                if isinstance(child, nn.Linear) and h.dim() > 2:
                    h = h.view(h.size(0), -1)
                h = torch.fx.symbolic_trace(child)(h)
            assert torch.allclose(h, model(x), atol=1e-5), "children chain != forward"
        return root + "; children trace, chain == forward"
    if entry.kind == "untraceable":
        raise AssertionError(f"{entry.name}: kind 'untraceable' but the root traced")
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5), "traced output differs"
    return "ok (traced output matches)"


def main() -> None:
    torch.set_num_threads(1)
    rows, skipped = [], []
    for entry in ZOO.values():
        torch.manual_seed(0)
        try:
            big = entry.factory()
            small = entry.small()
        except ImportError as err:  # only ours_resnet20 imports anything (zoopt.torch)
            skipped.append(f"{entry.name}: {_first_line(err)}")
            continue
        for model, shape in ((big, entry.input_shape), (small, entry.small_input_shape)):
            _check_forward_backward(model, shape, entry.num_classes)
        big.eval()
        small.eval()
        xb = torch.randn(32, *entry.input_shape)
        xs = torch.randn(4, *entry.small_input_shape)
        with torch.no_grad():
            t_big = _median_seconds(lambda m=big, x=xb: m(x), 5)
            t_small = _median_seconds(lambda m=small, x=xs: m(x), 20)
        fx = _check_fx(entry, big, entry.input_shape)
        _check_fx(entry, small, entry.small_input_shape)
        rows.append((entry, num_params(big), num_params(small), t_big, t_small, fx))

    for line in skipped:
        print(f"SKIPPED {line}")
    print(f"{len(rows)} entries: forward (train/eval, both sizes) and backward OK\n")
    header = (
        f"{'name':22} {'kind':12} {'params':>10} {'small':>8} "
        f"{'fwd ms b32':>10} {'small b4':>8}  input / small input"
    )
    print(header)
    print("-" * len(header))
    for entry, n_big, n_small, t_big, t_small, _ in rows:
        shapes = f"{'x'.join(map(str, entry.input_shape))} / "
        shapes += "x".join(map(str, entry.small_input_shape))
        print(
            f"{entry.name:22} {entry.kind:12} {n_big:>10,} {n_small:>8,} "
            f"{1e3 * t_big:>10.1f} {1e3 * t_small:>8.2f}  {shapes}"
        )
    print("\n(fwd ms: eval, no_grad, 1 CPU thread, median of 5; small: batch 4, median of 20)\n")
    print("torch.fx.symbolic_trace on the root module (benchmark size):")
    for entry, *_, fx in rows:
        print(f"  {entry.name:22} {fx}")
    slow = [
        e.name for e, _, n, _, t, _ in rows if t > 0.02 or (n > 20_000 and "ours" not in e.name)
    ]
    if slow:
        print(f"\nWARNING: small builds over budget (20k params / 20 ms): {slow}")


if __name__ == "__main__":
    main()
