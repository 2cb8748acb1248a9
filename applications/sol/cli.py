"""DeepZero Fig. 6: a network corrects a coarse wake-flow simulation, trained with ZO.

The coarse PhiFlow solver (``oracles/wake_flow.py``) advances the unsteady wake behind a
cylinder; a small CNN adds a correction after every step so that the coarse trajectory tracks
a fine simulation downsampled onto the coarse grid (Um et al. 2020, "Solver-in-the-Loop";
DeepZero Sec. 6.3). Four methods, evaluated on test Reynolds numbers not seen in training:

* ``SRC``    — the coarse solver alone;
* ``NON``    — the network trained first-order on pre-computed one-step coarse/fine pairs,
  no solver in the loop;
* ``FO-SOL`` — trained through ``n`` unrolled solver steps by autograd (Trainer "fo");
* ``ZO-SOL`` — the same loss, the solver a black box queried through its numpy ``step``:
  DeepZero (ZO-GraSP keep ratios, 95% gradient sparsity, sparse CGE, SGD; Trainer
  "deepzero"), every query of a step simulated as one solver batch.

Embedded default (600 steps per method; measured ~11 min on one core of a 2-core machine
whose other core was busy, plus 1.5-3.5 min once to fill the reference cache)::

    python applications/zo_sol.py --out runs/zo_sol

writes ``runs/zo_sol/mae.json`` (test MAE per method and per simulation, seconds per ZO step,
queries), ``mae.png`` (bar chart), ``vorticity.png`` (snapshot of every method) and one
Trainer folder per trained method. Paper scale (Um et al.: coarse 32x64, 4x finer
reference, 6 training / 5 test Re, 500 frames; see docs/zo_sol.md for what is not checked)::

    python applications/zo_sol.py --res 32x64 --fine-res 128x256 --frames 500 \\
        --kernel-size 5 --width 32 --windows-per-step 3 --steps 97000 --out runs/zo_sol_paper

This module only maps flags onto :class:`~applications.sol.config.SolSettings` and
:class:`~applications.sol.config.RunOptions`; :func:`applications.sol.experiment.run` runs.
"""

from __future__ import annotations

import argparse
import warnings

from .config import METHODS, TRAINED_METHODS, RunOptions, SolSettings


def _resolution(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW like 16x32, got {text!r}") from None
    return h, w


def _lr_flag(method: str) -> str:
    """``--lr-non``, ``--lr-fo-sol``, ``--lr-zo-sol``."""
    return f"--lr-{method.lower()}"


def _lr_dest(method: str) -> str:
    return f"lr_{method.lower().replace('-', '_')}"


def build_parser() -> argparse.ArgumentParser:
    """The flags, each defaulting to the matching :class:`SolSettings` / :class:`RunOptions`
    field."""
    d, r = SolSettings(), RunOptions()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(r.out))
    ap.add_argument("--res", type=_resolution, default=d.res, help="coarse HxW")
    ap.add_argument("--fine-res", type=_resolution, default=d.fine_res, help="reference HxW")
    ap.add_argument("--train-re", type=float, nargs="+", default=list(d.train_reynolds))
    ap.add_argument("--test-re", type=float, nargs="+", default=list(d.test_reynolds))
    ap.add_argument("--frames", type=int, default=d.frames)
    ap.add_argument("--warmup", type=int, default=d.warmup)
    ap.add_argument("--n-steps", type=int, default=d.n_steps, help="unrolled steps (SOL)")
    ap.add_argument("--eval-steps", type=int, default=d.eval_steps)
    ap.add_argument("--width", type=int, default=d.width)
    ap.add_argument("--depth", type=int, default=d.depth)
    ap.add_argument("--kernel-size", type=int, default=d.kernel_size)
    ap.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per method")
    ap.add_argument("--steps-per-epoch", type=int, default=d.steps_per_epoch)
    ap.add_argument("--windows-per-step", type=int, default=d.windows_per_step)
    ap.add_argument("--non-batch-size", type=int, default=d.non_batch_size)
    for m in TRAINED_METHODS:
        ap.add_argument(_lr_flag(m), type=float, default=d.lr[m])
    ap.add_argument("--momentum", type=float, default=d.momentum)
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
    ap.add_argument("--mu", type=float, default=d.mu)
    ap.add_argument("--sparsity", type=float, default=d.sparsity)
    ap.add_argument("--ratios", default=d.ratios)
    ap.add_argument("--grasp-q", type=int, default=d.grasp_q)
    ap.add_argument("--reshuffle-every", type=int, default=d.reshuffle_every)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--methods", nargs="+", default=list(d.methods), choices=METHODS)
    ap.add_argument("--cache-dir", default=d.cache_dir)
    ap.add_argument(
        "--threads", type=int, default=r.threads, help="torch threads (the solver uses 1)"
    )
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def parse_args(argv: list[str] | None = None) -> tuple[SolSettings, RunOptions]:
    """Flags -> (settings, run options); a bad value raises ValueError naming it."""
    a = build_parser().parse_args(argv)
    settings = SolSettings(
        res=a.res,
        fine_res=a.fine_res,
        train_reynolds=tuple(a.train_re),
        test_reynolds=tuple(a.test_re),
        frames=a.frames,
        warmup=a.warmup,
        n_steps=a.n_steps,
        eval_steps=a.eval_steps,
        width=a.width,
        depth=a.depth,
        kernel_size=a.kernel_size,
        steps=a.steps,
        steps_per_epoch=a.steps_per_epoch,
        windows_per_step=a.windows_per_step,
        non_batch_size=a.non_batch_size,
        lr={m: getattr(a, _lr_dest(m)) for m in TRAINED_METHODS},
        momentum=a.momentum,
        weight_decay=a.weight_decay,
        mu=a.mu,
        sparsity=a.sparsity,
        ratios=a.ratios,
        grasp_q=a.grasp_q,
        reshuffle_every=a.reshuffle_every,
        seed=a.seed,
        methods=tuple(a.methods),
        cache_dir=a.cache_dir,
    )
    options = RunOptions(out=a.out, threads=a.threads, resume=a.resume, progress=not a.no_progress)
    return settings, options


def main(argv: list[str] | None = None) -> int:
    """Run the experiment from command-line flags; prints the MAE table; returns 0."""
    import torch

    from .experiment import run
    from .report import summary_lines

    settings, options = parse_args(argv)
    torch.set_num_threads(options.threads)
    # phiml's jit uses torch.jit.trace (deprecated in torch 2.13) and PhiFlow's pressure matrix
    # is a beta sparse-CSR tensor: warnings that are not ours to fix, printed every trace
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    result = run(settings, options.out, resume=options.resume, progress=options.progress)
    print("\n".join(summary_lines(result, options.out)))
    return 0
