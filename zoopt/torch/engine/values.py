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
* :class:`Tree` -- any other structured output (a dict, a ``ModelOutput``), leaf by leaf.
* :class:`Objects` -- a non-tensor result that differs between queries, one per query.

A :class:`Chunk` of queries reads the engine through its
:class:`~.context.EngineContext` (``chunk.context``: the graph, the activation cache, the
random-generator states); :func:`query_value` and :func:`stack_queries` take one query's
value out of a stored value and put per-query results back into one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

if TYPE_CHECKING:
    from .context import EngineContext


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


@dataclass
class Objects:
    """A non-tensor value that differs between queries (e.g. a cache object): one each."""

    items: tuple[Any, ...]


@dataclass
class Tree:
    """A structured value other than a tuple (a dict, a Hugging Face ``ModelOutput``...):
    its ``torch.utils._pytree`` leaves, one value (or ``None``: unchanged) each, and the
    structure ``spec`` that rebuilds it with its own type."""

    spec: Any
    items: tuple[Any, ...]


Value = SliceDelta | Dense | Packed | Objects | Tree | None


class Chunk:
    """The state of one chunk of ``Q`` queries while it is pushed through the graph.

    ``context``: the engine's state a rule may read (:class:`~.context.EngineContext`);
    ``Q``: the number of queries; ``env``: the value of each node changed so far (absent or
    ``None``: the unperturbed value, ``chunk.cached(node)``).
    """

    def __init__(self, context: EngineContext, q: int):
        self.context = context
        self.Q = q
        self.env: dict[fx.Node, Value] = {}
        # value of node -> nodes whose value buffers it may share (views, identities)
        self.alias_of: dict[fx.Node, tuple[fx.Node, ...]] = {}

    def cached(self, arg: Any) -> Any:
        """The unperturbed value of a node argument (constants pass through)."""
        if isinstance(arg, fx.Node):
            return self.context.unperturbed(arg)
        return arg

    def meta(self, arg: Any) -> Any:
        """Shape, dtype and device of a node's unperturbed value (a tensor on the ``meta``
        device: reading its values raises); constants pass through. Never recomputes."""
        if isinstance(arg, fx.Node):
            return self.context.meta_of(arg)
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
        out = self.context.empty((self.Q, *base.shape), base)
        out.copy_(base.unsqueeze(0).expand_as(out))
        if isinstance(value, SliceDelta):
            q = torch.arange(self.Q, device=base.device)
            out.movedim(value.axis + 1, 1)[q, value.index] = value.values.movedim(value.axis, 0)
        return out

    def expanded(self, node: Any) -> torch.Tensor:
        """The cached value of ``node`` seen as ``(Q, *shape)`` (a broadcast view, no copy)."""
        base = self.cached(node)
        return base.unsqueeze(0).expand(self.Q, *base.shape)


def query_value(ch: Chunk, node: fx.Node, q: int) -> Any:
    """Query ``q``'s value of an input node (tensors, or tuples of them)."""
    v = ch.env.get(node)
    if v is None:
        return ch.cached(node)
    if isinstance(v, Packed | Tree | Objects):
        return _query_item(ch.cached(node), v, q)
    return ch.dense(v, node)[q]


def _query_item(base: Any, v: Value, q: int) -> Any:
    """Query ``q``'s part of a (possibly nested) value whose unperturbed value is ``base``."""
    if v is None:
        return base
    if isinstance(v, Dense):
        return v.values[q]
    if isinstance(v, Objects):
        return v.items[q]
    if isinstance(v, Packed):
        return type(base)(_query_item(b, item, q) for b, item in zip(base, v.items, strict=True))
    if isinstance(v, Tree):
        leaves = pytree.tree_leaves(base)
        return pytree.tree_unflatten(
            [_query_item(b, item, q) for b, item in zip(leaves, v.items, strict=True)], v.spec
        )
    raise TypeError(f"cannot take one query of a {type(v).__name__} value")


def stack_queries(outs: list[Any], node: fx.Node) -> Value:
    """One value for the per-query results ``outs`` of ``node`` (exact for any structure)."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        if all(isinstance(o, torch.Tensor) and o.shape == first.shape for o in outs):
            return Dense(torch.stack(outs))
        return Objects(tuple(outs))
    if isinstance(first, tuple | list) and all(
        type(o) is type(first) and len(o) == len(first) for o in outs
    ):
        if type(first) in (tuple, list):
            return Packed(
                tuple(stack_queries([o[i] for o in outs], node) for i in range(len(first)))
            )
    elif first is None and all(o is None for o in outs):
        return None
    leaves, spec = pytree.tree_flatten(first)
    if spec.num_leaves != 1 or leaves[0] is not first:  # a container: a dict, a ModelOutput
        flat = [pytree.tree_flatten(o) for o in outs]
        if all(s == spec for _, s in flat):
            return Tree(
                spec,
                tuple(stack_queries([f[i] for f, _ in flat], node) for i in range(len(leaves))),
            )
    if all(_same_object(o, first) for o in outs):
        return None  # e.g. an assertion: the same (non-tensor) result for every query
    return Objects(tuple(outs))  # e.g. a cache object: each query keeps its own


def _same_object(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - no truth value (e.g. holds tensors): not the same
        return False
