"""The sparse-CGE engine: ``f(x + step * e_c)`` for many coordinates ``c`` of any torch model.

A coordinate-wise gradient estimate perturbs one parameter at a time, so each query differs
from the unperturbed forward only downstream of the layers using that parameter, and inside
such a layer often only in one output channel. :class:`SparseCGEEngine` exploits this,
exactly (up to rounding):

1. Once per (train/eval modes, input shape) it turns the model into an op graph
   (:mod:`.graph`): the whole forward traced with ``torch.fx``, untraceable parts kept as
   opaque nodes, or, when the model's own forward cannot be traced, its children chained.
2. Once per step (per ``x`` and batch) it runs the unperturbed forward and caches every
   node's activation.
3. For the selected coordinates of one parameter tensor it builds the perturbed value of the
   nodes using that tensor, for all of them at once (:mod:`.origins`).
4. It pushes those values through the rest of the graph with per-op rules (:mod:`.rules`),
   in chunks of queries sized from a memory cap.

``explain()`` says, per parameter tensor, which path its queries take and what one query
costs; ``stats`` counts them. See docs/engine.md.

The engine is the coordinator of small parts with public interfaces: the
:class:`~.planner.Planner` (graphs and their plans; rules from the
:mod:`.registry`), the :class:`~.cache.ActivationCache` (the step's unperturbed values),
the :class:`~.rng.RNGStore` (the unperturbed forward's random-generator states), the
:class:`~.cost.CostModel` (``explain``'s estimates), and the :class:`~.context.EngineContext`
it hands to every chunk of queries and through it to the rules.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..._coords import check_coords
from ..params import ParamView, preserved_buffers
from . import origins as org
from .cache import ActivationCache
from .context import EngineContext
from .cost import CostModel
from .graph import placeholder_default
from .kernels import batchnorm_forward
from .losses import LossFn, cast_for_loss, per_query_loss
from .planner import Plan, Planner
from .reference import naive_coordinate_values, naive_loop
from .rng import RNGStore
from .values import Chunk, Dense, SliceDelta, Value, query_value

#: Default cap (bytes) on the activations of one chunk of queries, by device type. The CPU
#: value was picked by measurement (see docs/engine.md); the CUDA value is unmeasured.
DEFAULT_CHUNK_BYTES = {"cpu": 16 * 2**20, "cuda": 1024 * 2**20}

#: Live copies of the widest activation per query a chunk needs at once (input, output, temp).
_LIVE_FACTOR = 3


class SparseCGEEngine:
    """Evaluates ``f(x + step * e_c)`` for many coordinates ``c`` of a torch model, exactly.

    ``f(x) = loss_fn(module(inputs), targets)`` with the module's trainable parameters set to
    the flat vector ``x`` (see :class:`~zoopt.torch.ParamView`). Any model works: its forward
    is traced (or, where that fails, reused at module granularity; see :meth:`explain`).

    Args:
        module: the model (any ``nn.Module`` whose forward takes one tensor).
        loss_fn: ``loss_fn(logits, targets) -> scalar`` batch-mean loss.
        view: the flat parameter view (built from ``module`` if omitted).
        chunk_bytes: cap on one chunk's activations (bytes); the number of queries per chunk
            is ``chunk_bytes // (3 * widest activation downstream of the perturbed layer)``.
            Default (``None``): by device type from :data:`DEFAULT_CHUNK_BYTES`, and on the
            CPU at most a quarter of the step's activation cache (at least 4 MiB, below which
            per-chunk overhead costs more than the memory saves), so that the engine's memory
            stays close to a training step's.
        memory_format: ``"channels_last"``, ``"contiguous"`` or ``"auto"`` (channels-last on
            CPU, where the engine measured up to 1.5x faster and with less memory; contiguous
            elsewhere) for 4-D activations.
        loss_dtype: dtype the loss is computed in from the logits (see :func:`cast_for_loss`);
            the values returned have this dtype. ``None``: the logits' dtype.
        per_sample_modules: extra module types known to map each sample independently and
            statelessly (e.g. an eval-mode black-box classifier): the engine never traces into
            them and runs them once on all ``Q * B`` samples of a chunk.
    """

    def __init__(
        self,
        module: nn.Module,
        loss_fn: LossFn,
        *,
        view: ParamView | None = None,
        chunk_bytes: int | None = None,
        memory_format: str = "auto",
        loss_dtype: torch.dtype | None = torch.float64,
        per_sample_modules: tuple[type[nn.Module], ...] = (),
        max_cache_bytes: int | None = None,
    ):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        if memory_format not in ("auto", "channels_last", "contiguous"):
            raise ValueError(
                "memory_format must be 'auto', 'channels_last' or 'contiguous', "
                f"got {memory_format!r}"
            )
        if chunk_bytes is not None and (
            isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0
        ):
            raise ValueError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")
        if max_cache_bytes is not None and (
            isinstance(max_cache_bytes, bool)
            or not isinstance(max_cache_bytes, int)
            or max_cache_bytes < 0
        ):
            raise ValueError(
                f"max_cache_bytes must be a non-negative integer or None, got {max_cache_bytes!r}"
            )
        self.max_cache_bytes = max_cache_bytes
        per_sample_modules = tuple(per_sample_modules)
        if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in per_sample_modules):
            raise TypeError(
                f"per_sample_modules must be nn.Module types, got {per_sample_modules!r}"
            )
        self.module = module
        self.loss_fn = loss_fn
        self.view = view if view is not None else ParamView(module)
        device_type = self.view.device.type
        #: the chunk cap as given (None: automatic); ``chunk_bytes``: the cap in effect
        self.chunk_bytes_option = chunk_bytes
        self.chunk_bytes = chunk_bytes or DEFAULT_CHUNK_BYTES.get(
            device_type, DEFAULT_CHUNK_BYTES["cuda"]
        )
        if memory_format == "auto":
            memory_format = "channels_last" if device_type == "cpu" else "contiguous"
        self.memory_format = memory_format
        self._loss_per_query = per_query_loss(loss_fn)
        self.loss_dtype = loss_dtype
        self.per_sample_modules = per_sample_modules
        self.values_dtype = loss_dtype or self.view.dtype
        #: the plans of this model, one per (modes, input shape, dtype)
        self.planner = Planner(module, self.view, self.format_input, per_sample_modules)
        #: the step's unperturbed activations (recomputed ones held up to a quarter chunk)
        self.activations = ActivationCache(self._recompute, lambda: self.chunk_bytes // 4)
        #: the generator states of the step's unperturbed forward
        self.rng = RNGStore(self.view.device)
        self._plan: Plan | None = None
        self._context: EngineContext | None = None
        self._key: tuple | None = None
        self._x = torch.empty(0)
        self._buffers: list[torch.Tensor] = []
        self._warned: set[int] = set()
        self.stats = {
            "graph_builds": 0,  # op graphs built (once per modes and input shape)
            "cache_builds": 0,  # unperturbed forwards cached
            "chunks": 0,
            "queries": 0,
            "fast_queries": 0,  # perturbed layer by a channel-local / rank-one rule
            "batched_queries": 0,  # perturbed layer under vmap, all queries at once
            "module_rerun_queries": 0,  # perturbed module rerun per query (downstream batched)
            "slow_path_queries": 0,  # the whole model rerun per query
            "unused_queries": 0,  # parameters the forward never reads
            "vmapped_ops": 0,  # op applications batched by torch.func.vmap
            "looped_ops": 0,  # op applications run once per query
            "fallback_groups": 0,  # parameter tensors whose batched evaluation failed
            "recomputed_nodes": 0,  # unperturbed values recomputed instead of cached
        }

    # -- public -------------------------------------------------------------------------
    def coordinate_values(
        self,
        x: torch.Tensor,
        coords: Sequence[int] | np.ndarray | torch.Tensor,
        step: float,
        inputs: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        """``f(x + step * e_c)`` for each ``c`` in ``coords`` (shape ``(k,)``) → ``(k,)``.

        The module's parameters and buffers are unchanged afterwards.
        """
        x = self.view.check_flat(x, "x").to(self.view.device, self.view.dtype)
        coords_np = check_coords(coords, self.view.dim)
        step = float(step)
        out = torch.empty(coords_np.shape[0], dtype=self.values_dtype, device=self.view.device)
        if coords_np.shape[0] == 0:
            return out
        with torch.no_grad(), preserved_buffers(self.module), self.view.loaded(x):
            self._prepare(x, inputs, targets)
            which = self.view.group_index(coords_np)
            for g in np.unique(which):
                rows = np.flatnonzero(which == g)
                local = torch.as_tensor(
                    coords_np[rows] - self.view.groups[g].start, device=out.device
                )
                out[torch.as_tensor(rows, device=out.device)] = self._group_values(
                    int(g), local, step, inputs, targets
                )
                self.activations.derived.clear()  # per-layer helpers (padded inputs): one layer at a time
        return out

    @property
    def base_loss(self) -> float:
        """The unperturbed loss from the last cached forward."""
        return float(self._base_loss)

    def base_forward(
        self,
        x: torch.Tensor,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        update_stats: bool = False,
    ) -> float:
        """The unperturbed loss at ``x``; fills the per-step cache as a side effect.

        With ``update_stats=True`` this is the training forward: BatchNorm running statistics
        are updated as by ``module(inputs)`` (the one forward per step allowed to), and the
        following :meth:`coordinate_values` calls at the same ``x`` reuse its cache.
        """
        x = self.view.check_flat(x, "x").to(self.view.device, self.view.dtype)
        with torch.no_grad(), self.view.loaded(x):
            if update_stats:
                self._prepare(x, inputs, targets, update_stats=True)
            else:
                with preserved_buffers(self.module):
                    self._prepare(x, inputs, targets)
        return self.base_loss

    def forward_loss(self, x: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """``f(x)`` computed exactly as the engine's base forward, without caching anything.

        Parameters and buffers are unchanged afterwards.
        """
        x = self.view.check_flat(x, "x").to(self.view.device, self.view.dtype)
        with self.view.loaded(x):
            return self.current_loss(inputs, targets)

    def current_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """``f`` at the module's parameters as they are now, computed exactly as the base
        forward (what a query that perturbs the parameters in place runs); buffers are
        unchanged afterwards."""
        with torch.no_grad(), preserved_buffers(self.module):
            with self.planner.memoized_black_boxes(inputs):
                plan = self._plan_for(inputs)
                h = self.format_input(inputs.to(self.view.device))
                out, _ = self._run_base(plan, h, None)
            return float(self._loss(out, targets))

    def explain(self, inputs: torch.Tensor | None = None) -> str:
        """How each parameter tensor's queries are computed, as a table (see :meth:`plan_rows`)."""
        plan = self._require_plan(inputs)
        rows = self.plan_rows(inputs)
        eg = plan.graph
        kinds = {
            "traced": "the whole forward traced",
            "chain": "the model's children chained (its own forward is not traceable)",
            "opaque": "not traceable: one opaque node",
        }
        lines = [
            f"SparseCGEEngine on {type(self.module).__name__}: {kinds[eg.kind]}; "
            f"{len(eg.nodes)} graph nodes, {self.view.dim:,} trainable parameters",
        ]
        lines += [f"  note: {n}" for n in eg.notes]
        frozen = [n for n, p in self.module.named_parameters() if not p.requires_grad]
        if frozen:
            shown = ", ".join(frozen[:5]) + (" ..." if len(frozen) > 5 else "")
            lines.append(
                f"  frozen (requires_grad=False, not optimized): {len(frozen)} tensors ({shown}); "
                "call p.requires_grad_(True) before building the oracle to include them"
            )
        width = max([len(r["name"]) for r in rows] + [9])
        lines.append(f"  {'parameter':<{width}}  {'numel':>9}  {'path':<12}  cost/query  where")
        for r in rows:
            lines.append(
                f"  {r['name']:<{width}}  {r['numel']:>9,}  {r['path']:<12}  "
                f"{100 * r['cost_per_query']:>8.1f}%  {r['where']}"
            )
        total = sum(r["numel"] for r in rows)
        mean = sum(r["numel"] * r["cost_per_query"] for r in rows) / max(total, 1)
        lines.append(
            f"  cost/query: estimated multiply-adds of one query as a share of a full forward; "
            f"mean over coordinates {100 * mean:.1f}% (a full-forward loop: 100%)"
        )
        return "\n".join(lines)

    def plan_rows(self, inputs: torch.Tensor | None = None) -> list[dict[str, Any]]:
        """Per parameter tensor: ``name``, ``numel``, ``path`` (``fast``, ``batched``, ``module
        rerun``, ``slow``, ``unused``), ``cost_per_query`` (estimated share of a forward's
        multiply-adds) and ``where`` (the graph nodes using it)."""
        plan = self._require_plan(inputs)
        if self._plan is not plan or not self.activations.meta:
            batch = inputs if inputs is not None else self._batch_refs[0]
            with torch.no_grad(), preserved_buffers(self.module):
                h = self.format_input(batch.to(self.view.device))
                self.activations.meta = {}
                self._run_base(plan, h, {})  # for the activation shapes
        costs = CostModel(plan, self.activations.meta)
        rows = []
        for g, group in enumerate(self.view.groups):
            uses = plan.uses[g]
            where = ", ".join(sorted({_node_label(u.node, plan.graph.prefix) for u in uses}))
            where = where or "-"
            rows.append(
                {
                    "name": group.name,
                    "numel": group.size,
                    "path": plan.paths[g],
                    "cost_per_query": costs.per_query(plan.paths[g], uses),
                    "where": where,
                }
            )
        return rows

    @property
    def graph_kind(self) -> str | None:
        """``"traced"``, ``"chain"`` or ``"opaque"`` for the current graph (None before any)."""
        return None if self._plan is None else self._plan.graph.kind

    # -- plans -------------------------------------------------------------------------
    def _plan_for(self, inputs: torch.Tensor) -> Plan:
        """The plan for this batch's signature, made current (with its context)."""
        plan, built = self.planner.plan_for(inputs)
        if built:
            self.stats["graph_builds"] += 1
        if plan is not self._plan or self._context is None:
            self._context = EngineContext(
                plan.graph, plan.no_vmap, self.activations, self.rng, self.stats,
                self.memory_format,
            )  # fmt: skip
        self._plan = plan
        return plan

    def _require_plan(self, inputs: torch.Tensor | None) -> Plan:
        if inputs is not None:
            return self._plan_for(inputs)
        if self._plan is None:
            raise ValueError(
                "explain needs a batch: pass inputs (or evaluate the oracle once first)"
            )
        return self._plan

    @property
    def context(self) -> EngineContext:
        """What chunks and rules see of the engine for the current plan (its graph, the
        activation cache, the random-generator states, the counters)."""
        if self._context is None:
            raise ValueError("the engine has no plan yet: evaluate it on a batch first")
        return self._context

    # -- cache ---------------------------------------------------------------------------
    def _key_of(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple:
        """What besides ``x`` and the buffers the cache depends on: the batch, the modes."""
        key = (id(inputs), inputs._version, id(targets), targets._version)
        return key + self.planner.modes()

    def invalidate(self) -> None:
        """Forget the cached forward: the next call runs (and caches) the unperturbed forward
        again, as for a new step (benchmarks time the whole step this way)."""
        self._key = None
        self.activations.reset()

    def _is_cached(self, x: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> bool:
        """Is the cache valid for ``x``, this batch, these modes and running statistics?"""
        if self._key != self._key_of(inputs, targets) or not torch.equal(self._x, x):
            return False
        return all(
            torch.equal(b, c) for b, c in zip(self.module.buffers(), self._buffers, strict=True)
        )

    def _prepare(
        self,
        x: torch.Tensor,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        update_stats: bool = False,
    ) -> None:
        """Run the unperturbed forward once and cache every node's value.

        The parameters must already hold ``x``. Skipped when the cache is valid, unless
        ``update_stats`` asks for the stat-updating forward.
        """
        if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError("inputs and targets must be torch tensors")
        if not update_stats and self._is_cached(x, inputs, targets):
            return
        self._key = None
        with self.planner.memoized_black_boxes(inputs):
            self._run_and_cache(x, inputs, targets, update_stats)

    def _run_and_cache(
        self, x: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, update_stats: bool
    ) -> None:
        plan = self._plan_for(inputs)
        if not update_stats:  # buffers are restored by the caller: remember them as they are
            self._buffers = [b.clone() for b in self.module.buffers()]
        self.activations.reset()
        self.rng.clear()
        h = self.format_input(inputs.to(self.view.device))
        self.stats["cache_builds"] += 1
        self.rng.at_base = self.rng.current()  # full forwards, if any, draw what this one draws
        out, self.activations.values = self._run_base(
            plan, h, self.activations.values, update_stats
        )
        self._check_unchanged(x)
        self._base_loss = self._loss(out, targets)
        self.activations.cap(self.max_cache_bytes)
        if self.chunk_bytes_option is None and self.view.device.type == "cpu":
            self.chunk_bytes = min(
                DEFAULT_CHUNK_BYTES["cpu"], max(4 * 2**20, self.cache_bytes // 4)
            )
        if update_stats:
            self._buffers = [b.clone() for b in self.module.buffers()]
        self._widest_after = self._suffix_widest(plan)
        self._x = x.clone()
        self._batch_refs = (inputs, targets)  # held, so their ids cannot be reused
        self._key = self._key_of(inputs, targets)

    def _check_unchanged(self, x: torch.Tensor) -> None:
        """The forward must not write to trainable parameters (checked once per step, O(d)):
        a query would otherwise evaluate another point than it asks for."""
        for g, p in zip(self.view.groups, self.view.params, strict=True):
            if not torch.equal(p.detach().reshape(-1), x[g.start : g.stop]):
                raise RuntimeError(
                    f"the forward of {type(self.module).__name__} changed the trainable "
                    f"parameter {g.name}; a zeroth-order oracle needs a forward that leaves "
                    "its parameters as they are (freeze that tensor, or move the update out "
                    "of forward)"
                )

    def _run_base(
        self,
        plan: Plan,
        h: torch.Tensor,
        cache: dict[fx.Node, Any] | None,
        update_stats: bool = False,
    ) -> tuple[Any, dict[fx.Node, Any]]:
        """The unperturbed forward through the graph, recording every node's value (when
        ``cache`` is given), dropout masks and random-generator states. Mutates nothing but
        BatchNorm running statistics (as the eager forward does)."""
        eg = plan.graph
        env: dict[fx.Node, Any] = {} if cache is None else cache
        out: Any = None
        for node in eg.nodes:
            if node.op == "placeholder":
                env[node] = h if node is eg.input else placeholder_default(node)
            elif node.op == "get_attr":
                env[node] = eg.resolve(str(node.target))
            elif node.op == "output":
                out = fx.node.map_arg(node.args[0], env.__getitem__)
            else:
                args = fx.node.map_arg(node.args, env.__getitem__)
                kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
                spec = plan.dropouts.get(node)
                m = eg.modules.get(node)
                if spec is not None:
                    # a mask drawn in the eager (contiguous) order, whatever the layout here
                    mask = spec[0](torch.ones_like(args[0], memory_format=torch.contiguous_format))
                    if cache is not None:
                        self.activations.masks[node] = mask
                    env[node] = args[0] * mask
                elif plan.rules[node][1] == "batchnorm" and len(args) == 1 and not kwargs:
                    env[node] = batchnorm_forward(m, args[0], update_stats)  # type: ignore[arg-type]
                else:
                    if node in plan.rng_nodes and cache is not None:
                        self.rng.record(node)
                    env[node] = plan.callables[node](*args, **kwargs)
            if cache is not None:
                self.activations.record_meta(node, env.get(node))
            self._free_base(plan, node, env, cache is not None)
        return out, env

    @staticmethod
    def _free_base(plan: Plan, node: fx.Node, env: dict[fx.Node, Any], caching: bool) -> None:
        """Drop values the rest of the forward no longer reads (and the queries do not)."""
        pos = plan.graph.position[node]
        for n in (*node.all_input_nodes, node):
            if plan.last_read.get(n, -1) > pos:
                continue
            if caching and (n in plan.keep or not isinstance(env.get(n), torch.Tensor)):
                continue  # read by the queries, or a shape (never worth recomputing)
            env.pop(n, None)

    def _loss(self, out: Any, targets: torch.Tensor) -> torch.Tensor:
        """The loss of one forward's output, given to ``loss_fn`` as the model returns it."""
        if self._plan is not None:
            out = self._plan.graph.restore_output(out)
        loss = self.loss_fn(*cast_for_loss(out, targets, self.loss_dtype))
        return torch.as_tensor(loss).reshape(())

    def _suffix_widest(self, plan: Plan) -> list[int]:
        """Per position: bytes of the largest activation at or after it."""
        widest, out = 0, [0] * len(plan.graph.nodes)
        for i in range(len(plan.graph.nodes) - 1, -1, -1):
            v = self.activations.meta.get(plan.graph.nodes[i])
            tensors = [t for t in pytree.tree_leaves(v) if isinstance(t, torch.Tensor)]
            if tensors:  # a tensor, or a structured output (a ModelOutput's logits...)
                widest = max(widest, sum(t.numel() * t.element_size() for t in tensors))
            out[i] = widest
        return out

    def _recompute(self, node: fx.Node) -> Any:
        plan = self._plan
        assert plan is not None
        eg = plan.graph
        self.stats["recomputed_nodes"] += 1
        if node.op == "get_attr":
            return eg.resolve(str(node.target))
        if node.op == "placeholder":  # extra inputs: their defaults (the input is cached)
            return placeholder_default(node)
        unperturbed = self.activations.unperturbed
        args = fx.node.map_arg(node.args, unperturbed)
        kwargs = fx.node.map_arg(node.kwargs, unperturbed)
        if node in plan.dropouts:
            return args[0] * self.activations.masks[node]
        m = eg.modules.get(node)
        if plan.rules[node][1] == "batchnorm" and len(args) == 1 and not kwargs:
            return batchnorm_forward(m, args[0], update=False)  # type: ignore[arg-type]
        rng = self.rng.get(node)
        with self.rng.restorable(rng is not None):
            if rng is not None:
                self.rng.set(rng)
            with preserved_buffers(m) if m is not None else contextlib.nullcontext():
                return plan.callables[node](*args, **kwargs)

    @property
    def cache_bytes(self) -> int:
        """Bytes of the cached unperturbed activations (shared storage counted once)."""
        return self.activations.nbytes

    def format_input(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in the engine's memory format (4-D tensors only)."""
        if self.memory_format == "channels_last" and t.ndim == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    # -- queries -------------------------------------------------------------------------
    def _group_values(
        self, g: int, local: torch.Tensor, step: float, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Values for coordinates ``local`` (indices within parameter tensor ``g``)."""
        plan = self._plan
        assert plan is not None
        path, uses, param = plan.paths[g], plan.uses[g], self.view.params[g]
        k = local.numel()
        self.stats["queries"] += k
        if path == org.UNUSED:
            self.stats["unused_queries"] += k
            return self._base_loss.expand(k).clone()
        if path == org.SLOW and plan.graph.kind != "opaque":
            self.stats["slow_path_queries"] += k
            return self._naive(param, local, step, inputs, targets)
        try:
            values = self._chunked(plan, g, path, uses, param, local, step, targets)
        except Exception as exc:
            if plan.graph.kind == "opaque":
                raise
            values = self._naive(param, local, step, inputs, targets)  # raises if the model does
            self.stats["fallback_groups"] += 1
            if g not in self._warned:
                self._warned.add(g)
                warnings.warn(
                    f"SparseCGEEngine: batched queries of {self.view.groups[g].name} failed "
                    f"({type(exc).__name__}: {exc}); computing them with full forwards",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self.stats["slow_path_queries"] += k
            return values
        key = {
            org.FAST: "fast_queries",
            org.BATCHED: "batched_queries",
            org.RERUN: "module_rerun_queries",
            org.SLOW: "slow_path_queries",
        }[path]
        if path != org.RERUN:  # module reruns are counted where they happen
            self.stats[key] += k
        return values

    def _chunked(
        self,
        plan: Plan,
        g: int,
        path: str,
        uses: list[org.Use],
        param: torch.Tensor,
        local: torch.Tensor,
        step: float,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        start = min(plan.graph.position[u.node] for u in uses)
        per_query = _LIVE_FACTOR * self._widest_after[start]
        if path != org.FAST:
            per_query += param.numel() * param.element_size()
        chunk = max(1, self.chunk_bytes // max(1, per_query))
        flat = param.view(-1)
        out = []
        for first in range(0, local.numel(), chunk):
            idx = local[first : first + chunk]
            new = flat[idx] + step  # perturbed values, rounded as the naive loop rounds them
            ch = Chunk(self.context, idx.numel())
            result = self._propagate(ch, plan, start, {u.node: u for u in uses}, param, idx, new)
            out.append(self._losses(ch, plan, result, targets))
            self.stats["chunks"] += 1
        return torch.cat(out)

    def _naive(
        self,
        param: torch.Tensor,
        local: torch.Tensor,
        step: float,
        inputs: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        out = []
        assert self.rng.at_base is not None
        with self.rng.restorable(True):
            for i in local.tolist():
                self.rng.set(self.rng.at_base)
                one = torch.tensor([i], device=local.device)
                out.append(
                    naive_loop(
                        self.module,
                        self.loss_fn,
                        param,
                        one,
                        step,
                        inputs,
                        targets,
                        self.loss_dtype,
                    )
                )
        return torch.cat(out)

    def _propagate(
        self,
        ch: Chunk,
        plan: Plan,
        start: int,
        uses: dict[fx.Node, org.Use],
        param: torch.Tensor,
        idx: torch.Tensor,
        new: torch.Tensor,
    ) -> Any:
        """Perturb the nodes using ``param`` and push the change through the graph; returns
        the output node's argument (its values are in ``ch.env``)."""
        eg = plan.graph
        env = ch.env
        for pos in range(start, len(eg.nodes)):
            node = eg.nodes[pos]
            if node.op == "output":
                return node.args[0]
            if plan.live_last_use.get(node, -1) < 0:
                continue  # nobody reads it (e.g. an assertion)
            use = uses.get(node)
            if use is not None:
                if any(env.get(n) is not None for n in node.all_input_nodes):
                    value = org.joint_value(ch, use, param, idx, new)
                else:
                    value = org.origin_value(ch, use, param, idx, new)
            elif node.op in ("placeholder", "get_attr"):
                continue
            elif all(env.get(n) is None for n in node.all_input_nodes):
                continue
            else:
                rule, _ = plan.rules[node]
                value = rule(ch, node)
            if value is not None:
                env[node] = value
            for n in node.all_input_nodes:
                if plan.live_last_use.get(n, -1) <= pos and n in env:
                    del env[n]
        raise RuntimeError("graph without output")  # pragma: no cover

    def _losses(self, ch: Chunk, plan: Plan, out_arg: Any, targets: torch.Tensor) -> torch.Tensor:
        if isinstance(out_arg, fx.Node):
            v = ch.env.get(out_arg)
            if v is None:
                return self._base_loss.expand(ch.Q).clone()
            if isinstance(v, SliceDelta | Dense):
                logits = ch.dense(v, out_arg)  # (Q, *output shape)
                if logits.ndim >= 2 and logits.shape[1] == targets.shape[0]:
                    full, t = cast_for_loss(logits.flatten(0, 1), targets, self.loss_dtype)
                    return self._loss_per_query(full, t, ch.Q)
                return torch.stack([self._loss(logits[q], targets) for q in range(ch.Q)])

        def query(q: int) -> Any:
            return fx.node.map_arg(out_arg, lambda n: query_value(ch, n, q))

        return torch.stack([self._loss(query(q), targets) for q in range(ch.Q)]).to(
            self.values_dtype
        )


def _node_label(node: fx.Node, prefix: str = "") -> str:
    if node.op in ("call_module", "get_attr"):
        target = str(node.target)
        if prefix and target == prefix.rstrip("."):
            target = ""
        return target.removeprefix(prefix) or "<model>"
    return node.name


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "Dense",
    "LossFn",
    "SparseCGEEngine",
    "Value",
    "cast_for_loss",
    "naive_coordinate_values",
]
