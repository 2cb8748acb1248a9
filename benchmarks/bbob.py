"""COCO's ``bbob`` suite: ``zoopt.minimize`` with its defaults against scipy, pycma and NGOpt.

The field's standard black-box benchmark (``pip install -e ".[bench]"``: ``coco-experiment``,
module ``cocoex``, and ``cocopp``): 24 noiseless functions, each in several instances
(shifted, rotated, scaled) per dimension. Every solver runs as a user would type it:

* ``zoopt``: ``zoopt.minimize(f, x0, max_queries=B, seed=instance)``;
* ``lbfgsb``, ``nelder-mead``, ``powell``: ``scipy.optimize.minimize(f, x0, method=...)``
  with ``maxfun`` / ``maxfev`` = B (L-BFGS-B on finite differences);
* ``pycma``: ``cma.fmin2(f, x0, 2, {"maxfevals": B}, restarts=9)`` (IPOP: the population
  doubles at each restart), as COCO's pycma entries run;
* ``ngopt``: nevergrad's ``NGOpt(parametrization=d, budget=B)``.

x0 is the problem's ``initial_solution`` (the origin, inside [-5, 5]^d where every optimum
lies); B = ``--budget-multiplier`` · d. Every evaluation of every solver goes through one
counter per problem: past B it stops the solver, and a run that reaches f* + 1e-8 (the last
target) stops there, as COCO's experiments do. Scored as COCO scores: 51 targets
f* + 10^k, k = 2, 1.8, …, −8, per problem; the runtime ECDF at a budget b is the fraction of
all (problem, target) pairs whose target was reached within b evaluations; the table gives it
at b = 10·d, 100·d, 1,000·d and 10,000·d (those within the budget), and ``auc`` is its mean
over log-spaced budgets from 1·d to B (the area under the ECDF on log axes, normalized).

Writes, under ``--out``: COCO-format data (``cocoex.Observer``, one folder per solver under
``exdata/``, for ``cocopp``), ``runs.json`` (every run: evaluations, the evaluation at
which each target was first reached, the best f − f*), ``bbob_ecdf.png`` (runtime ECDFs
drawn from that bookkeeping, one panel per dimension and one for all) and ``summary.json``,
which is also printed. ``--cocopp`` runs COCO's own post-processing on the data as well
(offline: it ships its reference data) into ``ppdata/``.

    python benchmarks/bbob.py                                   # small: d=2,5, instance 1, 100·d
    nice -n 5 python benchmarks/bbob.py --dims 2 5 10 --instances 1-3 --budget-multiplier 1000
    # the full comparison (hours): d = 2, 5, 10, 20, 40, 15 instances, 10,000·d
    nice -n 5 python benchmarks/bbob.py --dims 2 5 10 20 40 --instances 1-15 \\
        --budget-multiplier 10000 --jobs 2 --cocopp --out runs/bbob_full

``--jobs N`` runs N solvers at once, each in its own process (forked; a solver that leaves
a thread behind cannot keep the run from ending).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

import zoopt

#: COCO's targets: f* + 10^k, k = 2 … −8 in steps of 0.2 (51 values)
TARGET_EXPONENTS = np.linspace(2.0, -8.0, 51)
#: budgets (in evaluations / d) of the summary table
CHECKPOINTS = (10, 100, 1_000, 10_000)


class StopRun(BaseException):
    """Stops a solver: its budget is spent, or it reached the last target.

    A ``BaseException`` (like ``KeyboardInterrupt``): solvers turn an ``Exception`` of the
    objective into a failed run of their own (zoopt's oracle wraps it in ``OracleError``,
    nevergrad may retry); this must leave every one of them at once."""


class TrackedProblem:
    """A bbob problem behind the shared counter: ``f(x) -> float`` for ``x`` of shape
    ``(d,)``; records the evaluation at which each target was first reached."""

    def __init__(self, problem: Any, f_opt: float, budget: int):
        self.problem, self.f_opt, self.budget = problem, float(f_opt), int(budget)
        self.dim = int(problem.dimension)
        self.evaluations = 0
        self.best = math.inf
        self.deltas = 10.0**TARGET_EXPONENTS
        #: evaluations to reach target i (``None``: not reached)
        self.hits: list[int | None] = [None] * len(self.deltas)
        self._next = 0

    def __call__(self, x: Any) -> float:
        if self.evaluations >= self.budget:
            raise StopRun("budget spent")
        x = np.asarray(x, dtype=np.float64).reshape(self.dim)
        f = float(self.problem(x))
        self.evaluations += 1
        if f < self.best:
            self.best = f
            while self._next < len(self.deltas) and f - self.f_opt <= self.deltas[self._next]:
                self.hits[self._next] = self.evaluations
                self._next += 1
            if self._next == len(self.deltas):
                raise StopRun("final target reached")
        return f


# ---------------------------------------------------------------------------------------
# Solvers, each with the defaults a user types
# ---------------------------------------------------------------------------------------
def run_zoopt(f: TrackedProblem, x0: np.ndarray, seed: int) -> None:
    zoopt.minimize(f, x0, max_queries=f.budget, seed=seed)


def _scipy(method: str, budget_option: str) -> Callable[[TrackedProblem, np.ndarray, int], None]:
    def run(f: TrackedProblem, x0: np.ndarray, seed: int) -> None:
        from scipy.optimize import minimize

        minimize(f, x0, method=method, options={budget_option: f.budget})

    return run


def run_pycma(f: TrackedProblem, x0: np.ndarray, seed: int) -> None:
    import cma

    opts = {"maxfevals": f.budget, "verbose": -9, "seed": seed}
    cma.fmin2(f, x0, 2.0, opts, restarts=9)


def run_ngopt(f: TrackedProblem, x0: np.ndarray, seed: int) -> None:
    import nevergrad as ng

    param = ng.p.Array(init=x0.copy())
    param.random_state = np.random.RandomState(seed)
    ng.optimizers.NGOpt(parametrization=param, budget=f.budget, num_workers=1).minimize(f)


SOLVERS: dict[str, Callable[[TrackedProblem, np.ndarray, int], None]] = {
    "zoopt": run_zoopt,
    "lbfgsb": _scipy("L-BFGS-B", "maxfun"),
    "nelder-mead": _scipy("Nelder-Mead", "maxfev"),
    "powell": _scipy("Powell", "maxfev"),
    "pycma": run_pycma,
    "ngopt": run_ngopt,
}
OPTIONAL = {"pycma": "cma", "ngopt": "nevergrad"}


def available(solver: str) -> bool:
    module = OPTIONAL.get(solver)
    return module is None or importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------
def _ranges(text: str) -> str:
    """``"1-3"``, ``"1,2,5"``, ``"1-3,7"`` checked and passed on in COCO's syntax."""
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise argparse.ArgumentTypeError(f"expected e.g. 1-3 or 1,2,5, got {text!r}")
    return text


def suite_options(dims: list[int], instances: str, functions: str) -> str:
    return (
        f"dimensions: {','.join(str(d) for d in dims)} "
        f"instance_indices: {instances} function_indices: {functions}"
    )


def optimal_values(options: str) -> dict[str, float]:
    """f* of every problem, by problem id: f at its optimum x* (which cocoex writes to a
    file; its evaluations are on this suite, never on an observed one)."""
    import cocoex

    found = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        for problem in cocoex.Suite("bbob", "", options):
            problem._best_parameter("print")  # cocoex's only way to x*: this file
            x_opt = np.loadtxt("._bbob_problem_best_parameter.txt").reshape(-1)
            found[problem.id] = float(problem(x_opt))
            problem.free()
    return found


def run_solver(solver: str, options: str, budget_multiplier: int, out: str) -> list[dict]:
    """Every problem of the suite for one solver, observed into ``out/exdata/<solver>``."""
    import cocoex

    f_opts = optimal_values(options)
    rows = []
    with contextlib.chdir(out):  # the Observer writes under exdata/ of the working directory
        observer = cocoex.Observer("bbob", f"result_folder: {solver} algorithm_name: {solver}")
        for problem in cocoex.Suite("bbob", "", options):
            problem.observe_with(observer)
            d = int(problem.dimension)
            f = TrackedProblem(problem, f_opts[problem.id], budget_multiplier * d)
            x0 = np.array(problem.initial_solution, dtype=np.float64)
            t0 = time.perf_counter()
            error, stop = None, "solver finished"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    SOLVERS[solver](f, x0, int(problem.id_instance))
            except StopRun as exc:
                stop = str(exc)
            except Exception as exc:  # a solver that crashes scores what it found before
                error = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(
                {
                    "solver": solver,
                    "problem": problem.id,
                    "function": int(problem.id_function),
                    "instance": int(problem.id_instance),
                    "d": d,
                    "budget": f.budget,
                    "evaluations": f.evaluations,
                    "best_minus_fopt": f.best - f.f_opt,
                    "hits": f.hits,
                    "stop": stop,
                    "error": error,
                    "seconds": round(time.perf_counter() - t0, 3),
                }
            )
            problem.free()
    return rows


def rows_from_coco(folder: Path, solver: str, budget_multiplier: int) -> list[dict]:
    """The runs of one solver's COCO-format folder (``exdata/<solver>``), as
    :func:`run_solver` returns them: the bbob logger writes a ``.dat`` line whenever the best
    f − f* crosses a level 10^(k/5), the 51 targets' grid, so the first line at or below a
    target is the evaluation that reached it."""
    rows = []
    for info in sorted(folder.glob("*.info")):
        lines = info.read_text().splitlines()
        for i in range(0, len(lines) - 2, 3):  # a header, a comment, the runs' line
            head = dict(
                part.strip().split(" = ", 1) for part in lines[i].split(",") if " = " in part
            )
            data_file, *runs = (r.strip() for r in lines[i + 2].split(","))
            function, d = int(head["funcId"]), int(head["DIM"])
            sections: list[list[list[float]]] = []
            for line in (folder / data_file).read_text().splitlines():
                if line.startswith("%"):
                    sections.append([])
                elif line.strip():
                    sections[-1].append([float(v) for v in line.split()[:3]])
            # a run still in progress has a section but is not yet listed in the .info
            for run, table in zip(runs, sections, strict=False):
                instance = int(run.split(":")[0])
                evals = np.array([row[0] for row in table])
                gaps = np.array([row[2] for row in table])
                hits: list[int | None] = []
                for delta in 10.0**TARGET_EXPONENTS:
                    reached = np.flatnonzero(gaps <= delta)
                    hits.append(int(evals[reached[0]]) if reached.size else None)
                rows.append(
                    {
                        "solver": solver,
                        "problem": f"bbob_f{function:03d}_i{instance:02d}_d{d:02d}",
                        "function": function,
                        "instance": instance,
                        "d": d,
                        "budget": budget_multiplier * d,
                        "evaluations": int(run.split(":")[1].split("|")[0]),
                        "best_minus_fopt": float(gaps.min()),
                        "hits": hits,
                        "stop": "from COCO data",
                        "error": None,
                        "seconds": 0.0,
                    }
                )
    return rows


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------
def ecdf(rows: list[dict], budgets_per_d: np.ndarray) -> np.ndarray:
    """Fraction of (problem, target) pairs reached within ``b·d`` evaluations, per ``b``."""
    if not rows:
        return np.full(len(budgets_per_d), math.nan)
    reached = np.zeros(len(budgets_per_d))
    for r in rows:
        hits = np.array([h for h in r["hits"] if h is not None], dtype=np.float64) / r["d"]
        reached += (hits[None, :] <= budgets_per_d[:, None]).sum(axis=1)
    return reached / (len(rows) * len(TARGET_EXPONENTS))


def summarize(rows: list[dict], solvers: list[str], budget_multiplier: int) -> dict:
    grid = np.logspace(0, math.log10(budget_multiplier), 41)
    checkpoints = [c for c in CHECKPOINTS if c <= budget_multiplier]
    dims = sorted({r["d"] for r in rows})
    table: dict[str, Any] = {}
    for s in solvers:
        mine = [r for r in rows if r["solver"] == s]
        entry: dict[str, Any] = {
            "problems": len(mine),
            "errors": sum(r["error"] is not None for r in mine),
            "seconds": round(sum(r["seconds"] for r in mine), 1),
            "auc": float(np.mean(ecdf(mine, grid))),
            "at": {f"{c}d": float(ecdf(mine, np.array([c]))[0]) for c in checkpoints},
            "by_dim": {},
        }
        for d in dims:
            sub = [r for r in mine if r["d"] == d]
            entry["by_dim"][str(d)] = {
                "auc": float(np.mean(ecdf(sub, grid))),
                "at": {f"{c}d": float(ecdf(sub, np.array([c]))[0]) for c in checkpoints},
            }
        table[s] = entry
    best_at = {}
    for c in checkpoints:
        key = f"{c}d"
        best_at[key] = max(solvers, key=lambda s: table[s]["at"][key]) if solvers else None
    return {"solvers": table, "best_at": best_at, "checkpoints": checkpoints}


def plot(rows: list[dict], solvers: list[str], budget_multiplier: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["d"] for r in rows})
    panels = [(f"d = {d}", [r for r in rows if r["d"] == d]) for d in dims]
    if len(dims) > 1:
        panels.append((f"all (d = {', '.join(map(str, dims))})", rows))
    grid = np.logspace(0, math.log10(budget_multiplier), 200)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True)
    for ax, (title, sub) in zip(np.atleast_1d(axes), panels, strict=True):
        for s in solvers:
            mine = [r for r in sub if r["solver"] == s]
            ax.step(grid, ecdf(mine, grid), where="post", label=s, lw=2 if s == "zoopt" else 1.2)
        for c in CHECKPOINTS:
            if c <= budget_multiplier:
                ax.axvline(c, color="0.85", lw=0.8, zorder=0)
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("evaluations / d")
    np.atleast_1d(axes)[0].set_ylabel("fraction of (problem, target) pairs")
    np.atleast_1d(axes)[-1].legend(fontsize=8, loc="upper left")
    n_inst = len({r["instance"] for r in rows})
    n_fun = len({r["function"] for r in rows})
    fig.suptitle(
        f"bbob runtime ECDF: {n_fun} functions × {n_inst} instances, 51 targets 1e2…1e-8",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_cocopp(out: Path, solvers: list[str]) -> str | None:
    """COCO's post-processing of the observed data into ``out/ppdata`` (or the error)."""
    try:
        import cocopp

        folders = []
        for s in solvers:  # the Observer appends -001, -002 … when a folder exists
            found = sorted((out / "exdata").glob(f"{s}*"), key=lambda p: p.stat().st_mtime)
            if found:
                folders.append(str(found[-1]))
        with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115
            cocopp.main(["-o", str(out / "ppdata"), *folders])
        return None
    except Exception as exc:  # post-processing is extra: the JSON and the plot stand
        return f"{type(exc).__name__}: {exc}"[:300]


def markdown(summary: dict) -> str:
    """The summary as a markdown table: ECDF at each checkpoint (all dimensions, then per
    dimension at the largest checkpoint) and the area under the ECDF."""
    checkpoints = summary["checkpoints"]
    solvers = summary["solvers"]
    dims = sorted({d for s in solvers.values() for d in s["by_dim"]}, key=int)
    last = f"{checkpoints[-1]}d" if checkpoints else None
    head = [f"{c}·d" for c in checkpoints] + ["AUC"] + [f"d={d} at {last}" for d in dims]
    lines = ["| solver | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, s in solvers.items():
        cells = [f"{s['at'][f'{c}d']:.3f}" for c in checkpoints] + [f"{s['auc']:.3f}"]
        cells += [f"{s['by_dim'][d]['at'][last]:.3f}" if last else "" for d in dims]
        errors = f" ({s['errors']} runs raised)" if s["errors"] else ""
        lines.append(f"| {name}{errors} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def source_digest() -> str:
    """A digest of zoopt's sources: which tree the numbers are of (the library changes)."""
    root = Path(zoopt.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 5])
    ap.add_argument("--instances", type=_ranges, default="1", help="e.g. 1-3 or 1,2,5")
    ap.add_argument("--functions", type=_ranges, default="1-24", help="e.g. 1-24 or 1,8,15")
    ap.add_argument("--budget-multiplier", type=int, default=100, help="budget = this × d")
    ap.add_argument("--solvers", nargs="+", default=None, choices=sorted(SOLVERS))
    ap.add_argument("--out", default="runs/bbob", help="folder of the data, plot and JSON")
    ap.add_argument("--jobs", type=int, default=1, help="solvers run at once (processes)")
    ap.add_argument("--cocopp", action="store_true", help="also run COCO's post-processing")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table after the JSON")
    ap.add_argument(
        "--from-coco",
        action="store_true",
        help="run nothing: score the COCO data already in OUT/exdata (the latest folder of "
        "each solver; --dims/--instances/--functions are not applied)",
    )
    args = ap.parse_args(argv)
    if args.budget_multiplier < 1 or min(args.dims) < 1 or args.jobs < 1:
        ap.error("--budget-multiplier, --dims and --jobs must be positive")
    solvers = args.solvers or [s for s in SOLVERS if available(s)]
    missing = [s for s in solvers if not available(s)]
    if missing:
        ap.error(f"not installed for {missing}: pip install -e '.[bench]'")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    options = suite_options(args.dims, args.instances, args.functions)
    t0 = time.perf_counter()
    digest = source_digest()  # now: the tree that runs (the files may change meanwhile)
    rows: list[dict] = []
    if args.from_coco:
        for s in solvers:
            found = sorted((out / "exdata").glob(f"{s}*"), key=lambda p: p.stat().st_mtime)
            rows += rows_from_coco(found[-1], s, args.budget_multiplier) if found else []
        solvers = [s for s in solvers if any(r["solver"] == s for r in rows)]
    # solvers run in forked processes (even with --jobs 1): those end with os._exit, so a
    # solver's leftover non-daemon thread (nevergrad's recaster after an exception in its
    # meta-model) cannot hang the run at exit
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = [
            pool.submit(run_solver, s, options, args.budget_multiplier, str(out))
            for s in ([] if args.from_coco else solvers)
        ]
        for fut in futures:
            rows += fut.result()
    (out / "runs.json").write_text(json.dumps(rows) + "\n")
    plot(rows, solvers, args.budget_multiplier, out / "bbob_ecdf.png")
    summary = {
        "benchmark": "bbob",
        "suite_options": "from COCO data" if args.from_coco else options,
        "budget_multiplier": args.budget_multiplier,
        "targets": "f* + 10^k, k = 2 … -8 (51)",
        "zoopt_version": getattr(zoopt, "__version__", None),
        "zoopt_source_sha256": digest,
        "python": platform.python_version(),
        "wall_s": round(time.perf_counter() - t0, 1),
        **summarize(rows, solvers, args.budget_multiplier),
        "plot": str(out / "bbob_ecdf.png"),
        "coco_data": str(out / "exdata"),
    }
    if args.cocopp:
        error = run_cocopp(out, solvers)
        summary["cocopp"] = str(out / "ppdata") if error is None else f"failed: {error}"
    text = json.dumps(summary, indent=2)
    (out / "summary.json").write_text(text + "\n")
    print(text)
    if args.markdown:
        print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
