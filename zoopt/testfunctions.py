"""Classic test functions, vectorized: each takes ``X`` of shape ``(n, d)`` and returns ``(n,)``.

Used by the CLI (``zoopt minimize rosenbrock``), the examples and the tests. Each entry of
:data:`FUNCTIONS` gives the batched function, a default starting point and the minimum value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def sphere(X: np.ndarray) -> np.ndarray:
    """Σ x_i²; minimum 0 at 0."""
    return np.sum(X * X, axis=-1)


def quadratic(X: np.ndarray) -> np.ndarray:
    """½ Σ h_i x_i² with h_i spaced from 1 to 10 (condition number 10); minimum 0 at 0."""
    d = X.shape[-1]
    h = np.linspace(1.0, 10.0, d)
    return 0.5 * np.sum(h * X * X, axis=-1)


def rosenbrock(X: np.ndarray) -> np.ndarray:
    """Σ 100 (x_{i+1} − x_i²)² + (1 − x_i)²; minimum 0 at (1, ..., 1)."""
    a, b = X[..., :-1], X[..., 1:]
    return np.sum(100.0 * (b - a * a) ** 2 + (1.0 - a) ** 2, axis=-1)


def rastrigin(X: np.ndarray) -> np.ndarray:
    """10 d + Σ x_i² − 10 cos(2π x_i); minimum 0 at 0 (many local minima)."""
    d = X.shape[-1]
    return 10.0 * d + np.sum(X * X - 10.0 * np.cos(2 * np.pi * X), axis=-1)


@dataclass(frozen=True)
class TestFunction:
    fn: Callable[[np.ndarray], np.ndarray]
    x0: Callable[[int], np.ndarray]
    minimum: float


FUNCTIONS: dict[str, TestFunction] = {
    "sphere": TestFunction(sphere, lambda d: np.ones(d), 0.0),
    "quadratic": TestFunction(quadratic, lambda d: np.ones(d), 0.0),
    "rosenbrock": TestFunction(rosenbrock, lambda d: np.zeros(d), 0.0),
    "rastrigin": TestFunction(rastrigin, lambda d: np.full(d, 0.4), 0.0),
}
