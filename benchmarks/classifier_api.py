"""Throughput of the classifier API: in-process ``LocalClassifier`` vs ``HTTPClassifier`` ->
our Open Inference Protocol server on 127.0.0.1, with binary tensors and with JSON tensors,
one client and four concurrent clients.

For each model and batch size it times ``predict`` on the same random float32 images through
each path (after a warm-up call that also checks that HTTP returns bit-identical logits) and
reports images per second and the HTTP/in-process ratio. The black-box defense sends every
query through this path, so this bounds its query rate.

    python benchmarks/classifier_api.py --json           # resnet18 and linear, 3x32x32
    python benchmarks/classifier_api.py --models resnet50 --shape 3,224,224 --batches 1,32
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import time
from collections.abc import Callable

import numpy as np
import torch

from oracles.classifier import HTTPClassifier, LocalClassifier
from oracles.http_service import make_server, serve_in_background
from oracles.resnet import build_resnet

TOKEN = "benchmark-token"


def build_model(
    name: str, shape: tuple[int, int, int], classes: int, cifar_stem: bool = False
) -> torch.nn.Module:
    """``linear`` (flatten + one linear layer) or a ResNet from :mod:`oracles.resnet` (ImageNet
    stem, or the CIFAR one); random weights (throughput does not depend on them)."""
    if name == "linear":
        return torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(int(np.prod(shape)), classes)
        )
    return build_resnet(name, num_classes=classes, in_channels=shape[0], small_input=cifar_stem)


def seconds_per_call(call: Callable[[], object], min_seconds: float) -> float:
    """Mean wall time of ``call()``, repeated for at least ``min_seconds`` (and once)."""
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < min_seconds:
        call()
        calls += 1
    return (time.perf_counter() - start) / calls


def measure(
    model_name: str, shape: tuple[int, int, int], batches: list[int], args: argparse.Namespace
) -> list[dict]:
    """One row per batch size: images/s in-process, over HTTP (binary, JSON, and binary with
    ``args.clients`` concurrent clients) and each HTTP/in-process ratio.

    The paths are timed in interleaved rounds and each reports its median round, so a
    change in machine load hits all paths alike instead of skewing the ratios.
    """
    torch.manual_seed(0)
    module = build_model(model_name, shape, args.classes, args.cifar_stem).eval()
    largest = max(batches)
    local = LocalClassifier(module, max_batch=largest, input_shape=shape)
    server = make_server(
        LocalClassifier(module, max_batch=largest, input_shape=shape, name=model_name),
        token=TOKEN,
        max_batch=largest,
        max_concurrent=max(4, args.clients),
    )
    serve_in_background(server)
    url = f"{server.url}/v2/models/{model_name}"
    binary = HTTPClassifier(url, token=TOKEN, max_batch=largest, binary=True)
    plain = HTTPClassifier(url, token=TOKEN, max_batch=largest, binary=False)
    many = [
        HTTPClassifier(url, token=TOKEN, max_batch=largest, binary=True)
        for _ in range(args.clients)
    ]
    pool = concurrent.futures.ThreadPoolExecutor(args.clients)
    rows = []
    try:
        for batch in batches:
            x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
            expected = local.predict(x)  # also the warm-up
            for client in (binary, plain, *many):
                if client.predict(x).tobytes() != expected.tobytes():
                    raise AssertionError(f"{model_name}: HTTP logits differ from local ones")

            def together(x: np.ndarray = x) -> None:  # every client sends one batch at once
                for future in [pool.submit(c.predict, x) for c in many]:
                    future.result()

            paths: dict[str, tuple[Callable[[], object], int]] = {
                "local": (lambda x=x: local.predict(x), batch),
                "http_binary": (lambda x=x: binary.predict(x), batch),
                "http_json": (lambda x=x: plain.predict(x), batch),
                f"http_binary_{args.clients}_clients": (together, batch * args.clients),
            }
            samples: dict[str, list[float]] = {key: [] for key in paths}
            for _ in range(args.rounds):
                for key, (call, images) in paths.items():
                    samples[key].append(images / seconds_per_call(call, args.round_seconds))
            row: dict = {"model": model_name, "shape": list(shape), "batch": batch}
            for key in paths:
                row[f"{key}_images_per_s"] = float(np.median(samples[key]))
            for key in paths:
                if key != "local":
                    row[f"{key}_ratio"] = round(
                        row[f"{key}_images_per_s"] / row["local_images_per_s"], 3
                    )
            for key in paths:
                row[f"{key}_images_per_s"] = round(row[f"{key}_images_per_s"], 1)
            rows.append(row)
    finally:
        pool.shutdown()
        for client in (binary, plain, *many):
            client.close()
        server.shutdown()
        server.server_close()
    return rows


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",")]
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,linear", help="linear and/or ResNet names")
    ap.add_argument("--shape", type=_ints, default=[3, 32, 32], help="C,H,W of the images")
    ap.add_argument("--batches", type=_ints, default=[1, 32, 256], help="images per call")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 ResNet stem")
    ap.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median kept)")
    ap.add_argument("--round-seconds", type=float, default=0.3, help="time per path per round")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args()
    if len(args.shape) != 3:
        ap.error(f"--shape must be C,H,W, got {args.shape}")
    if args.clients < 1:
        ap.error(f"--clients must be positive, got {args.clients}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        rows += measure(name.strip(), tuple(args.shape), args.batches, args)
    if args.json:
        print(json.dumps({"torch_threads": torch.get_num_threads(), "results": rows}))
        return
    many = f"http_binary_{args.clients}_clients"
    for r in rows:
        print(
            f"{r['model']:>9} batch {r['batch']:>4}: local {r['local_images_per_s']:9.0f} img/s | "
            f"binary {r['http_binary_images_per_s']:9.0f} ({r['http_binary_ratio']:.2f}) | "
            f"json {r['http_json_images_per_s']:9.0f} ({r['http_json_ratio']:.2f}) | "
            f"{args.clients} clients {r[many + '_images_per_s']:9.0f} ({r[many + '_ratio']:.2f})"
        )


if __name__ == "__main__":
    main()
