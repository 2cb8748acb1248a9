"""Bytes on the wire per distributed RGE step: seeds and scalars, never points (issue #21).

A local Dask cluster (``--workers`` processes, one thread each), a
:class:`~zoopt.parallel.ParallelOracle` over a :class:`~zoopt.torch.oracle.ModuleOracle` of
a CIFAR ResNet-18 (kuangliu style, 11.2M parameters, random weights, defined here), and
``--steps`` training steps as the trainer takes them: ``set_batch`` (a new random batch),
``fx = base_value(x)`` on the client, ``RGE(q).estimate(oracle, x, fx=fx)`` (the q queries
on the workers: :meth:`ParallelOracle.eval_direction_steps`), ``x ← x − lr·g``.

Two measurements of what crosses the wire per step, printed as JSON:

* ``accounted``: :attr:`ParallelOracle.traffic`, by kind: ``x`` (the broadcast of the new
  ``x``: O(d), once per worker), ``tasks`` (the query messages: seed, count, dim, dist and
  an (index, step) pair per row, with the function reference and keys), ``values`` (back),
  ``batch`` and ``state`` (BatchNorm running statistics after ``base_value``). Each message
  is measured as :func:`zoopt.parallel.oracle.wire_bytes`: its pickle (protocol 5) plus its
  out-of-band buffers, i.e. what Dask serializes, without its framing.
* ``tcp_written``: Dask's own byte counts: every ``TCP.write`` of ``distributed`` returns
  the bytes it wrote (frames and headers); the benchmark sums them in every process of the
  cluster (client, scheduler and nannies share the client process; each worker its own).
  This is all cluster traffic during the step: the scatter of ``x`` travels client →
  scheduler → one worker → the other worker (about 3 copies of ``x`` for 2 workers), and
  the heartbeats and task bookkeeping are in it. ``tcp_idle_bytes_per_s`` is the
  background rate measured with the cluster idle.

``--small`` repeats the step on a small MLP (d ≈ 1e3) to show that the task bytes do not
depend on d. ``--check`` compares the first step's values with the local oracle's own
``eval_direction_steps`` (one thread): they must be equal bit for bit.

    python benchmarks/parallel_seeds.py --json
    python benchmarks/parallel_seeds.py --steps 3 --q 32 --batch 8 --check --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zoopt import RGE
from zoopt.parallel import ParallelOracle, connect
from zoopt.torch.oracle import ModuleOracle


def log(msg: str) -> None:
    print(f"[parallel_seeds] {msg}", file=sys.stderr, flush=True)


# the CIFAR ResNet-18 (kuangliu/pytorch-cifar, 11.2M parameters) of the large-model benchmark
from large_model import ResNet18  # noqa: E402  (benchmarks/ is on sys.path: run as a script)


def small_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 32 * 32 // 16, 16), nn.ReLU(), nn.Linear(16, 10)
    )


# -- Dask's own byte counts ---------------------------------------------------------------------


def install_tcp_counter() -> None:
    """Sum the bytes every ``distributed`` TCP comm of this process writes (its ``write``
    returns them) into ``distributed.comm.tcp._zoopt_bytes_written``."""
    from distributed.comm import tcp

    if getattr(tcp, "_zoopt_bytes_written", None) is not None:
        return
    tcp._zoopt_bytes_written = 0
    original = tcp.TCP.write

    async def write(self, msg, serializers=None, on_error="message"):
        n = await original(self, msg, serializers=serializers, on_error=on_error)
        tcp._zoopt_bytes_written += int(n)
        return n

    tcp.TCP.write = write


def tcp_bytes_written() -> int:
    from distributed.comm import tcp

    return int(getattr(tcp, "_zoopt_bytes_written", 0))


def cluster_tcp_bytes(client) -> int:
    """Bytes written on TCP comms so far, summed over this process and every worker."""
    return tcp_bytes_written() + sum(client.run(tcp_bytes_written).values())


# -- one run ------------------------------------------------------------------------------------


def batch_of(args: argparse.Namespace, step: int, shape: tuple[int, ...]) -> tuple:
    g = torch.Generator().manual_seed(args.seed + step)
    return torch.randn(args.batch, *shape, generator=g), torch.randint(
        0, 10, (args.batch,), generator=g
    )


def run(args: argparse.Namespace, client, model: nn.Module, shape: tuple[int, ...]) -> dict:
    oracle = ModuleOracle(model.train(), F.cross_entropy, engine=False)
    x = oracle.view.flatten().clone()
    d = int(x.numel())
    log(f"d = {d:,}: building the parallel oracle")
    t0 = time.perf_counter()
    o = ParallelOracle(oracle, client)
    setup = {"factory_bytes": o.traffic["factory"], "seconds": time.perf_counter() - t0}
    est = RGE(q=args.q, mu=args.mu)
    rng = np.random.default_rng(args.seed)
    steps = []
    checked = None
    for t in range(args.steps):
        before = dict(o.traffic)
        tcp0 = cluster_tcp_bytes(client)
        t_step = time.perf_counter()
        o.set_batch(*batch_of(args, t, shape))
        fx = o.base_value(x)
        plan = est.plan(x, rng=rng, fx=fx)
        values = plan.evaluate(o)
        call = dict(o.last_call)
        grad = plan.finish(values).grad
        x = x - args.lr * grad
        seconds = time.perf_counter() - t_step
        tcp = cluster_tcp_bytes(client) - tcp0
        accounted = {k: o.traffic[k] - before[k] for k in o.traffic}
        row = {
            "step": t,
            "seconds": round(seconds, 3),
            "fx": fx,
            "accounted": accounted,
            "query_call": call["bytes"],
            "query_messages_bytes": accounted["tasks"],
            "x_broadcast_bytes": accounted["x"],
            "tcp_written": tcp,
            "worker_seconds": call["worker_seconds"],
            "chunk_sizes": call["chunk_sizes"],
        }
        steps.append(row)
        log(
            f"step {t}: {seconds:.1f} s; tasks {accounted['tasks']} B, x {accounted['x']:,} B, "
            f"values {accounted['values']} B, batch {accounted['batch']:,} B, "
            f"state {accounted['state']:,} B; TCP written {tcp:,} B"
        )
        if args.check and t == 0:
            serial = oracle.eval_direction_steps(plan.x, plan.direction_steps)
            checked = bool(torch.equal(torch.as_tensor(values), torch.as_tensor(serial)))
            log(f"values equal the local oracle's bit for bit: {checked}")
    o.close()
    return {
        "dim": d,
        "setup": setup,
        "steps": steps,
        "values_equal_serial": checked,
        "query_messages_bytes_max": max(s["query_messages_bytes"] for s in steps),
        "x_broadcast_bytes_per_step": steps[-1]["x_broadcast_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--q", type=int, default=32)
    parser.add_argument("--mu", type=float, default=1e-3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-small", dest="small", action="store_false",
                        help="skip the small-model run (d-independence of the task bytes)")  # fmt: skip
    parser.add_argument("--check", action="store_true",
                        help="compare step 0's values with the local oracle's (bit for bit)")  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as on the workers (exactness of --check)

    out: dict = {"workers": args.workers, "q": args.q, "batch": args.batch}
    with connect(args.workers) as client:
        install_tcp_counter()
        client.run(install_tcp_counter)
        idle0, t0 = cluster_tcp_bytes(client), time.perf_counter()
        time.sleep(3.0)
        out["tcp_idle_bytes_per_s"] = round(
            (cluster_tcp_bytes(client) - idle0) / (time.perf_counter() - t0)
        )
        torch.manual_seed(args.seed)
        out["resnet18"] = run(args, client, ResNet18(), (3, 32, 32))
        if args.small:
            torch.manual_seed(args.seed)
            out["small_mlp"] = run(args, client, small_mlp(), (3, 8, 8))
    big = out["resnet18"]
    out["summary"] = {
        "d": big["dim"],
        "query_messages_bytes_per_step": big["query_messages_bytes_max"],
        "goal_bytes": 64 * 1024,
        "x_broadcast_bytes_per_step": big["x_broadcast_bytes_per_step"],
        "query_messages_bytes_small_model": out.get("small_mlp", {}).get(
            "query_messages_bytes_max"
        ),
        "d_small_model": out.get("small_mlp", {}).get("dim"),
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(json.dumps(out["summary"], indent=2))


if __name__ == "__main__":
    main()
