"""A flat view of a module's trainable parameters.

ZO optimizers see a network as one vector ``x`` of shape ``(d,)``. :class:`ParamView` fixes
the order (``module.named_parameters()`` order, each tensor in row-major order), records
which slice of ``x`` belongs to which tensor, and copies between the two.
"""

from __future__ import annotations

import contextlib
import re
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
            frozen = sum(1 for _ in module.parameters())
            raise ValueError(
                f"{type(module).__name__} has no trainable parameters (none of its "
                f"{frozen} parameter tensors has requires_grad=True); unfreeze some with "
                "p.requires_grad_(True) or zoopt.torch.select_trainable(module, REGEX)"
            )
        _check_params(groups, params)
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

    def holds(self, flat: torch.Tensor) -> bool:
        """Whether the parameters equal ``flat`` (compared tensor by tensor, no copy)."""
        flat = self.check_flat(flat)
        with torch.no_grad():
            return all(
                p.dtype == flat.dtype
                and p.device == flat.device
                and torch.equal(p.reshape(-1), flat[g.start : g.stop])
                for p, g in zip(self.params, self.groups, strict=True)
            )

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
        """Temporarily load ``flat`` into the parameters; the old values come back on exit.

        When the parameters already hold ``flat`` (a trainer keeps them in sync with its x)
        nothing is copied: a large model is not duplicated for each forward.
        """
        if self.holds(flat):
            yield
            return
        saved = self.flatten()
        self.assign(flat)
        try:
            yield
        finally:
            self.assign(saved)

    @contextlib.contextmanager
    def restored_after(self, flat: torch.Tensor) -> Iterator[None]:
        """On exit the parameters hold their values from entry, exactly: copied back from
        ``flat`` when they held it (no memory), else from a copy saved now."""
        saved = None if self.holds(flat) else self.flatten()
        try:
            yield
        finally:
            self.assign(flat if saved is None else saved)

    def segments(self) -> list[tuple[int, torch.Tensor]]:
        """``(start, 1-D view)`` of each parameter tensor: the parameters as slices of the flat
        vector, to be written in place."""
        out = []
        for p, g in zip(self.params, self.groups, strict=True):
            if not p.is_contiguous():
                raise ValueError(
                    f"parameter {g.name!r} is not contiguous; it cannot be updated in place "
                    "(call .contiguous() on it when building the model)"
                )
            if p.device.type == "meta":
                raise ValueError(
                    f"parameter {g.name!r} is on the meta device (not materialized/offloaded): "
                    "no direction can be added to it"
                )
            out.append((g.start, p.detach().view(-1)))
        return out

    def chunk_pieces(self) -> Iterator[tuple[int, int, list[tuple[torch.Tensor, int, int]]]]:
        """The flat range in chunks of :func:`~zoopt.directions.chunk_length` entries, each
        as ``(start, stop, [(piece, lo, hi), ...])``: the parameter views' slices lying in the
        chunk, each with its flat range ``[lo, hi)``, in flat order (see
        :func:`~zoopt.directions.split_chunks`)."""
        from ..directions import chunk_length, split_chunks

        segments = self.segments()
        extents = [(start, view.shape[0]) for start, view in segments]
        for s, e, parts in split_chunks(extents, self.dim, chunk_length(segments[0][1])):
            pieces = []
            for k, a, b in parts:
                start, view = segments[k]
                pieces.append((view[a:b], start + a, start + b))
            yield s, e, pieces

    def perturb_from(self, flat: torch.Tensor, directions: Any, index: int, step: float) -> None:
        """Write ``flat + step · u_index`` into the parameters, regenerating the direction in
        chunks on the parameters' device (no full-size temporary).

        The same expression as :meth:`~zoopt.directions.DirectionSteps.points`, so a query in
        place equals the query of the built point bit for bit.
        """
        with torch.no_grad():
            for s, e, pieces in self.chunk_pieces():
                u = directions.chunk(index, s, e, flat)
                for piece, lo, hi in pieces:
                    piece.copy_(flat[lo:hi] + step * u[lo - s : hi - s])

    def add_direction_(self, directions: Any, index: int, step: float) -> None:
        """``θ += step · u_index`` on the parameters themselves (MeZO's in-place mode: no
        flat copy of θ exists; adding ``-step`` afterwards restores θ up to rounding)."""
        with torch.no_grad():
            for s, e, pieces in self.chunk_pieces():
                u = directions.chunk(index, s, e, pieces[0][0])
                for piece, lo, hi in pieces:
                    piece += step * u[lo - s : hi - s]

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


def _check_params(groups: list[ParamGroup], params: list[nn.Parameter]) -> None:
    """Trainable parameters must be real floating tensors with data, of one dtype and device."""
    for g, p in zip(groups, params, strict=True):
        if not p.is_floating_point():
            raise TypeError(
                f"trainable parameter {g.name} has dtype {p.dtype}; zeroth-order queries "
                "perturb floating-point values only (freeze it with requires_grad_(False))"
            )
        if p.device.type == "meta":
            raise ValueError(
                f"trainable parameter {g.name} is on the meta device (no data: an offloaded "
                "or not yet materialized tensor); load the model onto one real device first"
            )
    for attr in ("dtype", "device"):
        first = getattr(params[0], attr)
        other = next((i for i, p in enumerate(params) if getattr(p, attr) != first), None)
        if other is not None:
            kinds = sorted({str(getattr(p, attr)) for p in params})
            raise ValueError(
                f"all trainable parameters must share one dtype and device, got {attr}s "
                f"{kinds}: {groups[0].name} is {first}, {groups[other].name} is "
                f"{getattr(params[other], attr)} (convert the model with .to(...), or freeze "
                "the odd ones)"
            )


def select_trainable(module: nn.Module, pattern: str) -> list[str]:
    """Train exactly the parameters whose names match the regular expression ``pattern``.

    Sets ``requires_grad`` on every parameter of ``module``: ``True`` where
    ``re.search(pattern, name)`` matches its ``named_parameters()`` name, ``False`` elsewhere
    (so ``ModuleOracle`` / :class:`ParamView` optimize just those). Returns the matched names.

    Raises:
        ValueError: ``pattern`` is not a valid regular expression, or matches no parameter
            (the error names the pattern and some parameter names).
    """
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid trainable pattern {pattern!r}: {exc}") from exc
    names = [n for n, _ in module.named_parameters()]
    matched = [n for n in names if regex.search(n)]
    if not matched:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise ValueError(
            f"trainable pattern {pattern!r} matches none of the {len(names)} parameters of "
            f"{type(module).__name__} ({shown or 'it has none'})"
        )
    keep = set(matched)
    for n, p in module.named_parameters():
        p.requires_grad_(n in keep)
    return matched


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
