"""The one training recipe every run of the experiment uses, and fitting that names its flag.

Every model of the experiment (the owner's classifier, the MSE pretrainings, the three
methods) is trained by :class:`zoopt.torch.train.Trainer` with SGD (momentum 0.9) and a cosine
schedule; only the method, the learning rate and a few settings differ per run.
"""

from __future__ import annotations

from typing import Any

from zoopt.recipe import Recipe, RunOptions
from zoopt.torch.train import TrainConfig, Trainer

from .config import DefenseConfig


def train_config(config: DefenseConfig, method: str, lr: float, **overrides: Any) -> TrainConfig:
    """The shared recipe (SGD momentum 0.9, cosine schedule) for trainer ``method`` at ``lr``;
    ``overrides`` replace any :class:`~zoopt.recipe.Recipe` field."""
    base: dict[str, Any] = dict(
        method=method,
        epochs=config.training.epochs,
        lr=lr,
        momentum=0.9,
        weight_decay=config.training.weight_decay,
        mu=config.training.mu,
        seed=config.seed,
        max_steps_per_epoch=config.training.steps_per_epoch,
    )
    return TrainConfig.of(Recipe(**(base | overrides)), RunOptions(progress=config.progress))


def fit(trainer: Trainer, lr_flag: str) -> dict[str, Any]:
    """``trainer.fit()`` (its summary), naming the learning-rate flag when the run diverges."""
    try:
        return trainer.fit()
    except FloatingPointError as exc:
        raise FloatingPointError(
            f"{trainer.out.name if trainer.out else 'training'}: {exc}: {lr_flag} "
            f"{trainer.config.lr:g} is too high for this model, lower it"
        ) from exc
