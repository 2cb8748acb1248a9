"""Tensor math shared by the origins, the rules and the core: BatchNorm's one two-pass
formula, ``torch.func.vmap`` over queries, and the ``(Q, N, ...)`` layout helpers.

The engine computes every training-mode BatchNorm -- in the unperturbed forward, on a
changed channel, on a dense batch of queries -- with :func:`bn_batch_statistics`, so that
the rounding of ``f(x + mu e)`` and of ``f(x)`` is alike and cancels in their difference.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .values import Dense, Packed, Value


def flat_queries(values: torch.Tensor) -> torch.Tensor:
    """``(Q, N, ...)`` -> ``(Q * N, ...)`` (a view for the layouts the engine creates)."""
    return values.flatten(0, 1)


def unflat_queries(t: torch.Tensor, q: int) -> torch.Tensor:
    return t.unflatten(0, (q, t.shape[0] // q))


def bn_training(m: nn.modules.batchnorm._BatchNorm) -> bool:
    return m.training or (m.running_mean is None and m.running_var is None)


def _two_pass(
    x: torch.Tensor,
    dims: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    shape: tuple[int, ...],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with mean and (biased) variance over
    ``dims``, variance from the centred values; ``shape`` broadcasts weight and bias."""
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square_().mean(dims, keepdim=True)
    scale = torch.rsqrt(var.add_(eps))
    if weight is not None:
        scale = scale * weight.view(shape)
    shift = -mean * scale if bias is None else bias.view(shape) - mean * scale
    return torch.addcmul(shift, x, scale, out=out)


def bn_batch_statistics(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    overwrite: bool = False,
) -> torch.Tensor:
    """Training-mode BatchNorm of ``x`` = ``(N, C, *rest)``, statistics over all dims but 1.

    The engine computes every training-mode BatchNorm with this one two-pass formula (the
    unperturbed forward, changed channels and dense queries alike), so that the rounding of
    ``f(x + mu e)`` and of ``f(x)`` is alike and cancels in their difference. For layouts
    with channels innermost (channels-last 4-D, plain 2-D) it runs on the ``(N·H·W, C)``
    view: torch's own channels-last CPU kernel computes the variance with a much larger
    rounding error (1e-5 relative for inputs whose mean is a few standard deviations).
    """
    c = x.shape[1]
    if x.stride(1) == 1 and x.ndim >= 2:
        xl = x.movedim(1, -1)  # (N, *spatial, C), contiguous
        x2 = xl.reshape(-1, c)
        out = _two_pass(x2, (0,), weight, bias, eps, (1, c), out=x2 if overwrite else None)
        return out.view(xl.shape).movedim(-1, 1)
    dims = (0, *range(2, x.ndim))
    return _two_pass(x, dims, weight, bias, eps, (1, c) + (1,) * (x.ndim - 2))


def bn_channels(
    m: nn.modules.batchnorm._BatchNorm,
    x: torch.Tensor,
    channels: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """BatchNorm of ``x`` = ``(N, Q, *rest)`` whose channel ``q`` is channel ``channels[q]``.

    Training mode: each of the Q channels gets its own batch statistics, exactly as the
    per-query forward computes them for that channel.
    """
    if bn_training(m):
        return bn_batch_statistics(x.contiguous(), weight, bias, m.eps)
    return F.batch_norm(
        x, m.running_mean[channels], m.running_var[channels], weight, bias, False, 0.0, m.eps
    )


def gather(p: torch.Tensor | None, channels: torch.Tensor) -> torch.Tensor | None:
    return None if p is None else p[channels]


def bn_per_query(
    m: nn.modules.batchnorm._BatchNorm, values: torch.Tensor, overwrite: bool
) -> torch.Tensor:
    """Training-mode BatchNorm of ``values`` = ``(Q, N, C, *rest)``, statistics per query
    (:func:`bn_batch_statistics` for each query, vectorized)."""
    q, c = values.shape[0], values.shape[2]
    weight, bias = m.weight, m.bias
    flat = flat_queries(values)
    if flat.stride(1) == 1:
        xl = flat.movedim(1, -1)  # (Q*N, *spatial, C), contiguous
        x3 = xl.reshape(q, -1, c)
        inplace = overwrite and x3.data_ptr() == flat.data_ptr()
        out = _two_pass(x3, (1,), weight, bias, m.eps, (1, 1, c), out=x3 if inplace else None)
        return unflat_queries(out.view(xl.shape).movedim(-1, 1), q)
    dims = (1, *range(3, values.ndim))
    return _two_pass(values, dims, weight, bias, m.eps, (1, 1, c) + (1,) * (values.ndim - 3))


def batchnorm_forward(
    m: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, update: bool
) -> torch.Tensor:
    """The engine's unperturbed BatchNorm: the two-pass formula in training mode (running
    statistics updated by the module itself when ``update``), the module in eval mode."""
    if not bn_training(m) or x.ndim < 2:
        return m(x)
    if update and m.training and m.track_running_stats:
        m(x.contiguous())  # for its running statistics (and num_batches_tracked) alone
    return bn_batch_statistics(x, m.weight, m.bias, m.eps)


def standard(m: nn.Module, cls: type[nn.Module]) -> bool:
    """Is ``m`` a ``cls`` whose forward is ``cls``'s own (not overridden by a subclass)?"""
    return isinstance(m, cls) and type(m).forward is cls.forward


@contextlib.contextmanager
def no_running_stat_updates(module: nn.Module | None) -> Iterator[None]:
    """Training-mode BatchNorm without running-statistics updates (their outputs do not read
    them), so a module holding BatchNorm can run under vmap."""
    changed = []
    if module is not None:
        for m in module.modules():
            if (
                isinstance(m, nn.modules.batchnorm._BatchNorm)
                and m.training
                and m.track_running_stats
            ):
                changed.append(m)
                m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


@contextlib.contextmanager
def quiet_vmap() -> Iterator[None]:
    """vmap warns when it falls back to a loop inside an op (no batching rule); the engine
    reports its own paths (``stats``, ``explain``), so those warnings are noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        yield


def vmap_values(fn: Callable[..., Any], *tensors: torch.Tensor) -> Value:
    """``fn`` under ``torch.func.vmap`` over dim 0 of ``tensors`` (random draws refused).

    ``fn`` may return a tensor or a flat tuple/list of tensors and non-tensors (e.g.
    ``(out, None)`` from attention); non-tensor entries must not depend on the query."""
    layout: dict[str, Any] = {}

    def tensors_only(*ts: torch.Tensor) -> Any:
        out = fn(*ts)
        if isinstance(out, torch.Tensor):
            layout["kind"] = "tensor"
            return out
        if not isinstance(out, tuple | list) or any(isinstance(o, tuple | list) for o in out):
            raise TypeError(f"unsupported output type {type(out).__name__}")
        layout["kind"] = "tuple"
        layout["is_tensor"] = [isinstance(o, torch.Tensor) for o in out]
        return tuple(o for o in out if isinstance(o, torch.Tensor))

    with quiet_vmap():
        out = torch.func.vmap(tensors_only, randomness="error")(*tensors)
    if layout["kind"] == "tensor":
        return Dense(out)
    items = iter(out)
    return Packed(tuple(Dense(next(items)) if t else None for t in layout["is_tensor"]))


__all__ = [
    "batchnorm_forward",
    "bn_batch_statistics",
    "bn_channels",
    "bn_per_query",
    "bn_training",
    "flat_queries",
    "gather",
    "no_running_stat_updates",
    "quiet_vmap",
    "standard",
    "unflat_queries",
    "vmap_values",
]
