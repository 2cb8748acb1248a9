"""Bring-your-own-model benchmark: the engine on models written in other people's styles.

For each model of ``benchmarks/zoo_models.py`` (ResNets in the akamaster, kuangliu and
torchvision styles, VGG-11-BN, MobileNetV2, a ViT with SDPA or nn.MultiheadAttention, an
MLP-Mixer, a model whose forward fx cannot trace, in-place habits, GroupNorm/SiLU/padding
variants, and our own ResNet-20), at batch ``--batch`` in training mode:

* ``engine_qps`` / ``naive_qps``: perturbed-loss evaluations per second of the engine and of
  the per-coordinate full-forward loop, on uniformly random coordinates (interleaved rounds);
* ``slow_share``: share of the engine's queries that reran the whole model; the path counts;
* ``float32_error_engine`` / ``float32_error_naive``: the gradient-estimate error of each
  float32 method against a float64 naive loop at the same (float32-rounded) points, as the
  RMS over ``--truth-coords`` shared coordinates (``*_max``: the largest one);
  ``error_ratio`` = engine / naive RMS (goal <= 1.5; the max over a few dozen coordinates is
  too noisy to compare);
* memory: ``engine_peak_bytes`` (one step: base forward + queries; the per-step activation
  cache plus the largest chunk) and ``train_peak_bytes`` (a plain training forward +
  backward at the same batch), measured as peak RSS growth on CPU (large allocations are
  forced to mmap, so freed memory leaves the RSS) or ``torch.cuda.max_memory_allocated``.

Usage::

    python benchmarks/model_zoo.py --json                      # every model, CPU, 1 thread
    python benchmarks/model_zoo.py --models vit_tiny --device cuda --json

Prints one JSON object: ``{"config": ..., "models": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=None, help="zoo entries (default: all)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--budget-s", type=float, default=8.0, help="seconds per method per model")
    p.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds")
    p.add_argument("--truth-coords", type=int, default=128)
    p.add_argument("--mu", type=float, default=5e-3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="the tiny test-size models (smoke run)")
    p.add_argument(
        "--max-cache-fraction",
        type=float,
        default=None,
        help="cap the engine's activation cache at this fraction of its uncapped size",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch < 1 or args.rounds < 1 or args.budget_s <= 0:
        p.error("--batch and --rounds must be positive, --budget-s > 0")
    return args


def _build(name: str, small: bool, device: str):
    import torch

    sys.path.insert(0, str(HERE))
    from zoo_models import ZOO

    entry = ZOO[name]
    torch.manual_seed(0)
    model = (entry.small if small else entry.factory)().to(device).train()
    shape = entry.small_input_shape if small else entry.input_shape
    return entry, model, shape


def _batch(shape, batch: int, classes: int, device: str, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, *shape, generator=g).to(device)
    targets = torch.randint(0, classes, (batch,), generator=g).to(device)
    return inputs, targets


def _engine(model, inputs, targets, args: argparse.Namespace):
    """The engine, its cache capped at ``--max-cache-fraction`` of the uncapped size."""
    import torch.nn.functional as F

    from zoopt.torch import SparseCGEEngine

    if args.max_cache_fraction is None:
        return SparseCGEEngine(model, F.cross_entropy)
    probe = SparseCGEEngine(model, F.cross_entropy)
    probe.base_forward(probe.view.flatten(), inputs, targets)
    cap = int(probe.cache_bytes * args.max_cache_fraction)
    return SparseCGEEngine(model, F.cross_entropy, max_cache_bytes=cap)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _timed(fn, device: str) -> tuple[object, float]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def measure(name: str, args: argparse.Namespace) -> dict:
    """Speed, paths and float32 exactness of one model."""
    import torch
    import torch.nn.functional as F

    from zoopt.torch import naive_coordinate_values

    entry, model, shape = _build(name, args.small, args.device)
    inputs, targets = _batch(shape, args.batch, entry.num_classes, args.device, args.seed)
    engine = _engine(model, inputs, targets, args)
    view = engine.view
    x = view.flatten()
    rng = np.random.default_rng(args.seed)

    # warm-up (graph build, first cache) and a rate estimate to size the samples
    t_build0 = time.perf_counter()
    engine.base_forward(x, inputs, targets)
    build_s = time.perf_counter() - t_build0
    probe = rng.choice(view.dim, size=min(64, view.dim), replace=False)
    _, t = _timed(lambda: engine.coordinate_values(x, probe, args.mu, inputs, targets), args.device)
    engine_rate = probe.size / max(t, 1e-9)
    _, t = _timed(
        lambda: naive_coordinate_values(
            model, F.cross_entropy, x, probe[:4], args.mu, inputs, targets
        ),
        args.device,
    )
    naive_rate = 4 / max(t, 1e-9)
    per_round = args.budget_s / args.rounds
    n_engine = int(min(view.dim, max(64, engine_rate * per_round)))
    n_naive = int(min(view.dim, max(4, naive_rate * per_round)))
    for key in engine.stats:
        engine.stats[key] = 0

    totals = {"engine": [0, 0.0], "naive": [0, 0.0]}
    for _ in range(args.rounds):
        coords = rng.choice(view.dim, size=n_engine, replace=False)

        def engine_step(c=coords):
            engine._key = None  # a new step: the cached forward is part of the engine's cost
            engine.base_forward(x, inputs, targets)
            return engine.coordinate_values(x, c, args.mu, inputs, targets)

        _, t = _timed(engine_step, args.device)
        totals["engine"][0] += coords.size + 1
        totals["engine"][1] += t
        coords = rng.choice(view.dim, size=n_naive, replace=False)
        _, t = _timed(
            lambda c=coords: naive_coordinate_values(
                model, F.cross_entropy, x, c, args.mu, inputs, targets
            ),
            args.device,
        )
        totals["naive"][0] += coords.size
        totals["naive"][1] += t
    qps = {k: n / s for k, (n, s) in totals.items()}
    stats = dict(engine.stats)

    # float32 exactness against a float64 naive loop at the same float32-rounded points
    # every forward draws the same dropout masks (as ModuleOracle arranges per batch)
    seed = args.seed + 1
    truth = rng.choice(view.dim, size=min(args.truth_coords, view.dim), replace=False)
    engine._key = None
    torch.manual_seed(seed)
    base_e = engine.base_forward(x, inputs, targets)
    g_engine = (engine.coordinate_values(x, truth, args.mu, inputs, targets) - base_e) / args.mu

    def naive(m, point, coords, step, batch):
        return naive_coordinate_values(
            m, F.cross_entropy, point, coords, step, batch, targets, seed=seed
        )

    base_n = float(naive(model, x, [0], 0.0, inputs)[0])
    g_naive = (naive(model, x, truth, args.mu, inputs) - base_n) / args.mu
    m64 = _build(name, args.small, args.device)[1].double()
    m64.load_state_dict(model.state_dict())
    x64, in64 = x.double(), inputs.double()
    base64 = float(naive(m64, x64, [0], 0.0, in64)[0])
    step32 = ((x[truth] + args.mu) - x[truth]).double()
    vals64 = torch.stack(
        [
            naive(m64, x64, [c], float(s), in64)[0]
            for c, s in zip(truth.tolist(), step32.tolist(), strict=True)
        ]
    )
    g_true = (vals64 - base64) / args.mu
    diff_engine = (g_engine.double() - g_true).abs()
    diff_naive = (g_naive.double() - g_true).abs()
    err_engine = float(diff_engine.square().mean().sqrt())
    err_naive = float(diff_naive.square().mean().sqrt())
    rows = engine.plan_rows()
    total = sum(r["numel"] for r in rows)
    return {
        "model": name,
        "kind": entry.kind,
        "style": entry.style,
        "parameters": view.dim,
        "input_shape": list(shape),
        "graph_kind": engine.graph_kind,
        "graph_build_seconds": build_s,
        "naive_qps": qps["naive"],
        "engine_qps": qps["engine"],
        "engine_vs_naive": qps["engine"] / qps["naive"],
        "engine_queries_timed": totals["engine"][0],
        "naive_queries_timed": totals["naive"][0],
        "slow_share": stats["slow_path_queries"] / max(1, stats["queries"]),
        "paths": {
            k: stats[k]
            for k in (
                "fast_queries",
                "batched_queries",
                "module_rerun_queries",
                "slow_path_queries",
                "unused_queries",
                "vmapped_ops",
                "looped_ops",
                "fallback_groups",
            )
        },
        "estimated_cost_per_query": sum(r["numel"] * r["cost_per_query"] for r in rows)
        / max(total, 1),
        "grad_scale": float(g_true.abs().max()),
        "float32_error_engine": err_engine,
        "float32_error_naive": err_naive,
        "error_ratio": err_engine / max(err_naive, 1e-30),
        "float32_error_engine_max": float(diff_engine.max()),
        "float32_error_naive_max": float(diff_naive.max()),
        "notes": engine._plan.graph.notes if engine._plan is not None else [],
        "max_cache_bytes": engine.max_cache_bytes,
    }


# ----------------------------------------------------------------------------------------
# memory
def _rss_peak_reset() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    return _status("VmRSS")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(name: str, args: argparse.Namespace) -> dict:
    """In a fresh process: peak memory of a training step vs one engine step."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    entry, model, shape = _build(name, args.small, args.device)
    inputs, targets = _batch(shape, args.batch, entry.num_classes, args.device, args.seed)
    cuda = args.device == "cuda"

    def peak(fn) -> int:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        base = _rss_peak_reset()
        fn()
        return _status("VmHWM") - base

    def train_step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), targets).backward()

    train_step()  # warm-up: allocator, kernels, .grad
    model.zero_grad(set_to_none=True)
    train = peak(train_step)
    model.zero_grad(set_to_none=True)
    engine = _engine(model, inputs, targets, args)
    x = engine.view.flatten()
    rng = np.random.default_rng(args.seed)
    coords = rng.choice(engine.view.dim, size=min(512, engine.view.dim), replace=False)
    engine.base_forward(x, inputs, targets)  # graph build outside the measurement
    engine.coordinate_values(x, coords[:8], args.mu, inputs, targets)
    engine.invalidate()  # a new step, and the previous cache freed before measuring

    def engine_step():
        engine.base_forward(x, inputs, targets)
        engine.coordinate_values(x, coords, args.mu, inputs, targets)

    eng = peak(engine_step)
    cache = engine.cache_bytes  # distinct storages of the cached activations
    return {
        "train_peak_bytes": int(train),
        "engine_peak_bytes": int(eng),
        "engine_cache_bytes": int(cache),
        "chunk_bytes": engine.chunk_bytes,
        "engine_vs_train_memory": eng / max(train, 1),
    }


def memory(name: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env[_MMAP_ENV] = "65536"  # every large block is its own mapping: freeing it lowers the RSS
    env.setdefault("PYTHONPATH", str(HERE.parent))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", name]
    cmd += ["--batch", str(args.batch), "--device", args.device, "--threads", str(args.threads)]
    cmd += ["--seed", str(args.seed)] + (["--small"] if args.small else [])
    if args.max_cache_fraction is not None:
        cmd += ["--max-cache-fraction", str(args.max_cache_fraction)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"memory_error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args)))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("model_zoo.py: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    from zoo_models import ZOO

    names = args.models or list(ZOO)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        print(f"model_zoo.py: unknown model(s) {unknown}; choose from {list(ZOO)}", file=sys.stderr)
        return 2
    results = []
    for name in names:
        row = measure(name, args)
        if not args.no_memory:
            row.update(memory(name, args))
        results.append(row)
        if not args.json:
            print(
                f"{name:22s} {row['graph_kind']:7s} naive {row['naive_qps']:8.1f} q/s  engine "
                f"{row['engine_qps']:9.1f} q/s  x{row['engine_vs_naive']:5.1f}  slow "
                f"{100 * row['slow_share']:4.1f}%  err ratio {row['error_ratio']:.2f}  mem x"
                f"{row.get('engine_vs_train_memory', float('nan')):.2f}",
                flush=True,
            )
    config = {
        "batch": args.batch,
        "device": args.device,
        "threads": args.threads,
        "torch": torch.__version__,
        "small": args.small,
        "budget_s": args.budget_s,
        "rounds": args.rounds,
        "mu": args.mu,
        "max_cache_fraction": args.max_cache_fraction,
    }
    if args.device == "cuda":
        config["gpu"] = torch.cuda.get_device_name()
    print(json.dumps({"config": config, "models": results}, indent=None if args.json else 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
