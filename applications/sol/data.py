"""The coarse solver's interface, reference trajectories and the one-step pairs of NON.

Arrays are in the solver's layout (``oracles/wake_flow.py``): states ``(batch, 2, H, W)``
float32 (u_x, u_y in inflow speeds), Reynolds numbers ``(batch,)``, trajectories
``(sims, frames, 2, H, W)``; time is counted in solver steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:
    from .config import SolSettings


@runtime_checkable
class CoarseSolver(Protocol):
    """What the black-box path needs from the coarse solver (``WakeFlowSimulator``).

    ``step``: numpy in, numpy out, ``corrections`` added to the state values before the
    step, ``reynolds`` one value per batch member (or a scalar). No autograd.
    """

    def step(
        self,
        states: np.ndarray,
        corrections: np.ndarray | None = None,
        *,
        reynolds: float | np.ndarray | None = None,
    ) -> np.ndarray: ...


@runtime_checkable
class DifferentiableSolver(CoarseSolver, Protocol):
    """A coarse solver that FO-SOL can differentiate through: ``step_torch`` is ``step`` on
    float32 torch tensors with autograd to both inputs."""

    def step_torch(
        self,
        states: torch.Tensor,
        corrections: torch.Tensor | None = None,
        *,
        reynolds: float | np.ndarray | None = None,
    ) -> torch.Tensor: ...


def as_states(states: Any, name: str, ndim: int) -> np.ndarray:
    """``states`` as a C-contiguous float32 array of ``ndim`` dimensions, 2 velocity channels
    (axis -3), all finite; torch tensors are copied to numpy."""
    if isinstance(states, torch.Tensor):
        states = states.detach().cpu().numpy()
    a = np.asarray(states)
    if a.ndim != ndim or a.shape[-3] != 2:
        raise ValueError(f"{name} must be {ndim}-D with 2 velocity channels, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values")
    return np.ascontiguousarray(a, dtype=np.float32)


def as_reynolds(reynolds: Any, batch: int) -> np.ndarray:
    """``reynolds`` as ``(batch,)`` float64, every value finite and > 0."""
    re = np.asarray(reynolds, dtype=np.float64).reshape(-1)
    if re.shape[0] != batch:
        raise ValueError(f"reynolds has {re.shape[0]} values for a batch of {batch}")
    if not np.all(np.isfinite(re) & (re > 0)):
        raise ValueError(f"reynolds must be finite and > 0, got {re.tolist()}")
    return re


class OneStepPairs(NamedTuple):
    """NON's pre-computed pairs: ``inputs = P(r_{k-1})`` and ``targets = r_k``, both
    ``(N, 2, H, W)`` float32, with ``reynolds`` ``(N,)``; ``targets - inputs`` is the ideal
    one-step correction."""

    inputs: np.ndarray
    reynolds: np.ndarray
    targets: np.ndarray


@dataclass(frozen=True)
class Trajectories:
    """Reference trajectories of several simulations (validated, stored as float32/float64).

    Attributes:
        frames: ``(sims, T + 1, 2, H, W)`` float32; frame ``k`` is ``k`` solver steps after 0.
        reynolds: ``(sims,)`` float64, the Reynolds number of each simulation.
    """

    frames: np.ndarray
    reynolds: np.ndarray

    def __post_init__(self) -> None:
        frames = np.asarray(self.frames)
        reynolds = np.asarray(self.reynolds, dtype=np.float64).reshape(-1)
        if frames.ndim != 5 or frames.shape[2] != 2 or frames.shape[1] < 2:
            raise ValueError(
                f"frames must have shape (sims, T + 1 >= 2, 2, H, W), got {frames.shape}"
            )
        if reynolds.shape[0] != frames.shape[0]:
            raise ValueError(
                f"reynolds has {reynolds.shape[0]} values for {frames.shape[0]} simulations"
            )
        if not np.all(np.isfinite(frames)):
            raise ValueError("frames contain non-finite values")
        if not np.all(np.isfinite(reynolds) & (reynolds > 0)):
            raise ValueError(f"reynolds must be finite and > 0, got {reynolds.tolist()}")
        object.__setattr__(self, "frames", np.ascontiguousarray(frames, dtype=np.float32))
        object.__setattr__(self, "reynolds", reynolds)

    @property
    def n_sims(self) -> int:
        return int(self.frames.shape[0])

    @property
    def n_steps(self) -> int:
        """T, the steps covered (frames - 1)."""
        return int(self.frames.shape[1] - 1)

    @property
    def resolution(self) -> tuple[int, int]:
        return (int(self.frames.shape[3]), int(self.frames.shape[4]))


def one_step_pairs(solver: CoarseSolver, data: Trajectories) -> OneStepPairs:
    """One plain coarse step from every frame but the last of every simulation.

    ``N = sims * T`` pairs, simulation-major (pair ``s * T + k - 1`` starts at frame
    ``k - 1`` of simulation ``s``). One solver call per simulation (batch T).
    """
    inputs, reynolds, targets = [], [], []
    for frames, re in zip(data.frames, data.reynolds, strict=True):
        t = frames.shape[0] - 1
        inputs.append(solver.step(frames[:-1], reynolds=np.full(t, re)))
        reynolds.append(np.full(t, re))
        targets.append(frames[1:])
    return OneStepPairs(
        np.concatenate(inputs).astype(np.float32, copy=False),
        np.concatenate(reynolds),
        np.concatenate(targets).astype(np.float32, copy=False),
    )


def load_trajectories(
    settings: SolSettings, *, progress: bool = True
) -> tuple[Trajectories, Trajectories]:
    """Training and test references: fine simulations downsampled onto the coarse grid.

    Cached on disk (``settings.cache_dir``); Re not cached yet are simulated as one fine
    batch (minutes at the default grids).
    """
    from oracles.wake_flow import reference_trajectories

    def load(reynolds: tuple[float, ...]) -> Trajectories:
        frames = reference_trajectories(
            settings.res,
            list(reynolds),
            settings.frames,
            fine_res=settings.fine_res,
            warmup_steps=settings.warmup,
            cache_dir=settings.cache_dir,
            progress=progress,
        )
        return Trajectories(frames, np.asarray(reynolds))

    # one fine batch for all Re not cached yet (training and test alike)
    load(tuple(settings.train_reynolds) + tuple(settings.test_reynolds))
    return load(settings.train_reynolds), load(settings.test_reynolds)
