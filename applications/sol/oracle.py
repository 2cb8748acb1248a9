"""The correction losses as oracles over the network's flat parameters (``TrainableOracle``).

* :class:`SolverInTheLoopOracle` -- ZO-SOL / FO-SOL: the loss of a corrected coarse rollout
  through ``n`` unrolled solver steps (see the package docstring for the recurrence).
* :class:`SupervisedCorrectionOracle` -- NON: the one-step loss on pre-computed pairs.

Both are :class:`~zoopt.oracle.TrainableOracle` and :class:`~zoopt.oracle.DifferentiableOracle`:
``set_batch(*batch)`` takes one item of their task's ``train_batches``; every query goes
through ``BaseOracle.batch``, i.e. the one guarded call that counts it and applies the
error policy; ``loss_and_grad`` is autograd (no query).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from zoopt import BaseOracle, check_coords
from zoopt.torch import ParamView

from .config import check_positive_int
from .data import CoarseSolver, DifferentiableSolver, as_reynolds, as_states
from .model import CorrectionModel


def stacked_params(view: ParamView, X: torch.Tensor) -> dict[str, torch.Tensor]:
    """``n`` flat parameter vectors ``X`` ``(n, dim)`` as ``{name: (n, *shape)}`` views, the
    stacked form ``vmap(functional_call)`` takes."""
    n = X.shape[0]
    return {g.name: X[:, g.start : g.stop].reshape(n, *g.shape) for g in view.groups}


class CorrectionOracle(BaseOracle):
    """What both correction oracles share: the flat parameters of ``model``, the ``n``
    perturbed networks run together, the normalized error, timing.

    Subclasses implement ``set_batch``, ``_require_batch``, ``_query_losses(params, n)``
    (black-box losses of ``n`` stacked parameter sets, no autograd) and ``_loss_torch()``
    (the differentiable loss at the model's current parameters).

    Args:
        model: the correction network (see :class:`~applications.sol.model.CorrectionModel`);
            float32 parameters.
        vectorize: run the perturbed networks with ``torch.func.vmap`` (about 2x faster than
            a loop, which instead reproduces a single query's forward bit for bit).
        max_queries_per_call: cap on queries evaluated together (bounds the solver batch).
        **policy: ``max_queries``, ``on_error``, ``on_nonfinite`` (see ``BaseOracle``).
    """

    _what = "correction loss"

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
        if not isinstance(model, CorrectionModel):
            raise TypeError(
                f"model must have a correction_std buffer (1, 2, 1, 1) that scales the errors "
                f"(a CorrectionCNN does), got {type(model).__name__}"
            )
        view = ParamView(model)
        if view.dtype != torch.float32:
            raise TypeError(f"the model's parameters must be float32, got {view.dtype}")
        if max_queries_per_call is not None:
            check_positive_int("max_queries_per_call", max_queries_per_call)
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
    def set_batch(self, *batch: Any) -> None:
        raise NotImplementedError  # pragma: no cover

    def _require_batch(self) -> None:
        raise NotImplementedError  # pragma: no cover

    def _query_losses(self, params: dict[str, torch.Tensor], n: int) -> np.ndarray:
        raise NotImplementedError  # pragma: no cover

    def _loss_torch(self) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    # -- helpers for subclasses ---------------------------------------------------------
    def _normalized_sq_error(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``((pred - target) / correction_std)^2`` in float64, same shape as ``pred``."""
        err = pred.double() - target.double()
        # read the buffer on every call: a resumed checkpoint may have replaced it
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

    # -- BaseOracle ---------------------------------------------------------------------
    def _evaluate(self, X: Any) -> Any:
        """Loss of each row of ``X`` ``(n, dim)``: ``(n,)`` float64, black-box path.

        Called by ``BaseOracle.batch`` inside its guarded call (counting, error policy).
        """
        self._require_batch()
        as_numpy = isinstance(X, np.ndarray)
        Xt = torch.as_tensor(X, dtype=self.view.dtype)
        chunk = self.max_queries_per_call or Xt.shape[0]
        out = []
        start = time.perf_counter()
        with torch.no_grad():
            for s in range(0, Xt.shape[0], chunk):
                block = Xt[s : s + chunk]
                out.append(self._query_losses(stacked_params(self.view, block), block.shape[0]))
        self.seconds["batch"].append(time.perf_counter() - start)
        values = np.concatenate(out)
        return values if as_numpy else torch.from_numpy(values)

    def base_value(self, x: torch.Tensor) -> float:
        """``f(x)``, one query (the unperturbed rollout of a ZO step), through :meth:`batch`."""
        self._require_batch()
        x = self.view.check_flat(x, "x")
        start = time.perf_counter()
        value = float(self.batch(x.reshape(1, -1))[0])
        self.seconds["base_value"].append(time.perf_counter() - start)
        return value

    def eval_coordinate_steps(self, x: Any, coords: Any, step: float) -> Any:
        """``f(x + step * e_c)`` for every ``c`` in ``coords`` ``(k,)``: ``(k,)``, ``k`` queries.

        All ``k`` points go to :meth:`batch` as ONE batch (the base class would split them by
        ``max_batch_bytes``; here every query shares the solver calls, split only by
        ``max_queries_per_call``).
        """
        self._require_batch()
        self._check_point(x)
        as_numpy = isinstance(x, np.ndarray)
        xt = self.view.check_flat(x, "x").to(self.view.dtype)
        c = check_coords(coords, self.dim)
        start = time.perf_counter()
        points = xt.reshape(1, -1).repeat(c.size, 1)
        rows = torch.arange(c.size)
        cols = torch.tensor(c)  # a copy: check_coords may return the caller's array
        points[rows, cols] = points[rows, cols] + step
        values = self.batch(points) if c.size else torch.zeros(0, dtype=torch.float64)
        self.seconds["coordinate_steps"].append(time.perf_counter() - start)
        if as_numpy:
            return values.numpy() if isinstance(values, torch.Tensor) else values
        return values

    def uncounted_value(self, x: torch.Tensor) -> float:
        """``f(x)`` on the black-box path for diagnostics: not counted as a query, not charged
        to the budget, not timed; the error policy still applies (an error names query
        ``queries``, the index the evaluation would have had)."""
        self._require_batch()
        x = self.view.check_flat(x, "x").to(self.view.dtype)

        def evaluate() -> np.ndarray:
            with torch.no_grad():
                return self._query_losses(stacked_params(self.view, x.reshape(1, -1)), 1)

        return float(self.guarded(evaluate, 1, self.queries, x.reshape(1, -1))[0])

    # -- DifferentiableOracle -----------------------------------------------------------
    def loss_and_grad(
        self, x: torch.Tensor, *, update_stats: bool = True
    ) -> tuple[float, torch.Tensor]:
        """``(f(x), ∇f(x))`` by autograd (first-order methods); not counted as a query.

        ``update_stats`` is accepted for the protocol: the network keeps no running
        statistics (its buffers are the fitted :class:`Normalization`).
        """
        self._require_batch()
        x = self.view.check_flat(x, "x")
        start = time.perf_counter()
        with self.view.loaded(x), torch.enable_grad():
            loss = self._loss_torch()
            grads = torch.autograd.grad(loss, self.view.params, allow_unused=True)
        flat = self.view.flat_grad(grads)
        self.grad_evaluations += 1
        self.seconds["loss_and_grad"].append(time.perf_counter() - start)
        return float(loss.detach()), flat

    def mean_seconds(self) -> dict[str, float]:
        """Mean wall seconds per call of each kind recorded so far."""
        return {k: float(np.mean(v)) for k, v in self.seconds.items() if v}


class SolverInTheLoopOracle(CorrectionOracle):
    """The solver-in-the-loop loss of ``model``'s flat parameters ``x``.

    ``f(x)`` = mean over the batch's windows and the ``n`` unrolled steps of the normalized
    squared error of the corrected states (see the package docstring).

    Black-box path (every ZO query, :meth:`_evaluate`): numpy ``solver.step`` only, no
    autograd; the ``Q`` queries of a call are advanced together -- per unrolled step one
    ``vmap``-ed forward of the ``Q`` perturbed networks and one solver call on ``Q * B``
    states (chunks of ``max_queries_per_call`` queries if set). Query cost: ``n`` solver calls
    per chunk. First-order path (:meth:`loss_and_grad`): the same rollout through
    ``solver.step_torch`` with autograd (the solver must be a
    :class:`~applications.sol.data.DifferentiableSolver`).

    Args:
        model: the correction network, ``model(states (B, 2, H, W), reynolds (B,))``.
        solver: a :class:`~applications.sol.data.CoarseSolver`.
        vectorize, max_queries_per_call, **policy: see :class:`CorrectionOracle`.
    """

    _what = "solver-in-the-loop loss"

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
        if not isinstance(solver, CoarseSolver):
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
        """Windows (one item of :meth:`SolverInTheLoopTask.train_batches`): start states
        ``(B, 2, H, W)``, Re ``(B,)``, reference ``(B, n, 2, H, W)``.

        ``targets[:, j]`` is the reference ``j + 1`` steps after ``start``.
        """
        start = as_states(start, "start", 4)
        targets = as_states(targets, "targets", 5)
        if targets.shape[0] != start.shape[0] or targets.shape[2:] != start.shape[1:]:
            raise ValueError(
                f"targets {targets.shape} do not match start {start.shape} (want (B, n, 2, H, W))"
            )
        if targets.shape[1] < 1:
            raise ValueError("targets must hold at least one step")
        self.reynolds = as_reynolds(reynolds, start.shape[0])
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
        solver = self.solver
        if not isinstance(solver, DifferentiableSolver):
            raise TypeError(
                f"the first-order path needs a solver with step_torch (autograd), got {solver!r}"
            )
        re_t = torch.from_numpy(self.reynolds.astype(np.float32))
        state = torch.from_numpy(self.start)
        targets = torch.from_numpy(self.targets)
        corrections = None
        total = torch.zeros((), dtype=torch.float64)
        for j in range(targets.shape[1]):
            state = solver.step_torch(state, corrections, reynolds=self.reynolds)
            corrections = self.model(state, re_t)
            total = total + self._normalized_sq_error(state + corrections, targets[:, j]).mean()
        return total / targets.shape[1]


class SupervisedCorrectionOracle(CorrectionOracle):
    """NON: the one-step supervised loss on pre-computed pairs; no solver involved.

    ``f(x)`` = mean normalized squared error of ``inputs + N(inputs)`` against ``targets``.
    A call of ``Q`` queries is one ``vmap``-ed forward of the ``Q`` networks.
    """

    def __init__(self, model: nn.Module, **policy: Any):
        super().__init__(model, **policy)
        self.inputs: np.ndarray | None = None
        self.reynolds: np.ndarray | None = None
        self.targets: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"SupervisedCorrectionOracle(dim={self.dim}, queries={self.queries})"

    def set_batch(self, inputs: Any, reynolds: Any, targets: Any) -> None:
        """Pairs (one item of :meth:`SupervisedCorrectionTask.train_batches`): coarse states
        ``(B, 2, H, W)``, Re ``(B,)``, reference ``(B, 2, H, W)``."""
        inputs = as_states(inputs, "inputs", 4)
        targets = as_states(targets, "targets", 4)
        if inputs.shape != targets.shape:
            raise ValueError(f"inputs {inputs.shape} and targets {targets.shape} differ")
        self.reynolds = as_reynolds(reynolds, inputs.shape[0])
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
