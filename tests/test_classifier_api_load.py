"""The classifier service under load: queue, dynamic batching, metrics, slow senders, shutdown.

Real clients (NVIDIA's tritonclient, httpx, our HTTPClassifier) against our real server on
127.0.0.1; a tiny conv+linear model keeps it fast. Speed is measured in
benchmarks/classifier_api.py, never asserted here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

for _package in ("httpx", "starlette", "uvicorn", "prometheus_client"):
    pytest.importorskip(_package, reason=f"{_package} is missing: pip install -e '.[serve]'")

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from oracles.classifier import HTTPClassifier, LocalClassifier  # noqa: E402
from oracles.http_service import (  # noqa: E402
    ServerSettings,
    add_serve_parser,
    make_server,
    serve_in_background,
    settings_from_args,
    settings_table,
)
from oracles.open_inference import HEADER_LENGTH  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
INPUT_SHAPE = (3, 8, 8)
NUM_CLASSES = 5
INFER = "/v2/models/tiny/infer"


class TinyNet(nn.Module):
    """conv -> ReLU -> pool -> linear; records the batch sizes it is called with and can hold
    a call until ``release`` is set (to fill the queue behind it)."""

    def __init__(self, hold: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, NUM_CLASSES)
        self.batch_sizes: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        self.entered.set()
        self.release.wait(10)
        h = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(h.flatten(1))


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *INPUT_SHAPE), dtype=np.float32)


def start(module: nn.Module, **settings):
    server = make_server(LocalClassifier(module, input_shape=INPUT_SHAPE, name="tiny"), **settings)
    serve_in_background(server)
    return server


def stop(server) -> None:
    server.shutdown()
    server.server_close()


def infer_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A binary infer request for ``x``, written by hand (not by our codec)."""
    raw = x.astype("<f4").tobytes()
    spec = {"name": "images", "datatype": "FP32", "shape": list(x.shape),
            "parameters": {"binary_data_size": len(raw)}}  # fmt: skip
    head = json.dumps({"inputs": [spec], "parameters": {"binary_data_output": True}}).encode()
    return head + raw, {HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}


def read_logits(response: httpx.Response) -> np.ndarray:
    length = int(response.headers[HEADER_LENGTH])
    (output,) = json.loads(response.content[:length])["outputs"]
    return np.frombuffer(response.content[length:], dtype="<f4").reshape(output["shape"])


def post(client: httpx.Client, x: np.ndarray) -> httpx.Response:
    body, headers = infer_body(x)
    return client.post(INFER, content=body, headers=headers)


def metrics(url: str, client: httpx.Client | None = None) -> dict[tuple[str, tuple], float]:
    """``GET /metrics`` parsed by prometheus_client: {(sample name, sorted labels): value}."""
    text = (client or httpx).get(f"{url}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


# -- the queue ----------------------------------------------------------------------------
def test_64_concurrent_clients_are_never_refused_under_the_default_bounds():
    """32 tritonclient and 32 httpx clients (no retries in either), 2 single-image requests
    each, all at once: every answer is 200 and exact; nothing is refused."""
    tritonclient = pytest.importorskip("tritonclient.http")
    module = TinyNet()
    server = start(module)
    host, port = server.server_address
    local = LocalClassifier(TinyNet(), input_shape=INPUT_SHAPE)
    answers: dict[tuple[int, int], np.ndarray] = {}
    failures: list[str] = []
    barrier = threading.Barrier(64)

    def triton_worker(k: int) -> None:
        client = tritonclient.InferenceServerClient(f"{host}:{port}")
        try:
            barrier.wait()
            for r in range(2):
                tensor = tritonclient.InferInput("images", [1, *INPUT_SHAPE], "FP32")
                tensor.set_data_from_numpy(images(1, seed=1000 * k + r), binary_data=True)
                result = client.infer("tiny", [tensor], headers={})
                answers[k, r] = result.as_numpy("logits")
        except Exception as exc:  # collected: a thread's exception would be lost
            failures.append(f"tritonclient {k}: {exc!r}")
        finally:
            client.close()

    def httpx_worker(k: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            barrier.wait()
            for r in range(2):
                response = post(client, images(1, seed=1000 * k + r))
                if response.status_code != 200:
                    failures.append(f"httpx {k}: {response.status_code} {response.text}")
                    return
                answers[k, r] = read_logits(response)

    threads = [
        threading.Thread(target=triton_worker if k < 32 else httpx_worker, args=(k,))
        for k in range(64)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        counted = metrics(server.url)
    finally:
        stop(server)
    assert not failures, failures[:5]
    assert len(answers) == 128
    for (k, r), logits in answers.items():
        assert logits.tobytes() == local.predict(images(1, seed=1000 * k + r)).tobytes()
    assert not any(name == "zoopt_inference_failures_total" for name, _ in counted)
    assert counted["zoopt_inference_requests_total", (("model", "tiny"),)] == 128
    assert max(module.batch_sizes) > 2  # requests were merged (a single image runs as 2 rows)


def test_a_request_waiting_longer_than_queue_timeout_gets_503_with_retry_after():
    module = TinyNet(hold=True)
    server = start(module, queue_timeout=0.2)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as first:
            held = threading.Thread(target=post, args=(first, images(1)))
            held.start()
            assert module.entered.wait(10)
            with httpx.Client(base_url=server.url, timeout=30) as second:
                response = post(second, images(1))
            module.release.set()
            held.join(10)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "queue_timeout=0.2" in response.json()["error"]
    finally:
        module.release.set()
        stop(server)


# -- dynamic batching ---------------------------------------------------------------------
def fill_the_queue_behind_a_held_call(server, module: TinyNet, sizes: list[int]) -> dict:
    """One request holds the model; requests of ``sizes`` images queue behind it; then the
    model is released. Returns {index: logits} (index -1: the holding request)."""
    answers: dict[int, np.ndarray] = {}

    def one(index: int, x: np.ndarray) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            response = post(client, x)
            assert response.status_code == 200, response.text
            answers[index] = read_logits(response)

    holder = threading.Thread(target=one, args=(-1, images(1, seed=99)))
    holder.start()
    assert module.entered.wait(10)
    threads = []
    for i, n in enumerate(sizes):  # one after the other: the queue's order is known
        threads.append(threading.Thread(target=one, args=(i, images(n, seed=i))))
        threads[-1].start()
        wait_for(lambda i=i: server.batcher.waiting == i + 1)
    module.release.set()
    for thread in [holder, *threads]:
        thread.join(30)
    return answers


def test_batched_answers_equal_solo_answers_bit_for_bit():
    sizes = [1, 3, 2, 1, 4, 1, 2, 1]
    module = TinyNet(hold=True)
    server = start(module, max_batch=8)
    try:
        batched = fill_the_queue_behind_a_held_call(server, module, sizes)
        merged_calls = module.batch_sizes[1:]
        module.batch_sizes.clear()
        with httpx.Client(base_url=server.url, timeout=30) as client:  # now one at a time
            solo = {i: read_logits(post(client, images(n, seed=i))) for i, n in enumerate(sizes)}
        solo_calls = list(module.batch_sizes)
    finally:
        stop(server)
    # FIFO merging up to max_batch=8 images: [1, 3, 2, 1] then [4, 1, 2, 1]
    assert merged_calls == [7, 8]
    assert solo_calls == [max(n, 2) for n in sizes]  # single images padded to two rows
    for i in range(len(sizes)):
        assert batched[i].tobytes() == solo[i].tobytes(), i
    local = LocalClassifier(TinyNet(), input_shape=INPUT_SHAPE)
    for i, n in enumerate(sizes):
        assert solo[i].tobytes() == local.predict(images(n, seed=i)).tobytes(), i


@pytest.mark.parametrize("arch", ["tiny", "resnet18"])
def test_local_classifier_answers_an_image_the_same_in_any_batch(arch):
    """With the default min_batch=2, each image's row is bit for bit the same whether it is
    sent alone or in batches of 2, 3, 5 or 8 (what exact merging rests on)."""
    from oracles.resnet import build_resnet

    torch.manual_seed(0)
    module = TinyNet() if arch == "tiny" else build_resnet("resnet18", num_classes=10)
    shape = INPUT_SHAPE if arch == "tiny" else (3, 32, 32)
    classifier = LocalClassifier(module, input_shape=shape)
    x = np.random.default_rng(3).random((8, *shape), dtype=np.float32)
    solo = np.concatenate([classifier.predict(x[i : i + 1]) for i in range(8)])
    for n in (2, 3, 5, 8):
        together = np.concatenate([classifier.predict(x[s : s + n]) for s in range(0, 8, n)])
        assert together.tobytes() == solo.tobytes(), n
    with pytest.raises(ValueError, match="min_batch"):
        LocalClassifier(module, min_batch=0)


class BatchStatisticsNet(TinyNet):
    """A TinyNet with a batch norm that keeps no running statistics: in eval mode it still
    normalises with each call's own batch, so its rows depend on each other."""

    def __init__(self):
        super().__init__(hold=True)
        self.norm = nn.BatchNorm2d(3, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.norm(x))


@pytest.mark.parametrize("kind", ["training submodule", "batch statistics"])
def test_requests_are_not_merged_for_a_model_whose_rows_depend_on_each_other(kind):
    if kind == "training submodule":
        module = TinyNet(hold=True)
        classifier = LocalClassifier(module, input_shape=INPUT_SHAPE, name="tiny")
        module.fc.train()  # the root stays in eval mode
    else:
        module = BatchStatisticsNet()
        classifier = LocalClassifier(module, input_shape=INPUT_SHAPE, name="tiny")
    assert not classifier.rows_independent()
    server = make_server(classifier)
    serve_in_background(server)
    try:
        fill_the_queue_behind_a_held_call(server, module, [3, 2, 4])
    finally:
        stop(server)
    assert module.batch_sizes == [2, 3, 2, 4]  # each request its own call, in order


def test_max_in_flight_client_against_the_batching_server_gets_exact_answers():
    module = TinyNet()
    server = start(module, max_batch=8)
    try:
        with HTTPClassifier(server.url, max_batch=2, max_in_flight=4) as client:
            x = images(13, seed=5)
            logits = client.predict(x)
            assert client.queries == 13 and client.requests == 7
    finally:
        stop(server)
    local = LocalClassifier(TinyNet(), max_batch=2, input_shape=INPUT_SHAPE)
    assert logits.tobytes() == local.predict(x).tobytes()


# -- what the server did ------------------------------------------------------------------
def test_metrics_and_statistics_count_what_happened():
    tritonclient = pytest.importorskip("tritonclient.http")
    module = TinyNet(hold=True)
    server = start(module, max_batch=8, max_queue=3)
    sizes = [2, 1, 3]
    try:
        fill_the_queue_behind_a_held_call(server, module, sizes)  # 4 requests, 2 calls
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert post(client, images(9)).status_code == 400  # over max_batch
            bad = client.post(INFER, content=b"{}", headers={"Content-Type": "application/json"})
            assert bad.status_code == 400
        module.release.clear()  # hold the next call, fill the queue, then one more: 503
        module.entered.clear()
        holder = threading.Thread(target=post, args=(httpx.Client(base_url=server.url), images(1)))
        holder.start()
        assert module.entered.wait(10)
        waiting = [
            threading.Thread(target=post, args=(httpx.Client(base_url=server.url), images(1)))
            for _ in range(3)
        ]
        for thread in waiting:
            thread.start()
        wait_for(lambda: server.batcher.waiting == 3)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert post(client, images(1)).status_code == 503
        module.release.set()
        for thread in [holder, *waiting]:
            thread.join(30)
        counted = metrics(server.url)
        host, port = server.server_address
        stats = tritonclient.InferenceServerClient(f"{host}:{port}").get_inference_statistics(
            "tiny"
        )
    finally:
        module.release.set()
        stop(server)
    model = (("model", "tiny"),)
    requests, images_answered = 4 + 4, 1 + sum(sizes) + 4
    assert counted["zoopt_inference_requests_total", model] == requests
    assert counted["zoopt_inference_images_total", model] == images_answered
    assert counted["zoopt_inference_failures_total", (("model", "tiny"), ("status", "400"))] == 2
    assert counted["zoopt_inference_failures_total", (("model", "tiny"), ("status", "503"))] == 1
    calls = [1, 6, 1, 3]  # held, the three merged, held, the three merged (images)
    assert counted["zoopt_inference_batch_size_count", model] == len(calls)
    assert counted["zoopt_inference_batch_size_sum", model] == sum(calls)
    assert counted["zoopt_inference_batch_size_bucket", (("le", "1.0"), ("model", "tiny"))] == 2
    assert counted["zoopt_inference_compute_seconds_count", model] == len(calls)
    assert counted["zoopt_inference_queue_seconds_count", model] == requests
    assert counted["zoopt_inference_queue_depth", model] == 0
    (model_stats,) = stats["model_stats"]
    assert model_stats["inference_count"] == images_answered
    assert model_stats["execution_count"] == len(calls)
    assert model_stats["inference_stats"]["success"]["count"] == requests
    assert model_stats["inference_stats"]["fail"]["count"] == 3
    assert {b["batch_size"]: b["compute_infer"]["count"] for b in model_stats["batch_stats"]} == {
        1: 2,
        6: 1,
        3: 1,
    }


# -- slow senders -------------------------------------------------------------------------
def test_70_header_tricklers_do_not_stop_a_normal_client():
    """70 connections each send one header line every 0.2 s; while they are all still open
    and trickling, health, metadata and inference answer a normal client at once."""
    module = TinyNet()
    server = start(module, request_timeout=20)
    tricklers = [socket.create_connection(server.server_address, timeout=5) for _ in range(70)]
    stop_trickling = threading.Event()

    def trickle() -> None:
        lines = iter([b"POST /v2/models/tiny/infer HTTP/1.1\r\n"] + [b"X-Slow: 1\r\n"] * 10_000)
        while not stop_trickling.wait(0.2):
            line = next(lines)
            for sock in tricklers:
                sock.sendall(line)

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        time.sleep(0.5)
        with httpx.Client(base_url=server.url, timeout=5) as client:
            assert client.get("/v2/health/live").json() == {"live": True}
            assert client.get("/v2/models/tiny").status_code == 200
            response = post(client, images(2))
            assert response.status_code == 200
            logits = read_logits(response)
        for sock in tricklers:  # every trickler is still connected (nothing was answered)
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        stop_trickling.set()
        thread.join(5)
        for sock in tricklers:
            sock.close()
        stop(server)
    local = LocalClassifier(TinyNet(), input_shape=INPUT_SHAPE)
    assert logits.tobytes() == local.predict(images(2)).tobytes()


def test_one_client_address_can_hold_only_max_connections_per_client():
    server = start(TinyNet(), max_connections_per_client=4)
    held = [socket.create_connection(server.server_address, timeout=5) for _ in range(4)]
    try:
        with socket.create_connection(server.server_address, timeout=5) as fifth:
            assert fifth.recv(1) == b""  # closed at once
        # another loopback address is another client: it is served
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(base_url=server.url, transport=transport, timeout=5) as other:
            assert other.get("/v2/health/ready").json() == {"ready": True}
            counted = {n: v for (n, _), v in metrics(server.url, other).items()}
    finally:
        for sock in held:
            sock.close()
        stop(server)
    assert counted["zoopt_connections_refused_total"] >= 1


# -- graceful shutdown --------------------------------------------------------------------
SLOW_SERVER = textwrap.dedent(
    """
    import time
    import numpy as np
    from oracles.http_service import make_server, serve_forever

    class SlowClassifier:  # any ClassifierAPI: numpy only, so the process starts fast
        queries = 0
        input_shape = (3, 8, 8)
        name = "tiny"

        def predict(self, images):
            time.sleep(0.3)
            return images.reshape(len(images), -1)[:, :5] * np.float32(2)

    server = make_server(SlowClassifier(), shutdown_timeout=20)
    print(server.url, flush=True)
    serve_forever(server)
    print("drained", flush=True)
    """
)


def test_sigterm_answers_the_queued_requests_then_exits_0():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_SERVER], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    statuses: dict[int, tuple[int, np.ndarray | None]] = {}
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url

        def one(k: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as client:
                response = post(client, images(1, seed=k))
                ok = response.status_code == 200
                statuses[k] = response.status_code, read_logits(response) if ok else None

        threads = [threading.Thread(target=one, args=(k,)) for k in range(6)]
        for thread in threads:
            thread.start()
        wait_for(lambda: metrics(url)["zoopt_inference_queue_depth", (("model", "tiny"),)] >= 4)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(30)
        assert process.wait(30) == 0
        assert process.stdout.read().strip() == "drained"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        process.stdout.close()
    assert sorted(statuses) == list(range(6))
    for k, (status, logits) in statuses.items():
        assert status == 200
        assert logits.tobytes() == (images(1, seed=k).reshape(1, -1)[:, :5] * 2).tobytes()


# -- one set of settings ------------------------------------------------------------------
def test_cli_flags_make_server_keywords_and_docs_come_from_server_settings():
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve-classifier", "--weights", "w.pth", "--max-queue", "9",
                              "--max-batch-delay", "0.5", "--no-dynamic-batching", "--quiet",
                              "--max-request-mb", "2", "--token", "t"])  # fmt: skip
    settings = settings_from_args(args)
    assert settings == ServerSettings(
        port=8000, max_queue=9, max_batch_delay_ms=0.5, dynamic_batching=False,
        log_requests=False, max_request_bytes=2 * 2**20, token="t",
    )  # fmt: skip
    defaults = settings_from_args(parser.parse_args(["serve-classifier", "--weights", "w"]))
    assert defaults.log_requests and defaults.port == 8000 and defaults.max_queue == 256
    docs = (REPO / "docs" / "classifier_api.md").read_text()
    assert settings_table() in docs, (
        "regenerate the table: python -c 'from oracles."
        "http_service import settings_table; print(settings_table())'"
    )
