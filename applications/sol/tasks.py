"""Tasks for :class:`zoopt.torch.train.Trainer`: what NON and the SOL methods train on.

Each task's ``train_batches`` yields exactly what its oracle's ``set_batch`` takes: windows
``(start, reynolds, targets)`` for SOL, pairs ``(inputs, reynolds, targets)`` for NON.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
from torch import nn

from zoopt.torch.tasks import ModuleTaskMixin

from .config import check_positive_int
from .data import CoarseSolver, OneStepPairs, Trajectories, as_reynolds, as_states
from .oracle import CorrectionOracle, SolverInTheLoopOracle, SupervisedCorrectionOracle
from .rollout import rollout_mae


class WindowBatch(NamedTuple):
    """SOL windows: start states ``(B, 2, H, W)``, Re ``(B,)`` and the reference
    ``(B, n, 2, H, W)`` of the ``n`` steps after each start."""

    start: np.ndarray
    reynolds: np.ndarray
    targets: np.ndarray


class CorrectionTask(ModuleTaskMixin):
    """What both tasks share: the test evaluation and the whole-training-set loss (the flat
    parameters and the buffers, i.e. the :class:`Normalization` a checkpoint carries, come
    from ``ModuleTaskMixin``)."""

    model: nn.Module
    oracle: CorrectionOracle
    solver: CoarseSolver
    test: Trajectories
    eval_steps: int | None

    def test_mae_per_simulation(self) -> np.ndarray:
        """``(test sims,)`` MAE of the corrected rollouts (see :func:`rollout_mae`)."""
        return rollout_mae(self.model, self.solver, self.test, self.eval_steps)

    def evaluate(self) -> dict[str, float]:
        return {"test_mae": float(self.test_mae_per_simulation().mean())}

    def training_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The whole training set as one oracle batch."""
        raise NotImplementedError  # pragma: no cover

    def training_loss(self) -> float:
        """The task's own loss over its whole training set at the current parameters.

        A diagnostic (e.g. to pick a learning rate without looking at the test set): the
        black-box path, one evaluation, not counted and not timed; replaces the oracle's
        batch.
        """
        self.oracle.set_batch(*self.training_batch())
        return self.oracle.uncounted_value(self.parameters_vector())


class SolverInTheLoopTask(CorrectionTask):
    """SOL training: windows of ``n_steps + 1`` consecutive reference frames.

    Every ``(simulation, start frame)`` with a full window is one sample; an epoch visits
    them all in a random order, ``batch_size`` windows per step.

    Args:
        model: the correction network.
        solver: the coarse solver (black box for ZO, ``step_torch`` for FO).
        train, test: reference trajectories (test Re should not be in train).
        n_steps: unrolled solver steps per window (the paper: 16).
        batch_size: windows per step.
        eval_steps: steps of the test rollouts (default: the whole test trajectories).
        **oracle_kwargs: to :class:`SolverInTheLoopOracle`.
    """

    oracle: SolverInTheLoopOracle

    def __init__(
        self,
        model: nn.Module,
        solver: CoarseSolver,
        train: Trajectories,
        test: Trajectories,
        *,
        n_steps: int = 16,
        batch_size: int = 1,
        eval_steps: int | None = None,
        **oracle_kwargs: Any,
    ):
        check_positive_int("n_steps", n_steps)
        if n_steps > train.n_steps:
            raise ValueError(
                f"n_steps={n_steps} exceeds the {train.n_steps} steps of the training trajectories"
            )
        self.model = model
        self.solver = solver
        self.train, self.test = train, test
        self.n_steps = n_steps
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.eval_steps = eval_steps
        self.oracle = SolverInTheLoopOracle(model, solver, **oracle_kwargs)
        self.groups = self.oracle.view.groups
        starts = np.arange(train.n_steps - n_steps + 1)
        #: (sim, start frame) of every training window
        self.windows = np.array([(s, k) for s in range(train.n_sims) for k in starts])

    def steps_per_epoch(self) -> int:
        return -(-len(self.windows) // self.batch_size)

    def window_batch(self, indices: np.ndarray) -> WindowBatch:
        """The windows ``indices`` (into :attr:`windows`)."""
        sims, ks = self.windows[indices, 0], self.windows[indices, 1]
        start = self.train.frames[sims, ks]
        targets = np.stack(
            [
                self.train.frames[s, k + 1 : k + 1 + self.n_steps]
                for s, k in zip(sims, ks, strict=True)
            ]
        )
        return WindowBatch(start, self.train.reynolds[sims], targets)

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[WindowBatch]:
        order = rng.permutation(len(self.windows))
        for s in range(0, len(order), self.batch_size):
            yield self.window_batch(order[s : s + self.batch_size])

    def scoring_batch(self, rng: np.random.Generator) -> WindowBatch:
        return self.window_batch(rng.choice(len(self.windows), self.batch_size, replace=False))

    def training_batch(self) -> WindowBatch:
        """Every training window (``len(windows)`` of them; one solver batch per step)."""
        return self.window_batch(np.arange(len(self.windows)))


class SupervisedCorrectionTask(CorrectionTask):
    """NON training: minibatches of the pre-computed one-step pairs (see :func:`one_step_pairs`).

    Args:
        model: the correction network.
        pairs: ``(inputs, reynolds, targets)``.
        solver, test, eval_steps: for the test rollouts only.
        batch_size: pairs per step.
        **oracle_kwargs: to :class:`SupervisedCorrectionOracle`.
    """

    oracle: SupervisedCorrectionOracle

    def __init__(
        self,
        model: nn.Module,
        pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
        solver: CoarseSolver,
        test: Trajectories,
        *,
        batch_size: int = 32,
        eval_steps: int | None = None,
        **oracle_kwargs: Any,
    ):
        inputs, reynolds, targets = pairs
        self.inputs = as_states(inputs, "inputs", 4)
        self.targets = as_states(targets, "targets", 4)
        self.reynolds = as_reynolds(reynolds, self.inputs.shape[0])
        if self.targets.shape != self.inputs.shape:
            raise ValueError(f"inputs {self.inputs.shape} and targets {self.targets.shape} differ")
        self.model = model
        self.solver = solver
        self.test = test
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.eval_steps = eval_steps
        self.oracle = SupervisedCorrectionOracle(model, **oracle_kwargs)
        self.groups = self.oracle.view.groups

    def steps_per_epoch(self) -> int:
        return -(-self.inputs.shape[0] // self.batch_size)

    def _batch(self, idx: np.ndarray) -> OneStepPairs:
        return OneStepPairs(self.inputs[idx], self.reynolds[idx], self.targets[idx])

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[OneStepPairs]:
        order = rng.permutation(self.inputs.shape[0])
        for s in range(0, len(order), self.batch_size):
            yield self._batch(order[s : s + self.batch_size])

    def scoring_batch(self, rng: np.random.Generator) -> OneStepPairs:
        n = min(self.batch_size, self.inputs.shape[0])
        return self._batch(rng.choice(self.inputs.shape[0], n, replace=False))

    def training_batch(self) -> OneStepPairs:
        """Every pre-computed pair."""
        return OneStepPairs(self.inputs, self.reynolds, self.targets)
