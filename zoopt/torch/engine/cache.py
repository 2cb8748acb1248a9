"""The per-step activation cache: the unperturbed value of every node the queries read.

One unperturbed forward per step fills :class:`ActivationCache`; the queries read it through
:meth:`ActivationCache.unperturbed`. Values the planner did not keep (or that a
``max_cache_bytes`` cap evicted) are recomputed on demand from cached ones and held in a
small least-recently-used scratch area.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx


def storage_bytes(values: dict[fx.Node, Any]) -> dict[int, int]:
    """Bytes of each distinct storage the tensors of ``values`` live in, by storage address
    (views of one buffer counted once; ``meta`` tensors hold no memory)."""
    out: dict[int, int] = {}
    for v in values.values():
        if isinstance(v, torch.Tensor) and v.device.type != "meta":
            storage = v.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def tensor_bytes(value: Any) -> int:
    """Bytes of ``value``'s elements if it is a tensor, else 0."""
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


class ActivationCache:
    """Unperturbed activations of one step, by node.

    Args:
        recompute: ``recompute(node)`` computes a value that is not cached (from the cached
            values it reads, through :meth:`unperturbed`).
        scratch_limit: ``scratch_limit()`` bytes of recomputed values to hold at most (the
            most recently used one is always held).

    Attributes:
        values: the cached unperturbed values (a tensor, or any non-tensor node result).
        meta: every node's value as ``meta`` tensors (shape, dtype, device; no data).
        derived: per-layer helpers computed once per step (padded inputs...), by key.
        masks: the dropout masks the unperturbed forward drew, by node.
    """

    def __init__(self, recompute: Callable[[fx.Node], Any], scratch_limit: Callable[[], int]):
        self._recompute = recompute
        self._scratch_limit = scratch_limit
        self.values: dict[fx.Node, Any] = {}
        self.meta: dict[fx.Node, Any] = {}
        self.derived: dict[tuple, torch.Tensor] = {}
        self.masks: dict[fx.Node, torch.Tensor] = {}
        self._scratch: dict[fx.Node, Any] = {}  # recomputed values, least recently used first
        self._scratch_bytes = 0

    def reset(self) -> None:
        """Forget the previous step (a new unperturbed forward is about to fill it)."""
        self.values = {}
        self.meta = {}
        self.derived = {}
        self.masks = {}
        self._scratch = {}
        self._scratch_bytes = 0

    def record_meta(self, node: fx.Node, value: Any) -> None:
        """Remember the shape, dtype and device of ``node``'s unperturbed value."""
        self.meta[node] = (
            torch.empty_like(value, device="meta") if isinstance(value, torch.Tensor) else value
        )

    def meta_of(self, node: fx.Node) -> Any:
        """Shape, dtype and device of ``node``'s unperturbed value (``meta`` tensors)."""
        return self.meta[node]

    def unperturbed(self, node: fx.Node) -> Any:
        """The unperturbed value of ``node``: cached, or recomputed from cached values."""
        if node in self.values:
            return self.values[node]
        value = self._scratch.pop(node, None)
        if value is None:
            value = self._recompute(node)
        self._scratch[node] = value  # most recently used last
        self._scratch_bytes += tensor_bytes(value)
        while self._scratch_bytes > self._scratch_limit() and len(self._scratch) > 1:
            old = self._scratch.pop(next(iter(self._scratch)))
            self._scratch_bytes -= tensor_bytes(old)
        return value

    def cap(self, max_bytes: int | None) -> None:
        """Evict cached activations, largest first, until they fit ``max_bytes`` (None: keep
        all). The input placeholder and non-tensor values are never evicted."""
        if max_bytes is None:
            return
        sizes = storage_bytes(self.values)
        total = sum(sizes.values())
        candidates = sorted(
            (
                n
                for n, v in self.values.items()
                if isinstance(v, torch.Tensor) and n.op != "placeholder"
            ),
            key=lambda n: -tensor_bytes(self.values[n]),
        )
        for n in candidates:
            if total <= max_bytes:
                break
            value = self.values.pop(n)
            key = value.untyped_storage().data_ptr()
            if not any(
                isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() == key
                for v in self.values.values()
            ):
                total -= sizes.get(key, 0)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached values (shared storage counted once)."""
        return sum(storage_bytes(self.values).values())


__all__ = ["ActivationCache", "storage_bytes", "tensor_bytes"]
