"""Throughput of the classifier API: in-process ``LocalClassifier`` vs ``HTTPClassifier`` over
a real service on 127.0.0.1, and what HTTP costs on top.

For each model and batch size it times ``predict`` on the same random float32 images through
both backends (after a warm-up call), checks that the two return identical logits, and reports
milliseconds per call, images per second and the HTTP overhead per request (http - local). The
black-box defense sends every query through this path, so this bounds its query rate.

    python benchmarks/classifier_api.py --json        # the defense's default: 1x16x16 digits
    python benchmarks/classifier_api.py --models resnet50 --shape 3,224,224 --batches 1,32
"""

from __future__ import annotations

import argparse
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


def seconds_per_call(fn: Callable[[], object], min_seconds: float, min_calls: int) -> float:
    """Mean wall time of ``fn()`` over at least ``min_calls`` calls and ``min_seconds``."""
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def measure(
    model_name: str, shape: tuple[int, int, int], batches: list[int], args: argparse.Namespace
) -> list[dict]:
    torch.manual_seed(0)
    module = build_model(model_name, shape, args.classes, args.cifar_stem).eval()
    largest = max(batches)
    local = LocalClassifier(module, max_batch=largest, input_shape=shape)
    server = make_server(
        LocalClassifier(module, max_batch=largest, input_shape=shape),
        token=TOKEN,
        max_batch=largest,
    )
    serve_in_background(server)
    remote = HTTPClassifier(server.url, token=TOKEN, max_batch=largest)
    rows = []
    try:
        for batch in batches:
            x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
            if not np.array_equal(local.predict(x), remote.predict(x)):  # also the warm-up
                raise AssertionError(f"{model_name}: HTTP logits differ from local ones")
            row = {"model": model_name, "shape": list(shape), "batch": batch}
            for label, client in (("local", local), ("http", remote)):
                t = seconds_per_call(
                    lambda c=client, x=x: c.predict(x), args.min_seconds, args.min_calls
                )
                row[f"{label}_ms_per_call"] = round(1e3 * t, 3)
                row[f"{label}_images_per_s"] = round(batch / t, 1)
            row["http_overhead_ms_per_request"] = round(
                row["http_ms_per_call"] - row["local_ms_per_call"], 3
            )
            rows.append(row)
    finally:
        remote.close()
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
    ap.add_argument("--models", default="linear,resnet18", help="linear and/or ResNet names")
    ap.add_argument("--shape", type=_ints, default=[1, 16, 16], help="C,H,W of the images")
    ap.add_argument("--batches", type=_ints, default=[1, 64, 1024], help="images per call")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 ResNet stem")
    ap.add_argument("--min-seconds", type=float, default=1.0, help="time budget per measurement")
    ap.add_argument("--min-calls", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args()
    if len(args.shape) != 3:
        ap.error(f"--shape must be C,H,W, got {args.shape}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        rows += measure(name.strip(), tuple(args.shape), args.batches, args)
    if args.json:
        print(json.dumps({"torch_threads": torch.get_num_threads(), "results": rows}))
        return
    for r in rows:
        print(
            f"{r['model']:>9} batch {r['batch']:>5}: local {r['local_ms_per_call']:9.2f} ms "
            f"({r['local_images_per_s']:9.0f} img/s)  http {r['http_ms_per_call']:9.2f} ms "
            f"({r['http_images_per_s']:9.0f} img/s)  overhead {r['http_overhead_ms_per_request']:.2f} ms"
        )


if __name__ == "__main__":
    main()
