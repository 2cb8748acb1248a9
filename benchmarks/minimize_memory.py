"""Peak memory of ``zoopt.minimize``'s default method as d grows (issue 24: O(m·d)).

Each run is its own process: the interpreter imports numpy and zoopt, notes its peak RSS
(``ru_maxrss``, the baseline), then runs ``zoopt.minimize(sphere, zeros(d),
max_queries=5·d, batched=True)`` and reports the peak RSS above that baseline. Goal: at
d = 100,000 at most 0.3 GB (L-BFGS keeps m = 10 pairs of d-vectors, 16 MB at d = 100,000;
finite-difference points are built in chunks under ``max_batch_bytes``, 16 MiB).

Run::

    python benchmarks/minimize_memory.py --dims 1000 10000 100000 --json-out mem.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np
import zoopt

d, batched = int(sys.argv[1]), sys.argv[2] == "1"
c = np.linspace(-1, 1, d)
if batched:
    f = lambda X: np.sum((X - c) ** 2, axis=1)
else:
    f = lambda x: float(np.sum((x - c) ** 2))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
t0 = time.perf_counter()
res = zoopt.minimize(f, np.zeros(d), max_queries=5 * d, batched=batched, seed=0)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({
    "d": d, "batched": batched, "baseline_mb": base / 1024, "peak_above_baseline_mb": (peak - base) / 1024,
    "seconds": seconds, "nfev": int(res.nfev), "fun": float(res.fun), "status": int(res.status),
    "message": res.message,
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--unbatched", action="store_true", help="fun takes one point at a time")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    rows = []
    for d in args.dims:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(d), "0" if args.unbatched else "1"],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump({"benchmark": "minimize_memory", "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
