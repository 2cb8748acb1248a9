"""Tasks for the trainer: what is trained, on which data, judged how.

:class:`ClassificationTask` trains an image classifier (any staged ``nn.Module``) with the
cross-entropy loss; its oracle is a :class:`~zoopt.torch.ModuleOracle`, so the DeepZero
engine (feature reuse, per-query BatchNorm statistics) serves every ZO query.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import data as zdata
from ..oracle import TrainableOracle
from .oracle import ModuleOracle
from .params import ParamView


def _to_tensor(
    a: np.ndarray, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    return torch.as_tensor(a, device=device, dtype=dtype)


@runtime_checkable
class ModuleParamOracle(TrainableOracle, Protocol):
    """A trainable oracle over a module's parameters, seen through a
    :class:`~zoopt.torch.ParamView` (``view``): the module oracle, and the experiments' own
    oracles over a network (``applications/defense``, ``applications/sol``)."""

    view: ParamView


class ModuleTaskMixin:
    """The parameter and buffer plumbing every task over an ``nn.Module`` shares.

    Needs ``self.oracle`` (a :class:`ModuleParamOracle`) and ``self.model`` (whose buffers,
    e.g. BatchNorm running statistics, go into checkpoints).
    """

    oracle: ModuleParamOracle
    model: nn.Module

    def parameters_vector(self) -> torch.Tensor:
        return self.oracle.view.flatten()

    def load_vector(self, x: torch.Tensor) -> None:
        self.oracle.view.assign(x)

    def buffers_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.named_buffers()}

    def load_buffers_state(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.model.named_buffers())
        missing = set(state) - set(own)
        if missing:
            raise KeyError(f"checkpoint buffers not in the model: {sorted(missing)}")
        for k, v in state.items():
            own[k].copy_(v.to(own[k].device))


class ClassificationTask(ModuleTaskMixin):
    """Image classification with cross-entropy.

    Args:
        model: the network (trainable parameters are the flat vector).
        train: ``(X, y)`` numpy arrays, X of shape ``(n, C, H, W)`` float32, y ``(n,)`` int64.
        test: ``(X, y)`` for evaluation.
        batch_size: minibatch size.
        augment: random crop (pad 4) + horizontal flip on training batches (CIFAR).
        device: ``"cpu"`` or ``"cuda"``.
        grasp_per_class: images per class in the class-balanced ZO-GraSP scoring batch.
        max_batch_bytes: memory cap for the engine's query chunks.
    """

    def __init__(
        self,
        model: nn.Module,
        train: tuple[np.ndarray, np.ndarray],
        test: tuple[np.ndarray, np.ndarray],
        *,
        batch_size: int = 256,
        augment: bool = False,
        device: str | torch.device = "cpu",
        grasp_per_class: int = 10,
        max_batch_bytes: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for name, (X, y) in (("train", train), ("test", test)):
            if X.ndim != 4 or y.ndim != 1 or X.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{name} must be (X (n, C, H, W), y (n,)), got {X.shape} and {y.shape}"
                )
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' requested but CUDA is not available")
        self.model = model.to(self.device).train()
        self.X_train, self.y_train = train
        self.X_test, self.y_test = test
        self.batch_size = int(batch_size)
        self.augment = bool(augment)
        self.grasp_per_class = int(grasp_per_class)
        kwargs = {} if max_batch_bytes is None else {"max_batch_bytes": max_batch_bytes}
        # the best of minibatch losses means nothing to training, and keeping it would hold
        # one more copy of the parameters
        self.oracle = ModuleOracle(self.model, F.cross_entropy, track_best=False, **kwargs)
        self.groups = self.oracle.view.groups

    # -- data -----------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return -(-self.X_train.shape[0] // self.batch_size)

    def _batch(self, X: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return _to_tensor(X, self.device, torch.float32), _to_tensor(y, self.device, torch.long)

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[tuple]:
        for Xb, yb in zdata.batches(self.X_train, self.y_train, self.batch_size, rng):
            if self.augment:
                Xb = zdata.augment_crop_flip(Xb, rng)
            yield self._batch(Xb, yb)

    def scoring_batch(self, rng: np.random.Generator) -> tuple:
        Xs, ys = zdata.class_balanced_sample(self.X_train, self.y_train, self.grasp_per_class, rng)
        return self._batch(Xs, ys)

    # -- evaluation -----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Test accuracy and loss with BatchNorm in eval mode (running statistics)."""
        self.model.eval()
        correct, loss_sum, n = 0, 0.0, self.X_test.shape[0]
        try:
            for s in range(0, n, 1024):
                Xb, yb = self._batch(self.X_test[s : s + 1024], self.y_test[s : s + 1024])
                logits = self.model(Xb)
                loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
                correct += int((logits.argmax(1) == yb).sum())
        finally:
            self.model.train()
        return {"test_accuracy": correct / n, "test_loss": loss_sum / n}
