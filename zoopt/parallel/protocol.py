"""What an oracle must offer to be evaluated in parallel: declared, not guessed.

A parallel oracle keeps one *local* oracle on the client (the caller's: its model is the one
training updates) and builds a *replica* of it on every worker from a picklable factory.
Both sides are :class:`ReplicableOracle` s. Every capability the parallel oracle uses is a
member of the protocol; an oracle without one declares it by the member's documented
"nothing" answer (no model state: ``{}``; no parameter groups: ``[]``; no data batch:
``set_batch`` raises ``TypeError``), never by leaving the member out.

* :class:`~zoopt.torch.ModuleOracle` is replicable (its factory is
  :class:`~zoopt.torch.oracle.ModuleOracleFactory`; its model state is the module's
  buffers, e.g. BatchNorm running statistics).
* A plain black box (a numpy function, any :class:`~zoopt.BaseOracle` without data or state)
  becomes replicable with :func:`replicable`: ``replicable(build)`` for a picklable
  ``build() -> BaseOracle``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from .._array import Array
from ..directions import DirectionSteps
from ..oracle import BaseOracle, ErrorPolicy

CostClock = Literal["cpu", "wall"]

__all__ = [
    "REPLICABLE_MEMBERS",
    "CostClock",
    "OracleFactory",
    "ReplicableOracle",
    "StatelessFactory",
    "StatelessReplica",
    "check_replicable",
    "replicable",
]


@runtime_checkable
class OracleFactory(Protocol):
    """A picklable zero-argument callable that builds a replica (on a worker).

    It is pickled once per parallel oracle and called once per worker process; every call
    must build the same function (same model, loss and options).
    """

    def __call__(self) -> ReplicableOracle: ...


@runtime_checkable
class ReplicableOracle(Protocol):
    """An oracle that can be replicated on workers and kept in sync with the client's.

    Queries (as :class:`~zoopt.BaseOracle`): ``batch(X)`` with ``X`` of shape ``(n, dim)``
    → ``(n,)``; ``eval_coordinate_steps(x, coords, step)`` → ``(k,)``;
    ``eval_direction_steps(x, steps)`` → ``(rows,)`` (seeded directions, regenerated). On workers they
    receive host numpy arrays (``x``, ``X``, the batch) and convert them as they need.
    ``queries``, ``max_queries``, ``on_error``, ``on_nonfinite``, ``max_batch_bytes``: the
    counter, budget and policy of :class:`~zoopt.BaseOracle`; a parallel oracle takes its
    budget and policy from the local oracle, and sets each replica's to the same policy and
    no budget (the client counts).
    """

    dim: int
    queries: int
    max_queries: int | None
    on_error: ErrorPolicy
    on_nonfinite: ErrorPolicy
    max_batch_bytes: int

    def batch(self, X: Array) -> Array: ...

    def eval_coordinate_steps(self, x: Array, coords: Array, step: float) -> Array:
        """f(x + step e_c) for each c in ``coords``; ``k`` queries."""
        ...

    def eval_direction_steps(self, x: Array, steps: DirectionSteps) -> Array:
        """f(x + steps.steps[r]·u_{steps.index[r]}) for each row r of seeded directions;
        ``len(steps)`` queries (every :class:`~zoopt.BaseOracle` has it)."""
        ...

    def set_batch(self, *arrays: Any) -> None:
        """Use this data batch from now on; ``TypeError`` if the oracle takes no data."""
        ...

    def base_value(self, x: Array) -> float:
        """f(x), by the one forward per step that may update model state; 1 query."""
        ...

    def replica_factory(self) -> OracleFactory:
        """A picklable recipe that builds a replica of this oracle as it is now."""
        ...

    def model_state(self) -> dict[str, np.ndarray]:
        """State besides ``x`` that replicas must share (e.g. BatchNorm running statistics),
        as host arrays by name; ``{}`` when there is none."""
        ...

    def load_model_state(self, state: dict[str, np.ndarray]) -> None:
        """Take ``state`` (from :meth:`model_state` of the local oracle)."""
        ...

    def cost_groups(self) -> list[tuple[int, int]]:
        """Disjoint index ranges ``(start, stop)`` whose coordinates cost alike per query
        (e.g. a layer's parameters), for cost balancing; ``[]``: no such structure."""
        ...

    def cost_clock(self) -> CostClock:
        """What measures this oracle's cost: ``"cpu"`` (CPU seconds of the process: the
        oracle computes on this process's CPU) or ``"wall"`` (it waits on I/O or a GPU)."""
        ...

    def use_threads(self, n: int) -> None:
        """Compute with ``n`` threads (called once on each replica a worker builds: the
        workers are the parallelism); a no-op for oracles without a thread pool."""
        ...


#: every member of :class:`ReplicableOracle`, in declaration order
REPLICABLE_MEMBERS: tuple[str, ...] = (
    *ReplicableOracle.__annotations__,
    *(n for n, v in vars(ReplicableOracle).items() if callable(v) and not n.startswith("_")),
)


def check_replicable(oracle: Any) -> ReplicableOracle:
    """``oracle`` if it is a :class:`ReplicableOracle`; else ``TypeError`` naming what it lacks."""
    missing = [name for name in REPLICABLE_MEMBERS if not hasattr(oracle, name)]
    if missing:
        raise TypeError(
            f"a parallel oracle needs a replicable oracle (zoopt.parallel.ReplicableOracle); "
            f"{type(oracle).__name__} lacks {', '.join(missing)}. A plain oracle without data "
            "or model state becomes one with zoopt.parallel.replicable(build), build being a "
            "picklable function that returns it"
        )
    return oracle


# ---------------------------------------------------------------------------------------
# Plain oracles: no data batch, no model state
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatelessFactory:
    """Factory of :class:`StatelessReplica` s around ``build()`` (picklable), e.g. a
    function returning ``zoopt.as_oracle(f, dim)``.

    ``groups``: ``(start, stop)`` index ranges that cost alike (for cost balancing; ``()``:
    equal chunk sizes). ``clock``: what measures its cost (black boxes: wall time).
    """

    build: Callable[[], Any]
    groups: tuple[tuple[int, int], ...] = ()
    clock: CostClock = "wall"

    def __post_init__(self) -> None:
        if not callable(self.build):
            raise TypeError(f"build must be a callable returning an oracle, got {self.build!r}")
        if self.clock not in ("cpu", "wall"):
            raise ValueError(f"clock must be 'cpu' or 'wall', got {self.clock!r}")
        object.__setattr__(self, "groups", tuple((int(a), int(b)) for a, b in self.groups))

    def __call__(self) -> StatelessReplica:
        return StatelessReplica(self.build(), self)


class _Forwarded:
    """An attribute of the wrapped oracle, read and written through (one named attribute;
    not a catch-all)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, replica: StatelessReplica | None, owner: type | None = None) -> Any:
        if replica is None:
            return self
        return getattr(replica.oracle, self.name)

    def __set__(self, replica: StatelessReplica, value: Any) -> None:
        setattr(replica.oracle, self.name, value)


class StatelessReplica:
    """A plain :class:`~zoopt.BaseOracle` as a :class:`ReplicableOracle`: no data batch, no
    model state, the groups and clock of its factory.

    Queries go to the wrapped ``oracle``, which counts them and applies its policy.
    """

    dim = _Forwarded()
    queries = _Forwarded()
    max_queries = _Forwarded()
    on_error = _Forwarded()
    on_nonfinite = _Forwarded()
    max_batch_bytes = _Forwarded()

    def __init__(self, oracle: Any, factory: StatelessFactory):
        if not isinstance(oracle, BaseOracle):
            raise TypeError(f"build() must return a zoopt.BaseOracle, got {oracle!r}")
        self.oracle = oracle
        self.factory = factory

    def __call__(self, x: Array) -> float:
        return float(self.oracle(x))

    def batch(self, X: Array) -> Array:
        return self.oracle.batch(X)

    def eval_coordinate_steps(self, x: Array, coords: Array, step: float) -> Array:
        return self.oracle.eval_coordinate_steps(x, coords, step)

    def eval_direction_steps(self, x: Array, steps: DirectionSteps) -> Array:
        return self.oracle.eval_direction_steps(x, steps)

    def set_batch(self, *arrays: Any) -> None:
        raise TypeError(f"the oracle {self.oracle!r} takes no data batch (it is stateless)")

    def base_value(self, x: Array) -> float:
        """f(x) (1 query): a plain oracle has no state a base forward could update."""
        return float(self.oracle(x))

    def replica_factory(self) -> StatelessFactory:
        return self.factory

    def model_state(self) -> dict[str, np.ndarray]:
        return {}

    def load_model_state(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"a stateless oracle has no state to load, got {sorted(state)}")

    def cost_groups(self) -> list[tuple[int, int]]:
        return list(self.factory.groups)

    def cost_clock(self) -> CostClock:
        return self.factory.clock

    def use_threads(self, n: int) -> None:
        """Nothing to do: a plain oracle runs in the worker's thread."""

    def __repr__(self) -> str:
        return f"StatelessReplica({self.oracle!r})"


def replicable(
    build: Callable[[], Any],
    *,
    groups: tuple[tuple[int, int], ...] = (),
    clock: CostClock = "wall",
) -> StatelessReplica:
    """A plain oracle made replicable: ``build()`` (picklable, e.g. a module-level function)
    now, as the local oracle; every worker calls ``build()`` for its replica.

    ``groups`` and ``clock``: see :class:`StatelessFactory`.
    """
    return StatelessFactory(build, tuple(groups), clock)()
