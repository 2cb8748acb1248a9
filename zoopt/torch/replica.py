"""Replicating a :class:`~zoopt.torch.ModuleOracle` on parallel workers.

The torch half of :class:`zoopt.parallel.ReplicableOracle`: the picklable recipe a worker
builds its replica from (:class:`ModuleOracleFactory`), and the model state replicas share
with the client's oracle — the module's buffers (BatchNorm running statistics), as host
numpy arrays by name (:func:`module_state`, :func:`load_module_state`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from .oracle import ModuleOracle

__all__ = ["ModuleOracleFactory", "load_module_state", "module_state"]


def module_state(module: nn.Module) -> dict[str, np.ndarray]:
    """The module's buffers (e.g. BatchNorm running statistics) as host numpy copies by
    name; ``{}`` for a module without buffers."""
    return {name: b.detach().cpu().numpy().copy() for name, b in module.named_buffers()}


def load_module_state(module: nn.Module, state: dict[str, np.ndarray]) -> None:
    """Copy ``state`` (from :func:`module_state` of the same architecture) into the module's
    buffers, in place (each keeps its device and dtype).

    Raises:
        KeyError: ``state`` names buffers the module does not have.
    """
    own = dict(module.named_buffers())
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise KeyError(f"model state has buffers the module does not: {unknown}")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(torch.from_numpy(np.asarray(value)))


@dataclass
class ModuleOracleFactory:
    """Picklable recipe for a :class:`~zoopt.torch.ModuleOracle` replica.

    Attributes:
        model: an ``nn.Module`` to copy (its parameters and buffers travel with it), or a
            picklable constructor ``() -> nn.Module`` (e.g. ``partial(build_model, "resnet20")``).
        loss_fn: picklable ``loss_fn(logits, targets) -> scalar`` (e.g. ``F.cross_entropy``).
        state: optional ``state_dict`` loaded into the built model.
        options: keyword arguments of ``ModuleOracle`` (``engine``, ``max_batch_bytes``,
            ``memory_format``, ``loss_dtype``, ``per_sample_modules``, ``max_cache_bytes``).
        device: where the replica lives (``"cpu"`` or ``"cuda"``).
        training: the replica's train/eval mode (BatchNorm uses batch statistics in training).
    """

    model: nn.Module | Callable[[], nn.Module]
    loss_fn: Callable[..., Any]
    state: dict | None = None
    options: dict = field(default_factory=dict)
    device: str = "cpu"
    training: bool = True

    def __call__(self) -> ModuleOracle:
        from .oracle import ModuleOracle

        model = copy.deepcopy(self.model) if isinstance(self.model, nn.Module) else self.model()
        if self.state is not None:
            model.load_state_dict(self.state)
        model = model.to(self.device).train(self.training)
        return ModuleOracle(model, self.loss_fn, **self.options)

    @classmethod
    def from_oracle(cls, oracle: ModuleOracle) -> ModuleOracleFactory:
        """A recipe that rebuilds ``oracle`` as it is now: a CPU copy of its module (with
        parameters and buffers), its loss, engine options, device and mode."""
        from .oracle import ModuleOracle

        if not isinstance(oracle, ModuleOracle):
            raise TypeError(f"expected a ModuleOracle, got {oracle!r}")
        engine = oracle.engine
        options: dict[str, Any] = {"engine": engine is not None, "loss_dtype": oracle.loss_dtype}
        if engine is not None:
            options.update(
                max_batch_bytes=engine.chunk_bytes_option,
                max_cache_bytes=engine.max_cache_bytes,
                memory_format=engine.memory_format,
                per_sample_modules=engine.per_sample_modules,
            )
        else:
            options.update(max_batch_bytes=oracle.max_batch_bytes)
        cpu_copy = copy.deepcopy(oracle.module).to("cpu")
        return cls(
            cpu_copy,
            oracle.loss_fn,
            options=options,
            device=str(oracle.view.device),
            training=oracle.module.training,
        )
