"""What the Trainer trains in this experiment: denoised smoothing and MSE reconstruction.

Both are :class:`zoopt.torch.train.Task` s over the defender's own modules, with batches drawn
from the trainer's per-epoch generator (so a resumed run sees the same data and noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zoopt import data as zdata
from zoopt.torch.blackbox import eval_mode
from zoopt.torch.oracle import ModuleOracle
from zoopt.torch.params import ParamGroup
from zoopt.torch.tasks import ModuleTaskMixin

from .data import add_noise, check_images_labels
from .zo_ae_ds import AutoencoderZOOracle


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
        oracle: a ModuleOracle (FO-DS, DeepZero) or an
            :class:`~applications.defense.zo_ae_ds.AutoencoderZOOracle` over the trained
            parameters.
        train: ``(X, y)``: clean images ``(n, C, H, W)`` float32 and the classifier's labels.
        test: ``(X, y)`` for the per-epoch check.
        sigma: noise standard deviation, in pixel units.
        batch_size: B.
        evaluate_labels: ``images (m, C, H, W) -> labels (m,)`` of the defended pipeline (through
            the API: each epoch's check costs ``len(test)`` queries of one image).
        grasp_per_class: images per class in the ZO-GraSP scoring batch.
        device: where the trained modules live.
        groups: the parameter groups DeepZero's mask and ZO-GraSP see (default the oracle's
            ``view.groups``; :func:`~applications.defense.methods.deepzero_budget` may relabel
            them all prunable).
    """

    def __init__(
        self,
        model: nn.Module,
        oracle: ModuleOracle | AutoencoderZOOracle,
        train: tuple[np.ndarray, np.ndarray],
        test: tuple[np.ndarray, np.ndarray],
        *,
        sigma: float,
        batch_size: int,
        evaluate_labels: Callable[[np.ndarray], np.ndarray],
        grasp_per_class: int = 2,
        device: str | torch.device = "cpu",
        seed: int = 0,
        groups: Sequence[ParamGroup] | None = None,
    ):
        check_images_labels("train", train)
        check_images_labels("test", test)
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
