"""The ``zoopt`` command line.

``zoopt minimize FUNCTION`` optimizes a named test function or a user function given as
``module:function``; ``zoopt train`` trains an image classifier (its flags:
:mod:`zoopt.train_cli`, torch-free; the run: :mod:`zoopt.torch.cli_tasks`). Every other
command (``demo``, ``experiment``, ``serve-classifier``, or a plug-in's) is found through
the ``zoopt.commands`` entry points, so the library never imports the packages that provide
them: an entry point names a function that adds one subparser (with ``func`` set) to the
``zoopt`` subparsers. Commands import their heavy dependencies only when run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from . import registry

#: entry-point group of the commands that live outside the library
COMMANDS_GROUP = "zoopt.commands"

#: what ``zoopt minimize`` may import lazily once the user's module is loaded: imported
#: first, so that a file of the same name in the current folder cannot stand in for them
_OWN_LAZY_IMPORTS = ("array_api_compat", "tqdm", "tqdm.auto")


class CLIError(Exception):
    """An expected failure (a bad file, flag or value, user code raising): ``main`` prints
    ``zoopt: error: MESSAGE`` and returns 2, without a traceback."""


def _import_user_module(module_name: str) -> ModuleType:
    """Import ``module_name`` as ``python -c "import NAME"`` in the current folder would,
    without letting that folder shadow anything zoopt imports itself.

    The current folder is on ``sys.path`` only while the user's module is imported, and
    zoopt's own lazy dependencies are imported before it is added: a ``tqdm.py`` lying in
    the folder of a ``zoopt minimize math:fsum`` is never run.
    """
    for name in _OWN_LAZY_IMPORTS:
        importlib.import_module(name)
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise CLIError(f"cannot import module {module_name!r}: {exc}") from exc
    except Exception as exc:  # user code failing at import: a syntax error, a raise
        where = ""
        tb = exc.__traceback__
        while tb is not None:  # the innermost frame of the user's file, if any
            if tb.tb_frame.f_code.co_filename.startswith(cwd):
                where = f" ({tb.tb_frame.f_code.co_filename}, line {tb.tb_lineno})"
            tb = tb.tb_next
        if isinstance(exc, SyntaxError):
            where = f" ({exc.filename}, line {exc.lineno})"
        raise CLIError(
            f"importing module {module_name!r} failed{where}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        sys.path.remove(cwd)


def _load_function(spec: str) -> tuple[Callable[..., Any], bool, np.ndarray | None, float | None]:
    """Resolve a named test function or ``module:function``.

    Returns (callable, batched, default x0 for a dimension or None, known minimum or None).
    """
    from .testfunctions import FUNCTIONS

    if spec in FUNCTIONS:
        tf = FUNCTIONS[spec]
        return tf.fn, True, tf.x0, tf.minimum
    if ":" not in spec:
        raise CLIError(
            f"unknown function {spec!r}; use one of {sorted(FUNCTIONS)} or module:function"
        )
    module_name, _, attr = spec.partition(":")
    if not module_name or module_name.startswith(".") or not attr:
        raise CLIError(f"FUNCTION must be module:function, got {spec!r}")
    module = _import_user_module(module_name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise CLIError(f"{module_name!r} has no callable {attr!r}")
    return fn, False, None, None


def _check_out_file(out: str) -> Path:
    """The file ``np.save(out, ...)`` will write, checked before the run: a run must not end
    in a result it cannot save."""
    path = Path(out if out.endswith(".npy") else out + ".npy")
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise CLIError(f"--out {out}: the folder {str(folder)!r} {what}")
    if path.is_dir():
        raise CLIError(f"--out {out}: {str(path)!r} is a folder")
    if not os.access(folder, os.W_OK):
        raise CLIError(f"--out {out}: the folder {str(folder)!r} is not writable")
    return path


def _cmd_minimize(args: argparse.Namespace) -> int:
    import zoopt

    out_path = None if args.out is None else _check_out_file(args.out)
    fn, batched, x0_fn, fmin = _load_function(args.function)
    batched = batched or args.batched
    if args.x0 is not None:
        if args.x0.endswith(".npy"):
            x0 = np.load(args.x0, allow_pickle=False).astype(np.float64).ravel()
        else:
            x0 = np.full(args.dim, float(args.x0))
    elif x0_fn is not None:
        x0 = x0_fn(args.dim)
    else:
        x0 = np.zeros(args.dim)
    if x0.shape[0] != args.dim:
        raise CLIError(f"--x0 has {x0.shape[0]} entries but --dim is {args.dim}")
    fixed_flags = [
        flag
        for flag, value in (
            ("--optimizer", args.optimizer),
            ("--lr", args.lr),
            ("--momentum", args.momentum),
            ("--schedule", args.schedule),
        )
        if value is not None
    ]
    method = args.method or ("sgd" if fixed_flags else "lbfgs")
    if method in ("lbfgs", "spsa") and fixed_flags:
        raise CLIError(f"--method {method} takes no {', '.join(fixed_flags)}")
    if method == "spsa" and args.estimator:
        raise CLIError("--method spsa takes no --estimator")
    mu = 1e-4 if args.mu is None else args.mu
    est = None
    if args.estimator == "cge":
        est = zoopt.CGE(mu=mu, scheme=args.scheme if args.scheme != "antithetic" else "central")
    elif args.estimator == "rge" or method != "lbfgs" or args.mu is not None:
        # a --mu for L-BFGS means fixed-step differences instead of the adaptive ones
        if method == "lbfgs" and args.estimator is None:
            est = zoopt.CGE(mu=mu, scheme=args.scheme if args.scheme != "antithetic" else "central")
        else:
            est = zoopt.RGE(q=args.q, mu=mu, dist=args.dist, scheme=args.scheme)
    if method == "spsa":
        est = None
    opt = None
    if method not in ("lbfgs", "spsa"):
        if args.method and args.optimizer and args.method != args.optimizer:
            raise CLIError(f"--method {args.method} but --optimizer {args.optimizer}")
        method = args.optimizer or method
        base_lr = 1e-3 if args.lr is None else args.lr
        lr: Any = base_lr
        iterations = args.maxiter or 1000
        if args.schedule is not None and args.schedule != "constant":
            lr = registry.schedule(
                args.schedule,
                base_lr,
                total=max(1, iterations),
                warmup=min(args.warmup, iterations - 1),
            )
        takes_momentum = "momentum" in registry.OPTIMIZERS[method].options
        momentum = {"momentum": args.momentum or 0.0} if takes_momentum else {}
        opt = registry.optimizer(method, lr, **momentum)
    f = fn if batched else (lambda x: fn(x))
    oracle = zoopt.as_oracle(f, dim=args.dim, batched=batched, on_nonfinite="inf")
    try:
        f_start = float(oracle(x0))
    except zoopt.OracleError as exc:  # the user's function raising at x0 is their error
        raise CLIError(f"{args.function} failed at x0: {exc}") from exc
    res = zoopt.minimize(
        oracle,
        x0,
        method=None if opt is not None else method,
        estimator=est,
        optimizer=opt,
        maxiter=args.maxiter,
        max_queries=args.max_queries,
        seed=args.seed,
        progress=not args.quiet,
    )
    summary = {
        "function": args.function,
        "dim": args.dim,
        "method": method,
        "estimator": "adaptive finite differences" if est is None else repr(est),
        "f_start": f_start,
        "fun": res.fun,
        "best_fun": res.best_fun,
        "nit": res.nit,
        "nfev": res.nfev,
        "status": res.status,
        "success": bool(res.success),
        "message": res.message,
        "wall_seconds": round(res.wall_seconds, 3),
    }
    if fmin is not None:
        summary["gap_reduction"] = (f_start - fmin) / max(res.fun - fmin, 1e-300)
    save_error = None
    if out_path is not None:
        try:
            np.save(out_path, np.asarray(res.x))
            summary["x_saved_to"] = str(out_path)
        except OSError as exc:  # the folder changed during the run: still show the result
            save_error = f"--out {args.out}: could not save x ({exc})"
    if args.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:>14}: {v}")
    if save_error is not None:
        raise CLIError(save_error)
    # a run that ended at its budget or iteration limit did its job (status 1); a failed
    # oracle, a non-finite stop or an interrupt did not
    return 0 if res.status in (0, 1) else 1


def _add_minimize(sub: Any) -> None:
    p = sub.add_parser(
        "minimize",
        help="minimize a test function or module:function with ZO gradient estimates",
        description="Minimize FUNCTION (a named test function, or module:function taking a 1-D "
        "numpy array and returning a float) with zeroth-order gradient estimates.",
    )
    p.add_argument("function", help="sphere|quadratic|rosenbrock|rastrigin or module:function")
    p.add_argument("--dim", type=int, default=10, help="number of variables (default 10)")
    p.add_argument(
        "--x0", default=None, help="start: a constant, or a .npy file (default per function)"
    )
    p.add_argument(
        "--batched", action="store_true", help="module:function takes (n, d) and returns (n,)"
    )
    p.add_argument(
        "--method",
        choices=["lbfgs", "spsa", *registry.OPTIMIZERS],
        default=None,
        help="lbfgs (default: no learning rate), spsa (noisy functions), or a fixed-step "
        "optimizer (the default when --optimizer/--lr/--momentum/--schedule is given)",
    )
    p.add_argument(
        "--estimator",
        choices=["rge", "cge"],
        default=None,
        help="gradient estimator (lbfgs: adaptive finite differences unless given; "
        "fixed steps: rge)",
    )
    p.add_argument("--q", type=int, default=20, help="RGE directions (default 20)")
    p.add_argument(
        "--mu", type=float, default=None, help="smoothing / difference step (default 1e-4)"
    )
    p.add_argument("--dist", choices=["gaussian", "sphere", "rademacher"], default="gaussian")
    p.add_argument("--scheme", choices=["forward", "central", "antithetic"], default="forward")
    p.add_argument("--optimizer", choices=tuple(registry.OPTIMIZERS), default=None)
    p.add_argument("--lr", type=float, default=None, help="fixed-step learning rate (1e-3)")
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--schedule", choices=tuple(registry.SCHEDULES), default=None)
    p.add_argument("--warmup", type=int, default=0, help="warmup iterations of the cosine schedule")
    p.add_argument(
        "--maxiter", type=int, default=None, help="iterations (default: until converged or budget)"
    )
    p.add_argument("--max-queries", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="save the final x to this .npy file")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_minimize)


def _add_plugin_commands(sub: Any) -> None:
    """Every ``zoopt.commands`` entry point, by name; a broken one is reported, not fatal."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except Exception as exc:  # a plug-in must not take `zoopt minimize` down with it
            print(f"zoopt: command {ep.name!r} ({ep.value}) unavailable: {exc}", file=sys.stderr)


def _run_train(args: argparse.Namespace) -> int:
    """``zoopt train``: the flags as :class:`~zoopt.train_cli.TrainOptions` (torch-free),
    then the torch half."""
    from .train_cli import options_from_args

    opts = options_from_args(args)
    from .torch.cli_tasks import run

    return run(opts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zoopt", description="Zeroth-order optimization of black boxes (DeepZero)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_minimize(sub)
    from .train_cli import add_train_parser

    add_train_parser(sub).set_defaults(func=_run_train)
    _add_plugin_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("zoopt: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, OSError) as exc:
        # bad user input, or the system refusing (a file, a folder, a port): one clear line
        # naming it, no traceback
        print(f"zoopt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
