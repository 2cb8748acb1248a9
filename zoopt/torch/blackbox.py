"""A remote prediction API as a torch stage, and fixed (frozen) modules around trained ones.

Pieces for training something that sits in front of a model we may only query (or must not
change): :class:`BlackBoxStage` turns a prediction API into a parameter-free,
non-differentiable ``nn.Module`` that the sparse-CGE engine can feed all perturbed inputs of
a chunk at once (``per_sample_modules=(BlackBoxStage,)``); :class:`FrozenModule` and
:class:`CountingClassifier` keep a white-box module fixed while autograd flows through it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn


@runtime_checkable
class PredictionAPI(Protocol):
    """What a query-only model offers: ``predict(inputs (n, ...) float32) -> outputs (n, K)``
    (e.g. ``oracles.classifier.ClassifierAPI``: images in, logits out, every image counted)."""

    def predict(self, inputs: np.ndarray) -> np.ndarray: ...


def check_prediction_api(api: object) -> PredictionAPI:
    """``api`` itself; a ``TypeError`` naming its type if it has no ``predict`` method."""
    if not isinstance(api, PredictionAPI) or not callable(api.predict):
        raise TypeError(f"api must have a predict method, got {type(api).__name__}")
    return api


class BlackBoxStage(nn.Module):
    """A prediction API as a parameter-free, non-differentiable torch stage.

    ``forward(inputs (n, ...)) -> outputs (n, K)`` in the inputs' dtype and device; every call
    is one ``api.predict`` of ``n`` inputs (the API may split it into several requests). There
    is no autograd through it: only zeroth-order methods can train what lies in front of it.

    Args:
        api: a :class:`PredictionAPI`.
    """

    def __init__(self, api: PredictionAPI):
        super().__init__()
        self.api = check_prediction_api(api)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if isinstance(inputs, torch.fx.Proxy):
            # Not traceable on purpose: the engine then sees the stage as one opaque node, which
            # per_sample_modules=(BlackBoxStage,) lets it feed all queries of a chunk at once.
            raise TypeError("BlackBoxStage calls a remote API and cannot be traced")
        host = inputs.detach().to("cpu", torch.float32).contiguous().numpy()
        outputs = np.asarray(self.api.predict(host), dtype=np.float32)
        return torch.from_numpy(outputs).to(device=inputs.device, dtype=inputs.dtype)

    def extra_repr(self) -> str:
        return f"api={type(self.api).__name__}"


class FrozenModule(nn.Module):
    """A module used as a fixed function: always in eval mode (BatchNorm uses its running
    statistics, whatever mode the surrounding model is put in), its parameters frozen.
    Autograd still flows through it to whatever lies in front of it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenModule:
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class CountingClassifier(FrozenModule):
    """A white-box classifier that stays frozen in eval mode and counts the inputs it sees.

    Autograd flows through it to what lies in front of it; its own weights never move (nor
    its BatchNorm statistics). ``images`` counts forward inputs (white-box forwards, not API
    queries).
    """

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += int(x.shape[0])
        return self.module(x)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode and restore its previous mode on exit."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
