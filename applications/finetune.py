"""Issue 21's learning benchmark: ZO fine-tuning MNIST -> Fashion-MNIST, full and LoRA.

The experiment is the ``applications/finetuning/`` package (docs/finetune.md); this module
keeps the entry points ``python applications/finetune.py [flags]`` and
``zoopt experiment finetune [flags]`` (``--help`` lists the flags).
"""

from __future__ import annotations

import sys

from applications.finetuning.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
