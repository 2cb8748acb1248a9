"""Black boxes to query: classifier APIs (local and HTTP), their service, and models.

Import-light: the submodules load on first use, so ``import oracles`` costs nothing and the
HTTP client (:mod:`oracles.classifier`) never imports torch.

- :mod:`oracles.classifier`: ``ClassifierAPI``, ``LocalClassifier``, ``HTTPClassifier`` (a
  client of any Open Inference Protocol / KServe V2 server).
- :mod:`oracles.http_service`: ``make_server`` (our Open Inference Protocol server, Starlette
  on uvicorn) and the ``serve-classifier`` command.
- :mod:`oracles.open_inference`: the protocol's tensor encoding (JSON and binary).
- :mod:`oracles.resnet`: torchvision-compatible ResNets, ``load_weights``.
- :mod:`oracles.dncnn`: the DnCNN denoiser.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClassifierAPI": "classifier",
    "LocalClassifier": "classifier",
    "HTTPClassifier": "classifier",
    "as_label_function": "classifier",
    "make_server": "http_service",
    "serve_forever": "http_service",
    "serve_in_background": "http_service",
    "build_resnet": "resnet",
    "resnet50": "resnet",
    "load_weights": "resnet",
    "load_classifier": "resnet",
    "DnCNN": "dncnn",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'oracles' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
