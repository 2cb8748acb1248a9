"""The query-only classifier API: local backend, the real HTTP service on 127.0.0.1, the
HTTP client against real (flaky, slow, busy) servers, the wire format, and the ResNets."""

from __future__ import annotations

import http.client
import io
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from oracles.classifier import (
    ClassifierAPI,
    ClassifierAPIError,
    ClassifierAuthError,
    ClassifierRequestError,
    ClassifierTimeout,
    ClassifierUnavailable,
    HTTPClassifier,
    LocalClassifier,
    NpyFormatError,
    as_label_function,
    decode_npy,
    encode_npy,
)
from oracles.http_service import (
    ARCH_CHOICES,
    add_serve_parser,
    make_server,
    serve_in_background,
)
from oracles.resnet import (
    ARCHITECTURES,
    InputNormalization,
    build_resnet,
    load_classifier,
    load_weights,
    resnet18,
    resnet50,
    save_classifier_checkpoint,
)
from zoopt.oracle import BudgetExceeded

REPO = Path(__file__).resolve().parents[1]
INPUT_SHAPE = (3, 8, 8)
NUM_CLASSES = 5
TOKEN = "correct-horse-battery-staple"
SERVER_MAX_BATCH = 16


class TinyNet(nn.Module):
    """conv -> ReLU -> pool -> linear; records the batch sizes it is called with."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, NUM_CLASSES)
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        h = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(h.flatten(1))


class GatedNet(TinyNet):
    """A TinyNet whose forward waits for ``release`` (to hold a request inside the server)."""

    def __init__(self):
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        self.release.wait(10)
        return super().forward(x)


def images(n: int, seed: int = 0, shape: tuple[int, ...] = INPUT_SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def nan_images() -> np.ndarray:
    x = images(2)
    x[1, 2, 3, 4] = np.nan
    return x


@pytest.fixture
def model() -> TinyNet:
    return TinyNet()


@pytest.fixture
def service(model: TinyNet) -> Iterator:
    """The real service on 127.0.0.1 (token auth) serving ``model``; yields the server."""
    backend = LocalClassifier(model, input_shape=INPUT_SHAPE, name="tiny")
    server = make_server(backend, token=TOKEN, max_batch=SERVER_MAX_BATCH)
    serve_in_background(server)
    yield server
    server.shutdown()
    server.server_close()


def raw_request(
    server, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN
) -> tuple[int, dict[str, str], bytes]:
    """One plain http.client request; returns (status, lower-cased headers, body)."""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


# -- local backend ------------------------------------------------------------------------
def test_local_classifier_batches_counts_and_returns_float32_logits(model):
    classifier = LocalClassifier(model, max_batch=4)
    assert isinstance(classifier, ClassifierAPI)
    x = images(10)
    logits = classifier.predict(x)
    assert logits.shape == (10, NUM_CLASSES) and logits.dtype == np.float32
    assert model.batch_sizes == [4, 4, 2]
    assert classifier.queries == 10 and classifier.num_classes == NUM_CLASSES
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-6)


def test_local_classifier_runs_the_module_in_eval_mode():
    module = nn.Sequential(nn.Flatten(), nn.Dropout(0.9), nn.Linear(192, 3)).train()
    classifier = LocalClassifier(module)
    x = images(6)
    module.train()  # flipped back by someone: queries must still be deterministic
    first, second = classifier.predict(x), classifier.predict(x)
    np.testing.assert_array_equal(first, second)
    assert not module.training


def test_budget_is_checked_before_anything_is_sent(model):
    classifier = LocalClassifier(model, max_queries=15)
    classifier.predict(images(10))
    with pytest.raises(BudgetExceeded, match="max_queries=15"):
        classifier.predict(images(10))
    assert classifier.queries == 10 and model.batch_sizes == [10]


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (images(2).astype(np.float64), TypeError, "float32"),
        (images(2)[0], ValueError, "4-D"),
        (images(2, shape=(3, 9, 9)), ValueError, r"\(n, 3, 8, 8\)"),
        (images(0), ValueError, "empty"),
        (nan_images(), ValueError, r"finite; images\[1, 2, 3, 4\] = nan"),
        ([[[[0.0]]]], TypeError, "numpy array"),
    ],
    ids=["float64", "3-D", "wrong-shape", "empty", "nan", "list"],
)  # fmt: skip
def test_bad_images_get_a_clear_error(model, bad, error, match):
    with pytest.raises(error, match=match):
        LocalClassifier(model, input_shape=INPUT_SHAPE).predict(bad)


@pytest.mark.parametrize(
    "kwargs", [{"max_batch": 0}, {"max_batch": 2.5}, {"max_queries": -1}, {"input_shape": (3, 8)}]
)
def test_local_classifier_rejects_bad_settings(model, kwargs):
    with pytest.raises(ValueError):
        LocalClassifier(model, **kwargs)


def test_label_function_applies_preprocessing_then_argmax(model):
    classifier = LocalClassifier(model)
    x = images(7)
    labels = as_label_function(classifier, preprocess=lambda z: 1 - z)(x)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, LocalClassifier(model).predict(1 - x).argmax(1))


# -- wire format --------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.int16, np.dtype(">f4"), np.bool_]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    ),
    fortran=st.booleans(),
)
def test_npy_round_trip(array, fortran):
    array = np.asfortranarray(array) if fortran else array
    decoded = decode_npy(encode_npy(array))
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


def lying_header_body() -> bytes:
    """A .npy header claiming 10^12 images, followed by 16 bytes of data."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 3, 8, 8), }"
    header += " " * (-(len(header) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(16)


def test_decode_npy_refuses_malformed_bodies_without_allocating():
    body = encode_npy(images(2))
    for bad, match in [
        (b"not an array at all", "not a .npy"),
        (pickle.dumps(images(2)), "not a .npy"),
        (body[:-3], "truncated"),
        (body + b"xyz", "trailing"),
        (lying_header_body(), "truncated"),
    ]:
        with pytest.raises(NpyFormatError, match=match):
            decode_npy(bad)


# -- the service --------------------------------------------------------------------------
def test_http_round_trip_equals_the_local_backend_exactly(service, model):
    client = HTTPClassifier(service.url, token=TOKEN, max_batch=4)
    reference = LocalClassifier(TinyNet(), max_batch=4)  # same weights (same seed), same batches
    x = images(10, seed=3)
    logits = client.predict(x)
    np.testing.assert_array_equal(logits, reference.predict(x))
    assert logits.dtype == np.float32 and logits.flags.writeable
    assert model.batch_sizes == [4, 4, 2]  # the client split the request
    assert client.queries == 10 and client.requests == 3
    assert service.queries_served == 10 and service.requests_served == 3


def test_health_reports_model_shape_classes_and_queries(service):
    client = HTTPClassifier(service.url, token=TOKEN)
    before = client.health()
    client.predict(images(6))
    after = client.health()
    assert before["status"] == "ok" and before["model"]["name"] == "tiny"
    assert before["model"]["parameters"] == sum(p.numel() for p in TinyNet().parameters())
    assert before["input_shape"] == list(INPUT_SHAPE) and before["dtype"] == "float32"
    assert before["max_batch"] == SERVER_MAX_BATCH and before["auth"] == "bearer"
    assert (before["queries_served"], after["queries_served"]) == (0, 6)
    assert after["num_classes"] == NUM_CLASSES


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN[:-1]])
def test_missing_or_wrong_token_is_401(service, token):
    for method, path, body in [
        ("POST", "/predict", encode_npy(images(2))),
        ("GET", "/health", None),
    ]:
        status, headers, payload = raw_request(service, method, path, body, token=token)
        assert status == 401
        assert headers["www-authenticate"].startswith("Bearer")
        assert "token" in json.loads(payload)["error"]
    with pytest.raises(ClassifierAuthError, match="401"):
        HTTPClassifier(service.url, token=token).predict(images(2))
    assert service.queries_served == 0


def test_right_token_is_200(service):
    status, headers, body = raw_request(service, "POST", "/predict", encode_npy(images(3)))
    assert status == 200 and headers["content-type"] == "application/x-npy"
    assert decode_npy(body).shape == (3, NUM_CLASSES)


def test_oversize_body_is_413_before_it_is_read(service):
    oversize = b"\0" * (service.max_request_bytes + 1)
    status, _, body = raw_request(service, "POST", "/predict", oversize)
    assert status == 413 and "max_request_bytes" in json.loads(body)["error"]
    # The client maps it to a clear error telling what to do.
    client = HTTPClassifier(service.url, token=TOKEN, max_batch=64)
    with pytest.raises(ClassifierRequestError, match="413.*lower max_batch"):
        client.predict(images(64))


UNPICKLED: list[str] = []


def record_unpickling(message: str) -> None:
    UNPICKLED.append(message)


class Booby:
    """Unpickling this calls :func:`record_unpickling` (pickled by reference, so the call
    lands in this module): proof that someone unpickled our data."""

    def __reduce__(self):
        return (record_unpickling, ("unpickled",))


def object_array_body() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([Booby(), 1], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def test_the_unpickling_canary_fires_when_unpickled():
    np.load(io.BytesIO(object_array_body()), allow_pickle=True)
    assert UNPICKLED == ["unpickled"]
    UNPICKLED.clear()


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (object_array_body(), "object arrays"),
        (pickle.dumps(Booby()), "not a .npy"),
        (encode_npy(images(2).astype(np.float64)), "float32"),
        (encode_npy(images(2).astype(np.float16)), "float32"),
        (encode_npy(images(2)[0]), "4-D"),
        (encode_npy(images(2, shape=(3, 9, 9))), r"\(n, 3, 8, 8\)"),
        (encode_npy(images(SERVER_MAX_BATCH + 1)), f"max_batch={SERVER_MAX_BATCH}"),
        (encode_npy(nan_images()), r"finite; images\[1, 2, 3, 4\] = nan"),
        (encode_npy(images(2))[:-4], "truncated"),
        (lying_header_body(), "truncated"),
        (encode_npy(images(0)), "empty"),
    ],
    ids=[
        "object-array", "raw-pickle", "float64", "float16", "ndim", "shape",
        "batch-too-large", "nan", "truncated", "lying-header", "empty",
    ],
)  # fmt: skip
def test_bad_requests_are_400_with_a_message_naming_the_problem(service, body, match):
    status, headers, payload = raw_request(service, "POST", "/predict", body)
    assert status == 400 and headers["content-type"] == "application/json"
    assert re.search(match, json.loads(payload)["error"])
    assert UNPICKLED == []
    # ...and the service is still fine.
    assert raw_request(service, "POST", "/predict", encode_npy(images(1)))[0] == 200


def test_big_endian_float32_is_accepted(service):
    x = images(3)
    status, _, body = raw_request(service, "POST", "/predict", encode_npy(x.astype(">f4")))
    assert status == 200
    np.testing.assert_array_equal(decode_npy(body), LocalClassifier(TinyNet()).predict(x))


def test_unknown_paths_and_missing_length_are_rejected(service):
    assert raw_request(service, "GET", "/predict")[0] == 404
    assert raw_request(service, "POST", "/health", b"{}")[0] == 404
    host, port = service.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(
            f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 411")


def test_server_error_from_the_client_side_carries_the_server_message(service):
    client = HTTPClassifier(service.url, token=TOKEN)
    with pytest.raises(ClassifierRequestError, match=r"400 .*\(n, 3, 8, 8\)") as caught:
        client.predict(images(2, shape=(3, 9, 9)))
    assert caught.value.status == 400


def test_busy_server_answers_503_with_retry_after():
    model = GatedNet()
    server = make_server(LocalClassifier(model), max_concurrent=1)
    serve_in_background(server)
    try:
        held = threading.Thread(
            target=raw_request, args=(server, "POST", "/predict", encode_npy(images(1)))
        )
        held.start()
        assert model.entered.wait(10)
        status, headers, body = raw_request(server, "POST", "/predict", encode_npy(images(1)))
        assert status == 503 and headers["retry-after"] == "1"
        assert "busy" in json.loads(body)["error"]
    finally:
        model.release.set()
        held.join(10)
        server.shutdown()
        server.server_close()
    assert server.queries_served == 1


def test_binding_beyond_loopback_without_a_token_warns(model):
    with pytest.warns(UserWarning, match="without a token"):
        server = make_server(LocalClassifier(model), host="0.0.0.0")
    server.server_close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither of these may warn
        make_server(LocalClassifier(model), host="0.0.0.0", token="t").server_close()
        make_server(LocalClassifier(model)).server_close()


@pytest.mark.parametrize(
    "kwargs",
    [{"max_batch": 0}, {"token": ""}, {"max_request_bytes": 0}, {"max_concurrent": 0}, {"input_shape": (8, 8)}],
)  # fmt: skip
def test_make_server_rejects_bad_settings(model, kwargs):
    with pytest.raises(ValueError):
        make_server(LocalClassifier(model), **kwargs)


# -- the client against misbehaving servers -----------------------------------------------
class ScriptedServer(ThreadingHTTPServer):
    """A real server that answers the first ``failures`` POSTs with ``status`` (or sleeps
    ``delay`` seconds), then serves a real LocalClassifier."""

    daemon_threads = True

    def __init__(self, status: int = 503, failures: int = 0, delay: float = 0.0):
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.status, self.failures, self.delay = status, failures, delay
        self.backend = LocalClassifier(TinyNet())
        self.posts = 0
        self.wake = threading.Event()

    @property
    def url(self) -> str:
        return "http://{}:{}".format(*self.server_address[:2])


class ScriptedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ScriptedServer

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts += 1
        if self.server.delay:
            self.server.wake.wait(self.server.delay)
        if self.server.posts <= self.server.failures:
            self.reply(self.server.status, b'{"error": "scripted failure"}', {"Retry-After": "0"})
        else:
            self.reply(200, encode_npy(self.server.backend.predict(decode_npy(body))))

    def reply(self, status: int, payload: bytes, extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted() -> Iterator:
    servers: list[ScriptedServer] = []

    def start(**kwargs) -> ScriptedServer:
        server = ScriptedServer(**kwargs)
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.wake.set()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [502, 503, 504])
def test_client_retries_transient_failures_then_succeeds(scripted, status):
    server = scripted(status=status, failures=2)
    client = HTTPClassifier(server.url, retries=3, backoff=0.01)
    x = images(5)
    np.testing.assert_array_equal(client.predict(x), LocalClassifier(TinyNet()).predict(x))
    assert server.posts == 3 and client.requests == 3 and client.queries == 5


def test_client_gives_up_after_its_retries_with_a_clear_error(scripted):
    server = scripted(status=503, failures=100)
    client = HTTPClassifier(server.url, retries=3, backoff=0.01)
    with pytest.raises(
        ClassifierUnavailable, match="after 4 attempts.*HTTP 503 scripted failure"
    ) as caught:
        client.predict(images(2))
    assert caught.value.status == 503
    assert server.posts == 4 and client.queries == 0


def test_client_does_not_retry_a_server_error(scripted):
    server = scripted(status=500, failures=100)
    with pytest.raises(ClassifierAPIError, match="HTTP 500 scripted failure") as caught:
        HTTPClassifier(server.url, retries=3, backoff=0.01).predict(images(2))
    assert caught.value.status == 500 and server.posts == 1


def test_client_retries_refused_connections_then_gives_up():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = HTTPClassifier(f"http://127.0.0.1:{port}", retries=2, backoff=0.01)
    with pytest.raises(ClassifierUnavailable, match="after 3 attempts.*ConnectionRefusedError"):
        client.predict(images(1))
    assert client.requests == 3


def test_client_reconnects_when_the_server_dropped_its_idle_connection(model):
    server = make_server(LocalClassifier(model), request_timeout=0.1)
    serve_in_background(server)
    try:
        client = HTTPClassifier(server.url, retries=0)  # no retries to spend
        client.predict(images(2))
        time.sleep(1.0)  # meanwhile the server times the idle keep-alive connection out
        client.predict(images(2))
        assert client.queries == 4 and server.requests_served == 2
        assert client.requests == 3  # the request on the dead connection, then a fresh one
    finally:
        server.shutdown()
        server.server_close()


def test_client_timeout_surfaces_as_a_clear_error(scripted):
    server = scripted(delay=5.0)
    client = HTTPClassifier(server.url, timeout=0.2, retries=3, backoff=0.01)
    with pytest.raises(ClassifierTimeout, match=r"POST .*/predict timed out after 0.2 s"):
        client.predict(images(1))
    assert client.requests == 1  # a slow service is not hammered with retries


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"url": "ftp://127.0.0.1/"}, ValueError),
        ({"url": "file:///etc/passwd"}, ValueError),
        ({"url": "http://127.0.0.1", "timeout": 0}, ValueError),
        ({"url": "http://127.0.0.1", "retries": -1}, ValueError),
        ({"url": "http://127.0.0.1", "backoff": -1.0}, ValueError),
        ({"url": "http://127.0.0.1", "token": ""}, ValueError),
    ],
)
def test_client_rejects_bad_settings(kwargs, error):
    with pytest.raises(error):
        HTTPClassifier(**kwargs)


def test_client_warns_before_sending_a_token_in_clear_text_off_machine():
    with pytest.warns(UserWarning, match="clear text"):
        HTTPClassifier("http://classifier.example.com:8000", token="t")


# -- ResNets ------------------------------------------------------------------------------
def test_resnet50_has_torchvision_keys_and_parameter_count():
    model = resnet50()
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    assert len(state) == 320  # 161 parameters + 3 buffers for each of 53 BatchNorms
    for key in [
        "conv1.weight", "bn1.running_mean", "bn1.num_batches_tracked", "layer1.0.conv1.weight",
        "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var",
        "layer2.0.downsample.0.weight", "layer3.5.bn3.bias", "layer4.2.conv3.weight",
        "fc.weight", "fc.bias",
    ]:  # fmt: skip
        assert key in state, key
    assert "layer1.1.downsample.0.weight" not in state and "layer3.6.conv1.weight" not in state
    assert tuple(state["conv1.weight"].shape) == (64, 3, 7, 7)
    assert tuple(state["layer2.0.conv2.weight"].shape) == (128, 128, 3, 3)
    assert model.layer2[0].conv2.stride == (2, 2)  # v1.5: the stride sits on the 3x3 conv
    assert tuple(state["fc.weight"].shape) == (1000, 2048)


@pytest.mark.parametrize(
    ("arch", "params"),
    [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet101", 44_549_160)],
)
def test_other_resnets_have_torchvision_parameter_counts(arch, params):
    assert sum(p.numel() for p in build_resnet(arch).parameters()) == params


def test_resnet_forward_shapes_for_both_stems():
    with torch.no_grad():
        assert resnet50(num_classes=7).eval()(torch.rand(2, 3, 32, 32)).shape == (2, 7)
        small = resnet18(num_classes=10, small_input=True).eval()
        assert small(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert tuple(small.conv1.weight.shape) == (64, 3, 3, 3)
    assert set(small.state_dict()) == set(resnet18(num_classes=10).state_dict())


def test_load_weights_round_trip(tmp_path):
    source, target = resnet50(num_classes=10), resnet50(num_classes=10)
    with torch.no_grad():  # make the BN buffers non-trivial too
        source.bn1.running_mean.uniform_()
    path = tmp_path / "resnet50.pth"
    torch.save(source.state_dict(), path)
    assert load_weights(target, path) is target
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source.eval()(x), target.eval()(x))


def test_load_weights_strips_a_data_parallel_prefix(tmp_path):
    source, target = resnet18(num_classes=3), resnet18(num_classes=3)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "dp.pth")
    load_weights(target, tmp_path / "dp.pth")
    assert torch.equal(source.fc.weight, target.fc.weight)


def test_load_weights_names_missing_unexpected_and_misshapen_keys(tmp_path):
    state = resnet18(num_classes=3).state_dict()
    broken = dict(state)
    del broken["layer1.0.conv1.weight"]
    broken["extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(
        ValueError,
        match=r"1 missing keys \[layer1.0.conv1.weight\].*1 unexpected keys \[extra.weight\]",
    ):
        load_weights(resnet18(num_classes=3), tmp_path / "broken.pth")
    torch.save(state, tmp_path / "three.pth")
    with pytest.raises(ValueError, match=r"fc.weight: file \(3, 512\) vs model \(10, 512\)"):
        load_weights(resnet18(num_classes=10), tmp_path / "three.pth")
    with pytest.raises(FileNotFoundError):
        load_weights(resnet18(), tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read"):
        load_weights(resnet18(), tmp_path / "junk.pth")


def test_load_weights_never_unpickles_arbitrary_objects(tmp_path):
    torch.save({"conv1.weight": Booby()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="cannot read"):
        load_weights(resnet18(), tmp_path / "evil.pth")
    assert UNPICKLED == []


def test_load_classifier_from_a_bare_state_dict_infers_classes_and_stem(tmp_path):
    source = resnet18(num_classes=10, small_input=True)
    torch.save(source.state_dict(), tmp_path / "bare.pth")
    module, spec = load_classifier(tmp_path / "bare.pth", "resnet18", input_shape=(3, 32, 32))
    assert spec == {
        "arch": "resnet18",
        "num_classes": 10,
        "input_shape": [3, 32, 32],
        "mean": None,
        "std": None,
    }
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(module(x), source.eval()(x))
    with pytest.raises(ValueError, match="missing keys"):  # wrong arch for these weights
        load_classifier(tmp_path / "bare.pth", "resnet34")


def test_checkpoint_carries_arch_shape_and_normalization(tmp_path):
    source = resnet18(num_classes=4, small_input=True).eval()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    save_classifier_checkpoint(
        tmp_path / "ckpt.pth", source, "resnet18", input_shape=(3, 16, 16), mean=mean, std=std
    )
    module, spec = load_classifier(tmp_path / "ckpt.pth")
    assert spec["arch"] == "resnet18" and spec["input_shape"] == [3, 16, 16]
    assert spec["mean"] == mean and spec["std"] == std
    x = torch.rand(2, 3, 16, 16)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(module(x), source(expected))
    with pytest.raises(ValueError, match="std must be positive"):
        InputNormalization([0.0], [0.0])


def test_cli_arch_choices_match_the_builders():
    assert set(ARCH_CHOICES) == set(ARCHITECTURES)


def test_serve_classifier_command_serves_a_checkpoint(tmp_path):
    import argparse

    source = resnet18(num_classes=10, small_input=True).eval()
    path = tmp_path / "served.pth"
    save_classifier_checkpoint(path, source, "resnet18", input_shape=(3, 16, 16))
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve-classifier", "--weights", str(path), "--port", "0"])
    assert args.func.__name__ == "run_serve" and args.host == "127.0.0.1"

    env = {**os.environ, "ZOOPT_CLASSIFIER_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "oracles.http_service", "serve-classifier", "--weights", str(path), "--port", "0", "--quiet"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        banner = process.stdout.readline()
        url = re.search(r"on (http://127\.0\.0\.1:\d+)", banner)
        assert url, banner
        client = HTTPClassifier(url.group(1), token=TOKEN, max_batch=8)
        assert client.health()["input_shape"] == [3, 16, 16]
        assert client.health()["num_classes"] == 10
        x = images(8, shape=(3, 16, 16))
        np.testing.assert_array_equal(
            client.predict(x), LocalClassifier(source, max_batch=8).predict(x)
        )
        with pytest.raises(ClassifierAuthError):
            HTTPClassifier(url.group(1)).predict(x)
    finally:
        process.terminate()
        process.wait(10)
        process.stdout.close()


def test_import_oracles_does_not_import_torch():
    code = "import oracles, oracles.classifier, oracles.http_service, zoopt.certify, sys; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_lazy_package_exports_resolve():
    import oracles

    assert oracles.HTTPClassifier is HTTPClassifier and oracles.resnet50 is resnet50
    with pytest.raises(AttributeError):
        oracles.no_such_thing  # noqa: B018


def test_certify_through_the_service_with_a_denoiser_matches_local(service, model):
    from oracles.dncnn import DnCNN
    from zoopt.certify import certify

    torch.manual_seed(0)
    denoiser = DnCNN(3, depth=3, features=4).eval()

    def denoise(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return denoiser(torch.from_numpy(x)).numpy()

    remote = HTTPClassifier(service.url, token=TOKEN, max_batch=SERVER_MAX_BATCH)
    local = LocalClassifier(TinyNet(), max_batch=SERVER_MAX_BATCH)
    x = images(1)[0]
    over_http = certify(as_label_function(remote, denoise), x, 0.25, n0=20, n=100, batch=50, rng=1)
    in_process = certify(as_label_function(local, denoise), x, 0.25, n0=20, n=100, batch=50, rng=1)
    assert over_http == in_process
    assert remote.queries == 120 and service.queries_served == 120
