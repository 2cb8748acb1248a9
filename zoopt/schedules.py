"""Schedules: plain functions of the step counter ``t`` (0-based) → a float.

Used for learning rates and for the smoothing radius μ. A schedule is any callable
``t -> float``; a number means a constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

Schedule = Callable[[int], float]


def _positive(name: str, value: float, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    ok = value >= 0 if allow_zero else value > 0
    if not math.isfinite(value) or not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Constant:
    """``value`` at every step."""

    value: float

    def __post_init__(self) -> None:
        _positive("value", self.value, allow_zero=True)

    def __call__(self, t: int) -> float:
        return self.value


@dataclass(frozen=True)
class Cosine:
    """Linear warmup from ``base/warmup`` to ``base`` over ``warmup`` steps, then cosine decay
    from ``base`` to ``final`` at step ``total``; ``final`` afterwards."""

    base: float
    total: int
    warmup: int = 0
    final: float = 0.0

    def __post_init__(self) -> None:
        _positive("base", self.base, allow_zero=True)
        _positive("final", self.final, allow_zero=True)
        if not isinstance(self.total, int) or self.total < 1:
            raise ValueError(f"total must be an integer >= 1, got {self.total!r}")
        if not isinstance(self.warmup, int) or not 0 <= self.warmup < self.total:
            raise ValueError(
                f"warmup must be an integer in [0, total={self.total}), got {self.warmup!r}"
            )

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return self.base * (t + 1) / self.warmup
        span = self.total - self.warmup
        p = min(1.0, (t - self.warmup) / span)
        return self.final + 0.5 * (self.base - self.final) * (1.0 + math.cos(math.pi * p))


@dataclass(frozen=True)
class Step:
    """``base * gamma ** (t // step_size)``."""

    base: float
    step_size: int
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _positive("base", self.base, allow_zero=True)
        _positive("gamma", self.gamma)
        if not isinstance(self.step_size, int) or self.step_size < 1:
            raise ValueError(f"step_size must be an integer >= 1, got {self.step_size!r}")

    def __call__(self, t: int) -> float:
        return self.base * self.gamma ** (t // self.step_size)


@dataclass(frozen=True)
class Checked:
    """A user's schedule whose every value is checked when it is used.

    A NaN learning rate turns the iterate into NaN (and the error then blames the function);
    a negative one ascends. Each value must be a finite real number ``>= 0`` (``> 0`` with
    ``allow_zero=False``), else ``ValueError`` names the schedule, the step and the value.
    """

    fn: Callable[[int], float]
    name: str
    allow_zero: bool = True

    def __call__(self, t: int) -> float:
        value = self.fn(t)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        ok = math.isfinite(number) and (number >= 0 if self.allow_zero else number > 0)
        if isinstance(value, bool) or not ok:
            bound = ">= 0" if self.allow_zero else "> 0"
            raise ValueError(
                f"the {self.name} schedule returned {value!r} at step {t}; it must be a finite "
                f"number {bound}"
            )
        return number


def as_schedule(
    value: float | Schedule, name: str = "value", *, allow_zero: bool = True
) -> Schedule:
    """A schedule from a number (constant) or a callable (its values checked when used)."""
    if isinstance(value, Checked):
        return value
    if callable(value):
        return Checked(value, name, allow_zero)
    return Constant(_positive(name, value, allow_zero=allow_zero))
