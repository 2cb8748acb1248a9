"""The references the engine is checked against, one query at a time.

* :func:`naive_coordinate_values`: perturb one coordinate in place, run the full forward
  (the definition of ``f(x + step * e_c)``; the engine's slow path is :func:`naive_loop`).
* :func:`block_reuse_coordinate_values`: stage-granular reuse, the reference the DeepZero
  code implements (cache each stage's input once; a coordinate in stage ``s`` reruns stages
  ``s, s+1, ...``). Needs a model whose forward is the composition of ``stages_of(model)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..._coords import check_coords
from ..models import stages_of
from ..params import ParamView, preserved_buffers
from .losses import LossFn, cast_for_loss


def naive_loop(
    module: nn.Module,
    loss_fn: LossFn,
    param: torch.Tensor,
    local: torch.Tensor,
    step: float,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_dtype: torch.dtype | None,
) -> torch.Tensor:
    """Perturb ``param.view(-1)[i]`` in place for each ``i`` in ``local``; full forward each."""
    flat = param.view(-1)
    out = []
    for i in local.tolist():
        old = flat[i].clone()
        flat[i] = old + step
        try:
            logits = module(inputs)
            out.append(loss_fn(*cast_for_loss(logits, targets, loss_dtype)).reshape(()))
        finally:
            flat[i] = old
    return torch.stack(out)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def naive_coordinate_values(
    module: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    coords: Sequence[int] | np.ndarray | torch.Tensor,
    step: float,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    loss_dtype: torch.dtype | None = torch.float64,
    seed: int | None = None,
) -> torch.Tensor:
    """Reference: for each coordinate, perturb it in place and run the full forward.

    Returns ``(k,)`` losses (``loss_dtype``, see :func:`cast_for_loss`). Parameters and
    buffers are restored afterwards; BatchNorm in training mode uses the batch statistics.
    ``seed``: run every forward with torch's generators seeded to it (the same dropout masks
    in every forward; the generators are restored afterwards).
    """
    view = ParamView(module)
    coords_np = check_coords(coords, view.dim)
    out = torch.empty(coords_np.shape[0], dtype=loss_dtype or view.dtype, device=view.device)
    with torch.no_grad(), preserved_buffers(module), view.loaded(view.check_flat(x, "x")):
        which = view.group_index(coords_np)
        for k, c in enumerate(coords_np.tolist()):
            g = int(which[k])
            local = torch.tensor([c - view.groups[g].start])
            with _seeded(seed, view.device):
                out[k] = naive_loop(
                    module, loss_fn, view.params[g], local, step, inputs, targets, loss_dtype
                )[0]
    return out


def block_reuse_coordinate_values(
    module: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    coords: Sequence[int] | np.ndarray | torch.Tensor,
    step: float,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    loss_dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """Reference with reuse at stage granularity, one query at a time (as the DeepZero code).

    The unperturbed input of every stage is cached once; a coordinate in stage ``s`` reruns
    stages ``s, s+1, ...`` from that cache. Returns ``(k,)`` losses; parameters and buffers
    are restored afterwards.
    """
    view = ParamView(module)
    coords_np = check_coords(coords, view.dim)
    stages = stages_of(module)
    stage_of_param: dict[int, int] = {}
    for s, st in enumerate(stages):
        for p in st.parameters():
            stage_of_param.setdefault(id(p), s)
    out = torch.empty(coords_np.shape[0], dtype=loss_dtype or view.dtype, device=view.device)
    with torch.no_grad(), preserved_buffers(module), view.loaded(view.check_flat(x, "x")):
        stage_inputs = []
        h = inputs
        for st in stages:
            stage_inputs.append(h)
            h = st(h)
        which = view.group_index(coords_np)
        for k, c in enumerate(coords_np.tolist()):
            g = int(which[k])
            p = view.params[g]
            s = stage_of_param.get(id(p), 0)  # parameters outside every stage: rerun it all
            flat = p.view(-1)
            i = c - view.groups[g].start
            old = flat[i].clone()
            flat[i] = old + step
            try:
                h = stage_inputs[s].clone()  # a stage may modify its input in place
                for st in stages[s:]:
                    h = st(h)
                out[k] = loss_fn(*cast_for_loss(h, targets, loss_dtype))
            finally:
                flat[i] = old
    return out


__all__ = ["block_reuse_coordinate_values", "naive_coordinate_values", "naive_loop"]
