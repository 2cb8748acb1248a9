"""The classifier service under load: many single-image clients against ``serve-classifier``,
with and without dynamic batching, next to in-process inference.

The server runs as its own process (``python -m oracles.http_service serve-classifier`` on a
random-weight checkpoint, its defaults unless flags say otherwise); each client is a thread
here holding one NVIDIA ``tritonclient`` or one of our ``HTTPClassifier`` (``retries=0``, so
a 503 is counted, not hidden), sending one image per request for ``--seconds``. Reported per
(server mode, client kind, clients): images/s, p50/p99 latency, refused or failed requests;
and in-process ``LocalClassifier`` images/s and seconds per call at batch 1 and 64, plus the
goals of issue #25 (0 refused; batching >= 5x no batching at 16 clients and >= 60% of
in-process batch-64 throughput; p99 at 64 clients <= 2 batch-64 calls + the batch delay).

    python benchmarks/classifier_api.py --json                  # ResNet-18, 3x32x32, CPU
    python benchmarks/classifier_api.py --clients 16 --seconds 3 --kinds httpclassifier
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from oracles.classifier import ClassifierUnavailable, HTTPClassifier, LocalClassifier
from oracles.http_service import ServerSettings
from oracles.resnet import build_resnet, save_classifier_checkpoint

REPO = Path(__file__).resolve().parents[1]
MODES = {"batching": [], "no_batching": ["--no-dynamic-batching"]}


def seconds_per_call(call: Callable[[], object], min_seconds: float) -> float:
    """Mean wall time of ``call()``, repeated for at least ``min_seconds`` (and once)."""
    call()  # warm-up
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < min_seconds:
        call()
        calls += 1
    return (time.perf_counter() - start) / calls


class Server:
    """``serve-classifier`` in a child process; the URL is read from its banner."""

    def __init__(self, weights: Path, extra: list[str], torch_threads: int | None):
        command = [sys.executable, "-m", "oracles.http_service", "serve-classifier",
                   "--weights", str(weights), "--port", "0", "--quiet", *extra]  # fmt: skip
        if torch_threads:
            command += ["--torch-threads", str(torch_threads)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        banner = self.process.stdout.readline()
        found = re.search(r"on (http://[^ ]+)/v2/models/(\S+) ", banner)
        if not found:
            self.close()
            raise RuntimeError(f"the server did not start: {banner!r}")
        self.url, self.model = found.group(1), found.group(2)

    def close(self) -> int:
        self.process.terminate()  # SIGTERM: drains, exits 0
        code = self.process.wait(60)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code


def client_factory(kind: str, url: str, model: str) -> Callable[[], Callable[[np.ndarray], None]]:
    """``make()`` -> ``send(image (1, C, H, W))`` for one client of ``kind``; ``send`` raises
    on a refused or failed request."""
    if kind == "httpclassifier":

        def make() -> Callable[[np.ndarray], None]:
            client = HTTPClassifier(url, model=model, retries=0, max_batch=1, binary=True)
            return client.predict

        return make
    import tritonclient.http as triton

    host_port = url.removeprefix("http://")

    def make_triton() -> Callable[[np.ndarray], None]:
        client = triton.InferenceServerClient(host_port, connection_timeout=60, network_timeout=60)

        def send(x: np.ndarray) -> None:
            tensor = triton.InferInput("images", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=True)
            client.infer(model, [tensor], headers={}).as_numpy("logits")

        return send

    return make_triton


def model_statistics(url: str, model: str) -> tuple[int, int]:
    """``(images answered, model calls)`` so far, from the server's statistics endpoint."""
    import httpx

    (stats,) = httpx.get(f"{url}/v2/models/{model}/stats", timeout=60).json()["model_stats"]
    return stats["inference_count"], stats["execution_count"]


def load(url: str, model: str, kind: str, clients: int, seconds: float, shape: tuple) -> dict:
    """``clients`` threads, one client each, single-image requests for ``seconds``."""
    make = client_factory(kind, url, model)
    x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    refused = [0] * clients
    failed: list[str] = []
    barrier = threading.Barrier(clients + 1)
    stop_at = [float("inf")]  # set once every client is ready

    def worker(k: int) -> None:
        try:  # made on its own thread: tritonclient's gevent connections are bound to one
            send = make()
            send(x)  # connect and learn the metadata before the clock starts
        except Exception as exc:
            failed.append(f"setup: {exc!r}"[:200])
            barrier.wait()
            return
        barrier.wait()
        while time.perf_counter() < stop_at[0]:
            started = time.perf_counter()
            try:
                send(x)
            except ClassifierUnavailable:
                refused[k] += 1
                continue
            except Exception as exc:  # tritonclient's 503, or anything else
                if "503" in str(exc) or "queue" in str(exc):
                    refused[k] += 1
                else:
                    failed.append(repr(exc)[:200])
                continue
            latencies[k].append(time.perf_counter() - started)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    images_before, calls_before = model_statistics(url, model)
    start = time.perf_counter()
    stop_at[0] = start + seconds
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    images_after, calls_after = model_statistics(url, model)
    every = np.concatenate([np.asarray(lat) for lat in latencies])
    return {
        "client": kind,
        "clients": clients,
        "requests": int(every.size),
        "images_per_s": round(every.size / elapsed, 1),
        "p50_ms": round(float(np.percentile(every, 50)) * 1e3, 1) if every.size else None,
        "p99_ms": round(float(np.percentile(every, 99)) * 1e3, 1) if every.size else None,
        "mean_images_per_model_call": round(
            (images_after - images_before) / max(1, calls_after - calls_before), 1
        ),
        "refused": sum(refused),
        "failed": len(failed),
        "failures": failed[:3],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--shape", default="3,32,32", help="C,H,W")
    ap.add_argument("--clients", default="1,4,16,64", help="client threads per level")
    ap.add_argument("--kinds", default="tritonclient,httpclassifier")
    ap.add_argument("--modes", default="batching,no_batching")
    ap.add_argument("--seconds", type=float, default=5.0, help="load per level")
    ap.add_argument("--threads", type=int, default=None, help="torch threads, here and server")
    ap.add_argument(
        "--server-args", default="", help="extra serve-classifier flags, e.g. '--max-batch-delay 5'"
    )
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    levels = [int(v) for v in args.clients.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    module = build_resnet(args.arch, num_classes=10, in_channels=shape[0]).eval()
    local = LocalClassifier(module, max_batch=256, input_shape=shape)
    rng = np.random.default_rng(1)
    x1, x64 = (rng.random((n, *shape), dtype=np.float32) for n in (1, 64))
    call_1 = seconds_per_call(lambda: local.predict(x1), 2.0)
    call_64 = seconds_per_call(lambda: local.predict(x64), 3.0)  # again after the loads
    delay_s = ServerSettings().max_batch_delay_ms / 1000
    report: dict = {
        "arch": args.arch,
        "shape": list(shape),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(v, 2) for v in os.getloadavg()],
        "in_process": {
            "batch_1_s_per_call": round(call_1, 4),
            "batch_64_s_per_call": round(call_64, 4),
            "batch_1_images_per_s": round(1 / call_1, 1),
            "batch_64_images_per_s": round(64 / call_64, 1),
        },
        "server_args": args.server_args,
        "server_defaults": {
            k: getattr(ServerSettings(), k)
            for k in ("max_batch", "max_batch_delay_ms", "max_queue", "queue_timeout")
        },
        "results": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / f"{args.arch}.pth"
        save_classifier_checkpoint(weights, module, args.arch, input_shape=shape)
        for mode in args.modes.split(","):
            server = Server(weights, MODES[mode] + args.server_args.split(), args.threads)
            try:
                for kind in args.kinds.split(","):
                    for clients in levels:
                        row = {"server": mode}
                        row.update(
                            load(server.url, server.model, kind, clients, args.seconds, shape)
                        )
                        report["results"].append(row)
                        if not args.json:
                            print(json.dumps(row), flush=True)
            finally:
                row_exit = server.close()
            report.setdefault("server_exit_codes", {})[mode] = row_exit
    report["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    # The machine's load drifts: the goals use the faster of the two in-process timings.
    call_64_after = seconds_per_call(lambda: local.predict(x64), 3.0)
    report["in_process"]["batch_64_s_per_call_after"] = round(call_64_after, 4)
    call_64 = min(call_64, call_64_after)
    report["in_process"]["batch_64_images_per_s"] = round(64 / call_64, 1)
    report["goals"] = goals(report, call_64, delay_s)
    print(json.dumps(report, indent=None if args.json else 2))


def goals(report: dict, call_64: float, delay_s: float) -> dict:
    """Issue #25's goals, checked against this run."""
    rows = report["results"]

    def rate(mode: str, kind: str, clients: int) -> float | None:
        for r in rows:
            if (r["server"], r["client"], r["clients"]) == (mode, kind, clients):
                return r["images_per_s"]
        return None

    out: dict = {"refused_everywhere": sum(r["refused"] + r["failed"] for r in rows)}
    in_process_64 = report["in_process"]["batch_64_images_per_s"]
    for kind in {r["client"] for r in rows}:
        batched, plain = rate("batching", kind, 16), rate("no_batching", kind, 16)
        if batched and plain:
            out[f"{kind}_16_clients_batching_speedup"] = round(batched / plain, 2)
        if batched:
            out[f"{kind}_16_clients_fraction_of_in_process_batch_64"] = round(
                batched / in_process_64, 2
            )
        for r in rows:
            if (r["server"], r["client"], r["clients"]) == ("batching", kind, 64) and r["p99_ms"]:
                out[f"{kind}_64_clients_p99_over_bound"] = round(
                    r["p99_ms"] / 1e3 / (2 * call_64 + delay_s), 2
                )
    return out


if __name__ == "__main__":
    main()
