"""How the engine stores the activations of ``Q`` perturbed queries.

``None`` means "equal to the cached (unperturbed) activation for every query". Otherwise a
node's value is one of:

* :class:`SliceDelta` -- per query ``q`` the activation equals the cache except in one slice
  along one axis (``index[q]``): a channel of a CNN (axis 1), a feature of a transformer
  (the last axis), a head (axis 1 of ``(B, H, N, d)``). The new contents of those slices are
  stored in the activation's own layout with the axis holding ``Q`` slices, so BatchNorm,
  pooling, elementwise ops and per-row linear layers apply to them directly.
* :class:`Dense` -- every query's full activation, stacked: ``(Q, *shape)`` where ``shape``
  is the cached activation's shape (wherever its batch dimension is).
* :class:`Packed` -- a tuple output (``chunk``, ``unbind``, ``split``...), one value each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

if TYPE_CHECKING:
    from .core import SparseCGEEngine


@dataclass
class SliceDelta:
    """``index``: ``(Q,)`` int64. ``values``: the activation's shape with dim ``axis`` of size
    ``Q``: ``values.select(axis, q)`` is the new slice ``index[q]`` of query ``q``.

    For a cached ``(N, C, H, W)`` and ``axis=1`` (a channel): ``values`` is ``(N, Q, H, W)``.
    """

    index: torch.Tensor
    values: torch.Tensor
    axis: int = 1


@dataclass
class Dense:
    """``values``: ``(Q, *shape)``, query-major."""

    values: torch.Tensor


@dataclass
class Packed:
    """A tuple-valued node: one value (or ``None``) per element."""

    items: tuple[Any, ...]


Value = SliceDelta | Dense | Packed | None


class Chunk:
    """The state of one chunk of ``Q`` queries while it is pushed through the graph."""

    def __init__(self, engine: SparseCGEEngine, q: int):
        self.engine = engine
        self.Q = q
        self.env: dict[fx.Node, Value] = {}
        # value of node -> nodes whose value buffers it may share (views, identities)
        self.alias_of: dict[fx.Node, tuple[fx.Node, ...]] = {}

    def cached(self, arg: Any) -> Any:
        """The unperturbed value of a node argument (constants pass through)."""
        if isinstance(arg, fx.Node):
            return self.engine._base(arg)
        return arg

    def meta(self, arg: Any) -> Any:
        """Shape, dtype and device of a node's unperturbed value (a tensor on the ``meta``
        device: reading its values raises); constants pass through. Never recomputes."""
        if isinstance(arg, fx.Node):
            return self.engine._meta_of(arg)
        return arg

    def value(self, arg: Any) -> Value:
        return self.env.get(arg) if isinstance(arg, fx.Node) else None

    def exclusive(self, node: Any) -> bool:
        """May a rule overwrite the value buffer of ``node``? (Only its one reader reads it.)"""
        if not isinstance(node, fx.Node) or len(node.users) != 1:
            return False
        return all(self.exclusive(n) for n in self.alias_of.get(node, ()))

    def dense(self, value: Value, node: Any) -> torch.Tensor:
        """The full ``(Q, *shape)`` tensor of a (tensor) value of ``node``."""
        if isinstance(value, Dense):
            return value.values
        base = self.cached(node)
        if not isinstance(base, torch.Tensor):
            raise TypeError(f"cannot batch the non-tensor value of {node}")
        out = self.engine._empty((self.Q, *base.shape), base)
        out.copy_(base.unsqueeze(0).expand_as(out))
        if isinstance(value, SliceDelta):
            q = torch.arange(self.Q, device=base.device)
            out.movedim(value.axis + 1, 1)[q, value.index] = value.values.movedim(value.axis, 0)
        return out

    def expanded(self, node: Any) -> torch.Tensor:
        """The cached value of ``node`` seen as ``(Q, *shape)`` (a broadcast view, no copy)."""
        base = self.cached(node)
        return base.unsqueeze(0).expand(self.Q, *base.shape)
