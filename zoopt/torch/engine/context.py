"""What a chunk of queries and the per-op rules see of the engine: one :class:`EngineContext`.

The core (:class:`~.core.SparseCGEEngine`) owns the context and hands it to every
:class:`~.values.Chunk`; rules and origin builders read the step's graph, activation cache
and random-generator states through it, and nothing else of the engine. It sits below the
values, rules and the core, so that none of them imports another's internals.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from .cache import ActivationCache
from .rng import RNGState, RNGStore

if TYPE_CHECKING:
    from .graph import EngineGraph


class EngineContext:
    """One graph's view of the engine's per-step state.

    Attributes:
        graph: the op graph (for the current train/eval modes and input shape).
        no_vmap: nodes found not to run under ``torch.func.vmap``; rules add to it, and
            then run the node once per query.
        activations: the step's unperturbed values (:class:`~.cache.ActivationCache`).
        rng: the generator states of the step's unperturbed forward
            (:class:`~.rng.RNGStore`).
        stats: the engine's counters (``vmapped_ops``, ``looped_ops``, ...); rules add to
            them.
        memory_format: ``"channels_last"`` or ``"contiguous"``: the layout of 4-D
            activations, and of the ``(Q, N, C, H, W)`` batches :meth:`empty` makes.
    """

    def __init__(
        self,
        graph: EngineGraph,
        no_vmap: set[fx.Node],
        activations: ActivationCache,
        rng: RNGStore,
        stats: dict[str, int],
        memory_format: str,
    ):
        self.graph = graph
        self.no_vmap = no_vmap
        self.activations = activations
        self.rng = rng
        self.stats = stats
        self.memory_format = memory_format

    # -- the graph ---------------------------------------------------------------------
    def module_of(self, node: fx.Node) -> nn.Module:
        """The submodule a ``call_module`` node calls."""
        return self.graph.modules[node]

    # -- the activation cache ----------------------------------------------------------
    def unperturbed(self, node: fx.Node) -> Any:
        """The unperturbed value of ``node`` (cached, or recomputed from cached values)."""
        return self.activations.unperturbed(node)

    def meta_of(self, node: fx.Node) -> Any:
        """Shape, dtype and device of ``node``'s unperturbed value (``meta`` tensors)."""
        return self.activations.meta_of(node)

    @property
    def derived(self) -> dict[tuple, torch.Tensor]:
        """Per-layer helpers computed once per step and layer (padded inputs...), by key."""
        return self.activations.derived

    @property
    def masks(self) -> dict[fx.Node, torch.Tensor]:
        """The dropout masks the unperturbed forward drew, by node."""
        return self.activations.masks

    def empty(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialized ``(Q, *activation shape)`` tensor in the engine's layout."""
        if self.memory_format == "channels_last" and len(shape) == 5:
            flat = torch.empty(
                (shape[0] * shape[1], *shape[2:]),
                dtype=like.dtype,
                device=like.device,
                memory_format=torch.channels_last,
            )
            return flat.view(shape)
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    # -- random generators -------------------------------------------------------------
    def rng_state(self, node: fx.Node) -> RNGState | None:
        """The generator state before ``node`` in the unperturbed forward (None: not a
        random node)."""
        return self.rng.get(node)

    def set_rng(self, state: RNGState) -> None:
        """Set the generators to ``state`` (from :meth:`rng_state`)."""
        self.rng.set(state)

    def restorable_rng(self, active: bool) -> contextlib.AbstractContextManager:
        """A context that restores the generators on exit (``active``; else does nothing)."""
        return self.rng.restorable(active)


__all__ = ["EngineContext"]
