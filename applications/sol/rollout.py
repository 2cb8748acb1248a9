"""Corrected coarse rollouts and their error against the reference (the test metric)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .data import CoarseSolver, Trajectories, as_reynolds, as_states


@torch.no_grad()
def corrected_rollout(
    model: nn.Module | None,
    solver: CoarseSolver,
    start: np.ndarray,
    reynolds: np.ndarray,
    n_steps: int,
) -> np.ndarray:
    """Corrected coarse trajectory ``c_0..c_n`` from ``start`` (black-box ``step`` only).

    ``start`` ``(B, 2, H, W)``, ``reynolds`` ``(B,)``; ``model=None`` is the plain coarse
    solver (SRC). Returns ``(B, n + 1, 2, H, W)`` float32 with ``c_0 = start``. Cost:
    ``n_steps`` solver calls of batch ``B``.
    """
    if isinstance(n_steps, bool) or not isinstance(n_steps, int | np.integer) or n_steps < 0:
        raise ValueError(f"n_steps must be a non-negative int, got {n_steps!r}")
    start = as_states(start, "start", 4)
    re = as_reynolds(reynolds, start.shape[0])
    re_t = torch.from_numpy(re.astype(np.float32))
    frames = [start]
    state, corrections = start, None
    for _ in range(n_steps):
        state = solver.step(state, corrections, reynolds=re)
        if model is None:
            frames.append(state)
            continue
        corrections = model(torch.from_numpy(state), re_t).numpy()
        frames.append(state + corrections)
    return np.stack(frames, axis=1)


def rollout_mae(
    model: nn.Module | None,
    solver: CoarseSolver,
    data: Trajectories,
    n_steps: int | None = None,
) -> np.ndarray:
    """Per simulation, the MAE of the corrected trajectory against the reference.

    Every simulation starts at its frame 0 and runs ``n_steps`` (default: all T) steps; the
    MAE (inflow speeds) is averaged over frames ``1..n_steps``, both channels and all cells.
    Returns ``(sims,)`` float64.
    """
    n = data.n_steps if n_steps is None else int(n_steps)
    if not 1 <= n <= data.n_steps:
        raise ValueError(f"n_steps must be in [1, {data.n_steps}], got {n_steps!r}")
    pred = corrected_rollout(model, solver, data.frames[:, 0], data.reynolds, n)
    err = np.abs(pred[:, 1:].astype(np.float64) - data.frames[:, 1 : n + 1])
    return err.reshape(data.n_sims, -1).mean(axis=1)
