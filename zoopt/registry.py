"""Optimizers, learning-rate schedules and gradient estimators by name: the one table that
``zoopt train`` (its flags' choices), :class:`zoopt.recipe.Recipe` (its checks), the trainer,
:func:`zoopt.minimize` and the applications read.

Each kind is a read-only mapping name → entry (:data:`OPTIMIZERS`, :data:`SCHEDULES`,
:data:`ESTIMATORS`) and a builder (:func:`optimizer`, :func:`schedule`, :func:`estimator`)::

    from zoopt import registry

    registry.optimizer("sgd", 0.1, momentum=0.9)          # an SGD
    registry.schedule("cosine", 0.1, total=1000, warmup=50)
    registry.estimator("rge", q=16, mu=1e-3)
    tuple(registry.OPTIMIZERS)                            # ('sgd', 'adam', 'signsgd')
    registry.OPTIMIZERS["sgd"].options                    # ('momentum', 'nesterov', 'weight_decay')

Adding one (e.g. in your package, before building a :class:`~zoopt.recipe.Recipe` or
parsing flags) makes it a valid ``Recipe.optimizer`` / ``--optimizer`` choice everywhere::

    registry.register_optimizer("lion", Lion, options=("weight_decay",))

Torch-free: only the numpy/array-API core is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .estimators import CGE, RGE, Estimator
from .optim import SGD, Adam, Optimizer, SignSGD
from .schedules import Constant, Cosine, Schedule


@dataclass(frozen=True)
class OptimizerEntry:
    """A registered optimizer.

    Attributes:
        factory: ``factory(lr, **options) -> Optimizer`` (the built-ins' are the classes),
            ``lr`` a number or a :data:`~zoopt.schedules.Schedule`.
        options: the keyword options it takes. The trainer passes each of them that the
            :class:`~zoopt.recipe.Recipe` has a field of the same name for (e.g.
            ``momentum``, ``weight_decay``); others keep the factory's defaults.
    """

    factory: Callable[..., Optimizer]
    options: tuple[str, ...]


@dataclass(frozen=True)
class ScheduleEntry:
    """A registered learning-rate schedule.

    ``factory(base, *, total, warmup, final) -> Schedule``: ``base`` the learning rate,
    ``total`` the steps of the whole run, ``warmup`` the warmup steps (``< total``),
    ``final`` the value at the end; a schedule that has no use for one ignores it (``constant``
    is ``base`` throughout).
    """

    factory: Callable[..., Schedule]


@dataclass(frozen=True)
class EstimatorEntry:
    """A registered gradient estimator: ``factory(**options) -> Estimator``."""

    factory: Callable[..., Estimator]


def _constant(base: float, *, total: int, warmup: int = 0, final: float = 0.0) -> Schedule:
    return Constant(base)


def _cosine(base: float, *, total: int, warmup: int = 0, final: float = 0.0) -> Schedule:
    return Cosine(base=base, total=total, warmup=warmup, final=final)


_optimizers: dict[str, OptimizerEntry] = {
    "sgd": OptimizerEntry(SGD, ("momentum", "nesterov", "weight_decay")),
    "adam": OptimizerEntry(Adam, ("beta1", "beta2", "eps", "weight_decay")),
    "signsgd": OptimizerEntry(SignSGD, ("momentum", "weight_decay")),
}
_schedules: dict[str, ScheduleEntry] = {
    "cosine": ScheduleEntry(_cosine),
    "constant": ScheduleEntry(_constant),
}
_estimators: dict[str, EstimatorEntry] = {
    "rge": EstimatorEntry(RGE),
    "cge": EstimatorEntry(CGE),
}

#: the names that ship with zoopt (never unregistered)
_BUILT_IN = {
    "optimizer": frozenset(_optimizers),
    "schedule": frozenset(_schedules),
    "estimator": frozenset(_estimators),
}

#: name → :class:`OptimizerEntry`, read-only and live (a registered name appears here)
OPTIMIZERS: Mapping[str, OptimizerEntry] = MappingProxyType(_optimizers)
#: name → :class:`ScheduleEntry`, read-only and live
SCHEDULES: Mapping[str, ScheduleEntry] = MappingProxyType(_schedules)
#: name → :class:`EstimatorEntry`, read-only and live
ESTIMATORS: Mapping[str, EstimatorEntry] = MappingProxyType(_estimators)


def _entry(table: Mapping[str, Any], kind: str, name: str) -> Any:
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"unknown {kind} {name!r}; choose from {tuple(table)}")
    return table[name]


def optimizer(name: str, lr: float | Schedule, **options: Any) -> Optimizer:
    """The optimizer ``name`` with learning rate ``lr`` (a number or a schedule).

    Raises:
        ValueError: an unknown ``name`` (naming the choices).
        TypeError: an option ``name`` does not take (naming it and those it takes).
    """
    entry: OptimizerEntry = _entry(OPTIMIZERS, "optimizer", name)
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        raise TypeError(
            f"optimizer {name!r} takes no option {', '.join(unknown)}; its options: "
            f"{', '.join(entry.options) or 'none'}"
        )
    return entry.factory(lr, **options)


def schedule(
    name: str, base: float, *, total: int, warmup: int = 0, final: float = 0.0
) -> Schedule:
    """The learning-rate schedule ``name`` over a run of ``total`` steps (see
    :class:`ScheduleEntry`); ``ValueError`` naming the choices for an unknown ``name``."""
    entry: ScheduleEntry = _entry(SCHEDULES, "schedule", name)
    return entry.factory(base, total=total, warmup=warmup, final=final)


def estimator(name: str, **options: Any) -> Estimator:
    """The gradient estimator ``name`` (``rge``: :class:`~zoopt.estimators.RGE`, ``cge``:
    :class:`~zoopt.estimators.CGE`) built with ``options``; ``ValueError`` naming the choices
    for an unknown ``name``."""
    entry: EstimatorEntry = _entry(ESTIMATORS, "estimator", name)
    return entry.factory(**options)


#: the names ``zoopt`` exported before the registry (``zoopt.make_optimizer("adam", lr)``):
#: the same lookup, so a registered name works there too
make_optimizer = optimizer
make_estimator = estimator


def _register(table: dict[str, Any], kind: str, name: str, entry: Any) -> None:
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"a {kind} name must be a non-empty string without spaces, got {name!r}")
    if name in table:
        raise ValueError(f"{kind} {name!r} is already registered")
    table[name] = entry


def register_optimizer(
    name: str, factory: Callable[..., Optimizer], options: tuple[str, ...] = ()
) -> None:
    """Make ``name`` an optimizer choice everywhere (``factory(lr, **options)``, see
    :class:`OptimizerEntry`); ``ValueError`` if ``name`` is taken."""
    _register(_optimizers, "optimizer", name, OptimizerEntry(factory, tuple(options)))


def register_schedule(name: str, factory: Callable[..., Schedule]) -> None:
    """Make ``name`` a learning-rate schedule choice everywhere (``factory(base, *, total,
    warmup, final)``, see :class:`ScheduleEntry`); ``ValueError`` if ``name`` is taken."""
    _register(_schedules, "schedule", name, ScheduleEntry(factory))


def register_estimator(name: str, factory: Callable[..., Estimator]) -> None:
    """Make ``name`` an estimator choice (``factory(**options)``); ``ValueError`` if taken."""
    _register(_estimators, "estimator", name, EstimatorEntry(factory))


def unregister(kind: str, name: str) -> None:
    """Remove a ``name`` of ``kind`` (``"optimizer"``, ``"schedule"``, ``"estimator"``) that
    was registered (e.g. after a test); ``ValueError`` if it is not there or is built in."""
    table = {"optimizer": _optimizers, "schedule": _schedules, "estimator": _estimators}
    if kind not in table:
        raise ValueError(f"kind must be one of {tuple(table)}, got {kind!r}")
    if name not in table[kind]:
        raise ValueError(f"no {kind} {name!r} is registered")
    if name in _BUILT_IN[kind]:
        raise ValueError(f"{kind} {name!r} is built in and cannot be unregistered")
    del table[kind][name]
