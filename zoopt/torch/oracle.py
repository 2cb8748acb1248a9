"""A torch model + loss + minibatch as a counted ZO oracle over the flat parameter vector."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .._coords import check_coords
from ..directions import DirectionSteps
from ..oracle import DEFAULT_MAX_BATCH_BYTES, BaseOracle
from .engine import LossFn, SparseCGEEngine, cast_for_loss
from .engine.graph import same_randomness
from .params import ParamView, preserved_buffers
from .replica import load_module_state, module_state


class ModuleOracle(BaseOracle):
    """``f(x) = loss_fn(module(inputs), targets)`` with the parameters set to ``x``.

    ``x`` is a flat torch tensor of shape ``(dim,)`` in the parameters' dtype and device
    (see :attr:`view`). Evaluating never changes the module's parameters, and only
    :meth:`base_value` (and :meth:`loss_and_grad`) update BatchNorm running statistics; in
    training mode every query normalizes with its own batch statistics.

    Args:
        module: the network.
        loss_fn: ``loss_fn(logits, targets) -> scalar`` batch mean (e.g. ``F.cross_entropy``).
        inputs, targets: the minibatch (or call :meth:`set_batch` later).
        engine: serve :meth:`eval_coordinate_steps` with :class:`SparseCGEEngine`
            (``False``: the base class builds perturbed points and runs full forwards).
        max_batch_bytes: memory cap for one chunk of queries (engine: activations; base
            class: perturbed points). ``None``: the engine's per-device default.
        memory_format: the engine's layout for 4-D activations (see :class:`SparseCGEEngine`).
            With the engine, every forward of this oracle is the engine's base forward, so
            that all values round alike.
        loss_dtype: dtype the loss is reduced in (default float64, so the loss differences
            CGE divides by ``mu`` are not rounded to float32); values come back in it.
        per_sample_modules: module types the engine may run once on all ``Q * B`` perturbed
            samples of a chunk (they map each sample on its own and keep no state, e.g. a
            black-box classifier stage); see :class:`SparseCGEEngine`.
        max_cache_bytes: cap on the engine's per-step activation cache; beyond it the engine
            recomputes activations from the nearest cached ones (``None``: no cap).
        **policy: ``max_queries``, ``on_error``, ``on_nonfinite`` (see :class:`BaseOracle`).
    """

    def __init__(
        self,
        module: nn.Module,
        loss_fn: LossFn,
        inputs: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        *,
        engine: bool = True,
        max_batch_bytes: int | None = None,
        memory_format: str = "auto",
        loss_dtype: torch.dtype | None = torch.float64,
        per_sample_modules: tuple[type[nn.Module], ...] = (),
        max_cache_bytes: int | None = None,
        **policy: Any,
    ):
        given = locals()
        #: every keyword this oracle was built with (its options and policy), read from the
        #: signature so that a replica (:class:`ModuleOracleFactory`) is built the same way
        self.options: dict[str, Any] = {name: given[name] for name in _KEYWORDS} | policy
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        view = ParamView(module)
        super().__init__(
            view.dim, max_batch_bytes=max_batch_bytes or DEFAULT_MAX_BATCH_BYTES, **policy
        )
        self.module = module
        self.loss_fn = loss_fn
        self.view = view
        self.loss_dtype = loss_dtype
        self.values_dtype = loss_dtype or view.dtype
        self.engine = (
            SparseCGEEngine(
                module,
                loss_fn,
                view=view,
                chunk_bytes=max_batch_bytes,
                memory_format=memory_format,
                loss_dtype=loss_dtype,
                per_sample_modules=per_sample_modules,
                max_cache_bytes=max_cache_bytes,
            )
            if engine
            else None
        )
        self.inputs: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        self.grad_evaluations = 0
        if inputs is not None or targets is not None:
            self.set_batch(inputs, targets)

    _what = "model"

    def __repr__(self) -> str:
        return (
            f"ModuleOracle({type(self.module).__name__}, dim={self.dim}, "
            f"engine={self.engine is not None}, queries={self.queries})"
        )

    # -- data ---------------------------------------------------------------------------
    def set_batch(self, inputs: Any, targets: Any) -> None:
        """Use this minibatch from now on: ``inputs (B, ...)``, ``targets (B, ...)``.

        ``inputs`` is one tensor (or numpy array), passed to the model as ``module(inputs)``:
        floating inputs are cast to the parameters' dtype, integer inputs (token ids
        ``(B, T)``) are kept as they are. ``targets`` keep their dtype (the loss casts
        floating ones to ``loss_dtype``). A model that needs several inputs (``input_ids``
        and ``attention_mask``) is wrapped in a module taking one tensor (docs/your_model.md).
        """
        if hasattr(inputs, "keys") and not isinstance(inputs, torch.Tensor):  # a dict
            raise TypeError(
                f"inputs must be one tensor, got a {type(inputs).__name__} with keys "
                f"{sorted(map(str, inputs))}: wrap the model in a module whose forward takes "
                "one tensor and builds the other inputs (see 'Hugging Face models' in "
                "docs/your_model.md)"
            )
        inputs = _as_tensor(inputs, "inputs").to(self.view.device)
        targets = _as_tensor(targets, "targets").to(self.view.device)
        if inputs.ndim < 1 or targets.ndim < 1 or inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"inputs and targets need the same batch size, got shapes {tuple(inputs.shape)} "
                f"and {tuple(targets.shape)}"
            )
        if inputs.shape[0] == 0:
            raise ValueError("the batch is empty")
        if inputs.is_floating_point() and inputs.dtype != self.view.dtype:
            inputs = inputs.to(self.view.dtype)
        self.inputs = inputs
        self.targets = targets
        self._batch_seed: int | None = None

    def _same_randomness(self) -> contextlib.AbstractContextManager:
        """Every forward on the current batch draws the same random numbers (dropout masks...).

        A finite difference between two forwards with different dropout masks is noise, so
        in training mode each forward runs with torch's generators seeded from the batch's
        contents (the same seed on every worker of a distributed oracle); the generators are
        restored afterwards. Another batch gets other masks.
        """
        if not any(m.training for m in self.module.modules()):
            return contextlib.nullcontext()
        if self._batch_seed is None:
            inputs, targets = self._minibatch()
            self._batch_seed = _content_seed(inputs, targets)
        return same_randomness(self._batch_seed, self.view.device)

    def explain(self) -> str:
        """The engine's plan for this model and batch (see ``SparseCGEEngine.explain``)."""
        if self.engine is None:
            return "ModuleOracle(engine=False): every query runs a full forward"
        inputs, _ = self._minibatch()
        with self._same_randomness(), torch.no_grad(), preserved_buffers(self.module):
            return self.engine.explain(inputs)

    def _minibatch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inputs is None or self.targets is None:
            raise ValueError("no minibatch: call set_batch(inputs, targets) first")
        return self.inputs, self.targets

    # -- evaluation ---------------------------------------------------------------------
    def _loss(self, output: Any, targets: torch.Tensor) -> torch.Tensor:
        """``loss_fn(output, targets)`` on the model's output as it returns it (a tensor, a
        tuple, a dict, a ``ModelOutput``), its floating tensors cast to ``loss_dtype``."""
        return self.loss_fn(*cast_for_loss(output, targets, self.loss_dtype))

    def _evaluate(self, X: Any) -> Any:
        """Loss at each row of ``X`` (``(n, dim)``); running statistics untouched.

        With the engine, each forward is the engine's base forward, so these values round
        exactly like the engine's coordinate values and ``base_value``.
        """
        inputs, targets = self._minibatch()
        as_numpy = isinstance(X, np.ndarray)
        Xt = torch.as_tensor(X, device=self.view.device, dtype=self.view.dtype)
        out = torch.empty(Xt.shape[0], dtype=self.values_dtype, device=self.view.device)
        for i in range(Xt.shape[0]):
            with self.view.loaded(Xt[i]):
                out[i] = self._current_loss(inputs, targets)
        return out.cpu().numpy() if as_numpy else out

    def base_value(self, x: torch.Tensor) -> float:
        """``f(x)``: the unperturbed training forward, which DOES update running statistics.

        Costs one query. With the engine it also fills the engine's per-step cache, so the
        coordinate queries at the same ``x`` that follow skip their own base forward.
        """
        x = self.view.check_flat(x, "x")
        inputs, targets = self._minibatch()
        first = self._charge(1)

        def forward() -> torch.Tensor:
            with self._same_randomness():
                if self.engine is not None:
                    value = self.engine.base_forward(x, inputs, targets, update_stats=True)
                else:
                    with torch.no_grad(), self.view.loaded(x):
                        value = float(self._loss(self.module(inputs), targets))
            return torch.tensor([value], dtype=self.values_dtype, device=x.device)

        values = self.guarded(forward, 1, first, x[None])
        self._track_best(values, lambda i: x)
        return float(values[0])

    def loss_and_grad(
        self, x: torch.Tensor, *, update_stats: bool = True
    ) -> tuple[float, torch.Tensor]:
        """``(f(x), ∇f(x))`` by autograd; the gradient is flat, shape ``(dim,)``.

        For first-order baselines and FO-GraSP. Not counted as a ZO query (counted in
        ``grad_evaluations``). ``update_stats``: whether this forward updates BatchNorm
        running statistics (as a first-order training step does).
        """
        x = self.view.check_flat(x, "x")
        inputs, targets = self._minibatch()
        stats = contextlib.nullcontext() if update_stats else preserved_buffers(self.module)
        with self.view.loaded(x), stats, torch.enable_grad(), self._same_randomness():
            loss = self._loss(self.module(inputs), targets)
            grads = torch.autograd.grad(loss, self.view.params, allow_unused=True)
        self.grad_evaluations += 1
        return float(loss.detach()), self.view.flat_grad(grads)

    def eval_coordinate_steps(self, x: Any, coords: Any, step: float) -> Any:
        """``f(x + step * e_c)`` for each ``c`` in ``coords`` → ``(k,)``; costs ``k`` queries.

        With the engine: all coordinates in one pass of :class:`SparseCGEEngine` (exact);
        otherwise the base class's chunked full forwards.
        """
        if self.engine is None:
            return super().eval_coordinate_steps(x, coords, step)
        self._check_point(x)
        as_numpy = isinstance(x, np.ndarray)
        xt = self.view.check_flat(x, "x").to(self.view.device, self.view.dtype)
        coords_np = check_coords(coords, self.dim)
        k = int(coords_np.shape[0])
        inputs, targets = self._minibatch()
        first = self._charge(k)

        def queries() -> torch.Tensor:
            with self._same_randomness():
                return self.engine.coordinate_values(xt, coords_np, step, inputs, targets)

        def point(i: int) -> torch.Tensor:
            p = xt.clone()
            p[int(coords_np[i])] += step
            return p

        values = self.guarded(
            queries,
            k,
            first,
            xt[None],
            fallback=lambda: self._coordinate_values_rowwise(xt, coords_np, step),
        )
        self._track_best(values, point)
        return values.cpu().numpy() if as_numpy else values

    def _coordinate_values_rowwise(
        self, x: torch.Tensor, coords: np.ndarray, step: float
    ) -> torch.Tensor:
        """Under ``on_error='inf'``: one full forward per coordinate, ``+inf`` where it raises."""
        out = torch.empty(coords.shape[0], dtype=self.values_dtype, device=self.view.device)
        for i, c in enumerate(coords.tolist()):
            p = x.clone()
            p[c] += step
            try:
                out[i] = self._evaluate(p[None])[0]
            except Exception:
                out[i] = float("inf")
        return out

    # -- seeded directions, perturbed in place ----------------------------------------------
    def _current_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The loss at the parameters as they are now (running statistics untouched)."""
        with self._same_randomness():
            if self.engine is not None:  # rounds like the engine's base forward
                return self.engine.current_loss(inputs, targets)
            with torch.no_grad(), preserved_buffers(self.module):
                return float(self._loss(self.module(inputs), targets))

    def _direction_values(
        self, rows: int, perturb: Callable[[int], None], unperturb: Callable[[int], None]
    ) -> Callable[[], torch.Tensor]:
        inputs, targets = self._minibatch()

        def queries(rowwise_inf: bool = False) -> torch.Tensor:
            out = torch.empty(rows, dtype=self.values_dtype, device=self.view.device)
            for r in range(rows):
                perturb(r)
                try:
                    out[r] = self._current_loss(inputs, targets)
                except Exception:
                    if not rowwise_inf:
                        raise
                    out[r] = float("inf")
                finally:
                    unperturb(r)
            return out

        return queries

    def eval_direction_steps(self, x: Any, steps: DirectionSteps) -> Any:
        """``f(x + steps.steps[r]·u_{steps.index[r]})`` for each row → ``(rows,)``; costs
        ``rows`` queries; exact mode.

        In place: each query writes ``x + s·u`` into the parameters tensor by tensor (the
        direction regenerated in chunks on the parameters' device), runs the forward and
        moves on; afterwards the parameters hold exactly what they held before (copied back
        from ``x`` when they held ``x``, as the trainer keeps them, else from a copy).
        Memory: the model, ``x`` and one chunk; no perturbed point is ever built. Values
        equal those of the built points (:meth:`batch`) bit for bit.
        """
        self._check_point(x)
        self.check_direction_steps(steps)
        as_numpy = isinstance(x, np.ndarray)
        xt = self.view.check_flat(x, "x").to(self.view.device, self.view.dtype)
        rows = len(steps)
        dirs = steps.directions

        def perturb(r: int) -> None:
            self.view.perturb_from(xt, dirs, int(steps.index[r]), float(steps.steps[r]))

        queries = self._direction_values(rows, perturb, lambda r: None)
        first = self._charge(rows)
        with self.view.restored_after(xt):
            values = self.guarded(
                queries, rows, first, xt[None], fallback=lambda: queries(rowwise_inf=True)
            )
        self._track_best(values, lambda i: steps.rows(i, i + 1).points(xt)[0])
        return values.cpu().numpy() if as_numpy else values

    def eval_direction_steps_in_place(self, steps: DirectionSteps) -> torch.Tensor:
        """The same values with the parameters as the only copy of θ (MeZO's memory mode).

        Each query adds ``s·u`` to the parameters, runs the forward and subtracts ``s·u``
        again (both regenerated from the seed): no copy of θ exists, at the price of a
        rounding drift of the parameters (``θ + s·u - s·u`` is not always θ in floating
        point; measured in docs/large_models.md). Costs ``rows`` queries. The best point is
        not tracked (it would be a copy of θ).
        """
        self.check_direction_steps(steps)
        rows = len(steps)
        dirs = steps.directions
        first = self._charge(rows)

        def perturb(r: int) -> None:
            self.view.add_direction_(dirs, int(steps.index[r]), float(steps.steps[r]))

        def unperturb(r: int) -> None:
            self.view.add_direction_(dirs, int(steps.index[r]), -float(steps.steps[r]))

        queries = self._direction_values(rows, perturb, unperturb)
        like = self.view.params[0]
        return self.guarded(
            queries, rows, first, like.reshape(-1)[:1][None], fallback=lambda: queries(True)
        )

    def value_in_place(self) -> float:
        """``f`` at the parameters as they are (the base value of MeZO's memory mode; one
        query; running statistics untouched)."""
        inputs, targets = self._minibatch()
        first = self._charge(1)
        like = self.view.params[0].reshape(-1)[:1]

        def forward() -> torch.Tensor:
            value = self._current_loss(inputs, targets)
            return torch.tensor([value], dtype=self.values_dtype, device=like.device)

        return float(self.guarded(forward, 1, first, like[None])[0])

    # -- replication (zoopt.parallel.ReplicableOracle) ---------------------------------------
    def replica_factory(self) -> ModuleOracleFactory:
        """A picklable recipe for a replica of this oracle as it is now (see
        :class:`ModuleOracleFactory`)."""
        return ModuleOracleFactory.from_oracle(self)

    def model_state(self) -> dict[str, np.ndarray]:
        """The module's buffers (BatchNorm running statistics) as host numpy copies by name."""
        return module_state(self.module)

    def load_model_state(self, state: dict[str, np.ndarray]) -> None:
        """Copy ``state`` (from :meth:`model_state`) into the module's buffers."""
        load_module_state(self.module, state)

    def cost_groups(self) -> list[tuple[int, int]]:
        """Each parameter tensor's index range: its coordinates cost alike per query."""
        return [(g.start, g.stop) for g in self.view.groups]

    def cost_clock(self) -> Literal["cpu", "wall"]:
        """``"cpu"`` on CPU (the work is this process's), ``"wall"`` on a GPU."""
        return "cpu" if self.view.device.type == "cpu" else "wall"

    def use_threads(self, n: int) -> None:
        """Compute with ``n`` torch threads (torch's setting is per process)."""
        torch.set_num_threads(int(n))

    # -- function transforms (zoopt.torch.forward_gradient) ----------------------------------
    def functional_loss(self) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """``loss(tensors)``: the loss on the current minibatch with the module's parameters
        and buffers named in ``tensors`` replaced (``torch.func.functional_call``; the others
        as they are), a pure function of ``tensors`` for ``torch.func`` transforms (``jvp``:
        forward gradients). Call this outside the transform, the returned function inside.

        It runs with the batch's randomness (the dropout masks of every query on this batch)
        and casts the output to ``loss_dtype`` as every query does. Buffers in ``tensors``
        (running statistics) are updated in place in training mode. Counts nothing (the
        caller counts ``grad_evaluations``).
        """
        inputs, targets = self._minibatch()
        self._same_randomness()  # the batch's seed, computed here: not inside a transform

        def loss(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            with self._same_randomness():
                output = torch.func.functional_call(self.module, tensors, (inputs,))
                return self._loss(output, targets)

        return loss


def _content_seed(*tensors: torch.Tensor) -> int:
    """A seed that is a function of the tensors' contents alone (same on every process)."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        host = t.detach().to("cpu").contiguous()
        h.update(str((tuple(host.shape), host.dtype)).encode())
        h.update(host.view(torch.uint8).numpy().tobytes() if host.numel() else b"")
    return int.from_bytes(h.digest(), "little") % (2**63)


def _as_tensor(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    raise TypeError(f"{name} must be a torch tensor or numpy array, got {type(a).__name__}")


#: ModuleOracle's keyword-only parameters: what :attr:`ModuleOracle.options` records
_KEYWORDS = tuple(
    name
    for name, p in inspect.signature(ModuleOracle.__init__).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)


@dataclass
class ModuleOracleFactory:
    """Picklable recipe for a :class:`~zoopt.torch.ModuleOracle` replica.

    Attributes:
        model: an ``nn.Module`` to copy (its parameters and buffers travel with it), or a
            picklable constructor ``() -> nn.Module`` (e.g. ``partial(build_model, "resnet20")``).
        loss_fn: picklable ``loss_fn(logits, targets) -> scalar`` (e.g. ``F.cross_entropy``).
        state: optional ``state_dict`` loaded into the built model.
        options: keyword arguments of ``ModuleOracle`` (``engine``, ``max_batch_bytes``,
            ``memory_format``, ...; :meth:`from_oracle` takes all of the oracle's
            :attr:`ModuleOracle.options`).
        device: where the replica lives (``"cpu"`` or ``"cuda"``).
        training: the replica's train/eval mode (BatchNorm uses batch statistics in training).
    """

    model: nn.Module | Callable[[], nn.Module]
    loss_fn: Callable[..., Any]
    state: dict | None = None
    options: dict = field(default_factory=dict)
    device: str = "cpu"
    training: bool = True

    def __call__(self) -> ModuleOracle:
        model = copy.deepcopy(self.model) if isinstance(self.model, nn.Module) else self.model()
        if self.state is not None:
            model.load_state_dict(self.state)
        model = model.to(self.device).train(self.training)
        return ModuleOracle(model, self.loss_fn, **self.options)

    @classmethod
    def from_oracle(cls, oracle: ModuleOracle) -> ModuleOracleFactory:
        """A recipe that rebuilds ``oracle`` as it is now: a CPU copy of its module (with
        parameters and buffers), its loss, every keyword it was built with
        (:attr:`ModuleOracle.options`), its device and mode."""
        if not isinstance(oracle, ModuleOracle):
            raise TypeError(f"expected a ModuleOracle, got {oracle!r}")
        cpu_copy = copy.deepcopy(oracle.module).to("cpu")
        return cls(
            cpu_copy,
            oracle.loss_fn,
            options=dict(oracle.options),
            device=str(oracle.view.device),
            training=oracle.module.training,
        )
