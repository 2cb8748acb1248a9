"""A flat view of a module's trainable parameters.

ZO optimizers see a network as one vector ``x`` of shape ``(d,)``. :class:`ParamView` fixes
the order (``module.named_parameters()`` order, each tensor in row-major order), records
which slice of ``x`` belongs to which tensor, and copies between the two.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

#: Module types whose ``weight`` is prunable (kind "weight"); everything else is "other".
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True)
class ParamGroup:
    """One parameter tensor's slice ``[start, stop)`` of the flat vector.

    ``kind`` is ``"weight"`` for conv/linear weights (prunable) and ``"other"`` for
    BatchNorm parameters and biases (never pruned).
    """

    name: str
    start: int
    stop: int
    shape: tuple[int, ...]
    kind: str

    @property
    def size(self) -> int:
        return self.stop - self.start


class ParamView:
    """Flat view of the trainable parameters of ``module``.

    Attributes: ``groups`` (list of :class:`ParamGroup` in flat order), ``params`` (the
    parameter tensors, same order), ``dim`` (total length d), ``dtype``, ``device``.
    All parameters must share one floating dtype and one device.
    """

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise TypeError(f"ParamView needs a torch.nn.Module, got {type(module).__name__}")
        owner_kind = {}
        for mod in module.modules():
            for pname, p in mod.named_parameters(recurse=False):
                prunable = pname == "weight" and isinstance(mod, PRUNABLE_TYPES)
                owner_kind.setdefault(id(p), "weight" if prunable else "other")
        groups: list[ParamGroup] = []
        params: list[nn.Parameter] = []
        start = 0
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            stop = start + p.numel()
            groups.append(ParamGroup(name, start, stop, tuple(p.shape), owner_kind[id(p)]))
            params.append(p)
            start = stop
        if not params:
            raise ValueError(f"{type(module).__name__} has no trainable parameters")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(
                "all parameters must share one dtype and device, got dtypes "
                f"{sorted(map(str, dtypes))} "
                f"and devices {sorted(map(str, devices))}"
            )
        self.module = module
        self.groups = groups
        self.params = params
        self.dim = start
        self.dtype = params[0].dtype
        self.device = params[0].device
        self._starts = np.array([g.start for g in groups], dtype=np.int64)

    def __repr__(self) -> str:
        return f"ParamView({type(self.module).__name__}, dim={self.dim}, groups={len(self.groups)})"

    def flatten(self) -> torch.Tensor:
        """A copy of the parameters as one 1-D tensor of shape ``(dim,)`` (same dtype/device)."""
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1) for p in self.params])

    def check_flat(self, flat: Any, name: str = "flat") -> torch.Tensor:
        """Validate ``flat`` as a ``(dim,)`` tensor; numpy arrays are converted to torch."""
        if isinstance(flat, np.ndarray):
            flat = torch.from_numpy(flat)
        if not isinstance(flat, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch tensor of shape ({self.dim},), got {type(flat).__name__}"
            )
        if flat.ndim != 1 or flat.shape[0] != self.dim:
            raise ValueError(f"{name} must have shape ({self.dim},), got {tuple(flat.shape)}")
        if not flat.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {flat.dtype}")
        return flat

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` shaped like each parameter (no copy)."""
        flat = self.check_flat(flat)
        return [flat[g.start : g.stop].view(g.shape) for g in self.groups]

    def assign(self, flat: torch.Tensor) -> None:
        """Copy ``flat`` (shape ``(dim,)``) into the parameters, in place."""
        flat = self.check_flat(flat)
        with torch.no_grad():
            for p, g in zip(self.params, self.groups, strict=True):
                p.copy_(flat[g.start : g.stop].view(g.shape))

    @contextlib.contextmanager
    def loaded(self, flat: torch.Tensor) -> Iterator[None]:
        """Temporarily load ``flat`` into the parameters; the old values come back on exit."""
        saved = self.flatten()
        self.assign(flat)
        try:
            yield
        finally:
            self.assign(saved)

    def flat_grad(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Per-parameter gradients (as ``torch.autograd.grad(..., self.params,
        allow_unused=True)`` returns them; ``None``: unused) as one ``(dim,)`` tensor."""
        if len(grads) != len(self.params):
            raise ValueError(f"expected {len(self.params)} gradients, got {len(grads)}")
        return torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).reshape(-1)
                for p, g in zip(self.params, grads, strict=True)
            ]
        ).detach()

    def group_index(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """For each flat index, the position of its group in ``groups`` (vectorized)."""
        idx = np.asarray(indices)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        bad = (idx < 0) | (idx >= self.dim)
        if bad.any():
            raise ValueError(f"index {int(idx[bad][0])} out of range for dim={self.dim}")
        return np.searchsorted(self._starts, idx, side="right") - 1

    def group_of(self, index: int) -> ParamGroup:
        """The group holding flat index ``index`` (``0 <= index < dim``)."""
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise TypeError(f"index must be an integer, got {index!r}")
        return self.groups[int(self.group_index(np.array([index]))[0])]

    def mask(self, kind: str) -> torch.Tensor:
        """Boolean ``(dim,)`` mask of the coordinates of ``kind`` ("weight" or "other")."""
        if kind not in ("weight", "other"):
            raise ValueError(f"kind must be 'weight' or 'other', got {kind!r}")
        out = torch.zeros(self.dim, dtype=torch.bool, device=self.device)
        for g in self.groups:
            if g.kind == kind:
                out[g.start : g.stop] = True
        return out


@contextlib.contextmanager
def preserved_buffers(module: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``module`` (BatchNorm running statistics, counters) on exit."""
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)
