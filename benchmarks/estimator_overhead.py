"""Overhead of a full CGE estimate over the raw batched oracle calls on the same points.

A vectorized numpy oracle at d = 10 000 (a logistic-regression loss on 256 fixed random
samples: one (n, d) @ (d, 256) product per batch). ``overhead_ratio`` = time of
``CGE.estimate`` / time of calling the oracle on the same, precomputed point batches.

    python benchmarks/estimator_overhead.py --json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import zoopt


def make_oracle(d: int, samples: int, seed: int = 0):
    r = np.random.default_rng(seed)
    A = r.standard_normal((samples, d)) / np.sqrt(d)
    y = np.sign(r.standard_normal(samples))

    def loss(X: np.ndarray) -> np.ndarray:
        margins = (X @ A.T) * y  # (n, samples)
        return np.mean(np.logaddexp(0.0, -margins), axis=1)

    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=10_000)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    fn = make_oracle(args.dim, args.samples)
    x = np.random.default_rng(1).standard_normal(args.dim) * 0.1
    est = zoopt.CGE(mu=1e-4)
    oracle = zoopt.as_oracle(fn, dim=args.dim, batched=True)
    plan = est.plan(x)
    rows = max(1, oracle.max_batch_bytes // (args.dim * 8))
    batches = [plan.points(s, min(s + rows, plan.n)) for s in range(0, plan.n, rows)]

    raw, full = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for B in batches:
            fn(B)
        raw.append(time.perf_counter() - t)
        t = time.perf_counter()
        g = est.estimate(oracle, x)
        full.append(time.perf_counter() - t)
    result = {
        "dim": args.dim,
        "queries": g.queries,
        "chunk_rows": rows,
        "raw_oracle_seconds": min(raw),
        "estimate_seconds": min(full),
        "overhead_ratio": min(full) / min(raw),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
