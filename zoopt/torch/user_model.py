"""Bring your own model: build it from ``path/to/file.py:factory`` (or ``package.module:factory``)
and load its weights safely.

The factory is your code: importing your file runs it, as ``python file.py`` would. Weight
files are data: they are read with ``torch.load(..., weights_only=True)``, which refuses any
pickled object other than tensors and plain containers, so a weight file cannot run code.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn


def is_model_spec(spec: str) -> bool:
    """Does ``spec`` name a factory (``file.py:factory`` or ``module:factory``)?"""
    return isinstance(spec, str) and ":" in spec and not spec.startswith(":")


def load_factory(spec: str) -> Any:
    """The callable named by ``path/to/file.py:name`` or ``package.module:name``.

    Raises:
        ValueError: the file or module does not exist, or has no callable of that name.
    """
    if not is_model_spec(spec):
        raise ValueError(f"model spec must look like path/to/file.py:factory, got {spec!r}")
    where, _, name = spec.rpartition(":")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise ValueError(f"model file {str(path)!r} does not exist")
        module_name = f"zoopt_user_model_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"cannot import {str(path)!r} as a Python file")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # so dataclasses/pickling inside it work
        sys.path.insert(0, str(path.resolve().parent))  # its own sibling imports
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:  # the user's file failing: a syntax error, a raise
            sys.modules.pop(module_name, None)
            raise ValueError(
                f"importing model file {str(path)!r} failed{_where(exc)}: "
                f"{type(exc).__name__}: {exc.msg if isinstance(exc, SyntaxError) else exc}"
            ) from exc
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ValueError(f"cannot import module {where!r}: {exc}") from exc
        except Exception as exc:  # the user's module failing at import
            raise ValueError(
                f"importing module {where!r} failed{_where(exc)}: {type(exc).__name__}: {exc}"
            ) from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"{where!r} has no callable {name!r}")
    return factory


def build_user_model(spec: str, num_classes: int | None = None) -> nn.Module:
    """Call the factory named by ``spec``: with ``num_classes=`` if it takes that argument,
    otherwise with no arguments. It must return an ``nn.Module``."""
    factory = load_factory(spec)
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = {}
        if "num_classes" in params:
            kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the user's factory raising is their error, not ours
        raise ValueError(
            f"model factory {spec!r} raised{_where(exc)}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def check_model_output(
    model: nn.Module,
    spec: str,
    images: Any,
    num_classes: int,
    *,
    weights: str | Path | None = None,
    user_code: bool = True,
) -> None:
    """One forward of ``images`` (a couple of training images) in eval mode, before training:
    the model must map them to finite logits ``(len(images), num_classes)``.

    Nothing changes in the model (eval mode, no gradients; the training mode is restored).

    Raises:
        ValueError: the forward raises (``user_code``: a bug in a built-in model keeps its
            traceback), returns something else than logits of that shape, or gives NaN or
            inf (the model itself, or the ``weights`` loaded into it).
    """
    x = torch.as_tensor(images, dtype=torch.float32)
    was = model.training
    try:
        with torch.no_grad():
            logits = model.eval()(x)
    except Exception as exc:
        if not user_code:
            raise
        raise ValueError(
            f"model {spec!r} fails on the training images {tuple(x.shape[1:])} "
            f"(a batch of {x.shape[0]}){_where(exc)}: {type(exc).__name__}: "
            f"{_first_line(exc)}"
        ) from exc
    finally:
        model.train(was)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (x.shape[0], num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
        raise ValueError(
            f"model {spec!r} maps images {tuple(x.shape[1:])} to {shape}; "
            f"expected logits (batch, {num_classes})"
        )
    if not bool(torch.isfinite(logits).all()):
        bad = "nan" if bool(torch.isnan(logits).any()) else "inf"
        source = f"model {spec!r}"
        if weights is not None:
            nonfinite = [
                name for name, t in model.state_dict().items()
                if t.is_floating_point() and not bool(torch.isfinite(t).all())
            ]  # fmt: skip
            if nonfinite:
                source = (
                    f"--weights {str(weights)!r} hold non-finite values ({nonfinite[0]}"
                    f"{f' and {len(nonfinite) - 1} more' if len(nonfinite) > 1 else ''}): "
                    f"model {spec!r}"
                )
            else:
                source = f"model {spec!r} with --weights {str(weights)!r}"
        raise ValueError(
            f"{source} gives {bad} logits on the training images before any step: "
            "nothing to train from (the loss would be non-finite)"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _where(exc: BaseException) -> str:
    """`` (FILE, line N)``: where in the user's code ``exc`` was raised (the innermost frame
    outside torch and zoopt), or ``""``."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" ({exc.filename}, line {exc.lineno})"
    ours = (str(Path(torch.__file__).parent), str(Path(__file__).parents[1]))
    where = ""
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if not name.startswith(ours) and not name.startswith("<"):
            where = f" ({name}, line {tb.tb_lineno})"
        tb = tb.tb_next
    return where


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict from ``path`` into ``model`` (``weights_only=True``: no code runs).

    Accepts a plain state dict or one stored under ``"state_dict"`` / ``"model"``; a
    ``"module."`` prefix on every key (``nn.DataParallel`` checkpoints) is dropped.

    Raises:
        ValueError: unreadable file, not a state dict, or keys/shapes that do not match.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds of errors here
        raise ValueError(
            f"cannot read weights {str(path)!r} ({type(exc).__name__}: {exc})"
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"weights {str(path)!r} do not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(
            f"weights {str(path)!r} do not fit the model: {' '.join(first[:3])}"
        ) from exc
