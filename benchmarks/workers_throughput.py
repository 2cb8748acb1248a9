"""Process workers: queries per second of ``minimize(workers=N)`` on a GIL-bound objective.

The objective is pure Python (a loop over the d coordinates, repeated until one call costs
about ``--call-ms`` milliseconds), so threads cannot run it in parallel; worker processes
can. For each worker count, ``zoopt.minimize`` runs the default method with
``max_queries=--queries`` after a warm-up call (the loky pool is started once and reused);
``queries_per_s`` is the spent queries over the wall time of the run, and
``speedup_vs_1_worker`` its ratio to ``workers=1`` (in-process). ``cpu_capacity`` says how
many cores were free: the same busy loop on 2 processes at once vs. alone; on a shared
machine read a speedup against it (issue #24's goal: ≥ 1.8× with 2 workers on 2 free cores).

    python benchmarks/workers_throughput.py                      # d=100, ~1 ms calls, JSON
    python benchmarks/workers_throughput.py --workers 1 2 4 --queries 4000 --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

import zoopt


def make_objective(d: int, reps: int):
    """Rosenbrock's function in pure Python, computed ``reps`` times: holds the GIL, and a
    run does not converge within the budget (so every run spends it)."""

    def objective(x: np.ndarray) -> float:
        xs = x.tolist()
        total = 0.0
        for _ in range(reps):
            total = 0.0
            for a, b in zip(xs[:-1], xs[1:], strict=True):
                total += 100.0 * (b - a * a) ** 2 + (1.0 - a) ** 2
        return total

    return objective


def calibrate(d: int, call_ms: float) -> tuple[int, float]:
    """Repetitions making one call cost about ``call_ms`` ms, and the measured cost."""
    x = np.zeros(d)
    reps = 1
    while True:
        f = make_objective(d, reps)
        t = time.perf_counter()
        for _ in range(20):
            f(x)
        ms = (time.perf_counter() - t) / 20 * 1e3
        if ms >= call_ms or reps > 10**6:
            return reps, ms
        reps = max(reps + 1, int(reps * call_ms / max(ms, 1e-3)))


def _busy(seconds: float) -> int:
    end, n = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        n += 1
    return n


def cpu_capacity(processes: int = 2, seconds: float = 0.5) -> float:
    """Cores this machine gives ``processes`` busy loops now (2.0: two free cores)."""
    alone = _busy(seconds)
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_busy, [0.05] * processes))  # started
        together = sum(pool.map(_busy, [seconds] * processes))
    return together / alone


def run(f, d: int, workers: int, queries: int) -> dict:
    x0 = np.zeros(d)
    zoopt.minimize(f, x0, workers=workers, max_queries=2 * d + 2, seed=0)  # pool started
    t = time.perf_counter()
    res = zoopt.minimize(f, x0, workers=workers, max_queries=queries, seed=0)
    wall = time.perf_counter() - t
    return {
        "workers": workers,
        "queries": int(res.nfev),
        "wall_s": wall,
        "queries_per_s": res.nfev / wall,
        "fun": float(res.fun),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=100)
    ap.add_argument("--call-ms", type=float, default=1.0, help="target cost of one call")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    reps, ms = calibrate(args.dim, args.call_ms)
    f = make_objective(args.dim, reps)
    rows = [run(f, args.dim, w, args.queries) for w in args.workers]
    base = next((r["queries_per_s"] for r in rows if r["workers"] == 1), rows[0]["queries_per_s"])
    for r in rows:
        r["speedup_vs_1_worker"] = r["queries_per_s"] / base
    result = {
        "benchmark": "workers_throughput",
        "dim": args.dim,
        "call_ms": ms,
        "reps": reps,
        "cpu_count": os.cpu_count(),
        "cpu_capacity": cpu_capacity(max(2, max(args.workers))),
        "python": sys.version.split()[0],
        "rows": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
