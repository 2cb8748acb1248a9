"""The loss of a model's output: in ``loss_dtype``, and for ``Q`` queries at once.

``f(x) = loss_fn(module(inputs), targets)``; the engine, the reference loops and the oracle
all compute it through :func:`cast_for_loss`, so that they round alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

#: ``loss_fn(logits, targets) -> scalar`` batch-mean loss
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cast_for_loss(output: Any, targets: Any, loss_dtype: torch.dtype | None) -> tuple[Any, Any]:
    """The model's output and the targets with every floating tensor in ``loss_dtype``
    (``None``: unchanged); integer tensors and everything else as they are.

    The output keeps its structure and type: a tensor, a tuple, a dict or a Hugging Face
    ``ModelOutput`` (anything ``torch.utils._pytree`` flattens; other objects pass through
    untouched). CGE divides loss differences of size ``mu * |g|`` by ``mu``; reducing the
    loss in float64 keeps the final batch mean from rounding them to float32 resolution.
    """
    if loss_dtype is None:
        return output, targets
    return _cast_tree(output, loss_dtype), _cast_tree(targets, loss_dtype)


def _cast_tree(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    return pytree.tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
        value,
    )


def per_query_loss(loss_fn: LossFn) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """``(logits (Q*B, ...), targets (B, ...), Q) -> (Q,)`` losses, each a batch mean.

    Cross-entropy (``F.cross_entropy`` or an unweighted mean ``nn.CrossEntropyLoss``) runs
    once for all queries; any other loss is called once per query.
    """
    ce_kwargs: dict[str, Any] | None = None
    ignore_index = -100
    if loss_fn is torch.nn.functional.cross_entropy:
        ce_kwargs = {}
    elif (
        isinstance(loss_fn, nn.CrossEntropyLoss)
        and loss_fn.weight is None
        and loss_fn.reduction == "mean"
    ):
        ce_kwargs = {"label_smoothing": loss_fn.label_smoothing}
        ignore_index = loss_fn.ignore_index

    def looped(logits: torch.Tensor, targets: torch.Tensor, q: int) -> torch.Tensor:
        b = logits.shape[0] // q
        return torch.stack(
            [loss_fn(logits[i * b : (i + 1) * b], targets).reshape(()) for i in range(q)]
        )

    if ce_kwargs is None:
        return looped

    def vectorized(logits: torch.Tensor, targets: torch.Tensor, q: int) -> torch.Tensor:
        if not targets.is_floating_point() and bool((targets == ignore_index).any()):
            return looped(logits, targets, q)  # ignored samples change the mean's denominator
        reps = (q,) + (1,) * (targets.ndim - 1)
        per_sample = torch.nn.functional.cross_entropy(
            logits, targets.repeat(reps), reduction="none", **ce_kwargs
        )
        return per_sample.view(q, -1).mean(1)

    return vectorized


__all__ = ["LossFn", "cast_for_loss", "per_query_loss"]
