"""Where perturbing a parameter first changes an activation, and that changed activation.

A parameter tensor is *used* by graph nodes: the ``call_module`` node of each module call
that owns it, or a ``get_attr`` node where the forward reads it directly (``self.pos_embed``,
``F.linear(x, self.weight)``). For ``Q`` coordinates of the tensor, the value of every such
node is built for all queries at once:

* **fast** (channel-local or rank-one, from the cached input): Conv2d (any kernel, stride,
  padding, groups), Linear (2-D and token inputs), BatchNorm, GroupNorm, LayerNorm weights
  and biases;
* **batched**: a ``get_attr`` read (the parameter with one entry changed per query), or any
  other module run under ``torch.func.vmap`` over ``Q`` copies of its parameter;
* **module rerun**: the module run once per query on its cached input (modules vmap cannot
  run, e.g. with data-dependent code), with everything downstream still batched;
* **slow**: the model itself is one opaque node (``kind="opaque"``), or the parameter sits
  outside every child of a chained model: each query reruns the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .kernels import bn_channels, gather, no_running_stat_updates, standard, vmap_values
from .rules import conv_spec
from .values import Chunk, Dense, SliceDelta, Value, query_value, stack_queries

if TYPE_CHECKING:
    from ..params import ParamView
    from .graph import EngineGraph


@dataclass(frozen=True)
class Use:
    """A node whose value depends on a parameter: ``attr`` is its path inside the node's
    module (``call_module``), ``""`` for a ``get_attr`` node."""

    node: fx.Node
    attr: str


FAST, BATCHED, RERUN, SLOW, UNUSED = "fast", "batched", "module rerun", "slow", "unused"


def locate(eg: EngineGraph, view: ParamView, model: nn.Module) -> list[list[Use]]:
    """For each parameter tensor of ``view``: the graph nodes that use it."""
    uses: dict[int, list[Use]] = {}
    for node, m in eg.modules.items():
        for name, p in m.named_parameters():
            uses.setdefault(id(p), []).append(Use(node, name))
    for node in eg.nodes:
        if node.op == "get_attr":
            obj = eg.resolve(str(node.target))
            if isinstance(obj, torch.Tensor):
                uses.setdefault(id(obj), []).append(Use(node, ""))
    return [uses.get(id(p), []) for p in view.params]


def path_of(eg: EngineGraph, uses: list[Use], param: nn.Parameter, model: nn.Module) -> str:
    """How a parameter's queries are computed (see the module doc)."""
    if eg.kind == "opaque":
        return SLOW
    if not uses:
        # a chained model's own parameters are read by code outside its children
        own = {id(p) for p in model.parameters(recurse=False)}
        return SLOW if eg.kind == "chain" and id(param) in own else UNUSED
    kinds = {_use_kind(eg, u) for u in uses}
    if len(uses) > 1:  # a later use may see a changed input too: computed jointly
        kinds.add(BATCHED)
    for kind in (RERUN, BATCHED):
        if kind in kinds:
            return kind
    return FAST


def _fast_module(eg: EngineGraph, use: Use) -> bool:
    m = eg.modules.get(use.node)
    if m is None or use.node in eg.opaque or use.attr not in ("weight", "bias"):
        return False
    return any(
        standard(m, cls)
        for cls in (
            nn.Conv2d,
            nn.Linear,
            nn.modules.batchnorm._BatchNorm,
            nn.GroupNorm,
            nn.LayerNorm,
        )
    )


def _use_kind(eg: EngineGraph, use: Use) -> str:
    if use.node.op == "get_attr":
        return BATCHED
    if _fast_module(eg, use):
        return FAST
    return RERUN if use.node in eg.opaque else BATCHED


# ----------------------------------------------------------------------------------------
def origin_value(
    ch: Chunk, use: Use, param: torch.Tensor, idx: torch.Tensor, new: torch.Tensor
) -> Value:
    """The value of ``use.node`` with ``param.view(-1)[idx[q]] = new[q]`` for each query."""
    ctx = ch.context
    node = use.node
    eff = new - param.view(-1)[idx]  # the step actually taken in this dtype
    if node.op == "get_attr":
        return Dense(_perturbed_copies(param, idx, new))
    m = ctx.module_of(node)
    if _fast_module(ctx.graph, use):
        value = _fast_origin(ch, node, m, use.attr, param, idx, eff, new)
        if value is not None:
            return value
    if node not in ctx.no_vmap:
        try:
            value = _vmapped_module(ch, node, m, use.attr, param, idx, new)
        except Exception:  # noqa: BLE001 - vmap cannot run this module: rerun it per query
            ctx.no_vmap.add(node)
        else:
            return value
    ctx.stats["module_rerun_queries"] += idx.numel()
    return _rerun_module(ch, node, m, param, idx, new)


def joint_value(
    ch: Chunk, use: Use, param: torch.Tensor, idx: torch.Tensor, new: torch.Tensor
) -> Value:
    """The value of ``use.node`` when both the parameter and some of its inputs changed
    (a parameter used twice, the second use downstream of the first)."""
    ctx = ch.context
    node = use.node
    m = ctx.module_of(node)
    changed = [n for n in node.all_input_nodes if ch.env.get(n) is not None]
    copies = _perturbed_copies(param, idx, new)
    if node not in ctx.no_vmap:
        tensors = [ch.dense(ch.env[n], n) for n in changed]

        def call(p: torch.Tensor, *ts: torch.Tensor) -> Any:
            sub = dict(zip(changed, ts, strict=True))

            def load(n: fx.Node) -> Any:
                return sub[n] if n in sub else ch.cached(n)

            args = fx.node.map_arg(node.args, load)
            kwargs = fx.node.map_arg(node.kwargs, load)
            return torch.func.functional_call(m, {use.attr: p}, args, kwargs)

        try:
            with no_running_stat_updates(m):
                value = vmap_values(call, copies, *tensors)
        except Exception:  # noqa: BLE001 - vmap cannot run this module: loop below
            ctx.no_vmap.add(node)
        else:
            return value
    flat = param.view(-1)
    outs = []
    for q, (i, v) in enumerate(zip(idx.tolist(), new.tolist(), strict=True)):
        old = flat[i].clone()
        flat[i] = v
        try:
            args = fx.node.map_arg(node.args, lambda n, q=q: query_value(ch, n, q))
            kwargs = fx.node.map_arg(node.kwargs, lambda n, q=q: query_value(ch, n, q))
            outs.append(m(*args, **kwargs))
        finally:
            flat[i] = old
    return stack_queries(outs, node)


def _perturbed_copies(param: torch.Tensor, idx: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    q = idx.numel()
    out = param.detach().unsqueeze(0).repeat(q, *([1] * param.ndim))
    out.view(q, -1)[torch.arange(q, device=idx.device), idx] = new
    return out


def _fast_origin(
    ch: Chunk,
    node: fx.Node,
    m: nn.Module,
    attr: str,
    param: torch.Tensor,
    idx: torch.Tensor,
    eff: torch.Tensor,
    new: torch.Tensor,
) -> Value:
    base_in = ch.cached(node.args[0]) if node.args else None
    base_out = ch.cached(node)
    weight = attr == "weight"
    if isinstance(m, nn.Conv2d):
        if not weight:
            return SliceDelta(idx, base_out[:, idx] + eff.view(1, -1, 1, 1))
        spec = conv_spec(ch, node)
        if spec is None:
            return None
        co, ci, kh, kw = np.unravel_index(idx.cpu().numpy(), tuple(param.shape))
        per_group_out = param.shape[0] // spec.groups
        ci = (co // per_group_out) * param.shape[1] + ci  # the input channel it reads
        shifted = _shifted_input(ch, node, spec, ci, kh, kw)  # (N, Q, Ho, Wo)
        co_t = torch.as_tensor(co, device=idx.device)
        return SliceDelta(co_t, torch.addcmul(base_out[:, co_t], shifted, eff.view(1, -1, 1, 1)))
    last = base_out.ndim - 1
    if isinstance(m, nn.Linear):
        if base_in is None:
            return None
        if not weight:  # one output feature, for every row
            return SliceDelta(idx, base_out.index_select(-1, idx) + eff, last)
        o, i = np.unravel_index(idx.cpu().numpy(), tuple(param.shape))
        o_t = torch.as_tensor(o, device=idx.device)
        i_t = torch.as_tensor(i, device=idx.device)
        values = torch.addcmul(base_out.index_select(-1, o_t), base_in.index_select(-1, i_t), eff)
        return SliceDelta(o_t, values, last)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        w, b = gather(m.weight, idx), gather(m.bias, idx)
        if weight:
            w = new
        else:
            b = new
        return SliceDelta(idx, bn_channels(m, base_in[:, idx], idx, w, b))
    if isinstance(m, nn.GroupNorm):
        scale = eff.view(1, -1, *([1] * (base_out.ndim - 2)))
        if not weight:
            return SliceDelta(idx, base_out[:, idx] + scale)
        normalized = _normalized(
            ch, node, lambda x: F.group_norm(x, m.num_groups, None, None, m.eps)
        )
        return SliceDelta(idx, torch.addcmul(base_out[:, idx], normalized[:, idx], scale))
    if isinstance(m, nn.LayerNorm):
        k = len(m.normalized_shape)
        lead = base_out.shape[: base_out.ndim - k]
        cols = None
        if weight:
            normalized = _normalized(
                ch, node, lambda x: F.layer_norm(x, m.normalized_shape, None, None, m.eps)
            )
            cols = normalized.reshape(*lead, -1).index_select(-1, idx)
        if k == 1:  # one feature of every row
            values = base_out.index_select(-1, idx)
            return SliceDelta(
                idx, values + eff if cols is None else values.addcmul(cols, eff), last
            )
        if cols is not None:
            cols = cols.movedim(-1, 0)
        return _last_dim_update(ch, node, idx, eff, cols, features=k)
    return None


def _last_dim_update(
    ch: Chunk,
    node: fx.Node,
    feature: torch.Tensor,
    eff: torch.Tensor,
    cols: torch.Tensor | None,
    features: int = 1,
) -> Value:
    """Dense values: the cache with, for query q, ``eff[q] * cols[q]`` (or ``eff[q]``) added
    to feature ``feature[q]`` of the flattened last ``features`` dims."""
    base_out = ch.cached(node)
    out = ch.dense(None, node)
    q = ch.Q
    flat = out.view(q, *base_out.shape[: base_out.ndim - features], -1)
    rows = torch.arange(q, device=out.device)
    if cols is None:
        add = eff.view(q, *([1] * (flat.ndim - 2)))
    else:
        add = cols * eff.view(q, *([1] * (cols.ndim - 1)))
    flat[rows, ..., feature] += add
    return Dense(out)


def _normalized(ch: Chunk, node: fx.Node, fn: Any) -> torch.Tensor:
    cache = ch.context.derived
    key = (node, "normalized")
    if key not in cache:
        cache[key] = fn(ch.cached(node.args[0]))
    return cache[key]


def _shifted_input(
    ch: Chunk, node: fx.Node, spec: Any, ci: np.ndarray, kh: np.ndarray, kw: np.ndarray
) -> torch.Tensor:
    """``padded_input[:, ci, kh·dh + sh·i, kw·dw + sw·j]``: ``(N, Q, Ho, Wo)``."""
    cache = ch.context.derived
    key = (node, "padded")
    if key not in cache:
        cache[key] = spec.padded(ch.cached(node.args[0]))
    padded = cache[key]
    ho, wo = ch.meta(node).shape[2:]
    dev = padded.device
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    rows = torch.as_tensor(kh * dh, device=dev)[:, None] + sh * torch.arange(ho, device=dev)
    cols = torch.as_tensor(kw * dw, device=dev)[:, None] + sw * torch.arange(wo, device=dev)
    ci_t = torch.as_tensor(ci, device=dev)
    return padded[:, ci_t[:, None, None], rows[:, :, None], cols[:, None, :]]


def _vmapped_module(
    ch: Chunk,
    node: fx.Node,
    m: nn.Module,
    attr: str,
    param: torch.Tensor,
    idx: torch.Tensor,
    new: torch.Tensor,
) -> Value:
    """The module under vmap over ``Q`` copies of its parameter, one entry changed in each."""
    copies = _perturbed_copies(param, idx, new)
    args = fx.node.map_arg(node.args, ch.cached)
    kwargs = fx.node.map_arg(node.kwargs, ch.cached)
    if node in ch.context.graph.opaque:
        args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)

    def call(p: torch.Tensor) -> Any:
        return torch.func.functional_call(m, {attr: p}, args, kwargs)

    with no_running_stat_updates(m):
        return vmap_values(call, copies)


def _rerun_module(
    ch: Chunk,
    node: fx.Node,
    m: nn.Module,
    param: torch.Tensor,
    idx: torch.Tensor,
    new: torch.Tensor,
) -> Value:
    """Set each coordinate in place and rerun the module on its cached inputs, per query."""
    ctx = ch.context
    flat = param.view(-1)
    buffers = [(b, b.clone()) for b in m.buffers()]
    rng = ctx.rng_state(node)
    outs = []
    with ctx.restorable_rng(rng is not None):
        for i, v in zip(idx.tolist(), new.tolist(), strict=True):
            old = flat[i].clone()
            flat[i] = v
            try:
                for b, saved in buffers:
                    b.copy_(saved)
                if rng is not None:
                    ctx.set_rng(rng)
                args = fx.node.map_arg(node.args, ch.cached)
                args = tuple(
                    a.clone(memory_format=torch.contiguous_format)
                    if isinstance(a, torch.Tensor)
                    else a
                    for a in args
                )
                kwargs = fx.node.map_arg(node.kwargs, ch.cached)
                outs.append(m(*args, **kwargs))
            finally:
                flat[i] = old
    return stack_queries(outs, node)
