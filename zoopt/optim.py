"""Optimizers: update rules on flat arrays with explicit, serializable state.

Each optimizer works on any array-API array (numpy, torch, CuPy): ``x_new = opt.step(x, grad)``.
The learning rate is a number or a schedule of the step counter. ``state_dict()`` returns
host (numpy) copies of all state so checkpoints are portable; ``load_state_dict`` restores it
onto the device of the next ``x`` it sees.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._array import Array, device_of, namespace, to_numpy
from .schedules import Schedule, as_schedule


def _check_nonneg(name: str, value: float, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (upper is not None and value >= upper):
        rng = f"[0, {upper:g})" if upper is not None else ">= 0"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return float(value)


class Optimizer:
    """Base: step counter, learning-rate schedule, named state buffers."""

    #: names of per-coordinate state buffers (arrays shaped like x)
    buffers: tuple[str, ...] = ()

    def __init__(self, lr: float | Schedule):
        self.lr = as_schedule(lr, "lr")
        self.t = 0
        self._state: dict[str, Array | None] = {name: None for name in self.buffers}
        self._pending: dict[str, np.ndarray] = {}

    def current_lr(self) -> float:
        return float(self.lr(self.t))

    def step(self, x: Array, grad: Array) -> Array:
        """One update; returns the new x (a new array; x is not modified)."""
        if tuple(grad.shape) != tuple(x.shape):
            raise ValueError(
                f"grad shape {tuple(grad.shape)} does not match x shape {tuple(x.shape)}"
            )
        xp = namespace(x)
        for name, host in self._pending.items():
            self._state[name] = xp.asarray(host, dtype=x.dtype, device=device_of(x))
        self._pending = {}
        new_x = self._update(xp, x, grad, self.current_lr())
        self.t += 1
        return new_x

    def _update(self, xp: Any, x: Array, grad: Array, lr: float) -> Array:  # pragma: no cover
        raise NotImplementedError

    def _buffer(self, xp: Any, name: str, like: Array) -> Array:
        buf = self._state[name]
        if buf is None:
            buf = xp.zeros_like(like)
            self._state[name] = buf
        return buf

    def state_dict(self) -> dict[str, Any]:
        """``{"t": int, "<buffer>": numpy array or None, ...}`` (host copies)."""
        out: dict[str, Any] = {"t": self.t}
        for name in self.buffers:
            if name in self._pending:
                out[name] = self._pending[name].copy()
            else:
                buf = self._state[name]
                out[name] = None if buf is None else np.array(to_numpy(buf), copy=True)
        return out

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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_dict(state)
        self.t = int(state["t"])
        self._state = {name: None for name in self.buffers}
        self._pending = {
            name: np.array(to_numpy(state[name]), copy=True)
            for name in self.buffers
            if state[name] is not None
        }


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

    def _update(self, xp: Any, x: Array, grad: Array, lr: float) -> Array:
        g = grad + self.weight_decay * x if self.weight_decay else grad
        if self.momentum:
            v = self._buffer(xp, "velocity", x)
            v = self.momentum * v + g
            self._state["velocity"] = v
            g = g + self.momentum * v if self.nesterov else v
        return x - lr * g


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

    def _update(self, xp: Any, x: Array, grad: Array, lr: float) -> Array:
        g = grad + self.weight_decay * x if self.weight_decay else grad
        m = self.beta1 * self._buffer(xp, "m", x) + (1 - self.beta1) * g
        v = self.beta2 * self._buffer(xp, "v", x) + (1 - self.beta2) * g * g
        self._state["m"], self._state["v"] = m, v
        k = self.t + 1
        m_hat = m / (1 - self.beta1**k)
        v_hat = v / (1 - self.beta2**k)
        return x - lr * m_hat / (xp.sqrt(v_hat) + self.eps)


class SignSGD(Optimizer):
    """ZO-signSGD: ``x -= lr * sign(grad + weight_decay * x)`` (optionally on momentum)."""

    buffers = ("velocity",)

    def __init__(
        self, lr: float | Schedule = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0
    ):
        super().__init__(lr)
        self.momentum = _check_nonneg("momentum", momentum, upper=1.0)
        self.weight_decay = _check_nonneg("weight_decay", weight_decay)

    def _update(self, xp: Any, x: Array, grad: Array, lr: float) -> Array:
        g = grad + self.weight_decay * x if self.weight_decay else grad
        if self.momentum:
            v = self.momentum * self._buffer(xp, "velocity", x) + (1 - self.momentum) * g
            self._state["velocity"] = v
            g = v
        return x - lr * xp.sign(g)


def make_optimizer(name: str, lr: float | Schedule, **kwargs: Any) -> Optimizer:
    """Build an optimizer by name: ``"sgd"``, ``"adam"`` or ``"signsgd"``."""
    table = {"sgd": SGD, "adam": Adam, "signsgd": SignSGD}
    if name not in table:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(table)}")
    return table[name](lr=lr, **kwargs)
