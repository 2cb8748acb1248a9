"""Per-op rules: the value of a node for all ``Q`` queries of a chunk, from its inputs' values.

A rule is ``rule(chunk, node) -> Value``; it reads its inputs' values from ``chunk.env``
(``None``: unchanged, the cached activation) and cached activations from ``chunk.cached``.
Which rule an op gets is decided in :mod:`.registry` (where users add their own).

* Slice-local ops keep a :class:`SliceDelta` one slice wide: elementwise ops, residual adds,
  concatenation, slicing and padding along other axes, permutes, and, for a channel (axis
  1), BatchNorm, pooling and depthwise convs; for a row (any axis but the last), linear
  layers, LayerNorm and attention heads.
* A conv or linear layer reading the changed slice turns a SliceDelta into a :class:`Dense`
  batch at 1/C of its cost (each query's change lives in one input channel or feature).
* Dense values run once for all ``Q·B`` samples; BatchNorm in training mode normalizes every
  query with its own batch statistics.
* Shape ops work on the per-query shapes (``x.size(0)`` is the batch size ``B`` for every
  query: shape-only ops are never recomputed).
* Everything else runs under ``torch.func.vmap`` over the query dimension, and, where vmap
  cannot run an op (data-dependent code, random draws, in-place writes to captured tensors),
  once per query with the random generator restored to its state in the unperturbed forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .kernels import (
    bn_channels,
    bn_per_query,
    bn_training,
    flat_queries,
    gather,
    no_running_stat_updates,
    standard,
    unflat_queries,
    vmap_values,
)
from .ops import is_random, out_of_place
from .values import (
    Chunk,
    Dense,
    Packed,
    SliceDelta,
    Value,
    query_value,
    stack_queries,
)

Rule = Callable[[Chunk, fx.Node], Value]


# ----------------------------------------------------------------------------------------
# helpers
def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _only_first_changes(ch: Chunk, node: fx.Node) -> bool:
    first = node.args[0] if node.args else None
    return all(ch.env.get(n) is None for n in node.all_input_nodes if n is not first)


def _part(other: Any, out_shape: tuple[int, ...], v: SliceDelta) -> Any:
    """The part of an unchanged operand that meets slices ``v.index`` along ``v.axis`` of an
    output of shape ``out_shape`` (in the layout of ``v.values``)."""
    if not isinstance(other, torch.Tensor) or other.ndim == 0:
        return other
    t = other.reshape((1,) * (len(out_shape) - other.ndim) + tuple(other.shape))
    if t.shape[v.axis] == 1:
        return t
    return t.index_select(v.axis, v.index)


def _channels(v: Value) -> bool:
    """Is ``v`` a delta in one channel (axis 1)?"""
    return isinstance(v, SliceDelta) and v.axis == 1


# ----------------------------------------------------------------------------------------
# unchanged / identity / elementwise
def rule_unchanged(ch: Chunk, node: fx.Node) -> Value:
    """Shape-only ops and fills: the value does not depend on the input's values."""
    return None


def rule_identity(ch: Chunk, node: fx.Node) -> Value:
    src = node.args[0]
    ch.alias_of[node] = (src,)
    return ch.env.get(src)


def elementwise(fn: Callable[..., torch.Tensor], inplace: Callable[..., Any] | None = None) -> Rule:
    """An op acting on each element alone (extra arguments: constants); ``inplace``: its
    in-place form, used when the input's buffer is exclusively this node's."""

    def rule(ch: Chunk, node: fx.Node) -> Value:
        v = ch.env.get(node.args[0])
        if not _scalar_extras(ch, node):
            return rule_generic(ch, node)
        rest = [ch.cached(a) for a in node.args[1:]]
        kwargs = {k: ch.cached(a) for k, a in node.kwargs.items() if k != "inplace"}
        f = inplace if inplace is not None and ch.exclusive(node.args[0]) else fn
        if isinstance(v, SliceDelta):
            return SliceDelta(v.index, f(v.values, *rest, **kwargs), v.axis)
        if isinstance(v, Dense):
            return Dense(f(v.values, *rest, **kwargs))
        return rule_generic(ch, node)

    return rule


def rule_elementwise_module(ch: Chunk, node: fx.Node) -> Value:
    m = ch.context.module_of(node)
    v = ch.env.get(node.args[0])
    if not isinstance(v, SliceDelta | Dense):
        return rule_generic(ch, node)

    def apply(t: torch.Tensor) -> torch.Tensor:
        if getattr(m, "inplace", False) and not ch.exclusive(node.args[0]):
            t = t.clone()
        return m(t)

    if isinstance(v, SliceDelta):
        return SliceDelta(v.index, apply(v.values), v.axis)
    return Dense(apply(v.values))


# ----------------------------------------------------------------------------------------
# binary arithmetic (residual adds, gating, scaling)
def _shape(ch: Chunk, arg: Any) -> tuple[int, ...]:
    v = ch.meta(arg)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def binary(op: Callable[..., torch.Tensor], reverse: bool) -> Rule:
    def rule(ch: Chunk, node: fx.Node) -> Value:
        if len(node.args) != 2 or node.kwargs:
            return rule_generic(ch, node)
        a, b = (node.args[1], node.args[0]) if reverse else node.args
        va, vb = ch.value(a), ch.value(b)
        if isinstance(va, Packed) or isinstance(vb, Packed):
            return rule_generic(ch, node)
        out = ch.meta(node)
        if not isinstance(out, torch.Tensor):
            return rule_generic(ch, node)
        out_shape = tuple(out.shape)
        deltas = [v for v in (va, vb) if isinstance(v, SliceDelta)]
        changed = [(arg, v) for arg, v in ((a, va), (b, vb)) if v is not None]
        if (
            deltas
            and len(deltas) == len(changed)
            and all(_shape(ch, arg) == out_shape for arg, _ in changed)
            and all(
                d.axis == deltas[0].axis and torch.equal(d.index, deltas[0].index)
                for d in deltas[1:]
            )
        ):
            d0 = deltas[0]
            xa = va.values if isinstance(va, SliceDelta) else _part(ch.cached(a), out_shape, d0)
            xb = vb.values if isinstance(vb, SliceDelta) else _part(ch.cached(b), out_shape, d0)
            return SliceDelta(d0.index, op(xa, xb), d0.axis)
        nd = len(out_shape)

        def operand(arg: Any, v: Value) -> Any:
            if v is None:
                return ch.cached(arg)
            t = ch.dense(v, arg)
            return t.reshape(t.shape[0], *((1,) * (nd - (t.ndim - 1))), *t.shape[1:])

        xa, xb = operand(a, va), operand(b, vb)
        first_exclusive = (
            isinstance(va, Dense)
            and ch.exclusive(a)
            and isinstance(xa, torch.Tensor)
            and tuple(xa.shape[1:]) == out_shape
            and xa.dtype == out.dtype
            and op in (torch.add, torch.sub, torch.mul, torch.div)
        )
        if first_exclusive:
            return Dense(op(xa, xb, out=xa))
        return Dense(op(xa, xb))

    return rule


# ----------------------------------------------------------------------------------------
# convolutions
@dataclass(frozen=True)
class ConvSpec:
    """A 2-D convolution: weight ``(C_out, C_in / groups, kh, kw)``, explicit padding."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    pad: tuple[int, int, int, int]  # F.pad order: left, right, top, bottom
    mode: str  # "constant" (zeros), "reflect", "replicate" or "circular"

    def __call__(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The conv of a ``(n, C, H, W)`` batch (bias included unless ``weight`` is given)."""
        w = self.weight if weight is None else weight
        b = self.bias if weight is None else None
        left, right, top, bottom = self.pad
        if self.mode == "constant" and left == right and top == bottom:
            return F.conv2d(x, w, b, self.stride, (top, left), self.dilation, self.groups)
        return F.conv2d(self.padded(x), w, b, self.stride, 0, self.dilation, self.groups)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        if not any(self.pad):
            return x
        return F.pad(x, self.pad, self.mode)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _explicit_padding(
    padding: Any, kernel: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError(f"unknown conv padding {padding!r}")
        (th, tw) = (dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1))
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = _pair(padding)
    return (pw, pw, ph, ph)


def conv_spec(ch: Chunk, node: fx.Node) -> ConvSpec | None:
    """The conv of a ``Conv2d`` module node or an ``F.conv2d`` call (unchanged weights)."""
    if node.op == "call_module":
        m = ch.context.module_of(node)
        if not standard(m, nn.Conv2d):
            return None
        kernel, dilation = _pair(m.kernel_size), _pair(m.dilation)
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        pad = _explicit_padding(m.padding, kernel, dilation)
        return ConvSpec(m.weight, m.bias, _pair(m.stride), dilation, m.groups, pad, mode)
    if node.op == "call_function" and node.target is F.conv2d:
        if not _only_first_changes(ch, node):
            return None
        weight = ch.cached(_arg(node, 1, "weight"))
        if not isinstance(weight, torch.Tensor) or weight.ndim != 4:
            return None
        dilation = _pair(ch.cached(_arg(node, 5, "dilation", 1)))
        pad = _explicit_padding(ch.cached(_arg(node, 4, "padding", 0)), weight.shape[2:], dilation)
        return ConvSpec(
            weight,
            ch.cached(_arg(node, 2, "bias")),
            _pair(ch.cached(_arg(node, 3, "stride", 1))),
            dilation,
            int(ch.cached(_arg(node, 6, "groups", 1))),
            pad,
            "constant",
        )
    return None


def rule_conv(ch: Chunk, node: fx.Node) -> Value:
    spec = conv_spec(ch, node)
    v = ch.env.get(node.args[0])
    if spec is None or not isinstance(v, SliceDelta | Dense) or not _only_first_changes(ch, node):
        return rule_generic(ch, node)
    if not isinstance(v, SliceDelta) or v.axis != 1:
        x = ch.dense(v, node.args[0])
        return Dense(unflat_queries(spec(flat_queries(x)), ch.Q))
    base_in = ch.cached(node.args[0])
    base_out = ch.cached(node)
    # conv(base + delta) = conv(base) + conv_without_bias(delta); each query's delta lives in
    # one input channel, so its contribution costs 1/C_in of a conv.
    delta = v.values - base_in[:, v.index]  # (N, Q, H, W)
    return one_channel_conv(ch, spec, delta, v.index, base_out)


def one_channel_conv(
    ch: Chunk, spec: ConvSpec, delta: torch.Tensor, channels: torch.Tensor, base_out: torch.Tensor
) -> Value:
    """``base_out + conv(delta_q placed in input channel channels[q])`` for every query q.

    ``delta``: ``(N, Q, H, W)``. Dense ``(Q, N, C_out, Ho, Wo)``, or a SliceDelta when each
    input channel feeds one output channel (depthwise convs).
    """
    q = ch.Q
    w = spec.weight
    c_out, per_group_in, kh, kw = w.shape
    per_group_out = c_out // spec.groups
    padded = spec.padded(delta)
    if spec.groups == 1:
        if ch.context.memory_format == "channels_last":
            return Dense(_taps_matmul(ch, spec, padded, channels, base_out))
        weight = w[:, channels].transpose(0, 1).reshape(q * c_out, 1, kh, kw)
        contrib = F.conv2d(padded, weight, None, spec.stride, 0, spec.dilation, groups=q)
        n, _, ho, wo = contrib.shape
        out = ch.context.empty((q, *base_out.shape), base_out)
        torch.add(contrib.view(n, q, c_out, ho, wo).transpose(0, 1), base_out.unsqueeze(0), out=out)
        return Dense(out)
    group = torch.div(channels, per_group_in, rounding_mode="floor")
    local = channels - group * per_group_in
    out_idx = group[:, None] * per_group_out + torch.arange(per_group_out, device=w.device)
    wq = w[out_idx, local[:, None]]  # (Q, per_group_out, kh, kw)
    contrib = F.conv2d(
        padded, wq.reshape(q * per_group_out, 1, kh, kw), None, spec.stride, 0, spec.dilation, q
    )
    if per_group_out == 1:
        oc = out_idx[:, 0]
        return SliceDelta(oc, base_out[:, oc] + contrib)
    n, _, ho, wo = contrib.shape
    out = ch.context.empty((q, *base_out.shape), base_out)
    out.copy_(base_out.unsqueeze(0).expand_as(out))
    rows = torch.arange(q, device=w.device)[:, None]
    out[rows, :, out_idx] += contrib.view(n, q, per_group_out, ho, wo).permute(1, 2, 0, 3, 4)
    return Dense(out)


def _taps_matmul(
    ch: Chunk, spec: ConvSpec, padded: torch.Tensor, channels: torch.Tensor, base_out: torch.Tensor
) -> torch.Tensor:
    """The groups=1 one-channel conv as one batched matmul, in channels-last memory order.

    ``(Q, N·Ho·Wo, kh·kw) @ (Q, kh·kw, C_out)`` is the channels-last order of the result.
    Returns ``(Q, N, C_out, Ho, Wo)`` with channels-last strides per sample.
    """
    n, q = padded.shape[:2]
    c_out, _, kh, kw = spec.weight.shape
    ho, wo = base_out.shape[2:]
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    src = padded.transpose(0, 1)  # (Q, N, H', W')
    taps = torch.empty((q, n, ho, wo, kh * kw), dtype=padded.dtype, device=padded.device)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
            cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            taps[..., i * kw + j] = src[:, :, rows, cols]
    weight = spec.weight[:, channels].permute(1, 2, 3, 0).reshape(q, kh * kw, c_out)
    out = torch.bmm(taps.view(q, n * ho * wo, kh * kw), weight)  # (Q, N*Ho*Wo, C_out)
    out5 = out.view(q, n, ho, wo, c_out)
    out5.add_(base_out.permute(0, 2, 3, 1).unsqueeze(0))
    return out5.permute(0, 1, 4, 2, 3)


# ----------------------------------------------------------------------------------------
# linear
def _linear_params(ch: Chunk, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    if node.op == "call_module":
        m = ch.context.module_of(node)
        return m.weight, m.bias
    if not _only_first_changes(ch, node):
        return None
    return ch.cached(_arg(node, 1, "weight")), ch.cached(_arg(node, 2, "bias"))


def rule_linear(ch: Chunk, node: fx.Node) -> Value:
    """Linear maps the last axis: a delta in another axis stays one (each row on its own);
    a delta in one input feature adds a rank-one term (1/in_features of the layer)."""
    params = _linear_params(ch, node)
    v = ch.env.get(node.args[0])
    if params is None or not isinstance(v, SliceDelta | Dense):
        return rule_generic(ch, node)
    weight, bias = params
    if isinstance(v, Dense):
        return Dense(F.linear(v.values, weight, bias))
    nd = ch.meta(node.args[0]).ndim
    if v.axis < nd - 1:
        return SliceDelta(v.index, F.linear(v.values, weight, bias), v.axis)
    base_in = ch.cached(node.args[0])
    base_out = ch.cached(node)  # (*lead, O)
    delta = (v.values - base_in.index_select(-1, v.index)).movedim(-1, 0)  # (Q, *lead)
    cols = weight[:, v.index].transpose(0, 1)  # (Q, O)
    cols = cols.view(ch.Q, *([1] * (nd - 1)), -1)
    return Dense(torch.addcmul(base_out.unsqueeze(0), delta.unsqueeze(-1), cols))


# ----------------------------------------------------------------------------------------
# normalization
def rule_batchnorm(ch: Chunk, node: fx.Node) -> Value:
    m = ch.context.module_of(node)
    v = ch.env.get(node.args[0])
    if _channels(v):
        w, b = gather(m.weight, v.index), gather(m.bias, v.index)
        return SliceDelta(v.index, bn_channels(m, v.values, v.index, w, b))
    if isinstance(v, SliceDelta):
        v = Dense(ch.dense(v, node.args[0]))
    if not isinstance(v, Dense):
        return rule_generic(ch, node)
    if not bn_training(m):
        out = F.batch_norm(
            flat_queries(v.values),
            m.running_mean,
            m.running_var,
            m.weight,
            m.bias,
            False,
            0.0,
            m.eps,
        )
        return Dense(unflat_queries(out, ch.Q))
    return Dense(bn_per_query(m, v.values, overwrite=ch.exclusive(node.args[0])))


def rule_layer_norm(ch: Chunk, node: fx.Node) -> Value:
    """LayerNorm normalizes over trailing dims: a delta in a leading axis stays one, and the
    dense ``(Q, *shape)`` batch takes it as it is."""
    v = ch.env.get(node.args[0])
    if not _only_first_changes(ch, node) or not isinstance(v, SliceDelta | Dense):
        return rule_generic(ch, node)
    if node.op == "call_module":
        fn: Callable[..., Any] = ch.context.module_of(node)
        normalized = len(ch.context.module_of(node).normalized_shape)
        rest: list[Any] = []
        kwargs: dict[str, Any] = {}
    else:
        fn = F.layer_norm
        rest = [ch.cached(a) for a in node.args[1:]]
        kwargs = {k: ch.cached(a) for k, a in node.kwargs.items()}
        shape = ch.cached(_arg(node, 1, "normalized_shape"))
        normalized = 1 if isinstance(shape, int) else len(shape)
    if isinstance(v, SliceDelta) and v.axis < ch.meta(node.args[0]).ndim - normalized:
        return SliceDelta(v.index, fn(v.values, *rest, **kwargs), v.axis)
    return Dense(fn(ch.dense(v, node.args[0]), *rest, **kwargs))


def rule_per_sample(ch: Chunk, node: fx.Node) -> Value:
    """A module mapping each sample (dim 0) on its own: once on all ``Q·N`` samples."""
    v = ch.env.get(node.args[0])
    base_in, base_out = ch.meta(node.args[0]), ch.meta(node)
    if (
        not isinstance(v, SliceDelta | Dense)
        or len(node.args) != 1
        or node.kwargs
        or not isinstance(base_out, torch.Tensor)
        or base_in.ndim == 0
        or base_out.ndim == 0
        or base_out.shape[0] != base_in.shape[0]
    ):
        return rule_generic(ch, node)
    x = ch.dense(v, node.args[0])
    return Dense(unflat_queries(ch.context.module_of(node)(flat_queries(x)), ch.Q))


# ----------------------------------------------------------------------------------------
# pooling and reductions
def rule_pool(ch: Chunk, node: fx.Node) -> Value:
    """Pooling acts on each channel alone: the Q changed channels are pooled as channels."""
    v = ch.env.get(node.args[0])
    if not isinstance(v, SliceDelta | Dense) or not _only_first_changes(ch, node):
        return rule_generic(ch, node)
    if isinstance(v, SliceDelta) and v.axis != 1:
        v = Dense(ch.dense(v, node.args[0]))
    if node.op == "call_module":
        m = ch.context.module_of(node)
        fn: Callable[..., Any] = m
        rest: list[Any] = []
        kwargs: dict[str, Any] = {}
    else:
        fn = node.target  # type: ignore[assignment]
        rest = [ch.cached(a) for a in node.args[1:]]
        kwargs = {k: ch.cached(a) for k, a in node.kwargs.items()}
    if isinstance(v, SliceDelta):
        return SliceDelta(v.index, fn(v.values, *rest, **kwargs))
    return Dense(unflat_queries(fn(flat_queries(v.values), *rest, **kwargs), ch.Q))


def rule_reduce(ch: Chunk, node: fx.Node) -> Value:
    """``x.mean(dims, keepdim)`` and friends: channel-local when only dims >= 2 reduce."""
    v = ch.env.get(node.args[0])
    base = ch.meta(node.args[0])
    if not isinstance(v, SliceDelta | Dense) or not _only_first_changes(ch, node):
        return rule_generic(ch, node)
    name = str(node.target) if node.op == "call_method" else node.target.__name__  # type: ignore[union-attr]
    dim = ch.cached(_arg(node, 1, "dim"))
    keepdim = bool(ch.cached(_arg(node, 2, "keepdim", False)))
    extra = {k: ch.cached(a) for k, a in node.kwargs.items() if k not in ("dim", "keepdim")}
    if len(node.args) > 3 or (dim is None and keepdim):
        return rule_generic(ch, node)
    fn = getattr(torch, name)
    if dim is None:
        x = ch.dense(v, node.args[0])
        return Dense(fn(x.reshape(ch.Q, -1), 1, **extra))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    dims = tuple(d % base.ndim for d in dims)
    if isinstance(v, SliceDelta) and v.axis not in dims:
        axis = v.axis if keepdim else v.axis - sum(d < v.axis for d in dims)
        return SliceDelta(v.index, fn(v.values, dims, keepdim, **extra), axis)
    x = ch.dense(v, node.args[0])
    return Dense(fn(x, tuple(d + 1 for d in dims), keepdim, **extra))


# ----------------------------------------------------------------------------------------
# shapes and layouts
def rule_reshape(ch: Chunk, node: fx.Node) -> Value:
    """view/reshape/flatten/unflatten/squeeze/unsqueeze: per query, to the cached shape; a
    delta stays one when the dims up to its axis keep their sizes."""
    v = ch.env.get(node.args[0])
    base_in, base_out = ch.meta(node.args[0]), ch.meta(node)
    if not isinstance(v, SliceDelta | Dense) or not isinstance(base_out, torch.Tensor):
        return rule_generic(ch, node)
    ch.alias_of[node] = (node.args[0],)
    if isinstance(v, SliceDelta):
        a = v.axis
        if base_out.ndim > a and tuple(base_out.shape[: a + 1]) == tuple(base_in.shape[: a + 1]):
            shape = list(base_out.shape)
            shape[a] = ch.Q
            return SliceDelta(v.index, v.values.reshape(shape), a)
    return Dense(ch.dense(v, node.args[0]).reshape(ch.Q, *base_out.shape))


def _permutation(ch: Chunk, node: fx.Node, ndim: int) -> tuple[int, ...] | None:
    name = str(node.target) if node.op == "call_method" else node.target.__name__  # type: ignore[union-attr]
    args = [ch.cached(a) for a in node.args[1:]]
    if name == "permute":
        dims = args[0] if len(args) == 1 and not isinstance(args[0], int) else args
        dims = node.kwargs.get("dims", dims)
        return tuple(int(d) % ndim for d in dims)
    if name in ("transpose", "swapaxes", "swapdims"):
        if len(args) != 2:
            return None
        a, b = (int(d) % ndim for d in args)
        perm = list(range(ndim))
        perm[a], perm[b] = perm[b], perm[a]
        return tuple(perm)
    if name == "t" and ndim == 2:
        return (1, 0)
    return None


def rule_permute(ch: Chunk, node: fx.Node) -> Value:
    v = ch.env.get(node.args[0])
    base = ch.meta(node.args[0])
    if not isinstance(v, SliceDelta | Dense) or not _only_first_changes(ch, node):
        return rule_generic(ch, node)
    perm = _permutation(ch, node, base.ndim)
    if perm is None:
        return rule_generic(ch, node)
    ch.alias_of[node] = (node.args[0],)
    if isinstance(v, SliceDelta):
        return SliceDelta(v.index, v.values.permute(perm), perm.index(v.axis))
    x = ch.dense(v, node.args[0])
    return Dense(x.permute(0, *(p + 1 for p in perm)))


def _plain_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, int | slice | type(None)) or i is Ellipsis for i in items)


def _full_index(index: Any, ndim: int) -> tuple | None:
    """``index`` with any Ellipsis expanded to full slices; ``None`` if it cannot be."""
    items = list(index) if isinstance(index, tuple) else [index]
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    if items.count(Ellipsis) > 1 or used > ndim:
        return None
    if Ellipsis in items:
        k = items.index(Ellipsis)
        items[k : k + 1] = [slice(None)] * (ndim - used)
    return tuple(items)


def _axis_after_index(full: tuple, axis: int) -> int | None:
    """Where dim ``axis`` lands after basic indexing with ``full`` (None: indexed itself)."""
    dim, out = 0, 0
    for item in full:
        if item is None:
            out += 1
            continue
        if dim == axis:
            return out if item == slice(None) else None
        if not isinstance(item, int):
            out += 1
        dim += 1
    return out + (axis - dim)


def rule_getitem(ch: Chunk, node: fx.Node) -> Value:
    src, index = node.args[0], node.args[1]
    v = ch.env.get(src)
    index = fx.node.map_arg(index, ch.cached)
    if isinstance(v, Packed):
        if isinstance(index, int):
            return v.items[index]
        return rule_generic(ch, node)
    if not isinstance(v, SliceDelta | Dense) or not _only_first_changes(ch, node):
        return rule_generic(ch, node)
    if not _plain_index(index):
        return rule_generic(ch, node)
    base = ch.meta(src)
    ch.alias_of[node] = (src,)
    full = _full_index(index, base.ndim)
    if isinstance(v, SliceDelta) and full is not None:
        axis = _axis_after_index(full, v.axis)
        if axis is not None:
            return SliceDelta(v.index, v.values[full], axis)
    x = ch.dense(v, src)
    items = index if isinstance(index, tuple) else (index,)
    return Dense(x[(slice(None), *items)])


def rule_pad(ch: Chunk, node: fx.Node) -> Value:
    """``F.pad``: spatial padding is channel-local; padding the channel dim shifts channels."""
    v = ch.env.get(node.args[0])
    if not isinstance(v, SliceDelta | Dense) or not _only_first_changes(ch, node):
        return rule_generic(ch, node)
    base = ch.meta(node.args[0])
    pad = tuple(int(p) for p in ch.cached(_arg(node, 1, "pad")))
    mode = ch.cached(_arg(node, 2, "mode", "constant"))
    value = ch.cached(_arg(node, 3, "value", None))
    nd = base.ndim
    k = len(pad) // 2  # pads the last k dims
    if isinstance(v, SliceDelta) and k <= nd - 1 and min(pad) >= 0:
        # entry pairs cover the last k dims, last dim first; the axis pair shifts the index
        at = 2 * (nd - 1 - v.axis)
        shift = pad[at] if at < len(pad) else 0
        if at < len(pad) and mode != "constant" and (pad[at] or pad[at + 1]):
            return rule_generic(ch, node)
        others = tuple(0 if at <= i <= at + 1 else p for i, p in enumerate(pad))
        values = F.pad(v.values, others, mode, value) if any(others) else v.values
        if not any(others):
            ch.alias_of[node] = (node.args[0],)
        return SliceDelta(v.index + shift, values, v.axis)
    x = ch.dense(v, node.args[0])
    if mode == "constant" and k <= nd:
        return Dense(F.pad(x, pad, mode, value))
    return Dense(unflat_queries(F.pad(flat_queries(x), pad, mode, value), ch.Q))


def rule_cat(ch: Chunk, node: fx.Node) -> Value:
    """``torch.cat(tensors, dim)``: a delta concatenated along its own axis stays one."""
    parts = _arg(node, 0, "tensors")
    if not isinstance(parts, list | tuple) or any(isinstance(ch.value(p), Packed) for p in parts):
        return rule_generic(ch, node)
    out = ch.meta(node)
    dim = int(ch.cached(_arg(node, 1, "dim", 0))) % out.ndim
    changed = [i for i, p in enumerate(parts) if ch.value(p) is not None]
    v = ch.value(parts[changed[0]]) if len(changed) == 1 else None
    if isinstance(v, SliceDelta) and v.axis == dim:
        offset = sum(int(ch.meta(p).shape[dim]) for p in parts[: changed[0]])
        ch.alias_of[node] = (parts[changed[0]],)
        return SliceDelta(v.index + offset, v.values, v.axis)
    pieces = [
        ch.dense(ch.value(p), p) if ch.value(p) is not None else ch.expanded(p) for p in parts
    ]
    return Dense(torch.cat(pieces, dim + 1))


# ----------------------------------------------------------------------------------------
# attention and splits
def rule_sdpa(ch: Chunk, node: fx.Node) -> Value:
    """``F.scaled_dot_product_attention``: heads attend on their own, so a delta in one head
    (axis 1 of ``(B, H, N, d)``) stays one; otherwise all queries in one call."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    args = [
        ch.cached(_arg(node, i, n, None if i < 4 else (0.0 if i == 4 else False)))
        for i, n in enumerate(names)
    ]
    if args[4] or any(k not in (*names, "scale", "enable_gqa") for k in node.kwargs):
        return rule_generic(ch, node)
    nodes = [_arg(node, i, n) for i, n in enumerate(names[:3])]
    vals = [ch.value(n) for n in nodes]
    mask_node = _arg(node, 3, "attn_mask")
    if ch.value(mask_node) is not None or any(isinstance(v, Packed) for v in vals):
        return rule_generic(ch, node)
    extra = {k: ch.cached(a) for k, a in node.kwargs.items() if k in ("scale", "enable_gqa")}
    mask, causal = args[3], bool(args[5])
    deltas = [v for v in vals if v is not None]
    if (
        all(isinstance(v, SliceDelta) and v.axis == 1 for v in deltas)
        and all(
            torch.equal(v.index, deltas[0].index)
            for v in deltas[1:]  # type: ignore[union-attr]
        )
        and all(ch.meta(n).ndim == 4 for n in nodes)
    ):
        index = deltas[0].index  # type: ignore[union-attr]
        parts = [
            v.values if v is not None else ch.cached(n).index_select(1, index)  # type: ignore[union-attr]
            for n, v in zip(nodes, vals, strict=True)
        ]
        if isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[1] > 1:
            mask = mask.index_select(1, index)
        out = F.scaled_dot_product_attention(*parts, attn_mask=mask, is_causal=causal, **extra)
        return SliceDelta(index, out, 1)
    parts = [
        ch.dense(v, n) if v is not None else ch.expanded(n)
        for n, v in zip(nodes, vals, strict=True)
    ]
    if all(p.ndim == 5 for p in parts) and (
        not isinstance(mask, torch.Tensor) or mask.ndim < 4 or mask.shape[0] == 1
    ):
        # (Q, B, H, N, d) -> (Q·B, H, N, d): the fused kernels take 4-D inputs
        flat = [p.reshape(-1, *p.shape[2:]) for p in parts]
        out = F.scaled_dot_product_attention(*flat, attn_mask=mask, is_causal=causal, **extra)
        return Dense(unflat_queries(out, ch.Q))
    return Dense(F.scaled_dot_product_attention(*parts, attn_mask=mask, is_causal=causal, **extra))


def rule_multihead_attention(ch: Chunk, node: fx.Node) -> Value:
    """``nn.MultiheadAttention``: every query's sequences stacked into one batch, one call."""
    m = ch.context.module_of(node)
    names = ("query", "key", "value")
    nodes = [_arg(node, i, n) for i, n in enumerate(names)]
    vals = [ch.value(n) for n in nodes]
    kwargs = {k: ch.cached(a) for k, a in node.kwargs.items() if k not in names}
    if (
        len(node.args) > 3
        or any(isinstance(v, Packed) for v in vals)
        or any(ch.value(a) is not None for k, a in node.kwargs.items() if k not in names)
        or any(isinstance(kwargs.get(k), torch.Tensor) for k in ("attn_mask",))
        and kwargs["attn_mask"].ndim == 3
        or any(ch.meta(n).ndim != 3 for n in nodes)
    ):
        return rule_generic(ch, node)
    q = ch.Q
    batch_dim = 0 if m.batch_first else 1
    parts = [
        ch.dense(v, n) if v is not None else ch.expanded(n)
        for n, v in zip(nodes, vals, strict=True)
    ]
    if batch_dim == 1:  # (Q, L, B, E) -> (L, Q·B, E)
        parts = [p.transpose(0, 1).reshape(p.shape[1], -1, p.shape[-1]) for p in parts]
    else:
        parts = [p.reshape(-1, *p.shape[2:]) for p in parts]
    mask = kwargs.get("key_padding_mask")
    if isinstance(mask, torch.Tensor):
        kwargs["key_padding_mask"] = mask.repeat(q, *([1] * (mask.ndim - 1)))
    out, weights = m(*parts, **kwargs)
    if batch_dim == 1:
        out = out.reshape(out.shape[0], q, -1, out.shape[-1]).transpose(0, 1)
    else:
        out = unflat_queries(out, q)
    if weights is not None:
        weights = unflat_queries(weights, q)
    return Packed((Dense(out), None if weights is None else Dense(weights)))


def rule_split(ch: Chunk, node: fx.Node) -> Value:
    """``unbind``/``chunk``/``split`` into a tuple: pieces along another axis keep a delta."""
    v = ch.env.get(node.args[0])
    if not isinstance(v, SliceDelta | Dense) or not _only_first_changes(ch, node):
        return rule_generic(ch, node)
    name = str(node.target) if node.op == "call_method" else node.target.__name__  # type: ignore[union-attr]
    nd = ch.meta(node.args[0]).ndim
    if name == "unbind":
        dim = int(ch.cached(_arg(node, 1, "dim", 0))) % nd
        extra: tuple = ()
    else:
        dim = int(ch.cached(_arg(node, 2, "dim", 0))) % nd
        extra = (
            ch.cached(_arg(node, 1, "chunks" if name == "chunk" else "split_size_or_sections")),
        )
    ch.alias_of[node] = (node.args[0],)
    if isinstance(v, SliceDelta) and v.axis != dim:
        pieces = getattr(v.values, name)(*extra, dim)
        axis = v.axis - 1 if name == "unbind" and dim < v.axis else v.axis
        return Packed(tuple(SliceDelta(v.index, p, axis) for p in pieces))
    x = ch.dense(v, node.args[0])
    return Packed(tuple(Dense(p) for p in getattr(x, name)(*extra, dim + 1)))


# ----------------------------------------------------------------------------------------
# dropout: the same mask for the base forward and every query
def rule_dropout(ch: Chunk, node: fx.Node) -> Value:
    v = ch.env.get(node.args[0])
    mask = ch.context.masks.get(node)
    if mask is None or not isinstance(v, SliceDelta | Dense) or not _only_first_changes(ch, node):
        return rule_generic(ch, node)
    if isinstance(v, SliceDelta):
        return SliceDelta(v.index, v.values * mask.index_select(v.axis, v.index), v.axis)
    if ch.exclusive(node.args[0]):
        return Dense(v.values.mul_(mask))
    return Dense(v.values * mask)


# ----------------------------------------------------------------------------------------
# everything else: vmap over queries, else a loop
def rule_generic(ch: Chunk, node: fx.Node) -> Value:
    """Any op: under ``torch.func.vmap`` over the queries, or once per query (exact)."""
    ctx = ch.context
    m = ctx.module_of(node) if node.op == "call_module" else None
    fn = out_of_place(node, m)
    opaque = node.op == "call_module" and node in ctx.graph.opaque
    changed = [n for n in node.all_input_nodes if ch.env.get(n) is not None]
    dense_inputs = all(isinstance(ch.env[n], SliceDelta | Dense) for n in changed)
    if dense_inputs and node not in ctx.no_vmap and not is_random(node, m):
        tensors = [ch.dense(ch.env[n], n) for n in changed]

        def per_query(*ts: torch.Tensor) -> Any:
            sub = dict(zip(changed, ts, strict=True))

            def load(n: fx.Node) -> Any:
                return sub[n] if n in sub else ch.cached(n)

            return fn(*fx.node.map_arg(node.args, load), **fx.node.map_arg(node.kwargs, load))

        try:
            with no_running_stat_updates(m):
                value = vmap_values(per_query, *tensors)
        except Exception:  # noqa: BLE001 - vmap cannot run it: loop over queries below
            ctx.no_vmap.add(node)
        else:
            ctx.stats["vmapped_ops"] += 1
            ch.alias_of[node] = tuple(changed)
            return value
    return _loop(ch, node, fn, changed, m, opaque)


def _loop(
    ch: Chunk,
    node: fx.Node,
    fn: Callable[..., Any],
    changed: list[fx.Node],
    module: nn.Module | None,
    opaque: bool,
) -> Value:
    """Run ``node`` once per query: its inputs that query's, the random generator and the
    module's buffers as in the unperturbed forward (so random draws are the same)."""
    ctx = ch.context
    ctx.stats["looped_ops"] += 1
    buffers = [(b, b.clone()) for b in module.buffers()] if module is not None else []
    rng = ctx.rng_state(node)
    outs = []
    with ctx.restorable_rng(rng is not None):
        for q in range(ch.Q):
            sub = {n: query_value(ch, n, q) for n in changed}

            def load(n: fx.Node, sub: dict = sub) -> Any:
                value = sub[n] if n in sub else ch.cached(n)
                if (opaque or rng is not None) and isinstance(value, torch.Tensor):
                    # opaque code may write into its inputs; random draws follow memory order
                    value = value.clone(memory_format=torch.contiguous_format)
                return value

            for b, saved in buffers:
                b.copy_(saved)
            if rng is not None:
                ctx.set_rng(rng)
            outs.append(fn(*fx.node.map_arg(node.args, load), **fx.node.map_arg(node.kwargs, load)))
    return stack_queries(outs, node)


def _scalar_extras(ch: Chunk, node: fx.Node) -> bool:
    """Are the op's arguments besides the first unchanged and scalar (then it acts on each
    element alone)? ``x.type_as(y)`` / ``x.to(y)`` read only ``y``'s dtype and device."""
    first = node.args[0] if node.args else None
    dtype_only = node.op == "call_method" and str(node.target) in ("type_as", "to")
    for n in node.all_input_nodes:
        if n is first:
            continue
        if ch.env.get(n) is not None and not dtype_only:
            return False
        value = ch.cached(n)
        if isinstance(value, torch.Tensor) and value.ndim > 0 and not dtype_only:
            return False
    return True


__all__ = [
    "ConvSpec",
    "Rule",
    "binary",
    "conv_spec",
    "elementwise",
    "one_channel_conv",
    "rule_batchnorm",
    "rule_cat",
    "rule_conv",
    "rule_dropout",
    "rule_elementwise_module",
    "rule_generic",
    "rule_getitem",
    "rule_identity",
    "rule_layer_norm",
    "rule_linear",
    "rule_multihead_attention",
    "rule_pad",
    "rule_per_sample",
    "rule_permute",
    "rule_pool",
    "rule_reduce",
    "rule_reshape",
    "rule_sdpa",
    "rule_split",
    "rule_unchanged",
]
