"""Solver-in-the-loop training of a flow-correction network (DeepZero Sec. 6.3, Um et al. 2020).

A coarse solver ``P`` advances a velocity state one time step; a network ``N_θ(s, Re)`` adds a
correction to the state's values so that the corrected coarse trajectory tracks a reference
(a fine simulation downsampled onto the coarse grid). From a reference frame ``r_0``::

    c_0 = r_0,    f_j = P(c_{j-1}),    c_j = f_j + N_θ(f_j, Re)        (j = 1 .. n)

``c_j`` is the corrected state (Um et al. apply the network to the solver output). The
solver-in-the-loop loss is Um et al.'s per-step L2 loss: the MSE between ``c_1..c_n`` and
``r_1..r_n``, each velocity channel divided by the typical size of a one-step correction
(:attr:`Normalization.correction_std`), so the loss is O(1) whatever the grid. Because the
solver adds corrections *before* it steps, ``f_j = P(f_{j-1} + N(f_{j-1}))`` is one call
``solver.step(f_{j-1}, N(f_{j-1}))``.

Three ways to train ``θ``, all as oracles over the flat parameter vector for
:class:`~zoopt.torch.train.Trainer`:

* ZO-SOL — :class:`SolverInTheLoopOracle` queried as a black box: for a batch of ``Q``
  parameter vectors it runs, at every unrolled step, the ``Q`` perturbed networks
  (``torch.func.vmap`` over ``functional_call``) and then the solver **once** on all
  ``Q * B`` states through its numpy ``step`` (no autograd anywhere).
* FO-SOL — the same oracle's :meth:`~SolverInTheLoopOracle.loss_and_grad`: autograd through
  the unrolled differentiable solver (``step_torch``).
* NON — :class:`SupervisedCorrectionOracle`: pre-computed one-step pairs
  ``(f = P(r_{k-1}), r_k)``; the MSE of ``f + N(f)`` against ``r_k``; no solver in training.

Arrays: states are ``(batch, 2, H, W)`` float32 in the solver's layout (see
``oracles/wake_flow.py``); Reynolds numbers ``(batch,)``; trajectories
``(sims, frames, 2, H, W)``. Velocities are in inflow speeds, time in solver steps.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from ..oracle import BaseOracle
from .params import ParamView
from .tasks import ModuleTaskMixin

__all__ = [
    "CoarseSolver",
    "CorrectionCNN",
    "Normalization",
    "SolverInTheLoopOracle",
    "SolverInTheLoopTask",
    "SupervisedCorrectionOracle",
    "SupervisedCorrectionTask",
    "Trajectories",
    "corrected_rollout",
    "one_step_pairs",
    "rollout_mae",
]


class CoarseSolver(Protocol):
    """What the oracles need from the coarse solver (``oracles.wake_flow.WakeFlowSimulator``).

    ``step`` is the black box: numpy in, numpy out, ``corrections`` added to the state values
    before the step, ``reynolds`` one value per batch member. ``step_torch`` is the same step
    on torch tensors with autograd (FO-SOL only).
    """

    resolution: tuple[int, int]

    def step(
        self,
        states: np.ndarray,
        corrections: np.ndarray | None = None,
        *,
        reynolds: float | np.ndarray | None = None,
    ) -> np.ndarray: ...

    def step_torch(
        self,
        states: torch.Tensor,
        corrections: torch.Tensor | None = None,
        *,
        reynolds: float | np.ndarray | None = None,
    ) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trajectories:
    """Reference trajectories of several simulations.

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


def one_step_pairs(
    solver: CoarseSolver, data: Trajectories
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pre-computed coarse/fine pairs of NON: one plain coarse step from every frame.

    Returns ``(inputs, reynolds, targets)``: ``inputs = P(r_{k-1})`` ``(N, 2, H, W)``,
    ``reynolds`` ``(N,)`` and ``targets = r_k`` ``(N, 2, H, W)`` for every simulation and
    ``k = 1..T`` (``N = sims * T``). ``targets - inputs`` is the ideal one-step correction.
    One solver call per simulation (batch T).
    """
    inputs, reynolds, targets = [], [], []
    for frames, re in zip(data.frames, data.reynolds, strict=True):
        t = frames.shape[0] - 1
        inputs.append(solver.step(frames[:-1], reynolds=np.full(t, re)))
        reynolds.append(np.full(t, re))
        targets.append(frames[1:])
    return (
        np.concatenate(inputs).astype(np.float32, copy=False),
        np.concatenate(reynolds),
        np.concatenate(targets).astype(np.float32, copy=False),
    )


# --------------------------------------------------------------------------------------
# The correction network
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Normalization:
    """Input/output scaling of :class:`CorrectionCNN`, fitted on the training data.

    Attributes:
        velocity_mean, velocity_std: per velocity channel (u_x, u_y) of the states.
        log_re_mean, log_re_std: of ``ln Re`` over the training simulations (the Re input
            channel is ``(ln Re - mean) / std``: Re values are spread geometrically).
        correction_std: per channel, the RMS of the ideal one-step corrections; the network's
            output is multiplied by it and the losses divide errors by it.
    """

    velocity_mean: tuple[float, float]
    velocity_std: tuple[float, float]
    log_re_mean: float
    log_re_std: float
    correction_std: tuple[float, float]

    def __post_init__(self) -> None:
        for name in ("velocity_std", "correction_std"):
            if not all(math.isfinite(v) and v > 0 for v in getattr(self, name)):
                raise ValueError(f"{name} must be positive and finite, got {getattr(self, name)}")
        if not (math.isfinite(self.log_re_std) and self.log_re_std > 0):
            raise ValueError(f"log_re_std must be positive, got {self.log_re_std}")

    @classmethod
    def fit(
        cls, states: np.ndarray, reynolds: Sequence[float] | np.ndarray, corrections: np.ndarray
    ) -> Normalization:
        """From states ``(..., 2, H, W)``, the training Re and corrections ``(..., 2, H, W)``."""
        s = np.asarray(states, dtype=np.float64)
        c = np.asarray(corrections, dtype=np.float64)
        if s.ndim < 3 or s.shape[-3] != 2 or c.ndim < 3 or c.shape[-3] != 2:
            raise ValueError(
                f"states and corrections need shape (..., 2, H, W), got {s.shape} and {c.shape}"
            )
        s = np.moveaxis(s, -3, 0).reshape(2, -1)
        c = np.moveaxis(c, -3, 0).reshape(2, -1)
        log_re = np.log(np.asarray(reynolds, dtype=np.float64))
        # one Re: the channel is constant, so any positive std just centres it
        log_re_std = float(log_re.std()) if log_re.size > 1 and log_re.std() > 0 else 1.0
        return cls(
            velocity_mean=tuple(float(v) for v in s.mean(axis=1)),
            velocity_std=tuple(float(max(v, 1e-6)) for v in s.std(axis=1)),
            log_re_mean=float(log_re.mean()),
            log_re_std=log_re_std,
            correction_std=tuple(float(max(v, 1e-8)) for v in np.sqrt((c**2).mean(axis=1))),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CorrectionCNN(nn.Module):
    """A small fully convolutional correction network ``N(s, Re) -> corrections``.

    Input: the normalized velocity (2 channels) and the normalized ``ln Re`` as a constant
    third channel; ``depth`` 'same'-padded ``kernel_size`` convolutions with ``width``
    channels and tanh in between (smooth, so finite differences see no kinks); output: 2
    channels times :attr:`Normalization.correction_std`, added to the velocity *values*. The
    top row of u_y (the top wall, ignored by the solver) is always 0.

    Args:
        normalization: see :class:`Normalization` (kept in buffers, so checkpoints carry it).
        width: hidden channels.
        depth: number of convolutions (>= 2).
        kernel_size: odd kernel size.
        final_gain: scale of the last convolution's initial weights (its bias starts at 0).
            Keep the default 1 for ZO-GraSP: its scores are ``-θ ⊙ Hg``, so a shrunken output
            layer scores ~0 and gets almost no coordinates (0.1 left 1 of 144 weights).

    With the defaults (8 channels, 3 layers, 5x5) it has 2,618 parameters.
    """

    def __init__(
        self,
        normalization: Normalization,
        *,
        width: int = 8,
        depth: int = 3,
        kernel_size: int = 5,
        final_gain: float = 1.0,
    ):
        super().__init__()
        for name, value in (("width", width), ("depth", depth), ("kernel_size", kernel_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd ('same' padding), got {kernel_size}")
        if not isinstance(normalization, Normalization):
            raise TypeError(f"normalization must be a Normalization, got {normalization!r}")
        self.normalization = normalization
        pad = kernel_size // 2
        channels = [3] + [width] * (depth - 1) + [2]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
            layers.append(nn.Conv2d(c_in, c_out, kernel_size, padding=pad))
            if i < depth - 1:
                layers.append(nn.Tanh())
        self.body = nn.Sequential(*layers)
        with torch.no_grad():
            last = self.body[-1]
            last.weight.mul_(final_gain)
            last.bias.zero_()
        n = normalization
        self.register_buffer("velocity_mean", _channel_tensor(n.velocity_mean))
        self.register_buffer("velocity_std", _channel_tensor(n.velocity_std))
        self.register_buffer("correction_std", _channel_tensor(n.correction_std))
        self.register_buffer("log_re", torch.tensor([n.log_re_mean, n.log_re_std]))

    def forward(self, states: torch.Tensor, reynolds: torch.Tensor) -> torch.Tensor:
        """Corrections ``(B, 2, H, W)`` for states ``(B, 2, H, W)`` and Re ``(B,)``."""
        b, _, h, w = states.shape
        velocity = (states - self.velocity_mean) / self.velocity_std
        re = (torch.log(reynolds.to(states.dtype)) - self.log_re[0]) / self.log_re[1]
        re = re.reshape(b, 1, 1, 1).expand(b, 1, h, w)
        out = self.body(torch.cat([velocity, re], dim=1)) * self.correction_std
        # u_y's top row is the top wall: the solver ignores it, so the loss should too
        u_y = nn.functional.pad(out[:, 1:, :-1], (0, 0, 0, 1))
        return torch.cat([out[:, :1], u_y], dim=1)


def _channel_tensor(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32).reshape(1, 2, 1, 1)


# --------------------------------------------------------------------------------------
# Oracles
# --------------------------------------------------------------------------------------
class _CorrectionOracle(BaseOracle):
    """Shared machinery: flat parameters of ``model``, batched perturbed networks, timing.

    Subclasses implement ``_query_losses(params, n)`` (black-box losses of ``n`` stacked
    parameter sets, no autograd) and ``_loss_torch()`` (the differentiable loss at the
    model's current parameters).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        vectorize: bool = True,
        max_queries_per_call: int | None = None,
        **policy: Any,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        view = ParamView(model)
        if view.dtype != torch.float32:
            raise TypeError(f"the model's parameters must be float32, got {view.dtype}")
        if max_queries_per_call is not None and (
            isinstance(max_queries_per_call, bool)
            or not isinstance(max_queries_per_call, int)
            or max_queries_per_call < 1
        ):
            raise ValueError(
                f"max_queries_per_call must be a positive int or None, got {max_queries_per_call!r}"
            )
        super().__init__(view.dim, **policy)
        self.model = model
        self.view = view
        self.max_queries_per_call = max_queries_per_call
        self.vectorize = bool(vectorize)
        self.grad_evaluations = 0
        #: wall seconds of every call, by kind: "base_value", "coordinate_steps",
        #: "loss_and_grad", "batch".
        self.seconds: dict[str, list[float]] = defaultdict(list)

    # -- to implement -------------------------------------------------------------------
    def _query_losses(self, params: dict[str, torch.Tensor], n: int) -> np.ndarray:
        raise NotImplementedError  # pragma: no cover

    def _loss_torch(self) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def _require_batch(self) -> None:
        raise NotImplementedError  # pragma: no cover

    # -- helpers for subclasses ---------------------------------------------------------
    def _normalized_sq_error(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``((pred - target) / correction_std)^2`` in float64, same shape as ``pred``."""
        err = pred.double() - target.double()
        # read the buffer on every call: a resumed checkpoint may have replaced it
        if _has_scale(self.model):
            err = err / self.model.correction_std.detach().double()
        return err * err

    def _corrections(
        self, params: dict[str, torch.Tensor], states: torch.Tensor, reynolds: torch.Tensor
    ) -> torch.Tensor:
        """``n`` networks on their own states: params ``(n, ...)``, states ``(n, B, 2, H, W)``.

        ``vectorize``: one ``vmap``-ed call (grouped convolutions; rounds differently from a
        single network's forward by ~1e-9); otherwise a loop, each query computed exactly as
        if it were queried alone.
        """

        def one(p: dict[str, torch.Tensor], s: torch.Tensor) -> torch.Tensor:
            return functional_call(self.model, p, (s, reynolds))

        if self.vectorize:
            return vmap(one)(params, states)
        return torch.stack(
            [one({k: v[i] for k, v in params.items()}, states[i]) for i in range(len(states))]
        )

    def _stacked_params(self, X: torch.Tensor) -> dict[str, torch.Tensor]:
        n = X.shape[0]
        return {g.name: X[:, g.start : g.stop].reshape(n, *g.shape) for g in self.view.groups}

    # -- BaseOracle ---------------------------------------------------------------------
    def _evaluate(self, X: Any) -> Any:
        """Loss of each row of ``X`` ``(n, dim)``: ``(n,)`` float64, black-box path."""
        self._require_batch()
        as_numpy = isinstance(X, np.ndarray)
        Xt = torch.as_tensor(X, dtype=self.view.dtype)
        chunk = self.max_queries_per_call or Xt.shape[0]
        out = []
        start = time.perf_counter()
        with torch.no_grad():
            for s in range(0, Xt.shape[0], chunk):
                block = Xt[s : s + chunk]
                out.append(self._query_losses(self._stacked_params(block), block.shape[0]))
        self.seconds["batch"].append(time.perf_counter() - start)
        values = np.concatenate(out)
        return values if as_numpy else torch.from_numpy(values)

    def base_value(self, x: torch.Tensor) -> float:
        """``f(x)``, one query (the unperturbed rollout of a ZO step)."""
        self._require_batch()
        x = self.view.check_flat(x, "x")
        start = time.perf_counter()
        value = float(self.batch(x.reshape(1, -1))[0])
        self.seconds["base_value"].append(time.perf_counter() - start)
        return value

    def eval_coordinate_steps(self, x: Any, coords: Any, step: float) -> Any:
        """``f(x + step * e_c)`` for every ``c`` in ``coords``: all as ONE batch of queries.

        (The base class would split the points by ``max_batch_bytes``; here every query
        shares the solver calls, split only by ``max_queries_per_call``.)
        """
        self._require_batch()
        self._check_point(x)
        as_numpy = isinstance(x, np.ndarray)
        xt = self.view.check_flat(x, "x").to(self.view.dtype)
        c = np.asarray(coords.cpu() if isinstance(coords, torch.Tensor) else coords)
        c = c.astype(np.int64).reshape(-1)
        if c.size and (c.min() < 0 or c.max() >= self.dim):
            raise ValueError(f"coords out of range for dim={self.dim}")
        start = time.perf_counter()
        points = xt.reshape(1, -1).repeat(c.size, 1)
        rows = torch.arange(c.size)
        cols = torch.from_numpy(c)
        points[rows, cols] = points[rows, cols] + step
        values = self.batch(points) if c.size else torch.zeros(0, dtype=torch.float64)
        self.seconds["coordinate_steps"].append(time.perf_counter() - start)
        if as_numpy:
            return values.numpy() if isinstance(values, torch.Tensor) else values
        return values

    def loss_and_grad(self, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        """``(f(x), ∇f(x))`` by autograd (first-order methods); not counted as a query."""
        self._require_batch()
        x = self.view.check_flat(x, "x")
        start = time.perf_counter()
        with self.view.loaded(x), torch.enable_grad():
            loss = self._loss_torch()
            grads = torch.autograd.grad(loss, self.view.params, allow_unused=True)
        flat = torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).reshape(-1)
                for p, g in zip(self.view.params, grads, strict=True)
            ]
        )
        self.grad_evaluations += 1
        self.seconds["loss_and_grad"].append(time.perf_counter() - start)
        return float(loss.detach()), flat.detach().to(self.view.dtype)

    def mean_seconds(self) -> dict[str, float]:
        """Mean wall seconds per call of each kind recorded so far."""
        return {k: float(np.mean(v)) for k, v in self.seconds.items() if v}


def _has_scale(model: nn.Module) -> bool:
    return isinstance(getattr(model, "correction_std", None), torch.Tensor)


def _as_reynolds(reynolds: Any, batch: int) -> np.ndarray:
    re = np.asarray(reynolds, dtype=np.float64).reshape(-1)
    if re.shape[0] != batch:
        raise ValueError(f"reynolds has {re.shape[0]} values for a batch of {batch}")
    if not np.all(np.isfinite(re) & (re > 0)):
        raise ValueError(f"reynolds must be finite and > 0, got {re.tolist()}")
    return re


def _as_states(states: Any, name: str, ndim: int) -> np.ndarray:
    if isinstance(states, torch.Tensor):
        states = states.detach().cpu().numpy()
    a = np.asarray(states)
    if a.ndim != ndim or a.shape[-3] != 2:
        raise ValueError(f"{name} must be {ndim}-D with 2 velocity channels, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values")
    return np.ascontiguousarray(a, dtype=np.float32)


class SolverInTheLoopOracle(_CorrectionOracle):
    """The solver-in-the-loop loss of ``model``'s flat parameters ``x``.

    ``f(x)`` = mean over the batch's windows and the ``n`` unrolled steps of the normalized
    squared error of the corrected states (see the module docstring).

    Black-box path (every ZO query, :meth:`_evaluate`): numpy ``solver.step`` only, no
    autograd; the ``Q`` queries of a call are advanced together — per unrolled step one
    ``vmap``-ed forward of the ``Q`` perturbed networks and one solver call on ``Q * B``
    states (chunks of ``max_queries_per_call`` queries if set). First-order path
    (:meth:`loss_and_grad`): the same rollout through ``solver.step_torch`` with autograd.

    Args:
        model: the correction network, ``model(states (B, 2, H, W), reynolds (B,))``.
        solver: see :class:`CoarseSolver`.
        vectorize: run the perturbed networks with ``torch.func.vmap`` (about 2x faster than
            a loop, which instead reproduces a single query's forward bit for bit).
        max_queries_per_call: cap on queries advanced together (bounds the solver batch).
        **policy: ``max_queries``, ``on_error``, ``on_nonfinite`` (see ``BaseOracle``).
    """

    def __init__(
        self,
        model: nn.Module,
        solver: CoarseSolver,
        *,
        vectorize: bool = True,
        max_queries_per_call: int | None = None,
        **policy: Any,
    ):
        super().__init__(
            model, vectorize=vectorize, max_queries_per_call=max_queries_per_call, **policy
        )
        if not callable(getattr(solver, "step", None)):
            raise TypeError(
                f"solver must have a step(states, corrections, reynolds=) method, got {solver!r}"
            )
        self.solver = solver
        self.start: np.ndarray | None = None
        self.reynolds: np.ndarray | None = None
        self.targets: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"SolverInTheLoopOracle(dim={self.dim}, queries={self.queries})"

    @property
    def n_steps(self) -> int:
        """Unrolled steps of the current batch."""
        self._require_batch()
        return int(self.targets.shape[1])

    def set_batch(self, start: Any, reynolds: Any, targets: Any) -> None:
        """Windows: start states ``(B, 2, H, W)``, Re ``(B,)``, reference ``(B, n, 2, H, W)``.

        ``targets[:, j]`` is the reference ``j + 1`` steps after ``start``.
        """
        start = _as_states(start, "start", 4)
        targets = _as_states(targets, "targets", 5)
        if targets.shape[0] != start.shape[0] or targets.shape[2:] != start.shape[1:]:
            raise ValueError(
                f"targets {targets.shape} do not match start {start.shape} (want (B, n, 2, H, W))"
            )
        if targets.shape[1] < 1:
            raise ValueError("targets must hold at least one step")
        self.reynolds = _as_reynolds(reynolds, start.shape[0])
        self.start, self.targets = start, targets

    def _require_batch(self) -> None:
        if self.start is None:
            raise ValueError("no batch: call set_batch(start, reynolds, targets) first")

    def _query_losses(self, params: dict[str, torch.Tensor], n: int) -> np.ndarray:
        start, targets, re = self.start, self.targets, self.reynolds
        b = start.shape[0]
        re_t = torch.from_numpy(re.astype(np.float32))
        re_all = np.tile(re, n)  # query-major: query q owns rows q*B .. q*B + B - 1
        targets_t = torch.from_numpy(targets)
        states = np.tile(start, (n, 1, 1, 1))  # (n * B, 2, H, W), query-major
        corrections = None
        total = torch.zeros(n, dtype=torch.float64)
        for j in range(targets.shape[1]):
            states = self.solver.step(states, corrections, reynolds=re_all)
            f = torch.from_numpy(states).reshape(n, b, *start.shape[1:])
            corr = self._corrections(params, f, re_t)
            err = self._normalized_sq_error(f + corr, targets_t[:, j].unsqueeze(0))
            total += err.reshape(n, -1).mean(dim=1)
            corrections = np.ascontiguousarray(corr.reshape(n * b, *start.shape[1:]).numpy())
        return (total / targets.shape[1]).numpy()

    def _loss_torch(self) -> torch.Tensor:
        re_t = torch.from_numpy(self.reynolds.astype(np.float32))
        state = torch.from_numpy(self.start)
        targets = torch.from_numpy(self.targets)
        corrections = None
        total = torch.zeros((), dtype=torch.float64)
        for j in range(targets.shape[1]):
            state = self.solver.step_torch(state, corrections, reynolds=self.reynolds)
            corrections = self.model(state, re_t)
            total = total + self._normalized_sq_error(state + corrections, targets[:, j]).mean()
        return total / targets.shape[1]


class SupervisedCorrectionOracle(_CorrectionOracle):
    """NON: the one-step supervised loss on pre-computed pairs; no solver involved.

    ``f(x)`` = mean normalized squared error of ``inputs + N(inputs)`` against ``targets``.
    """

    def __init__(self, model: nn.Module, **policy: Any):
        super().__init__(model, **policy)
        self.inputs: np.ndarray | None = None
        self.reynolds: np.ndarray | None = None
        self.targets: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"SupervisedCorrectionOracle(dim={self.dim}, queries={self.queries})"

    def set_batch(self, inputs: Any, reynolds: Any, targets: Any) -> None:
        """Pairs: coarse states ``(B, 2, H, W)``, Re ``(B,)``, reference ``(B, 2, H, W)``."""
        inputs = _as_states(inputs, "inputs", 4)
        targets = _as_states(targets, "targets", 4)
        if inputs.shape != targets.shape:
            raise ValueError(f"inputs {inputs.shape} and targets {targets.shape} differ")
        self.reynolds = _as_reynolds(reynolds, inputs.shape[0])
        self.inputs, self.targets = inputs, targets

    def _require_batch(self) -> None:
        if self.inputs is None:
            raise ValueError("no batch: call set_batch(inputs, reynolds, targets) first")

    def _query_losses(self, params: dict[str, torch.Tensor], n: int) -> np.ndarray:
        f = torch.from_numpy(self.inputs)
        re_t = torch.from_numpy(self.reynolds.astype(np.float32))
        corr = self._corrections(params, f.unsqueeze(0).expand(n, *f.shape), re_t)
        err = self._normalized_sq_error(f + corr, torch.from_numpy(self.targets).unsqueeze(0))
        return err.reshape(n, -1).mean(dim=1).numpy()

    def _loss_torch(self) -> torch.Tensor:
        f = torch.from_numpy(self.inputs)
        re_t = torch.from_numpy(self.reynolds.astype(np.float32))
        corrected = f + self.model(f, re_t)
        return self._normalized_sq_error(corrected, torch.from_numpy(self.targets)).mean()


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------
@torch.no_grad()
def corrected_rollout(
    model: nn.Module | None,
    solver: CoarseSolver,
    start: np.ndarray,
    reynolds: np.ndarray,
    n_steps: int,
) -> np.ndarray:
    """Corrected coarse trajectory ``c_0..c_n`` from ``start`` (black-box ``step`` only).

    ``model=None`` is the plain coarse solver (SRC). Returns ``(B, n + 1, 2, H, W)``
    float32 with ``c_0 = start``.
    """
    if isinstance(n_steps, bool) or not isinstance(n_steps, int | np.integer) or n_steps < 0:
        raise ValueError(f"n_steps must be a non-negative int, got {n_steps!r}")
    start = _as_states(start, "start", 4)
    re = _as_reynolds(reynolds, start.shape[0])
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
    MAE is averaged over frames ``1..n_steps``, both channels and all cells. ``(sims,)``.
    """
    n = data.n_steps if n_steps is None else int(n_steps)
    if not 1 <= n <= data.n_steps:
        raise ValueError(f"n_steps must be in [1, {data.n_steps}], got {n_steps!r}")
    pred = corrected_rollout(model, solver, data.frames[:, 0], data.reynolds, n)
    err = np.abs(pred[:, 1:].astype(np.float64) - data.frames[:, 1 : n + 1])
    return err.reshape(data.n_sims, -1).mean(axis=1)


# --------------------------------------------------------------------------------------
# Tasks for zoopt.torch.train.Trainer
# --------------------------------------------------------------------------------------
class _CorrectionTask(ModuleTaskMixin):
    """What both tasks share: the test evaluation (the flat parameters and the buffers,
    i.e. the :class:`Normalization` a checkpoint carries, come from ``ModuleTaskMixin``)."""

    model: nn.Module
    oracle: _CorrectionOracle
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
        black-box path, one query, not counted and not timed; replaces the oracle's batch.
        """
        oracle = self.oracle
        oracle.set_batch(*self.training_batch())
        x = self.parameters_vector().reshape(1, -1).to(oracle.view.dtype)
        with torch.no_grad():
            return float(oracle._query_losses(oracle._stacked_params(x), 1)[0])


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


class SolverInTheLoopTask(_CorrectionTask):
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
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
        if n_steps > train.n_steps:
            raise ValueError(
                f"n_steps={n_steps} exceeds the {train.n_steps} steps of the training trajectories"
            )
        self.model = model
        self.solver = solver
        self.train, self.test = train, test
        self.n_steps = n_steps
        self.batch_size = _check_batch_size(batch_size)
        self.eval_steps = eval_steps
        self.oracle = SolverInTheLoopOracle(model, solver, **oracle_kwargs)
        self.groups = self.oracle.view.groups
        starts = np.arange(train.n_steps - n_steps + 1)
        #: (sim, start frame) of every training window
        self.windows = np.array([(s, k) for s in range(train.n_sims) for k in starts])

    def steps_per_epoch(self) -> int:
        return -(-len(self.windows) // self.batch_size)

    def window_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(start, reynolds, targets)`` of the windows ``indices`` (into :attr:`windows`)."""
        sims, ks = self.windows[indices, 0], self.windows[indices, 1]
        start = self.train.frames[sims, ks]
        targets = np.stack(
            [
                self.train.frames[s, k + 1 : k + 1 + self.n_steps]
                for s, k in zip(sims, ks, strict=True)
            ]
        )
        return start, self.train.reynolds[sims], targets

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[tuple]:
        order = rng.permutation(len(self.windows))
        for s in range(0, len(order), self.batch_size):
            yield self.window_batch(order[s : s + self.batch_size])

    def scoring_batch(self, rng: np.random.Generator) -> tuple:
        return self.window_batch(rng.choice(len(self.windows), self.batch_size, replace=False))

    def training_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every training window (``len(windows)`` of them; one solver batch per step)."""
        return self.window_batch(np.arange(len(self.windows)))


class SupervisedCorrectionTask(_CorrectionTask):
    """NON training: minibatches of the pre-computed one-step pairs (see :func:`one_step_pairs`).

    Args:
        model: the correction network.
        pairs: ``(inputs, reynolds, targets)``.
        solver, test, eval_steps: for the test rollouts only.
        batch_size: pairs per step.
    """

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
        self.inputs = _as_states(inputs, "inputs", 4)
        self.targets = _as_states(targets, "targets", 4)
        self.reynolds = _as_reynolds(reynolds, self.inputs.shape[0])
        if self.targets.shape != self.inputs.shape:
            raise ValueError(f"inputs {self.inputs.shape} and targets {self.targets.shape} differ")
        self.model = model
        self.solver = solver
        self.test = test
        self.batch_size = _check_batch_size(batch_size)
        self.eval_steps = eval_steps
        self.oracle = SupervisedCorrectionOracle(model, **oracle_kwargs)
        self.groups = self.oracle.view.groups

    def steps_per_epoch(self) -> int:
        return -(-self.inputs.shape[0] // self.batch_size)

    def _batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.inputs[idx], self.reynolds[idx], self.targets[idx]

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[tuple]:
        order = rng.permutation(self.inputs.shape[0])
        for s in range(0, len(order), self.batch_size):
            yield self._batch(order[s : s + self.batch_size])

    def scoring_batch(self, rng: np.random.Generator) -> tuple:
        n = min(self.batch_size, self.inputs.shape[0])
        return self._batch(rng.choice(self.inputs.shape[0], n, replace=False))

    def training_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every pre-computed pair."""
        return self.inputs, self.reynolds, self.targets
