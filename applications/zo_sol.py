"""DeepZero Fig. 6: a network corrects a coarse wake-flow simulation, trained with ZO.

The experiment is the ``applications/sol/`` package (docs/zo_sol.md); this module keeps the
documented entry points ``python applications/zo_sol.py [flags]`` and
``zoopt experiment zo_sol [flags]`` (``--help`` lists the flags).
"""

from __future__ import annotations

import sys

from applications.sol.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
