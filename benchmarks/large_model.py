"""Memory, time and drift of a zeroth-order step on large models (issue #21).

Each measurement runs in its own process (``--cell``), so a peak is the peak of that one
configuration and nothing else: peak resident memory on the CPU (``ru_maxrss``, and the
kernel's high-water mark reset after the model is built where the kernel allows it),
``torch.cuda.max_memory_allocated`` on a GPU. Rows, for each model and batch:

* ``inference``: a forward of the batch and its loss under ``torch.no_grad``;
* ``sgd`` / ``adam``: a first-order step with ``torch.optim``;
* ``inplace``: MeZO's memory mode, ``zoopt.torch.InPlaceRGE(RGE(q, mu=1e-3,
  mu_mode="absolute"), zoopt.SGD(...))`` -- the parameters are the only copy of θ;
* ``exact``: ``zoopt.step.step(ZO(RGE(...)), SGD(...), oracle, x, inplace=True)`` with θ also
  held as the flat ``x`` (the parameters are restored from it exactly; after the update they
  are set to the new ``x``).

Timing: one warm-up step (at ``min(q, 4)`` directions: the same code and allocations, so the
first timed GPT-2 step at q=16 does not cost two), then the median of a few steps; in the same
process the plain forward (``no_grad`` forward + loss) is timed before and after the steps,
and ``ratio_to_forwards`` = step / ((q+1) · forward). The direction generation is timed on its
own (``SeededDirections.chunk`` over all d entries) to split a step into generating and
forwarding.

Drift (``--drift``): MeZO's memory mode restores θ by subtracting the step it added, which
rounds; measured on a small float32 network over 1,000 steps.

    python benchmarks/large_model.py                      # the full CPU table (~20 min, 1 thread)
    python benchmarks/large_model.py --quick              # ~2 min: ResNet-18 q=1,4, a tiny GPT-2
    python benchmarks/large_model.py --device cuda --out large_model_cuda.json
    python benchmarks/large_model.py --drift-only         # the drift section alone

Prints one JSON document (``--out FILE`` also writes it). Results: docs/large_models.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

# -- the parent process: no torch import, so a cell's memory is its own ------------------

RESNET_QS = (1, 4, 16, 64)
GPT2_QS = (1, 16)
ROWS_FO = ("inference", "sgd", "adam")
ROWS_ZO = ("inplace", "exact")


def _steps_for(model: str, row: str, q: int, quick: bool) -> int:
    """Timed steps (after the warm-up): few where one step is long on a 2-core CPU."""
    if quick:
        return 1 if row in ROWS_ZO and q > 1 else 2
    if model == "gpt2":
        return 2 if row in ROWS_FO or q == 1 else 1
    if row in ROWS_FO:
        return 5
    return {1: 5, 4: 3, 16: 2}.get(q, 1)


def plan_cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    cells = []
    models = [("resnet18", (1, 4) if args.quick else RESNET_QS)]
    models.append(("gpt2-tiny" if args.quick else "gpt2", (1, 4) if args.quick else GPT2_QS))
    for model, qs in models:
        if args.models and model.split("-")[0] not in args.models:
            continue
        base = {"model": model, "device": args.device, "threads": args.threads}
        base["loss_dtype"] = args.loss_dtype
        for row in ROWS_FO:
            cells.append(
                {**base, "row": row, "q": 0, "steps": _steps_for(model, row, 0, args.quick)}
            )
        for q in qs:
            for row in ROWS_ZO:
                steps = _steps_for(model, row, q, args.quick)
                cells.append({**base, "row": row, "q": q, "steps": steps})
    return cells


def run_cell(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--cell", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**spec, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    out = json.loads(lines[-1])
    out["process_wall_s"] = round(wall, 1)
    return out


def _goals(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, per model, from the cells' peaks and times."""
    out: dict[str, Any] = {}
    for model in sorted({c["model"] for c in cells}):
        mine = [c for c in cells if c["model"] == model and "error" not in c]
        inf = next((c for c in mine if c["row"] == "inference"), None)
        if inf is None:
            continue
        peak_inf = inf["peak_bytes"]
        param_bytes = inf["param_bytes"]
        g: dict[str, Any] = {"inference_peak_bytes": peak_inf, "param_bytes": param_bytes}
        inplace = [c for c in mine if c["row"] == "inplace"]
        exact = [c for c in mine if c["row"] == "exact"]
        if inplace:
            peaks = [c["peak_bytes"] for c in inplace]
            g["inplace_peak_over_inference"] = {
                c["q"]: round(c["peak_bytes"] / peak_inf, 3) for c in inplace
            }
            g["inplace_peak_le_1.2x_inference"] = all(p <= 1.2 * peak_inf for p in peaks)
            # flat in q: the largest and smallest peak within 5 % of the inference peak
            g["inplace_peak_spread_bytes"] = max(peaks) - min(peaks)
            g["inplace_peak_flat_in_q"] = max(peaks) - min(peaks) <= 0.05 * peak_inf
        if exact:
            limit = (peak_inf + param_bytes) * 1.10
            g["exact_limit_bytes"] = int(limit)
            g["exact_peak_over_limit"] = {c["q"]: round(c["peak_bytes"] / limit, 3) for c in exact}
            g["exact_peak_le_inference_plus_params_plus_10pct"] = all(
                c["peak_bytes"] <= limit for c in exact
            )
        for row, cs in (("inplace", inplace), ("exact", exact)):
            if cs:
                g[f"{row}_ratio_to_forwards"] = {c["q"]: c["ratio_to_forwards"] for c in cs}
                g[f"{row}_time_le_1.15x_forwards"] = all(c["ratio_to_forwards"] <= 1.15 for c in cs)
                g[f"{row}_generation_share"] = {c["q"]: c["generation_share"] for c in cs}
        out[model] = g
    return out


def parent(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "large_model",
        "quick": args.quick,
        "device": args.device,
        "threads": args.threads,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_at_start": list(os.getloadavg()),
        },
    }
    if not args.drift_only:
        cells = []
        for spec in plan_cells(args):
            cell = run_cell(spec, args.cell_timeout)
            cells.append(cell)
            print(_cell_line(cell), file=sys.stderr, flush=True)
        result["cells"] = cells
        result["goals"] = _goals(cells)
    if not args.no_drift:
        n = args.drift_steps if args.drift_steps is not None else (300 if args.quick else 1000)
        spec = {"drift": True, "steps": n, "threads": args.threads}
        spec["device"] = args.device
        drift = run_cell(spec, args.cell_timeout)
        print(f"drift: {json.dumps(drift)[:300]}", file=sys.stderr, flush=True)
        result["drift"] = drift
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    result["total_wall_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(text)


def _cell_line(c: dict[str, Any]) -> str:
    if "error" in c:
        return f"{c['model']:>9} {c['row']:>9} q={c['q']:<3} ERROR {c['error']}"
    mib = 1 / 2**20
    return (
        f"{c['model']:>9} {c['row']:>9} q={c['q']:<3} peak {c['peak_bytes'] * mib:8.0f} MiB "
        f"(built {c['rss_after_build_bytes'] * mib:6.0f}) step {c['step_s']:8.3f} s "
        f"ratio {c.get('ratio_to_forwards', float('nan')):6.2f}"
    )


# -- a cell: one configuration in its own process ------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) so the step's own peak is visible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def build_model(name: str):
    import torch
    from torch.nn import functional as F

    if name == "resnet18":
        model = ResNet18()
        inputs = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        targets = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))
        return model.train(), inputs, targets, F.cross_entropy
    if name in ("gpt2", "gpt2-tiny"):
        from transformers import GPT2Config, GPT2LMHeadModel

        if name == "gpt2":
            cfg = GPT2Config(use_cache=False)  # GPT-2 small: 124M parameters
            batch, seq = 4, 128
        else:
            cfg = GPT2Config(
                n_layer=2, n_embd=128, n_head=4, vocab_size=4096, n_positions=128, use_cache=False
            )
            batch, seq = 4, 64
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg)
        ids = torch.randint(
            0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1)
        )
        # eval mode (dropout off, as MeZO's forwards); the same mode for every row
        return model.eval(), ids, ids, lm_loss
    raise ValueError(f"unknown model {name!r}")


def lm_loss(output: Any, ids: Any) -> Any:
    """Causal-LM cross-entropy read from the model's output: logits at t predict ids at t+1."""
    from torch.nn import functional as F

    logits = output.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _resnet18_classes():
    """kuangliu's CIFAR ResNet-18 (pytorch-cifar): BasicBlock, [2, 2, 2, 2], 11.2M params."""
    from torch import nn
    from torch.nn import functional as F

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, in_planes: int, planes: int, stride: int = 1):
            super().__init__()
            self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.shortcut = nn.Sequential()
            if stride != 1 or in_planes != planes:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += self.shortcut(x)
            return F.relu(out)

    class ResNet(nn.Module):
        def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10):
            super().__init__()
            self.in_planes = 64
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.layer1 = self._make_layer(64, num_blocks[0], 1)
            self.layer2 = self._make_layer(128, num_blocks[1], 2)
            self.layer3 = self._make_layer(256, num_blocks[2], 2)
            self.layer4 = self._make_layer(512, num_blocks[3], 2)
            self.linear = nn.Linear(512, num_classes)

        def _make_layer(self, planes, num_blocks, stride):
            layers = []
            for s in [stride] + [1] * (num_blocks - 1):
                layers.append(BasicBlock(self.in_planes, planes, s))
                self.in_planes = planes
            return nn.Sequential(*layers)

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
            out = F.adaptive_avg_pool2d(out, 1).flatten(1)
            return self.linear(out)

    return ResNet


def ResNet18():
    return _resnet18_classes()()


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def cell(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    dev = spec["device"]
    loss_dtype = {"float64": torch.float64, "float32": None}[spec.get("loss_dtype", "float64")]
    import zoopt
    from zoopt.directions import SeededDirections, chunk_length
    from zoopt.step import ZO, step
    from zoopt.torch import ModuleOracle
    from zoopt.torch.inplace import InPlaceRGE

    model, inputs, targets, loss_fn = build_model(spec["model"])
    model = model.to(dev)
    inputs, targets = inputs.to(dev), targets.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    row, q, steps = spec["row"], spec["q"], spec["steps"]
    lr = 1e-6

    def forward() -> float:
        with torch.no_grad():
            return float(loss_fn(model(inputs), targets))

    def timed(fn, n: int) -> list[float]:
        out = []
        for _ in range(n):
            _sync(dev)
            t = time.perf_counter()
            fn()
            _sync(dev)
            out.append(time.perf_counter() - t)
        return out

    # what each row's step is; built before the memory baseline where it is state of the
    # method (the oracle, the flat x of exact mode belong to the step's memory)
    rng = np.random.default_rng(0)
    if row == "inference":
        run = forward
    elif row in ("sgd", "adam"):
        opt = (
            torch.optim.SGD(params, lr=lr, momentum=0.9)
            if row == "sgd"
            else torch.optim.Adam(params, lr=lr)
        )

        def run() -> None:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            opt.step()
    else:
        oracle = ModuleOracle(
            model, loss_fn, inputs, targets, engine=False, loss_dtype=loss_dtype, track_best=False
        )
        state_box: dict[str, Any] = {}

        if row == "inplace":

            def make(qq: int):
                zo = InPlaceRGE(zoopt.RGE(qq, mu=1e-3, mu_mode="absolute"), zoopt.SGD(lr=lr))
                state_box.setdefault("state", zo.init())

                def go() -> None:
                    state_box["state"], _ = zo.step(oracle, state_box["state"], rng=rng)

                return go
        else:
            state_box["x"] = None

            def make(qq: int):
                source = ZO(zoopt.RGE(qq, mu=1e-3, mu_mode="absolute"))
                opt_zo = zoopt.SGD(lr=lr)

                def go() -> None:
                    x = state_box["x"]
                    step(source, opt_zo, oracle, x, rng=rng, inplace=True)
                    oracle.view.assign(x)  # the module's parameters follow x

                return go

        run = make(q)
        warm = make(min(q, 4))

    gc_collect()
    rss_build = (_status_kib("VmRSS") or 0) * 1024
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if row == "exact":
        state_box["x"] = oracle.view.flatten()  # θ's second copy: part of the step's memory
    hwm_reset = _reset_hwm() if dev == "cpu" else False
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()

    fwd = timed(forward, 1 if row != "inference" else 0)  # first forward: warm
    (warm if row in ROWS_ZO else run)()  # warm-up step
    fwd += timed(forward, 2 if row in ROWS_ZO else 0)
    step_times = timed(run, steps)
    fwd += timed(forward, 2 if row in ROWS_ZO else 0)

    out: dict[str, Any] = {
        "model": spec["model"],
        "row": row,
        "q": q,
        "device": dev,
        "threads": spec["threads"],
        "loss_dtype": spec.get("loss_dtype", "float64"),
        "n_params": n_params,
        "param_bytes": param_bytes,
        "steps_timed": steps,
        "step_s": statistics.median(step_times),
        "step_s_all": [round(t, 4) for t in step_times],
    }
    if dev == "cpu":
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        hwm = (_status_kib("VmHWM") or 0) * 1024
        out.update(
            rss_after_build_bytes=rss_build,
            maxrss_before_step_bytes=maxrss_before,
            ru_maxrss_bytes=maxrss,
            hwm_reset=hwm_reset,
            hwm_since_build_bytes=hwm if hwm_reset else None,
            # the step's peak: the high-water mark since the model was built where it could be
            # reset, else ru_maxrss (which also covers building the model)
            peak_bytes=hwm if hwm_reset else maxrss,
        )
        out["step_increment_bytes"] = out["peak_bytes"] - rss_build
    else:
        out.update(
            rss_after_build_bytes=base_alloc,
            peak_bytes=torch.cuda.max_memory_allocated(),
        )
        out["step_increment_bytes"] = out["peak_bytes"] - base_alloc
    if row in ROWS_ZO:
        t_fwd = statistics.median(fwd)
        queries = q + 1
        out["forward_s"] = t_fwd
        out["forward_s_all"] = [round(t, 4) for t in fwd]
        out["queries_per_step"] = queries
        out["ratio_to_forwards"] = round(out["step_s"] / (queries * t_fwd), 3)
        # generating one whole direction, chunk by chunk, on the parameters' device
        like = params[0].detach().reshape(-1)
        dirs = SeededDirections(12345, 1, n_params, "gaussian")
        c = chunk_length(like)

        def gen() -> None:
            for s in range(0, n_params, c):
                dirs.chunk(0, s, min(s + c, n_params), like)

        t_gen = statistics.median(timed(gen, 2))
        # in place: +s·u and -s·u per query, q in the update; exact: one per query, q in update
        gens = 3 * q if row == "inplace" else 2 * q
        out["generate_direction_s"] = t_gen
        out["generations_per_step"] = gens
        out["generation_share"] = round(gens * t_gen / out["step_s"], 3)
        out["forward_share"] = round(queries * t_fwd / out["step_s"], 3)
    else:
        out["forward_s"] = statistics.median(step_times) if row == "inference" else None
    out["loadavg"] = list(os.getloadavg())
    return out


def gc_collect() -> None:
    import gc

    gc.collect()


# -- drift of the in-place mode --------------------------------------------------------------


def drift(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch
    from torch import nn
    from torch.nn import functional as F

    import zoopt
    from zoopt.step import ZO, step
    from zoopt.torch import ModuleOracle
    from zoopt.torch.inplace import InPlaceRGE

    torch.set_num_threads(spec["threads"])
    n_steps = spec["steps"]
    mu, lr = 1e-3, 1e-4

    def make():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh())
        net.append(nn.Linear(256, 10))
        g = torch.Generator().manual_seed(1)
        xb, yb = torch.randn(64, 64, generator=g), torch.randint(0, 10, (64,), generator=g)
        return net, ModuleOracle(net, F.cross_entropy, xb, yb, engine=False)

    # (a) pure restore: +s·u then -s·u, no update
    net, oracle = make()
    view = oracle.view
    theta0 = view.flatten()
    est = zoopt.RGE(1, mu=mu, mu_mode="absolute")
    rng = np.random.default_rng(0)
    from zoopt.directions import draw_seed

    t0 = time.perf_counter()
    for _ in range(n_steps):
        dirs = est.seeded(view.dim, draw_seed(rng))
        view.add_direction_(dirs, 0, mu)
        view.add_direction_(dirs, 0, -mu)
    theta = view.flatten()
    diff = (theta - theta0).abs()
    restore = {
        "round_trips": n_steps,
        "max_abs": float(diff.max()),
        "rel_norm": float((theta - theta0).norm() / theta0.norm()),
        "changed_fraction": float((diff > 0).float().mean()),
        "max_abs_theta": float(theta0.abs().max()),
        "seconds": round(time.perf_counter() - t0, 2),
    }

    # (b) trajectories: in-place vs exact, the same seeds
    net_a, oracle_a = make()
    net_b, oracle_b = make()
    zo = InPlaceRGE(zoopt.RGE(1, mu=mu, mu_mode="absolute"), zoopt.SGD(lr=lr))
    state = zo.init()
    source, opt_b = ZO(zoopt.RGE(1, mu=mu, mu_mode="absolute")), zoopt.SGD(lr=lr)
    x = oracle_b.view.flatten()
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    marks = sorted({m for m in (1, 10, 100, 1000, n_steps) if m <= n_steps})
    traj = []
    first_loss = None
    t0 = time.perf_counter()
    for t in range(1, n_steps + 1):
        state, est_a = zo.step(oracle_a, state, rng=rng_a)
        _, est_b = step(source, opt_b, oracle_b, x, rng=rng_b, inplace=True)
        oracle_b.view.assign(x)
        if first_loss is None:
            first_loss = est_a.fx
        if t in marks:
            theta_a = oracle_a.view.flatten()
            d = theta_a - x
            traj.append(
                {
                    "step": t,
                    "max_abs": float(d.abs().max()),
                    "rel_norm": float(d.norm() / x.norm()),
                    "rel_norm_of_displacement": float(
                        d.norm() / max(float((x - theta0).norm()), 1e-30)
                    ),
                    "loss_inplace": est_a.fx,
                    "loss_exact": est_b.fx,
                }
            )
    return {
        "model": f"MLP 64-256-256-10 (tanh), {oracle_a.view.dim} float32 parameters, batch 64",
        "estimator": f"RGE(q=1, mu={mu}, mu_mode='absolute'), SGD(lr={lr})",
        "restore_only": restore,
        "trajectory": traj,
        "first_loss": first_loss,
        "seconds_trajectory": round(time.perf_counter() - t0, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ResNet-18 q=1,4 and a tiny GPT-2")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    ap.add_argument("--models", nargs="*", choices=("resnet18", "gpt2"), default=None)
    ap.add_argument(
        "--loss-dtype",
        choices=("float64", "float32"),
        default="float64",
        help="ModuleOracle's loss_dtype (float64 is its default; float32: None)",
    )
    ap.add_argument("--drift-steps", type=int, default=None, help="1000 (--quick: 300)")
    ap.add_argument("--no-drift", action="store_true")
    ap.add_argument("--drift-only", action="store_true")
    ap.add_argument("--cell-timeout", type=float, default=1200.0)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell is not None:
        spec = json.loads(args.cell)
        print(json.dumps(drift(spec) if spec.get("drift") else cell(spec)))
        return
    parent(args)


if __name__ == "__main__":
    main()
