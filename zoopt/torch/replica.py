"""The model state a :class:`~zoopt.torch.ModuleOracle` shares with its replicas on
parallel workers: the module's buffers (BatchNorm running statistics), as host numpy arrays
by name (:func:`module_state`, :func:`load_module_state`).

The picklable recipe a worker builds its replica from,
:class:`~zoopt.torch.oracle.ModuleOracleFactory`, lives beside the oracle it builds.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["load_module_state", "module_state"]


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
