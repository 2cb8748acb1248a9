"""Sparse-CGE query throughput: naive loop vs block reuse vs the engine (zoopt.torch.engine).

Usage::

    python benchmarks/cge_throughput.py --model resnet20 --batch 32 --sparsity 0.9 --json

The selected coordinates are what sparse CGE queries at that sparsity: every BatchNorm/bias
coordinate (never pruned) plus a uniformly random ``1 - sparsity`` share of the conv/linear
weights. The engine evaluates ``--coords N`` of them drawn uniformly (default 3000, about a
minute on 2 CPU cores; ``--coords 0``: all of them, ~28k for ResNet-20 at 0.9); the naive
loop and block reuse each evaluate a uniform subsample sized to take about
``--budget-s`` seconds. Gradients ``(f(x + mu e_c) - f(x)) / mu`` of each method are compared
on the coordinates they share; a float64 naive run on ``--truth-coords`` of them shows how
much of the float32 difference is float32 rounding of the naive loop itself. ``grad_scale``
is the largest gradient entry over all engine coordinates; ``rel_grad_diff`` divides the
largest engine-vs-naive difference by it.
Inputs are random (throughput does not depend on the data). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", choices=["resnet20", "smallcnn", "cnn8"])
    p.add_argument("--width", type=int, default=16, help="CNN8 width")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument(
        "--coords",
        type=int,
        default=3000,
        help="engine coordinates, a uniform sample of the selected ones (0: all of them)",
    )
    p.add_argument("--budget-s", type=float, default=30.0, help="seconds for naive and block")
    p.add_argument("--truth-coords", type=int, default=24, help="float64 naive coordinates")
    p.add_argument("--mu", type=float, default=5e-3, help="CGE step (DeepZero: 5e-3)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--chunk-bytes", type=int, default=None, help="engine memory cap per chunk")
    p.add_argument("--memory-format", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument(
        "--mac-coords", type=int, default=300, help="coordinates for the MAC count (0: skip)"
    )
    p.add_argument(
        "--steps-per-epoch",
        type=int,
        default=196,
        help="steps of one epoch for the projection (CIFAR-10 at batch 256: 196)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    args = p.parse_args(argv)
    if not 0.0 <= args.sparsity < 1.0:
        p.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.batch < 1:
        p.error(f"--batch must be positive, got {args.batch}")
    if args.rounds < 1:
        p.error(f"--rounds must be positive, got {args.rounds}")
    if args.steps_per_epoch < 1:
        p.error(f"--steps-per-epoch must be positive, got {args.steps_per_epoch}")
    return args


def select_coords(view, sparsity: float, rng: np.random.Generator) -> np.ndarray:
    """Every 'other' coordinate plus a random (1 - sparsity) share of each weight tensor."""
    parts = []
    for g in view.groups:
        idx = np.arange(g.start, g.stop)
        if g.kind == "weight":
            keep = max(1, round((1.0 - sparsity) * g.size))
            idx = np.sort(rng.choice(idx, size=keep, replace=False))
        parts.append(idx)
    return np.concatenate(parts)


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def count_macs(model, engine, block, x, inputs, targets, coords, mu) -> dict:
    """Multiply-accumulates per query in conv/linear layers.

    The full forward and block reuse are counted with forward hooks on the conv/linear
    modules. The engine runs its convolutions and linear layers outside the modules (one-
    channel convs as batched matmuls, rank-one linear updates, dense batches through
    ``F.conv2d``), so its count is its own cost model (``engine.plan_rows``: the same
    multiply-adds, per parameter tensor), averaged over the coordinates. Their ratios are the
    speedups each method would get if time were proportional to conv and linear work alone.
    """
    import numpy as np
    import torch
    from torch import nn

    count = [0]

    def hook(m, inputs, out):
        if isinstance(m, nn.Conv2d):
            count[0] += (
                out.numel() * m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            )
        else:
            count[0] += out.numel() * m.in_features

    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            model(inputs)
        full = count[0]
        count[0] = 0
        block(coords)
        block_macs = (count[0] - full) / coords.size  # less its one unperturbed forward
    finally:
        for h in handles:
            h.remove()
    engine.base_forward(x, inputs, targets)
    shares = np.array([r["cost_per_query"] for r in engine.plan_rows()])
    groups = engine.view.group_index(coords)
    engine_macs = float(shares[groups].mean()) * full
    return {
        "mac_coords": int(coords.size),
        "macs_full_forward": full,
        "macs_per_query_block_reuse": block_macs,
        "macs_per_query_engine": engine_macs,
        "mac_ceiling_vs_naive": full / engine_macs,
        "mac_ceiling_vs_block_reuse": block_macs / engine_macs,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    from zoopt.torch import (
        SparseCGEEngine,
        block_reuse_coordinate_values,
        build_model,
        naive_coordinate_values,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    channels, size = (1, 8) if args.model == "smallcnn" else (3, 32)
    options = {"width": args.width} if args.model == "cnn8" else {}
    model = build_model(args.model, 10, channels, size, **options).to(args.device).train()
    inputs = torch.randn(args.batch, channels, size, size, device=args.device)
    targets = torch.randint(0, 10, (args.batch,), device=args.device)
    loss_fn = F.cross_entropy
    mu = args.mu

    engine = SparseCGEEngine(
        model, loss_fn, chunk_bytes=args.chunk_bytes, memory_format=args.memory_format
    )
    view = engine.view
    x = view.flatten()
    selected = select_coords(view, args.sparsity, rng)
    coords = selected
    if 0 < args.coords < selected.size:
        coords = np.sort(rng.choice(selected, size=args.coords, replace=False))

    def naive(c):
        return naive_coordinate_values(model, loss_fn, x, c, mu, inputs, targets)

    def block(c):
        return block_reuse_coordinate_values(model, loss_fn, x, c, mu, inputs, targets)

    def plain():
        with torch.no_grad():
            return [model(inputs) for _ in range(3)]

    def engine_step(c):
        engine._key = None  # a new step: the cache forward is part of the engine's cost
        base = engine.base_forward(x, inputs, targets)
        return base, engine.coordinate_values(x, c, mu, inputs, targets)

    # warm-up (allocator, oneDNN primitives), then subsample sizes from a short probe
    plain()
    engine_step(coords[:: max(1, coords.size // 200)])
    engine.stats.update(chunks=0, queries=0, slow_path_queries=0)
    sizes = {}
    for name, fn in (("naive", naive), ("block", block)):
        probe = rng.choice(coords, size=min(4, coords.size), replace=False)
        fn(probe)
        _, t_probe = timed(lambda fn=fn, probe=probe: fn(probe), args.device)
        sizes[name] = int(min(coords.size, max(8, args.budget_s / max(t_probe / 4, 1e-6))))
    naive_sub = np.sort(rng.choice(coords, size=sizes["naive"], replace=False))
    block_sub = np.sort(rng.choice(coords, size=sizes["block"], replace=False))

    # interleaved rounds: the CPU is shared, so load drifts; every method sees each round
    totals = {k: [0, 0.0] for k in ("plain", "engine", "naive", "block")}
    engine_vals, naive_vals, block_vals, engine_base = [], [], [], None
    parts = {
        "engine": np.array_split(coords, args.rounds),
        "naive": np.array_split(naive_sub, args.rounds),
        "block": np.array_split(block_sub, args.rounds),
    }
    for r in range(args.rounds):
        _, t = timed(plain, args.device)
        totals["plain"][0] += 3
        totals["plain"][1] += t
        (engine_base, vals), t = timed(lambda r=r: engine_step(parts["engine"][r]), args.device)
        engine_vals.append(vals)
        totals["engine"][0] += parts["engine"][r].size
        totals["engine"][1] += t
        for name, fn, out in (("naive", naive, naive_vals), ("block", block, block_vals)):
            vals, t = timed(lambda fn=fn, name=name, r=r: fn(parts[name][r]), args.device)
            out.append(vals)
            totals[name][0] += parts[name][r].size
            totals[name][1] += t
    qps = {k: n / t for k, (n, t) in totals.items()}
    engine_vals = torch.cat(engine_vals)
    naive_vals = torch.cat(naive_vals)
    block_vals = torch.cat(block_vals)
    naive_base = float(naive_coordinate_values(model, loss_fn, x, [0], 0.0, inputs, targets)[0])

    pos = {int(c): i for i, c in enumerate(coords)}

    def grads(vals, base):
        return (vals.double().cpu() - base) / mu

    def engine_grads_on(sub):
        return grads(engine_vals[[pos[int(c)] for c in sub]], engine_base)

    g_naive = grads(naive_vals, naive_base)
    g_engine_on_naive = engine_grads_on(naive_sub)
    # the scale of the gradient being estimated: its largest entry over all coordinates
    grad_scale = float(grads(engine_vals, engine_base).abs().max())
    max_diff = float((g_naive - g_engine_on_naive).abs().max())
    max_diff_block = float((grads(block_vals, naive_base) - engine_grads_on(block_sub)).abs().max())

    # float64 truth on a few coordinates: how far is each float32 method from exact?
    truth = {}
    if args.truth_coords > 0:
        tc = naive_sub[: args.truth_coords]
        m64 = build_model(args.model, 10, channels, size, **options).to(args.device).double()
        m64.load_state_dict(model.state_dict())
        m64.train()
        x64, in64 = x.double(), inputs.double()
        base64 = float(naive_coordinate_values(m64, loss_fn, x64, [0], 0.0, in64, targets)[0])
        # perturb by the step float32 actually takes, so all three evaluate the same point
        steps32 = ((x[tc] + mu) - x[tc]).double().tolist()
        vals64 = [
            naive_coordinate_values(m64, loss_fn, x64, [c], s, in64, targets)[0]
            for c, s in zip(tc.tolist(), steps32, strict=True)
        ]
        g64 = (torch.stack(vals64).cpu() - base64) / mu
        n = len(tc)
        truth = {
            "truth_coords": n,
            "naive_float32_error": float((g_naive[:n] - g64).abs().max()),
            "engine_float32_error": float((g_engine_on_naive[:n] - g64).abs().max()),
        }

    memory = {}
    if args.device == "cuda":  # peak GPU memory of one engine step and one training step
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        engine_step(coords)
        torch.cuda.synchronize()
        memory["gpu_peak_bytes_engine_step"] = torch.cuda.max_memory_allocated() - before
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss_fn(model(inputs), targets).backward()
        torch.cuda.synchronize()
        memory["gpu_peak_bytes_train_step"] = torch.cuda.max_memory_allocated() - before
        model.zero_grad(set_to_none=True)

    macs = {}
    if args.mac_coords > 0:
        sub = np.sort(rng.choice(coords, size=min(args.mac_coords, coords.size), replace=False))
        macs = count_macs(model, engine, block, x, inputs, targets, sub, mu)

    result = {
        "model": args.model if args.model != "cnn8" else f"cnn8-w{args.width}",
        "params": view.dim,
        "batch": args.batch,
        "sparsity": args.sparsity,
        "selected_coords": int(selected.size),
        "engine_coords": int(coords.size),
        "naive_coords": int(naive_sub.size),
        "block_coords": int(block_sub.size),
        "naive_qps": qps["naive"],
        "block_reuse_qps": qps["block"],
        "engine_qps": qps["engine"],
        "plain_forward_qps": qps["plain"],
        "engine_vs_naive": qps["engine"] / qps["naive"],
        "engine_vs_block_reuse": qps["engine"] / qps["block"],
        "engine_seconds": totals["engine"][1],
        # one DeepZero step = every selected coordinate + the unperturbed loss; projected from
        # the measured rates (the optimizer update and data loading are not included)
        "step_seconds_engine": (selected.size + 1) / qps["engine"],
        "step_seconds_naive": (selected.size + 1) / qps["naive"],
        "steps_per_epoch": args.steps_per_epoch,
        "epoch_seconds_engine": args.steps_per_epoch * (selected.size + 1) / qps["engine"],
        "epoch_seconds_naive": args.steps_per_epoch * (selected.size + 1) / qps["naive"],
        "rounds": args.rounds,
        "max_abs_grad_diff": max_diff,
        "max_abs_grad_diff_block": max_diff_block,
        "grad_scale": grad_scale,
        "grad_scale_naive_coords": float(g_naive.abs().max()),
        "rel_grad_diff": max_diff / grad_scale if grad_scale > 0 else float("nan"),
        **truth,
        **memory,
        **macs,
        "mu": mu,
        "engine_chunks": engine.stats["chunks"],
        "engine_slow_path_queries": engine.stats["slow_path_queries"],
        "chunk_bytes": engine.chunk_bytes,
        "memory_format": engine.memory_format,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
