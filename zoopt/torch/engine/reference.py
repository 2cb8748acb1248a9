"""Stage-granular reuse, one query at a time: the reference the DeepZero code implements.

Used by the tests and benchmarks to compare the engine against the original authors'
approach (cache each stage's input once; a coordinate in stage ``s`` reruns stages ``s, s+1,
...``). Needs a model whose forward is the composition of ``stages_of(model)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..._coords import check_coords
from ..models import stages_of
from ..params import ParamView, preserved_buffers
from .core import LossFn, cast_for_loss


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
