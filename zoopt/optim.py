"""Optimizers: elementwise update rules on flat arrays, with their state as a value.

Each optimizer is an update rule (optax-style) plus a small stateful facade (torch-style):

* ``state = opt.init()`` -- an :class:`OptState` value: the step counter ``t`` and the named
  buffers (arrays shaped like x; ``None`` until the first update).
* ``x_new, state = opt.update(state, x, grad)`` -- pure: neither ``x`` nor ``state`` is
  modified, so undoing a step is keeping the old references. ``inplace=True`` writes
  ``x`` and the buffers in place instead (for models whose parameters fill the memory).
* ``x_new = opt.step(x, grad)`` -- the facade: ``opt.state`` is replaced by the new value;
  ``state_dict()`` / ``load_state_dict()`` give and take host (numpy) copies.

``grad`` is a dense array of x's shape, or a lazy gradient (:class:`LazyGradient`, e.g. a
seeded RGE estimate ``Σ cᵢuᵢ``) whose slices are regenerated: every rule is elementwise, so
the update runs slice by slice and no gradient vector is ever built. Both paths give
bit-identical results. Works on any array-API array (numpy, torch, CuPy); the learning rate
is a number or a schedule of ``t``. Weight decay (L2, added to the gradient) is one piece,
:func:`decayed`, shared by every rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ._array import Array, device_of, namespace, to_numpy
from .directions import split_chunks
from .schedules import Schedule, as_schedule


def _check_nonneg(name: str, value: float, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (upper is not None and value >= upper):
        rng = f"[0, {upper:g})" if upper is not None else ">= 0"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return float(value)


@runtime_checkable
class LazyGradient(Protocol):
    """A gradient computed slice by slice: ``chunk(start, stop)`` is ``g[start:stop]``."""

    @property
    def shape(self) -> tuple[int]: ...

    def chunk(self, start: int, stop: int) -> Array: ...

    def dense(self) -> Array: ...


@dataclass(frozen=True)
class OptState:
    """An optimizer's state: the step counter and the named buffers (arrays like x or None).

    A value: updates return a new one (except with ``inplace=True``).
    """

    t: int = 0
    buffers: Mapping[str, Array | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``{"t": int, "<buffer>": numpy array or None, ...}`` (host copies): the one
        serializer (:meth:`Optimizer.state_from_dict` reads it back)."""
        out: dict[str, Any] = {"t": self.t}
        for name, buf in self.buffers.items():
            out[name] = None if buf is None else np.array(to_numpy(buf), copy=True)
        return out


def decayed(grad: Array, x: Array, weight_decay: float) -> Array:
    """``grad + weight_decay * x`` (L2 weight decay; ``grad`` itself when it is 0)."""
    return grad + weight_decay * x if weight_decay else grad


def _on_device_of(buf: Array | None, x: Array) -> Array | None:
    """A buffer loaded from a checkpoint (host numpy) moved to x's library and device."""
    if buf is None or namespace(buf) is namespace(x) and device_of(buf) == device_of(x):
        return buf
    return namespace(x).asarray(to_numpy(buf), dtype=x.dtype, device=device_of(x))


#: entries a lazy gradient is regenerated and applied at a time
LAZY_CHUNK = 1 << 16


@dataclass(frozen=True)
class _Flat:
    """The flat x that ``update_segments`` writes in pieces: its length and an array of its
    library, dtype and device (buffers are allocated flat)."""

    dim: int
    like: Array


def _zeros_flat(xp: Any, like: Any) -> Array:
    if isinstance(like, _Flat):
        return xp.zeros((like.dim,), dtype=like.like.dtype, device=device_of(like.like))
    return xp.zeros_like(like)


class Optimizer:
    """Base: the learning-rate schedule, the rule's buffers, ``init``/``update``/``step``.

    Subclasses name their ``buffers`` and implement the elementwise :meth:`rule`.
    """

    #: names of per-coordinate state buffers (arrays shaped like x)
    buffers: tuple[str, ...] = ()

    def __init__(self, lr: float | Schedule):
        self.lr = as_schedule(lr, "lr")
        self.state = self.init()

    # -- the rule -------------------------------------------------------------------------
    def rule(
        self, xp: Any, x: Array, g: Array, lr: float, t: int, bufs: dict[str, Array]
    ) -> tuple[Array, dict[str, Array]]:  # pragma: no cover - abstract
        """One elementwise update of a slice: ``(x_new, new buffers)`` from ``x``, the
        gradient ``g``, the learning rate and the buffers (zeros before the first step);
        must not modify its arguments."""
        raise NotImplementedError

    # -- values ---------------------------------------------------------------------------
    def init(self) -> OptState:
        """The state before the first step: ``t = 0``, no buffers yet."""
        return OptState(0, {name: None for name in self.buffers})

    def lr_at(self, t: int) -> float:
        return float(self.lr(t))

    def update(
        self, state: OptState, x: Array, grad: Array | LazyGradient, *, inplace: bool = False
    ) -> tuple[Array, OptState]:
        """One step from ``state``: ``(x_new, new_state)``.

        ``grad``: a dense array shaped like ``x`` or a :class:`LazyGradient`. With
        ``inplace=False`` (default) nothing passed in is modified; with ``inplace=True`` the
        new values are written into ``x`` and the buffers (returned as they are), so the step
        needs no memory beyond the rule's own buffers.
        """
        if tuple(grad.shape) != tuple(x.shape):
            raise ValueError(
                f"grad shape {tuple(grad.shape)} does not match x shape {tuple(x.shape)}"
            )
        xp = namespace(x)
        lr = self.lr_at(state.t)
        bufs = {name: _on_device_of(state.buffers.get(name), x) for name in self.buffers}
        if not isinstance(grad, LazyGradient) and not inplace:
            full = {k: xp.zeros_like(x) if v is None else v for k, v in bufs.items()}
            x_new, new = self.rule(xp, x, grad, lr, state.t, full)
            return x_new, OptState(state.t + 1, {k: new.get(k) for k in self.buffers})
        out = x if inplace else xp.empty_like(x)
        new_bufs = self._apply(xp, lr, state.t, bufs, grad, [(0, x, out)], inplace, like=x)
        return out, OptState(state.t + 1, new_bufs)

    def update_segments(
        self,
        state: OptState,
        segments: Sequence[tuple[int, Array]],
        grad: Array | LazyGradient,
    ) -> OptState:
        """One step written in place into ``segments``: ``(start, 1-D array)`` pieces of a
        flat x that exists only in pieces (a model's parameter tensors in MeZO's memory
        mode: :meth:`~zoopt.torch.params.ParamView.segments`). Elementwise, so it equals
        :meth:`update` on the concatenation; the buffers (if the rule has any) are flat,
        in place. Returns the new state."""
        if not segments:
            raise ValueError("no segments to update")
        like = segments[0][1]
        xp = namespace(like)
        dim = int(grad.shape[0])
        if sum(int(a.shape[0]) for _, a in segments) != dim:
            raise ValueError(f"the segments do not cover the gradient's {dim} entries")
        lr = self.lr_at(state.t)
        flat_like = _Flat(dim, like)
        bufs = {name: _on_device_of(state.buffers.get(name), like) for name in self.buffers}
        pieces = [(start, a, a) for start, a in segments]
        new_bufs = self._apply(xp, lr, state.t, bufs, grad, pieces, True, like=flat_like)
        return OptState(state.t + 1, new_bufs)

    def _apply(
        self,
        xp: Any,
        lr: float,
        t: int,
        bufs: dict[str, Array | None],
        grad: Array | LazyGradient,
        pieces: Sequence[tuple[int, Array, Array]],
        inplace: bool,
        like: Any,
    ) -> dict[str, Array | None]:
        """The rule chunk by chunk over ``pieces`` ``(start, x piece, out piece)`` (a flat x
        in pieces, in flat order); a lazy gradient is regenerated once per chunk whatever
        the pieces. Buffers are flat, written in place (``inplace``) or into new arrays."""
        new_bufs: dict[str, Array] = {}
        lazy = isinstance(grad, LazyGradient)
        dim = int(grad.shape[0])
        extents = [(start, int(xs.shape[0])) for start, xs, _ in pieces]
        for s, e, parts in split_chunks(extents, dim, LAZY_CHUNK if lazy else dim):
            g_chunk = grad.chunk(s, e) if lazy else grad[s:e]
            for k, a, b in parts:
                start, xs_all, out = pieces[k]
                lo, hi = start + a, start + b
                g = g_chunk[lo - s : hi - s]
                old = {n: (xp.zeros_like(g) if v is None else v[lo:hi]) for n, v in bufs.items()}
                xs, nb = self.rule(xp, xs_all[a:b], g, lr, t, old)
                out[a:b] = xs
                for n, v in nb.items():
                    if n not in new_bufs:  # a buffer the rule uses (SGD without momentum: none)
                        keep = inplace and bufs[n] is not None
                        new_bufs[n] = bufs[n] if keep else _zeros_flat(xp, like)
                    new_bufs[n][lo:hi] = v
        return {n: new_bufs.get(n) for n in self.buffers}

    # -- the stateful facade ----------------------------------------------------------------
    @property
    def t(self) -> int:
        """Steps taken (the schedule's argument)."""
        return self.state.t

    def current_lr(self) -> float:
        return self.lr_at(self.state.t)

    def step(self, x: Array, grad: Array | LazyGradient, *, inplace: bool = False) -> Array:
        """One update of ``self.state``; returns the new x (a new array unless ``inplace``)."""
        x_new, self.state = self.update(self.state, x, grad, inplace=inplace)
        return x_new

    def state_dict(self) -> dict[str, Any]:
        """``{"t": int, "<buffer>": numpy array or None, ...}`` (host copies of
        ``self.state``: :meth:`OptState.to_dict`)."""
        return OptState(
            self.state.t, {n: self.state.buffers.get(n) for n in self.buffers}
        ).to_dict()

    def check_state_dict(self, state: Any, dim: int | None = None) -> None:
        """Raise ``ValueError`` (naming what is wrong) unless ``state`` is a valid
        :meth:`state_dict` of this optimizer (buffers of length ``dim`` if given)."""
        if not isinstance(state, dict):
            raise ValueError(f"optimizer state must be a dict, got {type(state).__name__}")
        missing = {"t", *self.buffers} - set(state)
        if missing:
            raise ValueError(f"optimizer state is missing {sorted(missing)}")
        t = state["t"]
        if isinstance(t, bool) or not isinstance(t, int | np.integer) or t < 0:
            raise ValueError(f"optimizer state t must be a non-negative integer, got {t!r}")
        for name in self.buffers:
            if state[name] is None:
                continue
            try:
                buf = np.asarray(to_numpy(state[name]), dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"optimizer state {name!r} is not an array: {exc}") from exc
            if buf.ndim != 1 or (dim is not None and buf.shape[0] != dim):
                want = f"({dim},)" if dim is not None else "1-D"
                raise ValueError(f"optimizer state {name!r} has shape {buf.shape}, expected {want}")
            if not np.all(np.isfinite(buf)):
                raise ValueError(f"optimizer state {name!r} holds non-finite values")

    def state_from_dict(self, state: Any, dim: int | None = None) -> OptState:
        """The :class:`OptState` saved as ``state`` (:meth:`OptState.to_dict`), checked whole
        first (:meth:`check_state_dict`); buffers stay host arrays until the next update
        moves them to its x's device."""
        self.check_state_dict(state, dim)
        return OptState(
            int(state["t"]),
            {
                name: None if state[name] is None else np.array(to_numpy(state[name]), copy=True)
                for name in self.buffers
            },
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the state by ``state`` (:meth:`state_from_dict`)."""
        self.state = self.state_from_dict(state)


class SGD(Optimizer):
    """SGD with momentum, Nesterov and (decoupled-from-the-estimate, L2-style) weight decay.

    ``g = grad + weight_decay * x``; ``v = momentum * v + g``;
    ``x -= lr * (g + momentum * v if nesterov else v)`` (PyTorch's convention).
    Weight decay and momentum apply to every coordinate, also those the (sparse)
    gradient estimate left at zero — DeepZero's "sparse gradient, dense model".
    """

    buffers = ("velocity",)

    def __init__(
        self,
        lr: float | Schedule = 1e-3,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ):
        super().__init__(lr)
        self.momentum = _check_nonneg("momentum", momentum, upper=1.0)
        self.weight_decay = _check_nonneg("weight_decay", weight_decay)
        if nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.nesterov = bool(nesterov)

    def rule(
        self, xp: Any, x: Array, g: Array, lr: float, t: int, bufs: dict[str, Array]
    ) -> tuple[Array, dict[str, Array]]:
        g = decayed(g, x, self.weight_decay)
        if not self.momentum:
            return x - lr * g, {}
        v = self.momentum * bufs["velocity"] + g
        g = g + self.momentum * v if self.nesterov else v
        return x - lr * g, {"velocity": v}


class Adam(Optimizer):
    """ZO-Adam (Kingma & Ba) with optional L2 weight decay and bias correction."""

    buffers = ("m", "v")

    def __init__(
        self,
        lr: float | Schedule = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(lr)
        self.beta1 = _check_nonneg("beta1", beta1, upper=1.0)
        self.beta2 = _check_nonneg("beta2", beta2, upper=1.0)
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.eps = float(eps)
        self.weight_decay = _check_nonneg("weight_decay", weight_decay)

    def rule(
        self, xp: Any, x: Array, g: Array, lr: float, t: int, bufs: dict[str, Array]
    ) -> tuple[Array, dict[str, Array]]:
        g = decayed(g, x, self.weight_decay)
        m = self.beta1 * bufs["m"] + (1 - self.beta1) * g
        v = self.beta2 * bufs["v"] + (1 - self.beta2) * g * g
        k = t + 1
        m_hat = m / (1 - self.beta1**k)
        v_hat = v / (1 - self.beta2**k)
        return x - lr * m_hat / (xp.sqrt(v_hat) + self.eps), {"m": m, "v": v}


class SignSGD(Optimizer):
    """ZO-signSGD: ``x -= lr * sign(grad + weight_decay * x)`` (optionally on momentum)."""

    buffers = ("velocity",)

    def __init__(
        self, lr: float | Schedule = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0
    ):
        super().__init__(lr)
        self.momentum = _check_nonneg("momentum", momentum, upper=1.0)
        self.weight_decay = _check_nonneg("weight_decay", weight_decay)

    def rule(
        self, xp: Any, x: Array, g: Array, lr: float, t: int, bufs: dict[str, Array]
    ) -> tuple[Array, dict[str, Array]]:
        g = decayed(g, x, self.weight_decay)
        if not self.momentum:
            return x - lr * xp.sign(g), {}
        v = self.momentum * bufs["velocity"] + (1 - self.momentum) * g
        return x - lr * xp.sign(v), {"velocity": v}
