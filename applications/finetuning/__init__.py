"""Learning benchmark of issue 21: ZO fine-tuning of a pretrained CNN, full and LoRA.

A small CNN (:mod:`.model`) is pretrained first-order on MNIST 60k, then fine-tuned to
Fashion-MNIST (both through ``zoopt.datasets``) with ZO-SGD (MeZO: RGE q=1 in place), RGE q=16
(SGD-momentum), ZO-Adam (RGE q=16), DeepZero (ZO-GraSP + sparse CGE) and first-order SGD,
each on every parameter (``full``) and on a LoRA adapter plus the head (``lora``), all
through the one trainer. Accuracy vs queries and vs wall time, per seed; ``results.json``,
``summary.md`` and ``finetune.png`` in the run folder (docs/finetune.md).

Modules: ``config`` (:class:`FinetuneSettings`, :data:`METHODS`), ``model`` (the CNN, the
LoRA set), ``experiment`` (data, pretraining, one fine-tuning run, :func:`run`), ``report``
(summary, goal, table, plot), ``cli`` (flags; ``main``). ``applications/finetune.py`` is
the command line (``zoopt experiment finetune``). Importing this package loads no torch.
"""

from __future__ import annotations

from .cli import main

__all__ = ["main"]
