"""``make bench-gpu``: everything the GPU paths need measured, as one script with a deadline.

Runs, in order, each step in a subprocess with its own time limit, writing the combined JSON
after every step (so a stopped run keeps what it measured):

1. ``pytest tests/test_gpu.py`` on CUDA (CuPy cases too where CuPy works);
2. ``cge_throughput.py`` for ResNet-20, batch 256, 90 % sparsity, every selected coordinate
   (one full DeepZero step), over a sweep of ``--chunk-bytes`` and both memory formats:
   naive / engine / plain-forward queries per second, projected step and epoch time, GPU
   memory peak of an engine step and of a training step;
3. 20 real training steps (``zoopt train``) of ResNet-20 on CUDA with batch 256 on random
   data written in the CIFAR-10 batch format, first-order and DeepZero;
4. ``model_zoo.py --device cuda`` (bring-your-own-model zoo).

Usage::

    python benchmarks/gpu_suite.py --out gpu.json [--budget-s 420]

On a machine without CUDA it stops at once with a clear message (exit 2). ``--device cpu``
(with ``--quick``) runs the same steps on the CPU at toy sizes, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_suite.json", help="JSON file written after each step")
    p.add_argument("--budget-s", type=float, default=480.0, help="skip steps past this time")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="toy sizes (to check the script)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the steps")
    return p.parse_args(argv)


def write_cifar_like(folder: Path, train_per_batch: int, test: int, seed: int = 0) -> None:
    """Random uint8 images in the CIFAR-10 python batch format (5 train batches + test)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else train_per_batch
        batch = {
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, size=n).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)


class Suite:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = time.perf_counter()
        self.result: dict = {"device": args.device, "steps": {}}
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def save(self) -> None:
        self.result["elapsed_s"] = time.perf_counter() - self.t0
        Path(self.args.out).write_text(json.dumps(self.result, indent=1))

    def run(self, name: str, cmd: list[str], limit: float, parse_json: bool = True) -> dict:
        """Run one step; record its JSON (last line of stdout), time and exit status."""
        if self.left() < 20:
            entry = {"skipped": "out of time"}
            self.result["steps"][name] = entry
            self.save()
            print(f"[{name}] skipped: out of time", flush=True)
            return entry
        limit = max(10.0, min(limit, self.left()))
        t = time.perf_counter()
        try:
            out = subprocess.run(
                cmd, capture_output=True, text=True, env=self.env, cwd=ROOT, timeout=limit
            )
            rc, stdout, stderr = out.returncode, out.stdout, out.stderr
        except subprocess.TimeoutExpired as exc:
            rc, stdout, stderr = "timeout", exc.stdout or "", exc.stderr or ""
            stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
            stderr = stderr.decode() if isinstance(stderr, bytes) else stderr
        entry: dict = {"rc": rc, "seconds": time.perf_counter() - t}
        if parse_json and rc == 0:
            try:
                entry["json"] = json.loads(stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                entry["stdout_tail"] = stdout[-2000:]
        else:
            entry["stdout_tail"] = stdout[-3000:]
        if rc != 0:
            entry["stderr_tail"] = stderr[-3000:]
        self.result["steps"][name] = entry
        self.save()
        print(f"[{name}] rc={rc} in {entry['seconds']:.1f}s", flush=True)
        return entry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_suite.py: CUDA is not available on this machine", file=sys.stderr)
        return 2
    suite = Suite(args)
    py = args.python
    suite.result["torch"] = torch.__version__
    if args.device == "cuda":
        suite.result["gpu"] = torch.cuda.get_device_name()

    # 1. the CUDA halves of the device tests
    suite.run(
        "test_gpu",
        [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
        150,
        parse_json=False,
    )

    # 2. one full DeepZero step of ResNet-20 at batch 256, chunk and layout sweep
    batch = 16 if args.quick else 256
    sweep = [("contiguous", 2**28), ("contiguous", 2**30), ("contiguous", 2**32)]
    sweep += [("channels_last", 2**30)]
    if args.quick:
        sweep = [("contiguous", 2**24), ("channels_last", 2**24)]
    for fmt, chunk in sweep:
        cmd = [py, "benchmarks/cge_throughput.py", "--model", "resnet20", "--batch", str(batch)]
        cmd += ["--sparsity", "0.9", "--device", args.device, "--json", "--rounds", "2"]
        cmd += ["--coords", "600" if args.quick else "0", "--budget-s", "2" if args.quick else "3"]
        cmd += ["--truth-coords", "4" if args.quick else "8", "--mac-coords", "0"]
        cmd += ["--chunk-bytes", str(chunk), "--memory-format", fmt]
        suite.run(f"cge_{fmt}_{chunk >> 20}MiB", cmd, 120)

    # 3. real training steps on CIFAR-shaped data
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "cifar"
        per_batch = 64 if args.quick else 1024  # 5 batches: 20 steps of 256
        write_cifar_like(data, per_batch, 256)
        steps = 2 if args.quick else 20
        for method in ("fo", "deepzero"):
            cmd = [py, "-m", "zoopt.cli", "train", "--dataset", "cifar10", "--data-dir", str(data)]
            cmd += ["--model", "resnet20", "--method", method, "--epochs", "1"]
            cmd += ["--max-steps", str(steps), "--batch-size", str(batch), "--device", args.device]
            cmd += ["--out", str(Path(tmp) / method), "--no-progress"]
            if args.quick:  # a CPU cannot do full-density DeepZero steps quickly
                cmd += ["--grasp-q", "4", "--sparsity", "0.999"]
            entry = suite.run(f"train_{method}", cmd, 240, parse_json=False)
            metrics = Path(tmp) / method / "metrics.jsonl"
            if metrics.exists():
                rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
                epoch = next((r for r in rows if "epoch_seconds" in r), None)
                entry["metrics"] = rows[-3:]
                if epoch is not None:
                    entry["seconds_per_step"] = epoch["epoch_seconds"] / steps
            summary = Path(tmp) / method / "summary.json"
            if summary.exists():
                entry["summary"] = json.loads(summary.read_text())
            suite.save()

    # 4. the bring-your-own-model zoo on the device
    cmd = [py, "benchmarks/model_zoo.py", "--device", args.device, "--json", "--no-memory"]
    cmd += ["--budget-s", "1" if args.quick else "2", "--rounds", "1", "--truth-coords", "16"]
    if args.quick:
        cmd += ["--small", "--batch", "4", "--models", "vit_tiny", "kuangliu_resnet18"]
    suite.run("model_zoo", cmd, 240)
    suite.save()
    print(json.dumps(summarize(suite.result), indent=1))
    return 0


def summarize(result: dict) -> dict:
    """The headline numbers of a suite result."""
    out: dict = {"device": result.get("gpu", result.get("device"))}
    for name, step in result["steps"].items():
        j = step.get("json")
        if name.startswith("cge_") and j:
            out[name] = {
                k: j.get(k)
                for k in (
                    "naive_qps",
                    "engine_qps",
                    "plain_forward_qps",
                    "engine_vs_naive",
                    "step_seconds_engine",
                    "epoch_seconds_engine",
                    "gpu_peak_bytes_engine_step",
                )
            }
        elif name.startswith("train_"):
            out[name] = {"rc": step.get("rc"), "seconds_per_step": step.get("seconds_per_step")}
        elif name == "model_zoo" and j:
            out[name] = {m["model"]: round(m["engine_vs_naive"], 2) for m in j.get("models", [])}
        else:
            out[name] = {"rc": step.get("rc")}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
