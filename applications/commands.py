"""The ``zoopt demo`` and ``zoopt experiment`` commands.

They live here, not in the library: ``zoopt`` finds them through the ``zoopt.commands`` entry
points declared in ``pyproject.toml``, so the library never imports its experiments. Each
function adds one subcommand to the ``zoopt`` parser; the experiment modules are imported
only when their command runs.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

#: the paper's experiments: ``zoopt experiment NAME ARGS...`` runs ``applications/NAME.py``
EXPERIMENTS: dict[str, str] = {
    "image_classification": "DeepZero vs first-order training (digits; CIFAR-10 at paper scale)",
    "cge_vs_rge": "CGE vs RGE accuracy and time as the model widens (Fig. 2)",
    "feature_reuse": "sparse-CGE step time: naive loop vs block reuse vs the engine (Fig. 3)",
    "zo_grasp_vs_random": "ZO-GraSP layer-wise ratios vs random/uniform ratios",
    "certified_defense": "black-box defense: FO-DS / ZO-AE-DS / DeepZero certified accuracy",
    "zo_sol": "solver-in-the-loop wake flow: SRC / NON / FO-SOL / ZO-SOL",
    "finetune": "ZO fine-tuning MNIST -> Fashion-MNIST: MeZO / RGE / ZO-Adam / DeepZero / FO",
}


def run_experiment(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"applications.{args.name}")
    return int(module.main(list(args.args)) or 0)


def add_experiment_parser(sub: Any) -> argparse.ArgumentParser:
    """``zoopt experiment NAME ARGS...``."""
    listing = "\n".join(f"  {name:<22} {what}" for name, what in EXPERIMENTS.items())
    p = sub.add_parser(
        "experiment",
        help="run one of the paper's experiments (applications/NAME.py)",
        description="Run one of the paper's experiments with its embedded default, or with the "
        "options it takes (zoopt experiment NAME --help).\n\n" + listing,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=sorted(EXPERIMENTS), metavar="NAME", help="experiment name")
    p.add_argument("args", nargs=argparse.REMAINDER, help="options of the experiment")
    p.set_defaults(func=run_experiment)
    return p


def run_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default: DeepZero vs first-order SGD on digits."""
    from applications.image_classification import ImageClassificationConfig, run

    print("zoopt demo: DeepZero (ZO-GraSP ratios, 90% gradient sparsity, sparse CGE) vs the")
    print("first-order baseline, small CNN on scikit-learn's 8x8 digits, 20 epochs each.\n")
    run(ImageClassificationConfig(out=args.out))
    return 0


def add_demo_parser(sub: Any) -> argparse.ArgumentParser:
    """``zoopt demo [--out DIR]``."""
    p = sub.add_parser(
        "demo",
        help="DeepZero vs first-order training on the embedded digits default",
        description="Train the small CNN on scikit-learn's digits with DeepZero (90%% gradient "
        "sparsity) and with first-order SGD, and print both test accuracies.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.set_defaults(func=run_demo)
    return p
