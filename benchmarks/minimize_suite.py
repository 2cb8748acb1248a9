"""``zoopt.minimize`` with its defaults against scipy, nevergrad and pycma, on six problems.

Problems (each with a known minimum f*): ``sphere`` (shifted), ``rotated_quadratic``
(condition number 10³, log-spaced eigenvalues, a dense random rotation built from two
orthonormal DCTs and random signs), ``rosenbrock``, ``logistic`` (ℓ2-regularized logistic
regression on 200 random samples; f* from a tight exact-gradient solve),
``l1_least_squares`` (lasso on 200 samples; f* from 20,000 FISTA iterations) and
``rastrigin`` (shifted). Dimensions 10, 100, 1000; budgets 20·d and 200·d queries; a seed
draws the instance (shift, rotation, data) and x0.

Every method's queries go through one independent counter: each point counts 1 (a batch of
n points counts n); past the budget the counter raises and the method is stopped; the
score is the **best value among the first B queries**, minus f*. Methods, all with their
defaults:

* ``zoopt``: ``zoopt.minimize(f, x0, max_queries=B, batched=True, seed=s)``;
* ``lbfgsb``: ``scipy.optimize.minimize(f, x0, method="L-BFGS-B", options={"maxfun": B})``
  (finite-difference gradients, ``jac=None``);
* ``ngopt``, ``ng_cma``: nevergrad's ``NGOpt`` and ``CMA`` with ``budget=B``;
* ``pycma``: ``cma.fmin2(f, x0, 1.0, {"maxfevals": B})``.

Run (``pip install -e ".[bench]"`` for nevergrad and cma; a missing one is skipped)::

    python benchmarks/minimize_suite.py --json-out benchmarks/results/minimize_suite.json \\
        --markdown

``--dims``, ``--budgets``, ``--seeds``, ``--problems``, ``--methods`` select a part; rank
and win rate need every method in a cell. A method's run that takes longer than
``--max-seconds`` is cut there (its best value so far counts; reported in the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import zoopt

# ---------------------------------------------------------------------------------------
# Problems: batched functions f(X) -> (n,), with f* known
# ---------------------------------------------------------------------------------------
#: samples of the logistic and lasso problems (a query costs SAMPLES·d multiply-adds)
SAMPLES = 200


@dataclass
class Problem:
    name: str
    d: int
    f: Callable[[np.ndarray], np.ndarray]  # (n, d) -> (n,)
    x0: np.ndarray
    f_star: float


def sphere(d: int, rng: np.random.Generator) -> Problem:
    c = rng.uniform(-1, 1, d)
    return Problem("sphere", d, lambda X: np.sum((X - c) ** 2, axis=1), np.zeros(d), 0.0)


def rotated_quadratic(d: int, rng: np.random.Generator) -> Problem:
    # A dense random rotation applied in O(d log d), so that scalar-query methods are not
    # timed on a d×d product: Q = S₁·C·S₂·C with C the orthonormal DCT-II and S random signs.
    from scipy.fft import dct

    s1, s2 = rng.choice([-1.0, 1.0], d), rng.choice([-1.0, 1.0], d)
    scale = np.sqrt(np.logspace(0, 3, d))  # eigenvalues 1 … 1000: condition number 10³
    c = rng.uniform(-1, 1, d)

    def f(X: np.ndarray) -> np.ndarray:  # ½ (x−c)ᵀ Q diag(λ) Qᵀ (x−c)
        Z = dct(s2 * dct(s1 * (X - c), type=2, norm="ortho", axis=1), norm="ortho", axis=1)
        Z = Z * scale
        return 0.5 * np.sum(Z * Z, axis=1)

    return Problem("rotated_quadratic", d, f, np.zeros(d), 0.0)


def rosenbrock(d: int, rng: np.random.Generator) -> Problem:
    def f(X: np.ndarray) -> np.ndarray:
        a, b = X[:, :-1], X[:, 1:]
        return np.sum(100.0 * (b - a * a) ** 2 + (1 - a) ** 2, axis=1)

    return Problem("rosenbrock", d, f, rng.uniform(-0.5, 0.5, d), 0.0)


def logistic(d: int, rng: np.random.Generator) -> Problem:
    n, lam = SAMPLES, 1e-3
    A = rng.standard_normal((n, d)) / np.sqrt(d)
    w = rng.standard_normal(d)
    y = np.where(A @ w + 0.5 * rng.standard_normal(n) > 0, 1.0, -1.0)
    Ay = A * y[:, None]

    def f(X: np.ndarray) -> np.ndarray:
        return np.mean(np.logaddexp(0.0, -(X @ Ay.T)), axis=1) + 0.5 * lam * np.sum(X * X, 1)

    def f_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        m = Ay @ x
        sig = 0.5 * (1 - np.tanh(0.5 * m))  # σ(−m), overflow-free
        return float(f(x[None])[0]), -(Ay.T @ sig) / n + lam * x

    from scipy.optimize import minimize as sp_minimize

    tight = sp_minimize(
        f_and_grad, np.zeros(d), jac=True, method="L-BFGS-B",
        options={"maxiter": 100_000, "gtol": 1e-13, "ftol": 1e-16, "maxcor": 50},
    )  # fmt: skip
    return Problem("logistic", d, f, np.zeros(d), float(tight.fun))


def l1_least_squares(d: int, rng: np.random.Generator) -> Problem:
    n, lam = SAMPLES, 0.05
    A = rng.standard_normal((n, d)) / np.sqrt(n)
    x_true = np.where(rng.random(d) < 0.1, rng.standard_normal(d), 0.0)
    b = A @ x_true + 0.01 * rng.standard_normal(n)

    def f(X: np.ndarray) -> np.ndarray:
        R = X @ A.T - b
        return 0.5 * np.sum(R * R, axis=1) + lam * np.sum(np.abs(X), axis=1)

    # f*: FISTA with step 1/L, L = ‖A‖₂²
    L = float(np.linalg.norm(A, 2) ** 2)
    x = z = np.zeros(d)
    t = 1.0
    for _ in range(20_000):
        g = A.T @ (A @ z - b)
        u = z - g / L
        x_new = np.sign(u) * np.maximum(np.abs(u) - lam / L, 0.0)
        t_new = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
        z = x_new + (t - 1) / t_new * (x_new - x)
        x, t = x_new, t_new
    return Problem("l1_least_squares", d, f, np.zeros(d), float(f(x[None])[0]))


def rastrigin(d: int, rng: np.random.Generator) -> Problem:
    c = rng.uniform(-2, 2, d)

    def f(X: np.ndarray) -> np.ndarray:
        Z = X - c
        return 10.0 * d + np.sum(Z * Z - 10.0 * np.cos(2 * np.pi * Z), axis=1)

    return Problem("rastrigin", d, f, np.zeros(d), 0.0)


PROBLEMS = {
    p.__name__: p
    for p in (sphere, rotated_quadratic, rosenbrock, logistic, l1_least_squares, rastrigin)
}


# ---------------------------------------------------------------------------------------
# The independent counter
# ---------------------------------------------------------------------------------------
class Exhausted(Exception):
    """The budget is spent: stop the method (not an error of the method)."""


class Counter:
    """Counts every point; keeps the best value among the first ``budget`` queries."""

    def __init__(self, problem: Problem, budget: int, max_seconds: float):
        self.p, self.budget = problem, budget
        self.count = 0
        self.best = math.inf
        self.deadline = time.perf_counter() + max_seconds
        self.timed_out = False

    def batch(self, X: Any) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        X = X.reshape(-1, self.p.d)
        n = X.shape[0]
        room = self.budget - self.count
        if room <= 0:
            raise Exhausted
        if time.perf_counter() > self.deadline:
            self.timed_out = True
            raise Exhausted
        values = self.p.f(X)
        self.count += n
        counted = values[: max(0, room)]  # queries beyond the budget do not count
        if counted.size:
            finite = counted[np.isfinite(counted)]
            if finite.size:
                self.best = min(self.best, float(np.min(finite)))
        if n > room:
            raise Exhausted
        return values

    def scalar(self, x: Any) -> float:
        return float(self.batch(np.asarray(x, dtype=np.float64)[None, :])[0])


# ---------------------------------------------------------------------------------------
# Methods (defaults only)
# ---------------------------------------------------------------------------------------
def run_zoopt(c: Counter, seed: int) -> None:
    zoopt.minimize(c.batch, c.p.x0, max_queries=c.budget, batched=True, seed=seed)


def run_lbfgsb(c: Counter, seed: int) -> None:
    from scipy.optimize import minimize as sp_minimize

    sp_minimize(c.scalar, c.p.x0, method="L-BFGS-B", options={"maxfun": c.budget})


def _nevergrad(c: Counter, seed: int, name: str) -> None:
    import nevergrad as ng

    param = ng.p.Array(init=c.p.x0.copy())
    param.random_state = np.random.RandomState(seed)
    opt = ng.optimizers.registry[name](parametrization=param, budget=c.budget, num_workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.minimize(c.scalar)


def run_ngopt(c: Counter, seed: int) -> None:
    _nevergrad(c, seed, "NGOpt")


def run_ng_cma(c: Counter, seed: int) -> None:
    _nevergrad(c, seed, "CMA")


def run_pycma(c: Counter, seed: int) -> None:
    import cma

    opts = {"maxfevals": c.budget, "seed": seed + 1, "verbose": -9}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cma.fmin2(c.scalar, c.p.x0, 1.0, opts)


METHODS: dict[str, Callable[[Counter, int], None]] = {
    "zoopt": run_zoopt,
    "lbfgsb": run_lbfgsb,
    "ngopt": run_ngopt,
    "ng_cma": run_ng_cma,
    "pycma": run_pycma,
}
OPTIONAL = {"ngopt": "nevergrad", "ng_cma": "nevergrad", "pycma": "cma"}


def available(method: str) -> bool:
    module = OPTIONAL.get(method)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def one_run(problem: Problem, method: str, budget: int, seed: int, max_seconds: float) -> dict:
    c = Counter(problem, budget, max_seconds)
    t0 = time.perf_counter()
    error = None
    try:
        METHODS[method](c, seed)
    except Exhausted:
        pass
    except Exception as exc:  # a method that crashes scores what it found before
        error = f"{type(exc).__name__}: {exc}"
    gap = max(c.best - problem.f_star, 0.0) if math.isfinite(c.best) else math.inf
    return {
        "problem": problem.name,
        "d": problem.d,
        "budget": budget,
        "seed": seed,
        "method": method,
        "gap": gap,
        "queries": min(c.count, budget),
        "seconds": round(time.perf_counter() - t0, 3),
        "timed_out": c.timed_out,
        "error": error,
    }


# ---------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------
def summarize(rows: list[dict], methods: list[str]) -> dict:
    """Per cell (problem, d, budget): the mean gap over seeds per method and the goal test
    (zoopt's mean gap ≤ 1.1 × L-BFGS-B's, or both ≤ 1e-8). Ranks are per run (cell and
    seed) among the methods, counted only where all of them ran; ties share the mean rank."""
    cells: dict[tuple, dict[str, list[float]]] = {}
    runs: dict[tuple, dict[str, float]] = {}
    timed_out: dict[tuple, set[str]] = {}
    for r in rows:
        key = (r["problem"], r["d"], r["budget"])
        cells.setdefault(key, {}).setdefault(r["method"], []).append(r["gap"])
        if r.get("timed_out"):
            timed_out.setdefault(key, set()).add(r["method"])
        runs.setdefault(key + (r["seed"],), {})[r["method"]] = r["gap"]
    ranks: dict[str, list[float]] = {m: [] for m in methods}
    ranked_runs = 0
    for gaps in runs.values():
        if not all(m in gaps for m in methods):
            continue
        ranked_runs += 1
        values = sorted(_rounded(gaps[m]) for m in methods)
        for m in methods:
            same = [i for i, v in enumerate(values) if v == _rounded(gaps[m])]
            ranks[m].append(1 + float(np.mean(same)))
    table = []
    wins = total = 0
    for key in sorted(cells, key=lambda k: (list(PROBLEMS).index(k[0]), k[1], k[2])):
        gaps = {m: float(np.mean(v)) for m, v in cells[key].items()}
        seeds = {m: len(v) for m, v in cells[key].items()}
        row = {"problem": key[0], "d": key[1], "budget": key[2], "gap": gaps, "seeds": seeds}
        row["timed_out"] = sorted(timed_out.get(key, ()))
        if "zoopt" in gaps and "lbfgsb" in gaps:
            z, s = gaps["zoopt"], gaps["lbfgsb"]
            ok = z <= 1.1 * s or (z <= 1e-8 and s <= 1e-8)
            row["zoopt_matches_lbfgsb"] = ok
            wins += ok
            total += 1
        table.append(row)
    return {
        "cells": table,
        "zoopt_matches_lbfgsb": f"{wins}/{total}",
        "zoopt_matches_lbfgsb_fraction": wins / total if total else math.nan,
        "mean_rank": {m: float(np.mean(v)) for m, v in ranks.items() if v},
        "ranked_runs": ranked_runs,
    }


def _rounded(gap: float) -> float:
    """Gaps below 1e-8 count as solved (equal); others compare to 3 significant digits."""
    if gap <= 1e-8:
        return 0.0
    return float(f"{gap:.3g}")


def markdown(summary: dict, methods: list[str]) -> str:
    head = "| problem | d | B | " + " | ".join(methods) + " | zoopt ≤ 1.1× L-BFGS-B |"
    lines = [head, "|" + "---|" * (len(methods) + 4)]
    for row in summary["cells"]:
        gaps = row["gap"]
        cells = []
        best = min(_rounded(g) for g in gaps.values())
        for m in methods:
            if m not in gaps:
                cells.append("–")
                continue
            text = f"{gaps[m]:.2g}"
            if m in row.get("timed_out", ()):
                text += "†"  # cut at --max-seconds: its best value by then
            if row["seeds"][m] < max(row["seeds"].values()):
                text += f" ({row['seeds'][m]} seed{'s' if row['seeds'][m] > 1 else ''})"
            cells.append(f"**{text}**" if _rounded(gaps[m]) == best else text)
        ok = row.get("zoopt_matches_lbfgsb")
        mark = "–" if ok is None else ("yes" if ok else "no")
        budget = f"{row['budget'] // row['d']}d"
        lines.append(
            f"| {row['problem']} | {row['d']} | {budget} | " + " | ".join(cells) + f" | {mark} |"
        )
    ranks = ", ".join(
        f"{m} {r:.2f}" for m, r in sorted(summary["mean_rank"].items(), key=lambda kv: kv[1])
    )
    lines.append("")
    lines.append(
        f"zoopt ≤ 1.1× L-BFGS-B's mean gap (or both ≤ 1e-8): {summary['zoopt_matches_lbfgsb']} "
        f"cells. Mean rank over the {summary['ranked_runs']} runs where all five ran "
        f"(1 = best): {ranks}. † = cut at --max-seconds (scored by its best value by then)."
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument("--dims", nargs="+", type=int, default=[10, 100, 1000])
    ap.add_argument("--budgets", nargs="+", type=int, default=[20, 200], help="multiples of d")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--max-seconds", type=float, default=300.0, help="cap per run (wall)")
    ap.add_argument("--json-out", default=None, help="write rows + summary to this file")
    ap.add_argument("--markdown", action="store_true", help="print the Markdown table")
    ap.add_argument("--progress", action="store_true", help="one line per run on stderr")
    ap.add_argument(
        "--merge", nargs="+", default=None, help="summarize the rows of these JSON outputs"
    )
    args = ap.parse_args()
    methods = [m for m in args.methods if available(m)]
    skipped = sorted(set(args.methods) - set(methods))
    rows = []
    if args.merge:
        for path in args.merge:
            with open(path) as fh:
                rows += json.load(fh)["rows"]
        args.problems, args.dims, args.budgets = [], [], []  # nothing new to run
    for name in args.problems:
        for d in args.dims:
            for seed in args.seeds:
                problem = PROBLEMS[name](d, np.random.default_rng([seed, d]))
                for mult in args.budgets:
                    for method in methods:
                        row = one_run(problem, method, mult * d, seed, args.max_seconds)
                        rows.append(row)
                        if args.progress:
                            print(json.dumps(row), file=sys.stderr, flush=True)
    summary = summarize(rows, methods)
    out = {
        "benchmark": "minimize_suite",
        "python": platform.python_version(),
        "zoopt": zoopt.__version__ if hasattr(zoopt, "__version__") else None,
        "skipped_methods": skipped,
        "args": vars(args),
        "summary": summary,
        "rows": rows,
    }
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(out, fh, indent=1)
    print(json.dumps({k: out["summary"][k] for k in ("zoopt_matches_lbfgsb", "mean_rank")}))
    if args.markdown:
        print(markdown(summary, methods))


if __name__ == "__main__":
    main()
