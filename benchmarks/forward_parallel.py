"""Forward parallelization: one sparse-CGE gradient step split across Dask workers.

For each worker count: a local Dask cluster (one thread per worker), a
:class:`~zoopt.parallel.ParallelOracle` over a :class:`~zoopt.torch.oracle.ModuleOracle`
of the model, and the time of ``CGE(mu).estimate(oracle, x, fx=fx, coords=coords)`` — the
gradient of one DeepZero step on a fixed batch (synthetic CIFAR-shaped data: nothing is
downloaded) with a per-layer uniform random mask (weights at ``--sparsity``, BatchNorm
parameters and biases always kept, as the trainer does). Set-up (starting the cluster,
building the replicas, measuring the group costs) is timed separately.

``cpu_capacity`` says how many cores the workers actually got at that moment: the same
pure-Python busy loop on all workers at once vs. alone in this process. On a shared machine
a wall-clock speedup can only be read against it. ``cpu_time_speedup_vs_1_worker``
compares the steps' critical paths in CPU time (the slowest worker's CPU seconds): the
speedup with a core per worker (memory stalls included, waiting for a shared core not).

Also measured once: the same gradient by the single-process engine in this process with
``--threads`` torch threads, which is the reference for ``max_abs_grad_diff``.

    python benchmarks/forward_parallel.py --workers 1 2 --json
    python benchmarks/forward_parallel.py --workers 1 2 --sparsity 0.99 --repeats 3 --json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from zoopt import CGE
from zoopt import sparsity as sp
from zoopt.parallel import ParallelOracle, connect
from zoopt.torch.models import build_model
from zoopt.torch.oracle import ModuleOracle


def spin(iterations: int) -> float:
    """Pure-Python busy loop (cache-resident): seconds it took."""
    t0 = time.perf_counter()
    total = 0
    for i in range(iterations):
        total += i
    return time.perf_counter() - t0


def log(msg: str) -> None:
    print(f"[forward_parallel] {msg}", file=sys.stderr, flush=True)


def make_problem(args: argparse.Namespace) -> tuple[ModuleOracle, torch.Tensor, tuple, np.ndarray]:
    """The model's oracle (batch set), its parameters, the batch and the step's coordinates."""
    torch.manual_seed(args.seed)
    options = {"width": args.width} if args.model == "cnn8" else {}
    model = build_model(args.model, num_classes=10, in_channels=3, image_size=32, **options)
    chunk_bytes = None if args.chunk_mib is None else int(args.chunk_mib * 2**20)
    oracle = ModuleOracle(model.train(), F.cross_entropy, max_batch_bytes=chunk_bytes)
    g = torch.Generator().manual_seed(args.seed)
    batch = (
        torch.randn(args.batch, 3, 32, 32, generator=g),
        torch.randint(0, 10, (args.batch,), generator=g),
    )
    oracle.set_batch(*batch)
    groups = oracle.view.groups
    mask = sp.DynamicMask(
        groups, sp.uniform_ratios(groups, args.sparsity), reshuffle_every=1, seed=args.seed
    )
    return oracle, oracle.view.flatten(), batch, mask.coords()


def single_process(args: argparse.Namespace, oracle: ModuleOracle, x, coords) -> dict:
    torch.set_num_threads(args.threads)
    fx = oracle.base_value(x)
    t0, c0 = time.perf_counter(), time.process_time()
    grad = CGE(mu=args.mu).estimate(oracle, x, fx=fx, coords=coords).grad
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    log(f"single process ({args.threads} thread(s)): {seconds:.2f} s, {cpu:.2f} CPU s")
    return {
        "threads": args.threads,
        "step_seconds": seconds,
        "step_cpu_seconds": cpu,
        "grad": grad,
        "fx": fx,
    }


def parallel_run(
    args: argparse.Namespace, workers: int, template: ModuleOracle, batch, x, coords, ref
) -> dict:
    t0 = time.perf_counter()
    with connect(workers) as client:
        # How many cores the workers really get right now (the machine is shared): the same
        # busy loop on every worker at once; capacity = workers * alone / slowest.
        spin_seconds = list(client.run(spin, args.spin).values())
        local = ModuleOracle(
            copy.deepcopy(template.module),
            F.cross_entropy,
            max_batch_bytes=template.engine.chunk_bytes,
        )
        # the workers' replicas come from local.replica_factory(): a copy of its model
        with ParallelOracle(local, client, timeout=args.timeout) as oracle:
            oracle.set_batch(*batch)
            fx = oracle.base_value(x)
            t1 = time.perf_counter()
            oracle.calibrate(x, coords, args.mu)
            setup = {
                "cluster_seconds": t1 - t0,
                "calibration_seconds": time.perf_counter() - t1,
                "calibration_queries": oracle.calibration_queries,
            }
            steps, chunks, diff = [], [], None
            for r in range(args.repeats):
                # a new x each step, as in training (workers redo their base forward)
                xr = x if r == 0 else x + 1e-4 * r * torch.ones_like(x)
                t = time.perf_counter()
                grad = CGE(mu=args.mu).estimate(oracle, xr, fx=fx, coords=coords).grad
                steps.append(time.perf_counter() - t)
                chunks.append(oracle.last_call)
                if r == 0:
                    diff = float((grad - ref["grad"]).abs().max())
                log(f"{workers} worker(s), step {r}: {steps[-1]:.2f} s")
    worker_seconds = [c["worker_seconds"] for c in chunks]
    worker_cpu = [c["worker_cpu_seconds"] for c in chunks]
    return {
        "workers": workers,
        "step_seconds": steps,
        "step_seconds_median": statistics.median(steps),
        "max_abs_grad_diff": diff,
        "fx_diff": abs(fx - ref["fx"]),
        "chunk_sizes": chunks[0]["chunk_sizes"],
        "worker_compute_seconds": worker_seconds,
        "worker_cpu_seconds": worker_cpu,
        # slowest worker / mean worker (wall, and CPU time = work): 1.0 is a perfect split
        "imbalance": [max(w) / (sum(w) / len(w)) for w in worker_seconds],
        "cpu_imbalance": [max(w) / (sum(w) / len(w)) for w in worker_cpu],
        # the step's critical path in CPU time: what a step would take if every worker had
        # a core to itself (memory stalls included, waiting for a shared core excluded)
        "critical_path_cpu_seconds": statistics.median(max(w) for w in worker_cpu),
        "spin_seconds": spin_seconds,
        **setup,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model", default="resnet20", choices=["resnet20", "cnn8", "smallcnn"])
    ap.add_argument("--width", type=int, default=16, help="cnn8 width")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--mu", type=float, default=5e-3)
    ap.add_argument("--repeats", type=int, default=1, help="timed steps per worker count")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the reference")
    ap.add_argument("--timeout", type=float, default=None, help="per-call timeout (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spin", type=int, default=20_000_000, help="busy-loop iterations")
    ap.add_argument(
        "--chunk-mib",
        type=float,
        default=None,
        help="engine memory cap per query chunk (MiB; default: the engine's CPU default)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if any(w < 1 for w in args.workers) or args.repeats < 1 or args.batch < 1:
        ap.error("--workers, --repeats and --batch must be >= 1")

    alone = spin(args.spin)
    oracle, x, batch, coords = make_problem(args)
    log(f"{args.model}: d={oracle.dim}, batch={args.batch}, {coords.size} coordinates per step")
    ref = single_process(args, oracle, x, coords)
    runs = [parallel_run(args, n, oracle, batch, x, coords, ref) for n in args.workers]
    one = next((r for r in runs if r["workers"] == 1), None)
    for r in runs:
        r["speedup_vs_1_worker"] = (
            None if one is None else one["step_seconds_median"] / r["step_seconds_median"]
        )
        r["cpu_time_speedup_vs_1_worker"] = (
            None
            if one is None
            else one["critical_path_cpu_seconds"] / r["critical_path_cpu_seconds"]
        )
        r["cpu_capacity"] = r["workers"] * alone / max(r["spin_seconds"])
    result = {
        "model": args.model,
        "parameters": oracle.dim,
        "batch": args.batch,
        "sparsity": args.sparsity,
        "coordinates": int(coords.size),
        "chunk_bytes": oracle.engine.chunk_bytes,
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "torch": torch.__version__,
        "single_process": {k: v for k, v in ref.items() if k not in ("grad", "fx")},
        "runs": runs,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for r in runs:
            print(
                f"{r['workers']} worker(s): {r['step_seconds_median']:.2f} s/step, "
                f"speedup {r['speedup_vs_1_worker']:.2f}x, "
                f"max |grad diff| {r['max_abs_grad_diff']:.2e}"
            )


if __name__ == "__main__":
    main()
