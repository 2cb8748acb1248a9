"""The random-generator states of the unperturbed forward, replayed by the queries.

A query that reruns a random op (dropout drawn by opaque code, ``torch.rand_like``, RReLU)
must draw what the unperturbed forward drew there, or the loss difference would be noise.
:class:`RNGStore` records the generator state before each such node and restores it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import fx

#: ``(CPU generator state, the CUDA device's generator state or None)``
RNGState = tuple[torch.Tensor, torch.Tensor | None]


class RNGStore:
    """Generator states of one step's unperturbed forward, by node, for one device.

    ``states[node]``: the state just before ``node`` ran; ``at_base``: the state before the
    whole forward (full-forward fallbacks start from it). Cleared for every new step.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.states: dict[fx.Node, RNGState] = {}
        self.at_base: RNGState | None = None

    def clear(self) -> None:
        """Forget the previous step's states."""
        self.states = {}
        self.at_base = None

    def current(self) -> RNGState:
        """The generators' state now (CPU, and the device's when it is a CUDA device)."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def record(self, node: fx.Node) -> None:
        """Remember the state before ``node`` runs in the unperturbed forward."""
        self.states[node] = self.current()

    def get(self, node: fx.Node) -> RNGState | None:
        """The state before ``node`` in the unperturbed forward (None: not a random node)."""
        return self.states.get(node)

    def set(self, state: RNGState) -> None:
        """Set the generators (CPU and the device's) to ``state``."""
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    def restorable(self, active: bool) -> contextlib.AbstractContextManager:
        """A context that restores the generators on exit (``active``; else does nothing)."""
        if not active:
            return contextlib.nullcontext()
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])


__all__ = ["RNGState", "RNGStore"]
