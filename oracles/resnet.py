"""ResNets in plain torch whose state-dict keys match torchvision's exactly.

A classifier owner's torchvision checkpoint (``resnet50-*.pth``) loads with :func:`load_weights`
without torchvision installed. Key layout (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``layer1.0.downsample.0/1``, ``fc``) and parameter counts (ResNet-50 with 1000 classes:
25,557,032) are those of ``torchvision.models.resnet`` (v1.5: the stride sits on the 3x3 conv).

Besides the bare weights we define one checkpoint format of our own
(:func:`save_classifier_checkpoint`): a dict holding the state dict together with the
architecture name, class count, input shape and input normalization, so a served model is
fully described by one file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: ``format`` tag of checkpoints written by :func:`save_classifier_checkpoint`.
CHECKPOINT_FORMAT = "zoopt.classifier/1"


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a skip connection (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 convs with a skip connection (ResNet-50/101/152)."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """The torchvision ResNet layout, for images of shape ``(n, in_channels, H, W)``.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        num_classes: K, the length of the logit vector ``(n, K)``.
        in_channels: C of the input images.
        small_input: CIFAR-style stem for small images (32x32): a 3x3 stride-1 ``conv1`` and
            no max-pool. The keys stay the same; only ``conv1.weight``'s shape changes.
        zero_init_residual: zero the last BN of each block so blocks start as identities.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        *,
        in_channels: int = 3,
        small_input: bool = False,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {tuple(layers)!r}")
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        self.inplanes = 64
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        # Identity holds no parameters, so the state-dict keys don't depend on the stem.
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self._init_weights(zero_init_residual)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        stage = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes) for _ in range(1, int(blocks))]
        return nn.Sequential(*stage)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, num_classes)`` for images ``(n, in_channels, H, W)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


#: Architecture name -> (block, blocks per stage), as in torchvision.
ARCHITECTURES: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


def build_resnet(arch: str, num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """A randomly initialised ResNet by name (one of :data:`ARCHITECTURES`).

    ``kwargs`` go to :class:`ResNet` (``in_channels``, ``small_input``, ``zero_init_residual``).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    block, layers = ARCHITECTURES[arch]
    return ResNet(block, layers, num_classes, **kwargs)


def resnet18(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    return build_resnet("resnet18", num_classes, **kwargs)


def resnet34(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    return build_resnet("resnet34", num_classes, **kwargs)


def resnet50(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    return build_resnet("resnet50", num_classes, **kwargs)


def resnet101(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    return build_resnet("resnet101", num_classes, **kwargs)


def resnet152(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    return build_resnet("resnet152", num_classes, **kwargs)


# -- weights ------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: a bare state dict, or the ``state_dict`` entry of one of
    our checkpoints. Loaded with ``weights_only=True`` (never arbitrary unpickling).

    A ``module.`` prefix on every key (left by ``nn.DataParallel``) is stripped.
    """
    return _state_from_payload(_torch_load(path), source=str(path))


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the state dict in ``path`` into ``model`` (in place) and return ``model``.

    Raises:
        ValueError: naming the missing and unexpected keys, or the tensors whose shapes differ.
    """
    state = read_state_dict(path)
    check_state_dict(model, state, source=str(path))
    model.load_state_dict(state, strict=True)
    return model


def check_state_dict(
    model: nn.Module, state: Mapping[str, Any], source: str = "state dict"
) -> None:
    """Raise ``ValueError`` unless ``state`` has exactly ``model``'s keys with matching shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match {type(model).__name__}: "
            f"{len(missing)} missing keys {_preview(missing)}, "
            f"{len(unexpected)} unexpected keys {_preview(unexpected)}"
        )
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(getattr(state[k], "shape", ())) != tuple(v.shape)
    ]
    if wrong:
        raise ValueError(f"{source}: {len(wrong)} tensors have the wrong shape: {_preview(wrong)}")


# -- our checkpoint format ----------------------------------------------------------------
class InputNormalization(nn.Module):
    """``(x - mean) / std`` per channel for images ``(n, C, H, W)`` (mean/std of length C).

    Classifiers trained on normalized inputs are served behind this so that clients send
    plain pixel values in [0, 1]. Its buffers are not persistent (not in the state dict).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(f"mean and std must have the same positive length, got {mean}, {std}")
        if any(not (s > 0 and math.isfinite(s)) for s in std):
            raise ValueError(f"std must be positive and finite, got {list(std)}")
        as_column = lambda v: torch.tensor([float(a) for a in v]).view(1, -1, 1, 1)  # noqa: E731
        self.register_buffer("mean", as_column(mean), persistent=False)
        self.register_buffer("std", as_column(std), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def save_classifier_checkpoint(
    path: str | Path,
    model: ResNet,
    arch: str,
    *,
    input_shape: Sequence[int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> None:
    """Write ``model`` with everything needed to serve it: a dict of ``format``, ``arch``,
    ``num_classes``, ``in_channels``, ``small_input``, ``input_shape`` (C, H, W), ``mean``,
    ``std`` (None: no normalization) and ``state_dict``; readable with ``weights_only=True``.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if len(input_shape) != 3 or any(int(s) < 1 for s in input_shape):
        raise ValueError(f"input_shape must be (C, H, W) of positive ints, got {input_shape!r}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "arch": arch,
            "num_classes": int(model.fc.out_features),
            "in_channels": int(model.conv1.in_channels),
            "small_input": model.conv1.kernel_size == (3, 3),
            "input_shape": [int(s) for s in input_shape],
            "mean": None if mean is None else [float(v) for v in mean],
            "std": None if std is None else [float(v) for v in std],
            "state_dict": model.state_dict(),
        },
        path,
    )


def load_classifier(
    path: str | Path,
    arch: str | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A ready-to-serve classifier (eval mode) from one of our checkpoints or a bare state dict.

    For a bare state dict, ``arch`` names the architecture (default ``resnet50``); the class
    count comes from ``fc.weight``, the input channels from ``conv1.weight`` and a 3x3
    ``conv1`` selects the small-input stem. Arguments given here override the checkpoint's.

    Returns:
        ``(module, spec)``: the module maps ``(n, C, H, W)`` float32 images to ``(n, K)``
        logits (behind :class:`InputNormalization` if mean/std are set); ``spec`` has
        ``arch``, ``num_classes``, ``input_shape`` (list or None), ``mean``, ``std``.
    """
    payload = _torch_load(path)
    meta: dict[str, Any] = dict(payload) if _is_checkpoint(payload) else {}
    state = _state_from_payload(payload, source=str(path))
    arch = arch or meta.get("arch") or "resnet50"
    for key in ("fc.weight", "conv1.weight"):
        if key not in state:
            raise ValueError(f"{path}: no {key!r} in the state dict; is this a ResNet checkpoint?")
    model = build_resnet(
        arch,
        num_classes=int(state["fc.weight"].shape[0]),
        in_channels=int(state["conv1.weight"].shape[1]),
        small_input=tuple(state["conv1.weight"].shape[2:]) == (3, 3),
    )
    check_state_dict(model, state, source=str(path))
    model.load_state_dict(state, strict=True)
    mean = mean if mean is not None else meta.get("mean")
    std = std if std is not None else meta.get("std")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    module: nn.Module = (
        model if mean is None else nn.Sequential(InputNormalization(mean, std), model)
    )
    shape = input_shape if input_shape is not None else meta.get("input_shape")
    spec = {
        "arch": arch,
        "num_classes": model.fc.out_features,
        "input_shape": None if shape is None else [int(s) for s in shape],
        "mean": None if mean is None else [float(v) for v in mean],
        "std": None if std is None else [float(v) for v in std],
    }
    return module.eval(), spec


# -- helpers ------------------------------------------------------------------------------
def _torch_load(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises a zoo of types for bad files
        raise ValueError(
            f"{path}: cannot read as torch weights ({type(exc).__name__}: {exc})"
        ) from exc


def _state_from_payload(payload: Any, source: str) -> dict[str, Any]:
    state = payload["state_dict"] if _is_checkpoint(payload) else payload
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ValueError(
            f"{source}: expected a state dict (str -> tensor), got {type(state).__name__}"
        )
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _is_checkpoint(payload: Any) -> bool:
    return isinstance(payload, Mapping) and payload.get("format") == CHECKPOINT_FORMAT


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _preview(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}]"
