"""The small CNN and its LoRA-style trainable set.

:class:`FinetuneCNN` (14x14 or any side, 1 channel): two stride-2 3x3 convolutions
(1→8→16 channels), ``fc1`` (→64) and the head ``fc2`` (→10), ReLU between; about 18k
parameters at 14x14. No BatchNorm or dropout, so train and eval forwards are the same.

Trainable sets (:func:`trainable_model`; the trainer trains exactly the parameters with
``requires_grad``):

* ``full``: every parameter;
* ``lora``: a rank-``r`` LoRA adapter on the hidden Linear layer ``fc1`` (its weight and bias
  frozen) plus the classification head ``fc2`` trained in full (as ``peft`` does for a new
  task's head, ``modules_to_save``); the convolutions frozen. With ``peft`` installed it is a
  real ``peft.get_peft_model`` LoRA (``lora_alpha = 2r``, no dropout); otherwise
  :class:`LowRankLinear`, the same adapter in plain torch:
  ``y = W x + b + (alpha / r) · B (A x)``, ``A`` (r × in) Kaiming-uniform, ``B`` (out × r)
  zero, so fine-tuning starts from the pretrained function exactly.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from torch import nn


class FinetuneCNN(nn.Module):
    """conv(1→8, s2)-ReLU, conv(8→16, s2)-ReLU, fc1(→64)-ReLU, fc2(→classes)."""

    def __init__(self, image_size: int = 14, num_classes: int = 10, hidden: int = 64):
        super().__init__()
        side = (((image_size + 1) // 2) + 1) // 2  # two stride-2 convs with padding 1
        self.conv1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(16 * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.fc2(self.act(self.fc1(x.flatten(1))))


class LowRankLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``r`` update (LoRA, Hu et al. 2021)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank = int(rank)
        self.scaling = (2.0 * rank if alpha is None else alpha) / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * ((x @ self.lora_A.T) @ self.lora_B.T)


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def lora_backend(impl: str) -> str:
    """``"peft"`` or ``"torch"`` for the setting ``auto`` / ``peft`` / ``torch``."""
    if impl == "auto":
        return "peft" if peft_available() else "torch"
    if impl == "peft" and not peft_available():
        raise ValueError("lora_impl='peft' but peft is not importable; use 'auto' or 'torch'")
    return impl


def trainable_model(model: FinetuneCNN, mode: str, rank: int, impl: str = "auto") -> nn.Module:
    """``model`` with the trainable set of ``mode`` (``full`` or ``lora``); may wrap it."""
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if mode != "lora":
        raise ValueError(f"mode must be 'full' or 'lora', got {mode!r}")
    if lora_backend(impl) == "peft":
        import peft

        config = peft.LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.0,
            target_modules=["fc1"],
            modules_to_save=["fc2"],
        )
        return peft.get_peft_model(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    model.fc1 = LowRankLinear(model.fc1, rank)
    for p in model.fc2.parameters():
        p.requires_grad_(True)
    return model


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
