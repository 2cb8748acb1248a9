"""Fast, exact sparse-CGE queries: ``f(x + step * e_c)`` for many coordinates ``c`` at once.

A coordinate-wise gradient estimate perturbs one parameter at a time, so each query differs
from the unperturbed forward only *downstream* of one layer, and inside that layer only in
one output channel. :class:`SparseCGEEngine` exploits this, exactly:

1. Once per step (per ``x`` and batch) it runs the unperturbed forward and caches the
   activation of every node of every stage (each stage is traced with ``torch.fx``).
2. For the selected coordinates of one parameter tensor it builds the perturbed output of
   that layer for all of them at once as a :class:`ChannelDelta` — "equal to the cache except
   in channel ``c_q`` for query ``q``" — from the cached input (a conv weight changes one
   output channel by ``step`` times a shifted input channel; a BN parameter one channel).
3. It pushes those values through the rest of the network with per-op rules: channel-local
   ops (BatchNorm, ReLU, pooling, residual adds, option-A shortcuts) keep a ChannelDelta
   channel-local; the next conv/linear turns it into a :class:`Dense` batch of ``Q * B``
   samples as ``cache + conv(delta)``, where each query's delta has one input channel (1/C
   of a conv); dense ops then run once on the large batch. BatchNorm in training mode
   normalizes every query with its own batch statistics; running statistics are never
   touched.
4. Queries are processed in chunks whose size comes from a memory cap.

See docs/engine.md for the design, the float32 accuracy measures and measured speed.

Ops without a rule fall back to a per-query loop (always exact, just slower), and so do
stages ``torch.fx`` cannot trace. The two references used by the tests and the benchmark,
:func:`naive_coordinate_values` and :func:`block_reuse_coordinate_values`, are here too.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .models import PadShortcut, stages_of
from .params import ParamView, preserved_buffers

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Default cap (bytes) on the activations of one chunk of queries, by device type. The CPU
#: value was picked by measurement (see docs/engine.md); the CUDA value is unmeasured.
DEFAULT_CHUNK_BYTES = {"cpu": 16 * 2**20, "cuda": 1024 * 2**20}

#: Live copies of the widest activation per query a chunk needs at once (input, output, temp).
_LIVE_FACTOR = 3


# ----------------------------------------------------------------------------------------
# Values flowing through the graph. ``None`` means "equal to the cached activation".
@dataclass
class ChannelDelta:
    """Per query ``q``, the activation equals the cache except channel ``channels[q]``.

    ``channels``: ``(Q,)`` int64. ``values``: ``(B, Q, *rest)``, the new contents of those
    channels laid out as ``Q`` channels (so BatchNorm/pooling/grouped conv apply directly).
    """

    channels: torch.Tensor
    values: torch.Tensor


@dataclass
class Dense:
    """Every query's full activation, stacked query-major: ``(Q * B, *shape[1:])``."""

    values: torch.Tensor


Value = ChannelDelta | Dense | None


class _Chunk:
    """What rules need while pushing one chunk of ``Q`` queries through a stage."""

    def __init__(self, engine: SparseCGEEngine, stage: int, q: int):
        self.engine = engine
        self.stage = stage
        self.Q = q
        self.B = engine._batch_size
        self.alias_of: dict[fx.Node, fx.Node] = {}
        self.env: dict[fx.Node, Value] = {}

    def cached(self, arg: Any) -> Any:
        """The unperturbed value of a node argument (constants pass through)."""
        if isinstance(arg, fx.Node):
            return self.engine._cache[self.stage][arg]
        return arg

    def exclusive(self, node: fx.Node) -> bool:
        """May a rule overwrite the value of ``node``? (Only its one user reads it.)"""
        while True:
            if len(node.users) != 1:
                return False
            if node not in self.alias_of:
                return True
            node = self.alias_of[node]

    def dense(self, value: Value, node: Any) -> torch.Tensor:
        """The full ``(Q * B, ...)`` tensor of a value."""
        if isinstance(value, Dense):
            return value.values
        base = self.cached(node)
        if not isinstance(base, torch.Tensor):
            raise TypeError(f"cannot batch non-tensor value of node {node}")
        out = self.engine._empty((self.Q * self.B, *base.shape[1:]), base)
        out5 = out.view(self.Q, self.B, *base.shape[1:])
        out5.copy_(base.unsqueeze(0).expand_as(out5))
        if isinstance(value, ChannelDelta):
            q = torch.arange(self.Q, device=base.device)
            out5[q, :, value.channels] = value.values.transpose(0, 1)
        return out


# ----------------------------------------------------------------------------------------
# Rules: (chunk, node, module-or-None, input values) -> output value.
Rule = Callable[[_Chunk, fx.Node, Any, list[Value]], Value]


def _rule_identity(ch: _Chunk, node: fx.Node, m: Any, vals: list[Value]) -> Value:
    ch.alias_of[node] = node.args[0]
    return vals[0]


def _elementwise(fn: Callable[[torch.Tensor, bool], torch.Tensor]) -> Rule:
    """A rule for an op acting on each element alone: applies to either representation."""

    def rule(ch: _Chunk, node: fx.Node, m: Any, vals: list[Value]) -> Value:
        v = vals[0]
        may_overwrite = ch.exclusive(node.args[0])
        if isinstance(v, ChannelDelta):
            return ChannelDelta(v.channels, fn(v.values, may_overwrite))
        return Dense(fn(v.values, may_overwrite))

    return rule


def _module_elementwise(ch: _Chunk, node: fx.Node, m: nn.Module, vals: list[Value]) -> Value:
    def apply(t: torch.Tensor, may_overwrite: bool) -> torch.Tensor:
        if getattr(m, "inplace", False) and not may_overwrite:
            t = t.clone()
        return m(t)

    return _elementwise(apply)(ch, node, m, vals)


def _relu(t: torch.Tensor, may_overwrite: bool) -> torch.Tensor:
    return torch.relu_(t) if may_overwrite else torch.relu(t)


def _rule_pool(ch: _Chunk, node: fx.Node, m: nn.Module, vals: list[Value]) -> Value:
    """Pooling acts on each channel alone: the Q changed channels are pooled as channels."""
    v = vals[0]
    if isinstance(v, ChannelDelta):
        return ChannelDelta(v.channels, m(v.values))
    return Dense(m(v.values))


def _flatten_rule(start_dim: int, end_dim: int) -> Rule:
    """``flatten(x, start_dim, end_dim)``; a ChannelDelta on ``(B, C, 1, ...)`` stays one."""

    def rule(ch: _Chunk, node: fx.Node, m: Any, vals: list[Value]) -> Value:
        v = vals[0]
        ndim = ch.cached(node.args[0]).ndim
        start, end = start_dim % ndim, end_dim % ndim
        if start == 0:  # would mix queries into one sample
            return _generic(ch, node, m, vals)
        ch.alias_of[node] = node.args[0]  # reshapes are views
        if isinstance(v, ChannelDelta) and start == 1 and end == ndim - 1:
            if all(s == 1 for s in v.values.shape[2:]):
                return ChannelDelta(v.channels, v.values.reshape(ch.B, ch.Q))
        return Dense(torch.flatten(ch.dense(v, node.args[0]), start, end))

    return rule


def _module_flatten(ch: _Chunk, node: fx.Node, m: nn.Flatten, vals: list[Value]) -> Value:
    return _flatten_rule(m.start_dim, m.end_dim)(ch, node, m, vals)


def _call_flatten(ch: _Chunk, node: fx.Node, m: Any, vals: list[Value]) -> Value:
    """``torch.flatten(x, start_dim=0, end_dim=-1)`` or ``x.flatten(...)``."""
    args = list(node.args[1:])
    start = node.kwargs.get("start_dim", args[0] if args else 0)
    end = node.kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
    if not isinstance(start, int) or not isinstance(end, int):
        return _generic(ch, node, m, vals)
    return _flatten_rule(start, end)(ch, node, m, vals)


def _rule_conv2d(ch: _Chunk, node: fx.Node, m: nn.Conv2d, vals: list[Value]) -> Value:
    v = vals[0]
    if isinstance(v, Dense):
        return Dense(m(v.values))
    if not _conv_fast(m):
        return Dense(m(ch.dense(v, node.args[0])))
    # conv(base + delta) = conv(base) + conv_without_bias(delta), and each query's delta lives
    # in one input channel: its contribution costs 1/C_in of a conv.
    base_in = ch.cached(node.args[0])
    base_out = ch.cached(node)
    delta = v.values - base_in[:, v.channels]  # (B, Q, H, W)
    if ch.engine.memory_format == "channels_last":
        return Dense(_one_channel_conv_cl(m, delta, v.channels, base_out))
    weight = m.weight[:, v.channels].transpose(0, 1)  # (Q, C_out, kh, kw)
    c_out = weight.shape[1]
    weight = weight.reshape(ch.Q * c_out, 1, *weight.shape[2:])
    contrib = F.conv2d(delta, weight, None, m.stride, m.padding, m.dilation, groups=ch.Q)
    contrib = contrib.view(ch.B, ch.Q, c_out, *contrib.shape[2:]).transpose(0, 1)
    out = ch.engine._empty((ch.Q * ch.B, *base_out.shape[1:]), base_out)
    torch.add(contrib, base_out.unsqueeze(0), out=out.view(ch.Q, ch.B, *base_out.shape[1:]))
    return Dense(out)


def _one_channel_conv_cl(
    m: nn.Conv2d, delta: torch.Tensor, channels: torch.Tensor, base_out: torch.Tensor
) -> torch.Tensor:
    """``base_out + conv(delta_q placed in channel channels[q])`` for every query q.

    ``delta``: ``(B, Q, H, W)``. Returns ``(Q * B, C_out, Ho, Wo)`` in channels-last layout,
    computed as one batched matmul of the ``kh * kw`` shifted copies of each delta with that
    channel's filter taps: ``(Q, B·Ho·Wo, kh·kw) @ (Q, kh·kw, C_out)`` is already the
    channels-last memory order of the result.
    """
    b, q = delta.shape[:2]
    c_out, _, kh, kw = m.weight.shape
    ho, wo = base_out.shape[2:]
    (sh, sw), (dh, dw), (ph, pw) = m.stride, m.dilation, m.padding
    padded = F.pad(delta.transpose(0, 1), (pw, pw, ph, ph))  # (Q, B, H + 2ph, W + 2pw)
    taps = torch.empty((q, b, ho, wo, kh * kw), dtype=delta.dtype, device=delta.device)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
            cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            taps[..., i * kw + j] = padded[:, :, rows, cols]
    weight = m.weight[:, channels].permute(1, 2, 3, 0).reshape(q, kh * kw, c_out)
    out = torch.bmm(taps.view(q, b * ho * wo, kh * kw), weight)  # (Q, B*Ho*Wo, C_out)
    out5 = out.view(q, b, ho, wo, c_out)
    out5.add_(base_out.permute(0, 2, 3, 1).unsqueeze(0))
    return out5.view(q * b, ho, wo, c_out).permute(0, 3, 1, 2)  # channels-last strides


def _rule_linear(ch: _Chunk, node: fx.Node, m: nn.Linear, vals: list[Value]) -> Value:
    v = vals[0]
    if isinstance(v, Dense):
        return Dense(m(v.values))
    base_in = ch.cached(node.args[0])
    if base_in.ndim != 2:
        return Dense(m(ch.dense(v, node.args[0])))
    base_out = ch.cached(node)  # (B, O)
    delta = v.values - base_in[:, v.channels]  # (B, Q)
    cols = m.weight[:, v.channels].transpose(0, 1)  # (Q, O)
    out = base_out.unsqueeze(0) + delta.transpose(0, 1).unsqueeze(-1) * cols.unsqueeze(1)
    return Dense(out.reshape(ch.Q * ch.B, -1))


def _bn_training(m: nn.modules.batchnorm._BatchNorm) -> bool:
    return m.training or (m.running_mean is None and m.running_var is None)


def _bn_channels(
    m: nn.modules.batchnorm._BatchNorm,
    x: torch.Tensor,
    channels: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """BatchNorm of ``x`` = ``(B, Q, *rest)`` whose channel ``q`` is channel ``channels[q]``.

    Training mode: each of the Q channels gets its own batch statistics, exactly as the
    per-query forward computes them for that channel. (Computed in the contiguous layout:
    see :func:`_bn_per_query` on the channels-last kernel's rounding.)
    """
    x = x.contiguous()
    if _bn_training(m):
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, m.eps)
    return F.batch_norm(
        x, m.running_mean[channels], m.running_var[channels], weight, bias, False, 0.0, m.eps
    )


def _gather(p: torch.Tensor | None, channels: torch.Tensor) -> torch.Tensor | None:
    return None if p is None else p[channels]


def _bn_per_query(
    m: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, q: int, overwrite: bool
) -> torch.Tensor:
    """Training-mode BatchNorm of ``x`` = ``(Q * B, C, ...)`` with statistics per query.

    Channels-innermost layouts (channels-last 4-D, plain 2-D) get one vectorized two-pass
    computation over the ``(Q, B·H·W, C)`` view: torch's own channels-last CPU kernel
    computes the variance with a much larger rounding error (1e-5 relative for inputs whose
    mean is a few standard deviations, vs 1e-6 here), which is coherent over a channel and
    would swamp the tiny loss differences CGE takes. Other layouts: the native kernel per
    query.
    """
    c = x.shape[1]
    weight, bias = m.weight, m.bias
    if x.stride(1) == 1:
        xl = x.movedim(1, -1)  # (Q*B, *spatial, C), contiguous
        x3 = xl.reshape(q, -1, c)
        mean = x3.mean(1, keepdim=True)
        var = (x3 - mean).square_().mean(1, keepdim=True)
        scale = torch.rsqrt(var.add_(m.eps))
        if weight is not None:
            scale = scale * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        out = torch.addcmul(shift, x3, scale, out=x3 if overwrite else None)
        return out.view(xl.shape).movedim(-1, 1)
    b = x.shape[0] // q
    return torch.cat(
        [
            F.batch_norm(x[i * b : (i + 1) * b], None, None, weight, bias, True, 0.0, m.eps)
            for i in range(q)
        ]
    )


def _rule_batchnorm(
    ch: _Chunk, node: fx.Node, m: nn.modules.batchnorm._BatchNorm, vals: list[Value]
) -> Value:
    v = vals[0]
    if isinstance(v, ChannelDelta):
        w, b = _gather(m.weight, v.channels), _gather(m.bias, v.channels)
        return ChannelDelta(v.channels, _bn_channels(m, v.values, v.channels, w, b))
    x = v.values
    if not _bn_training(m):
        return Dense(
            F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
        )
    return Dense(_bn_per_query(m, x, ch.Q, overwrite=ch.exclusive(node.args[0])))


def _rule_per_sample(ch: _Chunk, node: fx.Node, m: nn.Module, vals: list[Value]) -> Value:
    """A module acting on each sample alone: run it once on the whole ``Q * B`` batch."""
    return Dense(m(ch.dense(vals[0], node.args[0])))


def _rule_pad_shortcut(ch: _Chunk, node: fx.Node, m: PadShortcut, vals: list[Value]) -> Value:
    v = vals[0]
    if isinstance(v, ChannelDelta):
        s = m.stride
        ch.alias_of[node] = node.args[0]  # may be a view
        return ChannelDelta(v.channels + m.pad, v.values[:, :, ::s, ::s])
    return Dense(m(v.values))


def _rule_add(ch: _Chunk, node: fx.Node, m: Any, vals: list[Value]) -> Value:
    if node.kwargs or len(node.args) != 2:
        return _generic(ch, node, m, vals)
    a, b = node.args
    va = vals[0] if isinstance(a, fx.Node) else None
    vb = vals[1] if isinstance(b, fx.Node) else None
    if va is None or vb is None:  # one side unchanged: add its cache
        (changed, v), other = ((a, va), b) if vb is None else ((b, vb), a)
        base_other = ch.cached(other)
        base_changed = ch.cached(changed)
        same_shape = not isinstance(base_other, torch.Tensor) or (
            base_other.shape == base_changed.shape
        )
        if isinstance(v, ChannelDelta) and same_shape:
            add = base_other[:, v.channels] if isinstance(base_other, torch.Tensor) else base_other
            return ChannelDelta(v.channels, v.values + add)
        t = ch.dense(v, changed)
        t5 = t.view(ch.Q, ch.B, *t.shape[1:])
        other5 = base_other.unsqueeze(0) if isinstance(base_other, torch.Tensor) else base_other
        if isinstance(v, Dense) and ch.exclusive(changed):
            t5.add_(other5)
            return Dense(t)
        return Dense((t5 + other5).reshape(t.shape))
    if (
        isinstance(va, ChannelDelta)
        and isinstance(vb, ChannelDelta)
        and torch.equal(va.channels, vb.channels)
    ):
        return ChannelDelta(va.channels, va.values + vb.values)
    ta, tb = ch.dense(va, a), ch.dense(vb, b)
    if isinstance(va, Dense) and ch.exclusive(a):
        return Dense(ta.add_(tb))
    return Dense(ta + tb)


def _generic(ch: _Chunk, node: fx.Node, m: Any, vals: list[Value]) -> Value:
    """Any op: run it once per query on that query's full inputs (exact, slow)."""
    full = {n: ch.dense(ch.env[n], n) for n in node.all_input_nodes if ch.env.get(n) is not None}
    fn = _callable_of(node, m)
    ch.engine.stats["looped_ops"] += 1

    def load(n: fx.Node, sl: slice) -> Any:
        if n in full:
            return full[n][sl]
        base = ch.cached(n)
        return base.clone() if isinstance(base, torch.Tensor) else base  # ops may mutate

    outs = []
    for q in range(ch.Q):
        sl = slice(q * ch.B, (q + 1) * ch.B)
        args = fx.node.map_arg(node.args, lambda n, sl=sl: load(n, sl))
        kwargs = fx.node.map_arg(node.kwargs, lambda n, sl=sl: load(n, sl))
        out = fn(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"the engine cannot batch node {node.format_node()} returning "
                f"{type(out).__name__}; use engine=False"
            )
        outs.append(out)
    return Dense(torch.cat(outs))


_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
)  # fmt: skip
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)  # fmt: skip


_PER_SAMPLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.LayerNorm, nn.GroupNorm, nn.Upsample,
)  # fmt: skip


def _module_rule(m: nn.Module) -> Rule:
    if isinstance(m, nn.Conv2d):
        return _rule_conv2d
    if isinstance(m, nn.Linear):
        return _rule_linear
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return _rule_batchnorm
    if isinstance(m, nn.ReLU):
        return _elementwise(_relu)
    if isinstance(m, _ELEMENTWISE_MODULES):
        return _module_elementwise
    if isinstance(m, _POOL_MODULES) and not getattr(m, "return_indices", False):
        return _rule_pool
    if isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and (not m.training or m.p == 0)):
        return _rule_identity
    if isinstance(m, nn.Flatten):
        return _module_flatten
    if isinstance(m, PadShortcut):
        return _rule_pad_shortcut
    if isinstance(m, _PER_SAMPLE_MODULES):
        return _rule_per_sample
    return _generic


def _function_rule(node: fx.Node) -> Rule:
    target = node.target
    if node.op == "call_function":
        if target in (operator.add, operator.iadd, torch.add):
            return _rule_add
        if target in (F.relu, torch.relu, torch.relu_):
            return _elementwise(_relu)
        if target is torch.flatten:
            return _call_flatten
    elif node.op == "call_method":
        if target in ("add", "add_", "__add__", "__iadd__"):
            return _rule_add
        if target in ("relu", "relu_"):
            return _elementwise(_relu)
        if target == "flatten":
            return _call_flatten
    return _generic


_INPLACE_FUNCTIONS = {operator.iadd: operator.add, torch.relu_: torch.relu}


def _callable_of(node: fx.Node, m: Any) -> Callable[..., Any]:
    """An out-of-place callable for ``node`` (never mutates cached activations)."""
    if node.op == "call_module":
        if getattr(m, "inplace", False):

            def call(*args: Any, **kwargs: Any) -> Any:
                first = args[0].clone() if isinstance(args[0], torch.Tensor) else args[0]
                return m(first, *args[1:], **kwargs)

            return call
        return m
    if node.op == "call_function":
        fn = _INPLACE_FUNCTIONS.get(node.target, node.target)
        if "inplace" in node.kwargs:
            return lambda *a, **k: fn(*a, **{**k, "inplace": False})
        return fn
    if node.op == "call_method":
        name = node.target
        if name.endswith("_") and not name.endswith("__"):
            name = name[:-1]
        elif name.startswith("__i") and name.endswith("__"):
            name = "__" + name[3:]
        return lambda self, *a, **k: getattr(self, name)(*a, **k)
    raise TypeError(f"unexpected node {node.format_node()}")  # pragma: no cover


# ----------------------------------------------------------------------------------------
# Stage graphs
_SELF = "<stage>"  # call_module target standing for the stage module itself


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps every module the engine has a rule for as a leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, PadShortcut) or super().is_leaf_module(m, qualname)


@dataclass
class _Stage:
    module: nn.Module
    nodes: list[fx.Node]
    modules: dict[fx.Node, nn.Module]  # call_module node -> module
    position: dict[fx.Node, int]
    traced: bool


def _trace_stage(stage: nn.Module) -> _Stage:
    """Trace ``stage`` into an op graph.

    A stage that is itself a leaf module (e.g. a bare ``nn.Linear``) becomes one
    ``call_module`` node with its rule; an untraceable stage one opaque node (run per query).
    """
    tracer = _Tracer()
    leaf = tracer.is_leaf_module(stage, "")
    traced = True
    if not leaf:
        try:
            graph = tracer.trace(stage)
        except Exception:
            traced = False
    if leaf or not traced:
        graph = fx.Graph()
        x = graph.placeholder("x")
        graph.output(graph.call_module(_SELF, (x,)))
    nodes = list(graph.nodes)
    if sum(n.op == "placeholder" for n in nodes) != 1:
        raise TypeError(
            f"each stage must take exactly one tensor input; {type(stage).__name__} does not"
        )
    modules = {}
    for n in nodes:
        if n.op == "call_module":
            modules[n] = stage if n.target == _SELF else stage.get_submodule(n.target)
    return _Stage(stage, nodes, modules, {n: i for i, n in enumerate(nodes)}, traced)


def _is_channels_last_bn(m: Any, args: tuple) -> bool:
    x = args[0] if args else None
    return (
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and isinstance(x, torch.Tensor)
        and x.ndim == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def _run_base(stage: _Stage, x: torch.Tensor) -> tuple[torch.Tensor, dict[fx.Node, Any]]:
    """The unperturbed forward of one stage, recording every node's value (no mutation)."""
    env: dict[fx.Node, Any] = {}
    out = None
    for node in stage.nodes:
        if node.op == "placeholder":
            env[node] = x
        elif node.op == "get_attr":
            obj: Any = stage.module
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            env[node] = obj
        elif node.op == "output":
            out = fx.node.map_arg(node.args[0], env.__getitem__)
        else:
            m = stage.modules.get(node)
            fn = _callable_of(node, m)
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            if _is_channels_last_bn(m, args):  # the channels-last kernel rounds coarsely
                first = args[0].contiguous()
                out_bn = fn(first, *args[1:], **kwargs)
                env[node] = out_bn.contiguous(memory_format=torch.channels_last)
            else:
                env[node] = fn(*args, **kwargs)
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"each stage must return one tensor; {type(stage.module).__name__} does not"
        )
    return out, env


# ----------------------------------------------------------------------------------------
# Where each parameter enters the graph
@dataclass(frozen=True)
class _Origin:
    """Where perturbing a parameter tensor first changes an activation.

    ``kind``: ``"node"`` (a leaf module of stage ``stage``), ``"stage"`` (the whole stage,
    e.g. a shared or functionally used parameter) or ``"model"`` (outside every stage).
    """

    kind: str
    stage: int = -1
    node: fx.Node | None = None
    attr: str = ""


def _locate_params(stages: list[_Stage], view: ParamView) -> list[_Origin]:
    users: dict[int, list[tuple[int, fx.Node | None, str]]] = {}
    for s, st in enumerate(stages):
        for node, m in st.modules.items():
            if not st.traced:
                for name, p in m.named_parameters():
                    users.setdefault(id(p), []).append((s, None, name))
                continue
            for name, p in m.named_parameters():
                users.setdefault(id(p), []).append((s, node, name))
        for node in st.nodes:
            if node.op == "get_attr":
                obj: Any = st.module
                for part in str(node.target).split("."):
                    obj = getattr(obj, part)
                users.setdefault(id(obj), []).append((s, None, ""))
    origins = []
    for p in view.params:
        found = users.get(id(p), [])
        stages_used = {s for s, _, _ in found}
        if len(found) == 1 and found[0][1] is not None:
            s, node, attr = found[0]
            origins.append(_Origin("node", s, node, attr))
        elif len(stages_used) == 1:
            origins.append(_Origin("stage", stages_used.pop()))
        else:
            origins.append(_Origin("model"))
    return origins


# ----------------------------------------------------------------------------------------
# Per-query losses
def cast_for_loss(
    logits: torch.Tensor, targets: torch.Tensor, loss_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (and floating targets) in ``loss_dtype`` (``None``: unchanged).

    CGE divides loss differences of size ``mu * |g|`` by ``mu``; reducing the loss in
    float64 keeps the final batch mean from rounding them to float32 resolution (~1e-7).
    """
    if loss_dtype is None:
        return logits, targets
    if targets.is_floating_point():
        targets = targets.to(loss_dtype)
    return logits.to(loss_dtype), targets


def _per_query_loss(loss_fn: LossFn) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """``(logits (Q*B, ...), targets (B, ...), Q) -> (Q,)`` losses, each a batch mean.

    Cross-entropy (``F.cross_entropy`` or an unweighted mean ``nn.CrossEntropyLoss``) runs
    once for all queries; any other loss is called once per query.
    """
    ce_kwargs: dict[str, Any] | None = None
    ignore_index = -100
    if loss_fn is F.cross_entropy:
        ce_kwargs = {}
    elif (
        isinstance(loss_fn, nn.CrossEntropyLoss)
        and loss_fn.weight is None
        and loss_fn.reduction == "mean"
    ):
        ce_kwargs = {"label_smoothing": loss_fn.label_smoothing}
        ignore_index = loss_fn.ignore_index

    def looped(logits: torch.Tensor, targets: torch.Tensor, q: int) -> torch.Tensor:
        b = logits.shape[0] // q
        return torch.stack(
            [loss_fn(logits[i * b : (i + 1) * b], targets).reshape(()) for i in range(q)]
        )

    if ce_kwargs is None:
        return looped

    def vectorized(logits: torch.Tensor, targets: torch.Tensor, q: int) -> torch.Tensor:
        if not targets.is_floating_point() and bool((targets == ignore_index).any()):
            return looped(logits, targets, q)  # ignored samples change the mean's denominator
        reps = (q,) + (1,) * (targets.ndim - 1)
        per_sample = F.cross_entropy(logits, targets.repeat(reps), reduction="none", **ce_kwargs)
        return per_sample.view(q, -1).mean(1)

    return vectorized


# ----------------------------------------------------------------------------------------
class SparseCGEEngine:
    """Evaluates ``f(x + step * e_c)`` for many coordinates ``c`` of a torch model, exactly.

    Args:
        module: the model; its forward must be the composition of ``stages_of(module)``.
        loss_fn: ``loss_fn(logits, targets) -> scalar`` batch-mean loss.
        view: the flat parameter view (built from ``module`` if omitted).
        chunk_bytes: cap on one chunk's activations (bytes); the number of queries per chunk
            is ``chunk_bytes // (3 * B * widest downstream activation)``. Default by device
            type from :data:`DEFAULT_CHUNK_BYTES`.
        memory_format: ``"channels_last"``, ``"contiguous"`` or ``"auto"`` (channels-last on
            CPU, where it measured ~1.5x faster; contiguous elsewhere) for 4-D activations.
        loss_dtype: dtype the loss is computed in from the logits (see :func:`cast_for_loss`);
            the values returned have this dtype. ``None``: the logits' dtype.
        per_sample_modules: extra module types known to map each sample independently and
            statelessly (e.g. an eval-mode black-box classifier stage): the engine runs them
            once on all ``Q * B`` samples of a chunk instead of once per query.
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
    ):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        if memory_format not in ("auto", "channels_last", "contiguous"):
            raise ValueError(
                "memory_format must be 'auto', 'channels_last' or 'contiguous', "
                f"got {memory_format!r}"
            )
        if chunk_bytes is not None and (not isinstance(chunk_bytes, int) or chunk_bytes <= 0):
            raise ValueError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")
        self.module = module
        self.loss_fn = loss_fn
        self.view = view if view is not None else ParamView(module)
        self.stages = [_trace_stage(s) for s in stages_of(module)]
        self.origins = _locate_params(self.stages, self.view)
        device_type = self.view.device.type
        self.chunk_bytes = chunk_bytes or DEFAULT_CHUNK_BYTES.get(
            device_type, DEFAULT_CHUNK_BYTES["cuda"]
        )
        if memory_format == "auto":
            memory_format = "channels_last" if device_type == "cpu" else "contiguous"
        self.memory_format = memory_format
        self._loss_per_query = _per_query_loss(loss_fn)
        self.loss_dtype = loss_dtype
        self.per_sample_modules = tuple(per_sample_modules)
        self.values_dtype = loss_dtype or self.view.dtype
        self._key: tuple | None = None
        self._x = torch.empty(0)
        self._buffers: list[torch.Tensor] = []
        self._cache: list[dict[fx.Node, Any]] = []
        self._batch_size = 0
        self.stats = {
            "cache_builds": 0,  # unperturbed forwards cached
            "chunks": 0,
            "queries": 0,
            "slow_path_queries": 0,  # queries whose parameter has no fast origin rule
            "looped_ops": 0,  # op applications run once per query (no batched rule)
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

        ``f`` is ``loss_fn(module(inputs), targets)`` with the parameters ``x`` (shape
        ``(dim,)``). The module's parameters and buffers are unchanged afterwards.
        """
        x = self.view.check_flat(x, "x").to(self.view.device, self.view.dtype)
        coords_np = as_coords(coords, self.view.dim)
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
        return out

    @property
    def base_loss(self) -> float:
        """The unperturbed loss from the last cached forward."""
        return float(self._base_loss)

    # -- cache ---------------------------------------------------------------------------
    def _key_of(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple:
        """What besides ``x`` and the buffers the cache depends on: the batch, the modes."""
        key = (id(inputs), inputs._version, id(targets), targets._version)
        return key + tuple(m.training for m in self.module.modules())

    def _is_cached(self, x: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> bool:
        """Is the cache valid for ``x``, this batch, these modes and running statistics?"""
        if self._key != self._key_of(inputs, targets) or not torch.equal(self._x, x):
            return False
        return all(
            torch.equal(b, c) for b, c in zip(self.module.buffers(), self._buffers, strict=True)
        )

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
        with torch.no_grad(), preserved_buffers(self.module), self.view.loaded(x):
            h = self.format_input(inputs.to(self.view.device))
            for st in self.stages:
                h, _ = _run_base(st, h)
            return float(self.loss_fn(*cast_for_loss(h, targets, self.loss_dtype)))

    def _prepare(
        self,
        x: torch.Tensor,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        update_stats: bool = False,
    ) -> None:
        """Run the unperturbed forward once and cache every stage's node values.

        The parameters must already hold ``x``. Skipped when the cache is valid, unless
        ``update_stats`` asks for the stat-updating forward.
        """
        if not update_stats and self._is_cached(x, inputs, targets):
            return
        self._key = None
        if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError("inputs and targets must be torch tensors")
        if not update_stats:  # buffers are restored by the caller: remember them as they are
            self._buffers = [b.clone() for b in self.module.buffers()]
        h = self.format_input(inputs.to(self.view.device))
        self._batch_size = int(inputs.shape[0])
        self._cache = []
        self.stats["cache_builds"] += 1
        for st in self.stages:
            h, env = _run_base(st, h)
            self._cache.append(env)
        self._base_loss = self.loss_fn(*cast_for_loss(h, targets, self.loss_dtype)).reshape(())
        if update_stats:
            self._buffers = [b.clone() for b in self.module.buffers()]
        self._widest = self._widest_downstream()
        self._padded: dict[fx.Node, torch.Tensor] = {}
        self._x = x.clone()
        self._batch_refs = (inputs, targets)  # held, so their ids cannot be reused
        self._key = self._key_of(inputs, targets)

    def _widest_downstream(self) -> list[dict[fx.Node, int]]:
        """Per stage and node: largest per-sample activation size at or after that node."""
        out: list[dict[fx.Node, int]] = [{} for _ in self.stages]
        widest = 0
        for s in range(len(self.stages) - 1, -1, -1):
            for node in reversed(self.stages[s].nodes):
                v = self._cache[s].get(node)
                if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == self._batch_size:
                    widest = max(widest, v[0].numel())
                out[s][node] = widest
        return out

    def format_input(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in the engine's memory format (4-D tensors only)."""
        if self.memory_format == "channels_last" and t.ndim == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    def _empty(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        t = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self.format_input(t)

    # -- queries -------------------------------------------------------------------------
    def _group_values(
        self, g: int, local: torch.Tensor, step: float, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Values for coordinates ``local`` (indices within parameter tensor ``g``)."""
        origin = self.origins[g]
        param = self.view.params[g]
        if origin.kind == "model":
            self.stats["slow_path_queries"] += local.numel()
            return _naive_loop(
                self.module, self.loss_fn, param, local, step, inputs, targets, self.loss_dtype
            )
        first = origin.node if origin.kind == "node" else self.stages[origin.stage].nodes[0]
        per_query = self._batch_size * self._widest[origin.stage][first]
        per_query *= _LIVE_FACTOR * param.element_size()
        chunk = max(1, self.chunk_bytes // max(1, per_query))
        flat = param.view(-1)
        out = []
        for start in range(0, local.numel(), chunk):
            idx = local[start : start + chunk]
            new = flat[idx] + step  # perturbed values, rounded as the naive loop rounds them
            ch = _Chunk(self, origin.stage, idx.numel())
            if origin.kind == "node":
                value = self._origin_value(ch, origin, param, idx, new)
                last = self._propagate(ch, origin.stage, origin.node, value)
            else:
                self.stats["slow_path_queries"] += idx.numel()
                value = self._stage_origin_value(ch, origin.stage, param, idx, new)
                last = self._propagate(ch, origin.stage + 1, None, value)
            losses = self._losses(ch, last, targets)
            out.append(losses)
            self.stats["chunks"] += 1
            self.stats["queries"] += losses.numel()
        return torch.cat(out)

    def _origin_value(
        self, ch: _Chunk, origin: _Origin, param: torch.Tensor, idx: torch.Tensor, new: torch.Tensor
    ) -> Value:
        """The output of the module owning ``param`` with ``param.view(-1)[idx[q]] = new[q]``."""
        node = origin.node
        m = self.stages[origin.stage].modules[node]
        eff = new - param.view(-1)[idx]  # the step actually taken in this dtype
        base_in = ch.cached(node.args[0]) if node.args else None
        base_out = ch.cached(node)
        is_weight = origin.attr == "weight"
        if isinstance(m, nn.Conv2d) and _conv_fast(m) and origin.attr in ("weight", "bias"):
            if not is_weight:
                vals = base_out[:, idx] + eff.view(1, -1, 1, 1)
                return ChannelDelta(idx, vals)
            co, ci, kh, kw = np.unravel_index(idx.cpu().numpy(), tuple(param.shape))
            shifted = self._shifted_input(ch, node, m, ci, kh, kw)  # (B, Q, Ho, Wo)
            co_t = torch.as_tensor(co, device=idx.device)
            return ChannelDelta(
                co_t, torch.addcmul(base_out[:, co_t], shifted, eff.view(1, -1, 1, 1))
            )
        if isinstance(m, nn.Linear) and base_in is not None and base_in.ndim == 2:
            if not is_weight:
                return ChannelDelta(idx, base_out[:, idx] + eff.view(1, -1))
            o, i = np.unravel_index(idx.cpu().numpy(), tuple(param.shape))
            o_t = torch.as_tensor(o, device=idx.device)
            i_t = torch.as_tensor(i, device=idx.device)
            return ChannelDelta(
                o_t, torch.addcmul(base_out[:, o_t], base_in[:, i_t], eff.view(1, -1))
            )
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and origin.attr in ("weight", "bias"):
            weight = _gather(m.weight, idx)
            bias = _gather(m.bias, idx)
            if is_weight:
                weight = new
            else:
                bias = new
            return ChannelDelta(idx, _bn_channels(m, base_in[:, idx], idx, weight, bias))
        self.stats["slow_path_queries"] += idx.numel()
        return self._per_query_module(ch, node, m, param, idx, new)

    def _shifted_input(
        self,
        ch: _Chunk,
        node: fx.Node,
        m: nn.Conv2d,
        ci: np.ndarray,
        kh: np.ndarray,
        kw: np.ndarray,
    ) -> torch.Tensor:
        """``input[:, ci, kh + stride*i, kw + stride*j]`` (zero padded): ``(B, Q, Ho, Wo)``."""
        padded = self._padded.get(node)
        if padded is None:
            ph, pw = m.padding
            padded = F.pad(ch.cached(node.args[0]), (pw, pw, ph, ph))
            self._padded[node] = padded
        ho, wo = ch.cached(node).shape[2:]
        dev = padded.device
        sh, sw = m.stride
        dh, dw = m.dilation
        rows = torch.as_tensor(kh * dh, device=dev)[:, None] + sh * torch.arange(ho, device=dev)
        cols = torch.as_tensor(kw * dw, device=dev)[:, None] + sw * torch.arange(wo, device=dev)
        ci_t = torch.as_tensor(ci, device=dev)
        return padded[:, ci_t[:, None, None], rows[:, :, None], cols[:, None, :]]

    def _per_query_module(
        self,
        ch: _Chunk,
        node: fx.Node,
        m: nn.Module,
        param: torch.Tensor,
        idx: torch.Tensor,
        new: torch.Tensor,
    ) -> Value:
        """Fallback origin: set each coordinate in place and rerun the module on cached input."""
        fn = _callable_of(node, m)
        flat = param.view(-1)
        outs = []
        for i, v in zip(idx.tolist(), new.tolist(), strict=True):
            old = flat[i].clone()
            flat[i] = v
            try:
                args = fx.node.map_arg(node.args, ch.cached)
                kwargs = fx.node.map_arg(node.kwargs, ch.cached)
                outs.append(fn(*args, **kwargs))
            finally:
                flat[i] = old
        return Dense(torch.cat(outs))

    def _stage_origin_value(
        self, ch: _Chunk, s: int, param: torch.Tensor, idx: torch.Tensor, new: torch.Tensor
    ) -> Value:
        """Fallback origin: set each coordinate in place and rerun the whole stage."""
        stage_in = self._cache[s][self.stages[s].nodes[0]]
        flat = param.view(-1)
        outs = []
        for i, v in zip(idx.tolist(), new.tolist(), strict=True):
            old = flat[i].clone()
            flat[i] = v
            try:
                outs.append(self.stages[s].module(stage_in.clone()))
            finally:
                flat[i] = old
        return Dense(torch.cat(outs))

    def _propagate(self, ch: _Chunk, s: int, origin: fx.Node | None, value: Value) -> Value:
        """Push ``value`` from node ``origin`` of stage ``s`` (``None``: from stage ``s``'s
        input) through the remaining stages; returns the value of the model output."""
        for si in range(s, len(self.stages)):
            st = self.stages[si]
            ch.stage, ch.alias_of, ch.env = si, {}, {}
            if origin is not None:
                ch.env[origin] = value
                todo = st.nodes[st.position[origin] + 1 :]
                origin = None
            else:
                todo = st.nodes
            for node in todo:
                if node.op == "placeholder":
                    ch.env[node] = value
                elif node.op == "output":
                    arg = node.args[0]
                    value = ch.env.get(arg) if isinstance(arg, fx.Node) else None
                elif all(ch.env.get(n) is None for n in node.all_input_nodes):
                    ch.env[node] = None
                else:
                    args = [ch.env.get(a) if isinstance(a, fx.Node) else None for a in node.args]
                    ch.env[node] = self._apply(ch, node, st, args)
            if value is None:
                return None
        return value

    def _apply(self, ch: _Chunk, node: fx.Node, st: _Stage, arg_vals: list[Value]) -> Value:
        if node.op == "call_module":
            m = st.modules[node]
            rule = _rule_per_sample if isinstance(m, self.per_sample_modules) else _module_rule(m)
        elif node.op in ("call_function", "call_method"):
            m = None
            rule = _function_rule(node)
        else:  # get_attr etc. never change
            return None
        if rule is not _generic and (not node.args or not isinstance(node.args[0], fx.Node)):
            rule = _generic
        if rule is not _generic and rule is not _rule_add:
            # single-input rules: every other input must be unchanged
            others = [ch.env.get(n) for n in node.all_input_nodes if n is not node.args[0]]
            if any(v is not None for v in others) or arg_vals[0] is None:
                rule = _generic
        return rule(ch, node, m, arg_vals)

    def _losses(self, ch: _Chunk, logits: Value, targets: torch.Tensor) -> torch.Tensor:
        if logits is None:
            return self._base_loss.expand(ch.Q).clone()
        last = self.stages[-1]
        out_node = last.nodes[-1].args[0]
        ch.stage = len(self.stages) - 1
        full, targets = cast_for_loss(ch.dense(logits, out_node), targets, self.loss_dtype)
        return self._loss_per_query(full, targets, ch.Q)


def _conv_fast(m: nn.Conv2d) -> bool:
    return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def as_coords(coords: Any, dim: int) -> np.ndarray:
    """Validate coordinate indices: a 1-D integer array with entries in ``[0, dim)``."""
    if isinstance(coords, torch.Tensor):
        coords = coords.detach().cpu().numpy()
    arr = np.asarray(coords)
    if arr.ndim != 1:
        raise ValueError(f"coords must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"coords must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = (arr < 0) | (arr >= dim)
    if bad.any():
        raise ValueError(f"coordinate {int(arr[bad][0])} out of range for dim={dim}")
    return arr


# ----------------------------------------------------------------------------------------
# References
def _naive_loop(
    module: nn.Module,
    loss_fn: LossFn,
    param: torch.Tensor,
    local: torch.Tensor,
    step: float,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_dtype: torch.dtype | None,
) -> torch.Tensor:
    """Perturb ``param.view(-1)[i]`` in place for each ``i`` in ``local``; full forward each."""
    flat = param.view(-1)
    out = []
    for i in local.tolist():
        old = flat[i].clone()
        flat[i] = old + step
        try:
            logits = module(inputs)
            out.append(loss_fn(*cast_for_loss(logits, targets, loss_dtype)).reshape(()))
        finally:
            flat[i] = old
    return torch.stack(out)


def naive_coordinate_values(
    module: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    coords: Sequence[int] | np.ndarray | torch.Tensor,
    step: float,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    loss_dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """Reference: for each coordinate, perturb it in place and run the full forward.

    Returns ``(k,)`` losses (``loss_dtype``, see :func:`cast_for_loss`). Parameters and
    buffers are restored afterwards; BatchNorm in training mode uses the batch statistics.
    """
    view = ParamView(module)
    coords_np = as_coords(coords, view.dim)
    out = torch.empty(coords_np.shape[0], dtype=loss_dtype or view.dtype, device=view.device)
    with torch.no_grad(), preserved_buffers(module), view.loaded(view.check_flat(x, "x")):
        which = view.group_index(coords_np)
        for k, c in enumerate(coords_np.tolist()):
            g = int(which[k])
            local = torch.tensor([c - view.groups[g].start])
            out[k] = _naive_loop(
                module, loss_fn, view.params[g], local, step, inputs, targets, loss_dtype
            )[0]
    return out


def block_reuse_coordinate_values(
    module: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    coords: Sequence[int] | np.ndarray | torch.Tensor,
    step: float,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    loss_dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """Reference with reuse at stage granularity, one query at a time (as the DeepZero code).

    The unperturbed input of every stage is cached once; a coordinate in stage ``s`` reruns
    stages ``s, s+1, ...`` from that cache. Returns ``(k,)`` losses; parameters and buffers
    are restored afterwards.
    """
    view = ParamView(module)
    coords_np = as_coords(coords, view.dim)
    stages = stages_of(module)
    stage_of_param: dict[int, int] = {}
    for s, st in enumerate(stages):
        for p in st.parameters():
            stage_of_param.setdefault(id(p), s)
    out = torch.empty(coords_np.shape[0], dtype=loss_dtype or view.dtype, device=view.device)
    with torch.no_grad(), preserved_buffers(module), view.loaded(view.check_flat(x, "x")):
        stage_inputs = []
        h = inputs
        for st in stages:
            stage_inputs.append(h)
            h = st(h)
        which = view.group_index(coords_np)
        for k, c in enumerate(coords_np.tolist()):
            g = int(which[k])
            p = view.params[g]
            s = stage_of_param.get(id(p), 0)  # parameters outside every stage: rerun it all
            flat = p.view(-1)
            i = c - view.groups[g].start
            old = flat[i].clone()
            flat[i] = old + step
            try:
                h = stage_inputs[s].clone()  # a stage may modify its input in place
                for st in stages[s:]:
                    h = st(h)
                out[k] = loss_fn(*cast_for_loss(h, targets, loss_dtype))
            finally:
                flat[i] = old
    return out
