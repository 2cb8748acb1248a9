"""Wake-flow black box timings as JSON: solver steps, and one ZO-SOL step of the oracle.

``solver`` records come from :func:`oracles.wake_flow.benchmark_step` (one torch thread, jit,
settled flow, distinct corrections per batch member). The ``zo_step`` record times what one
DeepZero step of ``applications/zo_sol.py`` costs: the unperturbed rollout plus the sparse
CGE queries of the correction CNN through ``n`` unrolled solver steps, all queries of a step
simulated as one solver batch (windows come from the coarse solver itself, so no reference
cache is needed; timing does not depend on the data)::

    python benchmarks/wake_flow.py                      # solver 16x32 and 32x64, batch 1/64
    python benchmarks/wake_flow.py --zo-step --res 16x32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import numpy as np


def zo_step_timing(
    res: tuple[int, int],
    *,
    n_steps: int = 16,
    sparsity: float = 0.95,
    kernel_size: int = 3,
    windows: int = 1,
    repeats: int = 3,
    mu: float = 5e-3,
    seed: int = 0,
) -> dict:
    """Seconds of ``repeats`` ZO steps (base rollout + CGE on a uniform 95%-sparse mask)."""
    import torch

    from applications.sol.model import CorrectionCNN, Normalization
    from applications.sol.oracle import SolverInTheLoopOracle
    from oracles.wake_flow import WakeFlowSimulator
    from zoopt import CGE
    from zoopt import sparsity as sp

    sim = WakeFlowSimulator(res)
    frames = sim.rollout(sim.initial_state(windows), 60 + n_steps, reynolds=200.0)[:, 60:]
    norm = Normalization((1.0, 0.0), (0.3, 0.3), float(np.log(200.0)), 1.0, (0.04, 0.02))
    torch.manual_seed(seed)
    oracle = SolverInTheLoopOracle(CorrectionCNN(norm, kernel_size=kernel_size), sim)
    oracle.set_batch(frames[:, 0], np.full(windows, 200.0), frames[:, 1:])
    x = oracle.view.flatten()
    ratios = sp.uniform_ratios(oracle.view.groups, sparsity)
    mask = sp.DynamicMask(oracle.view.groups, ratios, reshuffle_every=1, seed=seed)
    oracle.eval_coordinate_steps(x, mask.coords(), mu)  # jit traces of both batch sizes
    oracle.base_value(x)
    load_before = os.getloadavg()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fx = oracle.base_value(x)
        CGE(mu=mu).estimate(oracle, x, fx=fx, coords=mask.coords())
        seconds.append(time.perf_counter() - start)
        mask.advance()
    return {
        "record": "zo_step",
        "resolution": list(res),
        "n_steps": n_steps,
        "windows": windows,
        "parameters": oracle.dim,
        "queries_per_step": int(mask.coords().size + 1),
        "seconds_per_step": round(float(np.mean(seconds)), 3),
        "seconds_min": round(float(np.min(seconds)), 3),
        "ms_per_simulated_step": round(
            1e3 * float(np.mean(seconds)) / ((mask.coords().size + 1) * windows * n_steps), 3
        ),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
    }


def _resolution(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", nargs="+", default=["16x32", "32x64"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--zo-step", action="store_true", help="also time one ZO-SOL step")
    ap.add_argument("--res", default="16x32", help="grid of the ZO-SOL step")
    ap.add_argument("--n-steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    import torch

    from oracles.wake_flow import benchmark_step

    torch.set_num_threads(1)
    for r in args.resolutions:
        for b in args.batches:
            result = benchmark_step(_resolution(r), b, n_steps=args.steps)
            print(json.dumps({"record": "solver", **result}), flush=True)
    if args.zo_step:
        result = zo_step_timing(_resolution(args.res), n_steps=args.n_steps, repeats=args.repeats)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
