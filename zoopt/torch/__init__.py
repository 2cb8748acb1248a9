"""Torch side of zoopt: flat parameter views, models, the module oracle and the fast
sparse-CGE engine. Importing this package imports torch."""

from .engine import (
    SparseCGEEngine,
    block_reuse_coordinate_values,
    naive_coordinate_values,
)
from .models import CNN8, ResNet20, SmallCNN, build_model, stages_of
from .oracle import ModuleOracle
from .params import ParamGroup, ParamView, preserved_buffers, select_trainable
from .user_model import build_user_model, load_weights

__all__ = [
    "CNN8",
    "ModuleOracle",
    "ParamGroup",
    "ParamView",
    "ResNet20",
    "SmallCNN",
    "SparseCGEEngine",
    "block_reuse_coordinate_values",
    "build_model",
    "build_user_model",
    "load_weights",
    "naive_coordinate_values",
    "preserved_buffers",
    "select_trainable",
    "stages_of",
]
