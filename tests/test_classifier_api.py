"""The query-only classifier API: the local backend, the Open Inference Protocol (KServe V2)
codec, our real server on 127.0.0.1 (attacked over raw sockets), the httpx client against
real (flaky, slow, busy, lying) servers, interoperability with NVIDIA's tritonclient and
Seldon's MLServer, and the ResNets."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import pickle
import re
import shutil
import socket
import struct
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
    NonFiniteLogits,
    as_label_function,
)
from oracles.http_service import (
    ARCH_CHOICES,
    add_serve_parser,
    make_server,
    serve_in_background,
)
from oracles.open_inference import (
    HEADER_LENGTH,
    ProtocolError,
    decode_tensor,
    encode_message,
    encode_tensors,
    parse_header_length,
    split_body,
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
from zoopt.oracle import BudgetExceeded, OracleError

# The server and client need the `serve` extra (part of `all`, which `make test` installs):
# without it these tests skip, naming the missing package.
for _package in ("httpx", "starlette", "uvicorn"):
    pytest.importorskip(_package, reason=f"{_package} is missing: pip install -e '.[serve]'")

REPO = Path(__file__).resolve().parents[1]
INPUT_SHAPE = (3, 8, 8)
NUM_CLASSES = 5
TOKEN = "correct-horse-battery-staple"
SERVER_MAX_BATCH = 16
INFER = "/v2/models/tiny/infer"


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


class NaNNet(TinyNet):
    """A TinyNet whose logit [1, 2] is NaN: a broken remote model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x).clone()
        out[1, 2] = float("nan")
        return out


def images(n: int, seed: int = 0, shape: tuple[int, ...] = INPUT_SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def nan_images() -> np.ndarray:
    x = images(2)
    x[1, 2, 3, 4] = np.nan
    return x


def reference(x: np.ndarray, max_batch: int = SERVER_MAX_BATCH) -> np.ndarray:
    """Local inference with the service's weights (same seed) and batches."""
    return LocalClassifier(TinyNet(), max_batch=max_batch).predict(x)


@pytest.fixture
def model() -> TinyNet:
    return TinyNet()


def start(module: nn.Module, **kwargs):
    kwargs.setdefault("token", TOKEN)
    kwargs.setdefault("max_batch", SERVER_MAX_BATCH)
    server = make_server(LocalClassifier(module, input_shape=INPUT_SHAPE, name="tiny"), **kwargs)
    serve_in_background(server)
    return server


def stop(server) -> None:
    server.shutdown()
    server.server_close()


@pytest.fixture
def service(model: TinyNet) -> Iterator:
    """Our real server on 127.0.0.1 (token auth) serving ``model`` as "tiny"."""
    server = start(model)
    yield server
    stop(server)


def infer_body(
    x: np.ndarray, binary: bool = True, name: str = "images", datatype: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """An infer request for ``x`` (written by hand here, not by our codec)."""
    spec = {"name": name, "shape": list(x.shape), "datatype": datatype or "FP32"}
    document = {"inputs": [spec], "outputs": [{"name": "logits"}]}
    if not binary:
        spec["data"] = x.ravel().tolist()
        return json.dumps(document).encode(), {"Content-Type": "application/json"}
    raw = x.astype("<f4").tobytes()
    spec["parameters"] = {"binary_data_size": len(raw)}
    document["parameters"] = {"binary_data_output": True}
    head = json.dumps(document).encode()
    return head + raw, {HEADER_LENGTH: str(len(head))}


def raw_request(
    server,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    token: str | None = TOKEN,
) -> tuple[int, dict[str, str], bytes]:
    """One plain http.client request; returns (status, lower-cased headers, body)."""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def read_logits(payload: bytes, headers: dict[str, str]) -> np.ndarray:
    """Logits from an infer response, decoded by hand (json + np.frombuffer)."""
    length = int(headers.get(HEADER_LENGTH.lower(), len(payload)))
    document = json.loads(payload[:length])
    (output,) = document["outputs"]
    assert output["name"] == "logits" and output["datatype"] == "FP32"
    if "data" in output:
        return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    assert output["parameters"]["binary_data_size"] == len(payload) - length
    return np.frombuffer(payload[length:], dtype="<f4").reshape(output["shape"])


def exchange(server, data: bytes, wait: float = 3.0) -> bytes:
    """Send raw bytes on a fresh connection; everything the server answers until it closes
    the connection or ``wait`` seconds pass."""
    with socket.create_connection(server.server_address[:2], timeout=wait) as sock:
        sock.sendall(data)
        chunks, deadline = [], time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def statuses(answer: bytes) -> list[int]:
    return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


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


# -- the protocol codec -------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.float16, np.int16, np.uint8, np.bool_]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4),
        elements={"allow_nan": False},
    ),
    binary=st.booleans(),
)
def test_tensor_round_trip_in_both_encodings(array, binary):
    specs, parts = encode_tensors([("t", array, binary)])
    body, length = encode_message({"outputs": specs}, parts)
    assert (length is not None) == binary
    document, tail = split_body(body, length)
    decoded, used = decode_tensor(document["outputs"][0], tail, 0, "t")
    assert used == len(tail) and decoded.shape == array.shape and decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("value", ["+5", "1_2", " 5x", "-1", "0x10", "٥", "1e3", "99"])
def test_header_length_must_be_plain_digits_within_the_body(value):
    with pytest.raises(ProtocolError, match=HEADER_LENGTH):
        parse_header_length(value, body_length=50)
    assert parse_header_length(" 12 ", 50) == 12 and parse_header_length(None, 50) is None


@pytest.mark.parametrize(
    ("spec", "binary", "match"),
    [
        ({"name": "x", "datatype": "FP32", "shape": [2], "data": ["nan", "1"]}, b"", "numbers only"),
        ({"name": "x", "datatype": "FP32", "shape": [2], "data": [[1.0], [2.0, 3.0]]}, b"", "regular array"),
        ({"name": "x", "datatype": "FP32", "shape": [3], "data": [1.0, 2.0]}, b"", "needs 3"),
        ({"name": "x", "datatype": "FP32", "shape": [2], "data": {"a": 1}}, b"", "JSON list"),
        ({"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}, b"", "datatype"),
        ({"name": "x", "datatype": "FP32", "shape": [True], "data": [1.0]}, b"", "shape"),
        ({"name": "x", "datatype": "FP32", "shape": [10**12, 3],
          "parameters": {"binary_data_size": 8}}, bytes(8), "needs 12000000000000"),
        ({"name": "x", "datatype": "FP32", "shape": [4],
          "parameters": {"binary_data_size": 16}}, bytes(8), "ends after 8 of 16"),
        ({"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2],
          "parameters": {"binary_data_size": 8}}, bytes(8), "both"),
    ],
    ids=["strings", "ragged", "count", "not-a-list", "bytes", "bool-shape", "lying-shape",
         "short-binary", "both-encodings"],
)  # fmt: skip
def test_decode_tensor_names_what_is_wrong_without_allocating(spec, binary, match):
    with pytest.raises(ProtocolError, match=match):
        decode_tensor(spec, memoryview(binary), 0, "input 'x'")


def test_split_body_refuses_non_json_and_deep_nesting():
    for body, match in [
        (pickle.dumps(images(1)), "not valid JSON"),
        (b"[1, 2]", "must be an object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply|not valid JSON"),
    ]:
        with pytest.raises(ProtocolError, match=match):
            split_body(body, None)


# -- the service --------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_round_trip_equals_local_inference_exactly(service, model, binary):
    client = HTTPClassifier(service.url, token=TOKEN, max_batch=4, binary=binary)
    x = images(10, seed=3)
    logits = client.predict(x)
    np.testing.assert_array_equal(logits, reference(x, max_batch=4))
    assert logits.dtype == np.float32 and logits.flags.writeable
    assert model.batch_sizes == [4, 4, 2]  # the client split the request
    assert client.queries == 10 and client.requests == 3  # infers only, not the metadata
    assert service.queries_served == 10 and service.requests_served == 3


def test_health_metadata_ready_and_repository_index(service):
    get = lambda path: raw_request(service, "GET", path)  # noqa: E731
    assert get("/v2/health/live")[::2] == (200, b'{"live":true}')
    assert get("/v2/health/ready")[::2] == (200, b'{"ready":true}')
    assert "binary_tensor_data" in json.loads(get("/v2")[2])["extensions"]
    for prefix in ("/v2/models/tiny", "/v2/models/tiny/versions/1"):
        status, _, body = get(prefix)
        metadata = json.loads(body)
        assert status == 200 and metadata["name"] == "tiny" and metadata["versions"] == ["1"]
        assert metadata["inputs"] == [
            {"name": "images", "datatype": "FP32", "shape": [-1, *INPUT_SHAPE]}
        ]
        assert metadata["outputs"][0]["name"] == "logits"
        assert json.loads(get(prefix + "/ready")[2]) == {"name": "tiny", "ready": True}
    status, _, body = raw_request(service, "POST", "/v2/repository/index", b"{}")
    assert json.loads(body) == [{"name": "tiny", "version": "1", "state": "READY"}]
    HTTPClassifier(service.url, token=TOKEN).predict(images(2))
    assert json.loads(get("/v2/models/tiny")[2])["outputs"][0]["shape"] == [-1, NUM_CLASSES]
    client = HTTPClassifier(service.url, token=TOKEN)
    assert client.ready() and client.metadata()["name"] == "tiny"


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN[:-1]])
def test_missing_or_wrong_token_is_401_on_every_endpoint(service, token):
    body, headers = infer_body(images(2))
    for method, path, payload in [
        ("POST", INFER, body),
        ("GET", "/v2/health/ready", None),
        ("GET", "/v2/models/tiny", None),
    ]:
        status, response_headers, answer = raw_request(
            service, method, path, payload, headers, token
        )
        assert status == 401
        assert response_headers["www-authenticate"].startswith("Bearer")
        assert "token" in json.loads(answer)["error"]
    with pytest.raises(ClassifierAuthError, match="401"):
        HTTPClassifier(service.url, token=token, model="tiny").predict(images(2))
    assert service.queries_served == 0


def test_oversize_body_is_413_before_it_is_read(service):
    oversize = b"\0" * (service.max_request_bytes + 1)
    status, headers, body = raw_request(service, "POST", INFER, oversize)
    assert status == 413 and "max_request_bytes" in json.loads(body)["error"]
    assert "connection" not in headers  # a small body is drained: the connection stays usable
    # A declared 2 GiB body: answered from the headers alone, and the connection closed.
    answer = exchange(service, (REQUEST_HEAD + f"Content-Length: {2**31}\r\n\r\n").encode())
    assert statuses(answer) == [413] and b"connection: close" in answer.lower()


def test_a_chunked_body_over_the_limit_is_413_while_it_is_read(service):
    """No Content-Length to check up front: the limit holds as the chunks arrive."""
    chunk = b"a" * 32768
    with socket.create_connection(service.server_address, timeout=5) as sock:
        sock.sendall((REQUEST_HEAD + "Transfer-Encoding: chunked\r\n\r\n").encode())
        try:
            for _ in range(service.max_request_bytes // len(chunk) + 2):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:  # the server may close before we are done sending
            pass
        answer = b""
        try:
            while chunk := sock.recv(65536):  # until the server closes the connection
                answer += chunk
        except ConnectionResetError:
            # the server closed with our unread chunks in its buffer: the kernel answers
            # them with a reset, after the 413 it had already sent (read above)
            pass
    assert statuses(answer) == [413] and b"exceeds max_request_bytes" in answer


UNPICKLED: list[str] = []


def record_unpickling(message: str) -> None:
    UNPICKLED.append(message)


class Booby:
    """Unpickling this calls :func:`record_unpickling` (pickled by reference, so the call
    lands in this module): proof that someone unpickled our data."""

    def __reduce__(self):
        return (record_unpickling, ("unpickled",))


def test_the_unpickling_canary_fires_when_unpickled():
    pickle.loads(pickle.dumps(Booby()))
    assert UNPICKLED == ["unpickled"]
    UNPICKLED.clear()


def _json_request(**changes) -> tuple[bytes, dict[str, str]]:
    body, headers = infer_body(images(2), binary=False)
    document = json.loads(body)
    for key, value in changes.items():
        if key in ("datatype", "shape", "name", "data"):
            document["inputs"][0][key] = value
        else:
            document[key] = value
    return json.dumps(document).encode(), headers


def _binary_request(x: np.ndarray, extra: bytes = b"", length_header: str | None = None):
    body, headers = infer_body(x)
    if length_header is not None:
        headers[HEADER_LENGTH] = length_header
    return body + extra, headers


def _declared_shape_request(n: int) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [n, *INPUT_SHAPE], "parameters": {"binary_data_size": 4 * n * 192}}]}).encode()  # fmt: skip
    return head + bytes(16), {HEADER_LENGTH: str(len(head))}


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        ((pickle.dumps(Booby()), {}), "not valid JSON"),
        ((pickle.dumps(Booby()), {HEADER_LENGTH: "10"}), "not valid JSON"),
        (_json_request(datatype="FP64"), "datatype must be FP32, got 'FP64'"),
        (_json_request(name="pixels"), "unknown input 'pixels'; the model's input is 'images'"),
        (_json_request(shape=[2, 3, 8]), "data has 384 values but shape"),
        (_json_request(shape=[1, 3, 16, 8]), r"\(n, 3, 8, 8\)"),
        (_json_request(data=["0.5"] * 384), "numbers only"),
        (_json_request(outputs=[{"name": "probabilities"}]), "unknown output 'probabilities'"),
        (_json_request(inputs=[]), "inputs must be a list with the one input"),
        (_binary_request(images(SERVER_MAX_BATCH + 1)), f"max_batch={SERVER_MAX_BATCH}"),
        (_declared_shape_request(10**12), "max_batch"),
        (_binary_request(nan_images()), r"finite; images\[1, 2, 3, 4\] = nan"),
        (_binary_request(images(2), extra=b"xyz"), "3 bytes of binary data follow"),
        (_binary_request(images(0)), "empty"),
        (_binary_request(images(2), length_header="+5"), "decimal byte count"),
        (_binary_request(images(2), length_header="1_2"), "decimal byte count"),
        (_binary_request(images(2), length_header="999999"), "only"),
    ],
    ids=["pickle", "pickle-as-binary", "fp64", "input-name", "count", "shape", "strings",
         "output-name", "no-inputs", "batch-too-large", "lying-shape", "nan", "trailing-bytes",
         "empty", "length-plus", "length-underscore", "length-too-long"],
)  # fmt: skip
def test_bad_infer_requests_are_400_with_a_message_naming_the_problem(service, request_, match):
    body, headers = request_
    status, response_headers, payload = raw_request(service, "POST", INFER, body, headers)
    assert status == 400 and response_headers["content-type"] == "application/json"
    assert re.search(match, json.loads(payload)["error"]), payload
    assert UNPICKLED == []
    # ...and the service is still fine.
    assert raw_request(service, "POST", INFER, *infer_body(images(1)))[0] == 200


def test_unknown_models_paths_methods_and_encodings_get_json_errors(service):
    body, headers = infer_body(images(1))
    for method, path, status, match in [
        ("POST", "/v2/models/other/infer", 404, "unknown model 'other'; this server serves 'tiny'"),
        ("POST", "/v2/models/tiny/versions/2/infer", 404, "unknown version '2'"),
        ("GET", "/v2/models/other", 404, "unknown model"),
        ("GET", "/predict", 404, "unknown path '/predict'"),
        ("GET", INFER, 405, "method not allowed"),
    ]:
        answer = raw_request(service, method, path, body if method == "POST" else None, headers)
        assert answer[0] == status and re.search(match, json.loads(answer[2])["error"])
    gzipped = raw_request(service, "POST", INFER, body, {**headers, "Content-Encoding": "gzip"})
    assert gzipped[0] == 415 and "gzip" in json.loads(gzipped[2])["error"]
    with pytest.raises(ClassifierRequestError, match="404 unknown model 'nope'"):
        HTTPClassifier(service.url, token=TOKEN, model="nope").predict(images(1))


def test_server_error_reaches_the_client_with_the_server_message(service):
    client = HTTPClassifier(service.url, token=TOKEN, model="tiny", input_shape=(3, 9, 9))
    with pytest.raises(ClassifierRequestError, match=r"400 .*\(n, 3, 8, 8\)") as caught:
        client.predict(images(2, shape=(3, 9, 9)))
    assert caught.value.status == 400


def test_kept_alive_responses_are_not_delayed_by_nagle(service):
    """A response leaves in two writes (head, then body). With Nagle's algorithm on, the body
    waits for the client's delayed ACK of the head: ~40 ms on every kept-alive request. We
    time the gap between a response's first and last byte, which is independent of load."""
    request = f"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    gaps = []
    with socket.create_connection(service.server_address, timeout=5) as sock:
        for _ in range(12):
            sock.sendall(request.encode())
            answer = sock.recv(4096)
            first = time.perf_counter()
            while not answer.endswith(b'{"ready":true}'):
                answer += sock.recv(4096)
            gaps.append(time.perf_counter() - first)
    assert sorted(gaps[2:])[5] < 0.02, gaps


def test_a_request_beyond_the_queue_bound_gets_503_with_retry_after():
    model = GatedNet()
    server = start(model, max_queue=1)
    try:
        held, queued = (
            threading.Thread(
                target=raw_request, args=(server, "POST", INFER, *infer_body(images(1, seed)))
            )
            for seed in (1, 2)
        )
        held.start()
        assert model.entered.wait(10)  # the first is in the model, the second waits
        queued.start()
        deadline = time.monotonic() + 10
        while server.batcher.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, headers, body = raw_request(server, "POST", INFER, *infer_body(images(1)))
        assert status == 503 and headers["retry-after"] == "1"
        assert "queue full" in json.loads(body)["error"]
    finally:
        model.release.set()
        held.join(10)
        queued.join(10)
        stop(server)
    assert server.queries_served == 2


def test_binding_beyond_loopback_without_a_token_warns(model):
    with pytest.warns(UserWarning, match="without a token"):
        server = make_server(LocalClassifier(model), host="0.0.0.0")
    server.server_close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither of these may warn
        make_server(LocalClassifier(model), host="0.0.0.0", token="t").server_close()
        make_server(LocalClassifier(model)).server_close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_batch": 0}, "max_batch"), ({"token": ""}, "token"), ({"max_request_bytes": 0}, "max_request_bytes"),
     ({"max_queue": 0}, "max_queue"), ({"input_shape": (8, 8)}, "input_shape"),
     ({"max_connections_per_client": 0}, "max_connections_per_client"),
     ({"queue_timeout": 0}, "queue_timeout"), ({"max_batch_delay_ms": -1}, "max_batch_delay_ms"),
     ({"request_timeout": float("inf")}, "inf"), ({"model_name": "a/b"}, "a/b")],
)  # fmt: skip
def test_make_server_rejects_bad_settings(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_server(LocalClassifier(model), **kwargs)


# -- attacks over raw sockets -------------------------------------------------------------
REQUEST_HEAD = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"


@pytest.mark.parametrize(
    "lengths",
    [["5", "6"], ["+5"], ["1_2"], ["-1"], ["0x5"], ["5, 6"], [" 5 5"]],
    ids=["duplicate-conflicting", "plus", "underscore", "negative", "hex", "list", "two-numbers"],
)
def test_malformed_content_length_is_400_and_the_connection_closed(service, lengths):
    head = REQUEST_HEAD + "".join(f"Content-Length: {v}\r\n" for v in lengths) + "\r\n"
    answer = exchange(service, head.encode() + b"abcdefghijkl")
    assert statuses(answer) == [400]  # one answer; nothing after it was parsed as a request
    assert service.requests_served == 0


def test_identical_duplicate_content_lengths_frame_one_body(service):
    """RFC 9112 section 6.3 lets a server accept repeated identical values (h11 does): the
    body is framed once, so nothing can be smuggled after it."""
    body, headers = infer_body(images(1))
    head = (
        REQUEST_HEAD + f"{HEADER_LENGTH}: {headers[HEADER_LENGTH]}\r\n"
        + f"Content-Length: {len(body)}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )  # fmt: skip
    answer = exchange(service, head.encode() + body)
    assert statuses(answer) == [200] and service.requests_served == 1


def test_the_body_of_a_get_is_not_parsed_as_a_second_request(service):
    smuggled = f"GET /v2/models/tiny HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    head = (
        f"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Length: {len(smuggled)}\r\n\r\n"
    )
    answer = exchange(service, (head + smuggled).encode(), wait=1.5)
    assert statuses(answer) == [200] and b'"ready":true' in answer
    assert b'"inputs"' not in answer  # the metadata of the smuggled GET never came back


def _trickle(server, data: bytes, every: float, seconds: float, outcome: dict, key: str) -> None:
    """Send ``data`` one byte per ``every`` seconds for at most ``seconds``; record what the
    server answered (or "closed") and when."""
    started = time.monotonic()
    with socket.create_connection(server.server_address[:2], timeout=seconds) as sock:
        sock.settimeout(every)
        for i in range(len(data)):
            if time.monotonic() - started > seconds:
                break
            try:
                sock.sendall(data[i : i + 1])
                answer = sock.recv(4096)
                outcome[key] = (statuses(answer) or ["closed"])[0], time.monotonic() - started
                return
            except TimeoutError:
                continue  # nothing from the server yet: next byte
            except OSError:
                outcome[key] = "closed", time.monotonic() - started
                return
    outcome[key] = "still open", time.monotonic() - started


def test_slow_trickling_clients_time_out_without_blocking_anyone():
    """Four clients trickle their headers and four their body, a byte every 0.1 s (each
    byte would reset a per-read timeout); with request_timeout=1 s and max_queue=1 they
    are cut off within the deadline, and meanwhile every normal request is answered."""
    server = start(TinyNet(), max_queue=1, request_timeout=1.0)
    body, headers = infer_body(images(1))
    with_body = (REQUEST_HEAD + f"{HEADER_LENGTH}: {headers[HEADER_LENGTH]}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    outcome: dict = {}
    threads = []
    try:
        for i in range(4):
            head_only = threading.Thread(
                target=_trickle, args=(server, REQUEST_HEAD.encode() * 10, 0.1, 6.0, outcome, f"head{i}")
            )  # fmt: skip
            threads.append(head_only)

            def body_trickler(key=f"body{i}"):
                with socket.create_connection(server.server_address[:2], timeout=6) as sock:
                    sock.sendall(with_body)  # headers at once: the body then trickles
                    started = time.monotonic()
                    sock.settimeout(0.1)
                    for byte in body:
                        try:
                            sock.sendall(bytes([byte]))
                            answer = sock.recv(4096)
                            outcome[key] = (
                                (statuses(answer) or ["closed"])[0],
                                time.monotonic() - started,
                            )
                            return
                        except TimeoutError:
                            if time.monotonic() - started > 6:
                                break
                        except OSError:
                            outcome[key] = "closed", time.monotonic() - started
                            return
                    outcome[key] = "still open", time.monotonic() - started

            threads.append(threading.Thread(target=body_trickler))
        for thread in threads:
            thread.start()
        time.sleep(0.3)  # the tricklers are connected and sending
        client = HTTPClassifier(server.url, token=TOKEN, model="tiny", input_name="images",
                                output_name="logits", retries=0, timeout=5)  # fmt: skip
        latencies = []
        for k in range(8):
            t = time.monotonic()
            np.testing.assert_array_equal(
                client.predict(images(2, seed=k)), reference(images(2, seed=k))
            )
            latencies.append(time.monotonic() - t)
        client.close()
        for thread in threads:
            thread.join(10)
    finally:
        stop(server)
    assert max(latencies) < 0.5, latencies  # no normal request waited for the tricklers
    for i in range(4):
        assert outcome[f"head{i}"][0] == "closed" and outcome[f"head{i}"][1] < 3.0, outcome
        assert outcome[f"body{i}"][0] == 408 and outcome[f"body{i}"][1] < 3.0, outcome
    assert server.requests_served == 8


def test_a_slow_body_never_holds_the_only_slot():
    """A request enters the queue after its body is complete: with max_queue=1, a client
    halfway through sending its body does not make others get 503."""
    server = start(TinyNet(), max_queue=1, request_timeout=5.0)
    body, headers = infer_body(images(1))
    try:
        with socket.create_connection(server.server_address[:2], timeout=5) as slow:
            slow.sendall((REQUEST_HEAD + f"{HEADER_LENGTH}: {headers[HEADER_LENGTH]}\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:-10])  # fmt: skip
            time.sleep(0.2)
            for _ in range(3):
                assert raw_request(server, "POST", INFER, *infer_body(images(1)))[0] == 200
            slow.sendall(body[-10:])  # now it completes, and is answered
            assert statuses(slow.recv(65536)) == [200]
    finally:
        stop(server)


# -- the client -----------------------------------------------------------------------------
def test_query_budget_is_exact_with_10_threads():
    service = start(TinyNet())  # no 503s: only the budget says no
    client = HTTPClassifier(service.url, token=TOKEN, max_queries=10)
    outcomes: list[str] = []
    barrier = threading.Barrier(10)

    def worker(seed: int) -> None:
        barrier.wait()
        try:
            client.predict(images(2, seed=seed))
            outcomes.append("ok")
        except BudgetExceeded:
            outcomes.append("budget")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(10)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        stop(service)
    assert sorted(outcomes) == ["budget"] * 5 + ["ok"] * 5
    assert client.queries == 10 and service.queries_served == 10
    with pytest.raises(BudgetExceeded, match="10 queries spent of max_queries=10"):
        client.predict(images(1))


def test_twenty_concurrent_clients_get_bit_identical_answers():
    """20 clients (half binary, half JSON) at once, each 3 calls; the server admits all 20
    (merged into shared model calls by the server's dynamic batching)."""
    service = start(TinyNet())
    inputs = [images(3, seed=100 + k) for k in range(20)]
    expected = [reference(x) for x in inputs]
    results: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(20)

    def worker(k: int) -> None:
        with HTTPClassifier(service.url, token=TOKEN, binary=k % 2 == 0) as client:
            barrier.wait()
            for _ in range(3):
                results[k] = client.predict(inputs[k])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(20)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        stop(service)
    assert sorted(results) == list(range(20))
    for k in range(20):
        assert results[k].tobytes() == expected[k].tobytes(), k
    assert service.queries_served == 20 * 3 * 3


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_nan_logits_raise_by_default_and_inf_policy_records_inf(binary):
    server = start(NaNNet())
    try:
        client = HTTPClassifier(server.url, token=TOKEN, binary=binary)
        with pytest.raises(NonFiniteLogits, match=r"non-finite logit nan for image 1 .*class 2"):
            client.predict(images(3))
        assert isinstance(NonFiniteLogits("x"), OracleError)
        lenient = HTTPClassifier(server.url, token=TOKEN, binary=binary, on_nonfinite="inf")
        logits = lenient.predict(images(3))
        assert logits[1, 2] == np.inf and np.isfinite(np.delete(logits.ravel(), 1 * 5 + 2)).all()
    finally:
        stop(server)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"url": "ftp://127.0.0.1/"}, "http"),
        ({"url": "file:///etc/passwd"}, "http"),
        ({"timeout": float("inf")}, "timeout .* got inf"),
        ({"timeout": float("nan")}, "timeout .* got nan"),
        ({"timeout": 0}, "timeout .* got 0"),
        ({"retries": -1}, "retries .* got -1"),
        ({"retries": 1.5}, "retries .* got 1.5"),
        ({"backoff": float("inf")}, "backoff .* got inf"),
        ({"token": ""}, "token"),
        ({"max_in_flight": 0}, "max_in_flight .* got 0"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite .* got 'ignore'"),
        ({"datatype": "INT8"}, "datatype .* got 'INT8'"),
        ({"url": "http://127.0.0.1/v2/models/a", "model": "b"}, "disagrees"),
    ],
)
def test_client_rejects_bad_settings_naming_the_value(kwargs, match):
    kwargs = {"url": "http://127.0.0.1:1", **kwargs}
    with pytest.raises(ValueError, match=match):
        HTTPClassifier(**kwargs)


def test_client_warns_before_sending_a_token_in_clear_text_off_machine():
    with pytest.warns(UserWarning, match="clear text"):
        HTTPClassifier("http://classifier.example.com:8000", token="t").close()


def test_client_learns_names_and_shape_from_metadata_and_takes_a_model_url(model):
    server = make_server(
        LocalClassifier(model), token=TOKEN, model_name="owner-net", input_name="x",
        output_name="y", input_shape=INPUT_SHAPE, max_batch=SERVER_MAX_BATCH,
        dynamic_batching=False,  # the model sees the client's own batches
    )  # fmt: skip
    serve_in_background(server)
    try:
        client = HTTPClassifier(f"{server.url}/v2/models/owner-net", token=TOKEN, max_batch=5,
                                max_in_flight=3)  # fmt: skip
        x = images(13)
        np.testing.assert_array_equal(client.predict(x), reference(x, max_batch=5))
        assert (client.model, client.input_name, client.output_name) == ("owner-net", "x", "y")
        assert client.input_shape == INPUT_SHAPE and client.datatype == "FP32"
        assert client.queries == 13 and sorted(model.batch_sizes) == [3, 5, 5]
        with pytest.raises(ValueError, match=r"\(n, 3, 8, 8\)"):  # checked before sending
            client.predict(images(1, shape=(3, 4, 4)))
        client.close()
    finally:
        stop(server)


class ScriptedServer(ThreadingHTTPServer):
    """A stand-in for someone else's flaky server: answers the first ``failures`` infers with
    ``status`` (and ``Retry-After``), or sleeps ``delay`` seconds, then answers like a real
    Open Inference Protocol server with TinyNet's logits (JSON ``data``)."""

    daemon_threads = True

    def __init__(
        self, status: int = 503, failures: int = 0, delay: float = 0.0, retry_after: str = "0"
    ):
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.status, self.failures, self.delay, self.retry_after = (
            status,
            failures,
            delay,
            retry_after,
        )
        self.backend = LocalClassifier(TinyNet())
        self.posts = 0
        self.times: list[float] = []
        self.wake = threading.Event()

    @property
    def url(self) -> str:
        return "http://{}:{}/v2/models/tiny".format(*self.server_address[:2])


class ScriptedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ScriptedServer

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts += 1
        self.server.times.append(time.monotonic())
        if self.server.delay:
            self.server.wake.wait(self.server.delay)
        if self.server.posts <= self.server.failures:
            self.reply(
                self.server.status,
                b'{"error": "scripted failure"}',
                {"Retry-After": self.server.retry_after},
            )
            return
        spec = json.loads(body)["inputs"][0]
        x = np.asarray(spec["data"], dtype=np.float32).reshape(spec["shape"])
        logits = self.server.backend.predict(x)
        out = {"outputs": [{"name": "logits", "datatype": "FP32", "shape": list(logits.shape), "data": logits.ravel().tolist()}]}  # fmt: skip
        self.reply(200, json.dumps(out).encode())

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

    def start_scripted(**kwargs) -> ScriptedServer:
        server = ScriptedServer(**kwargs)
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        servers.append(server)
        return server

    yield start_scripted
    for server in servers:
        server.wake.set()
        server.shutdown()
        server.server_close()


def scripted_client(server: ScriptedServer, **kwargs) -> HTTPClassifier:
    """Names given: no metadata request, only infers."""
    kwargs = {"retries": 3, "backoff": 0.01, "binary": False, **kwargs}
    return HTTPClassifier(server.url, input_name="images", output_name="logits", **kwargs)


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_client_retries_transient_failures_then_succeeds(scripted, status):
    server = scripted(status=status, failures=2)
    client = scripted_client(server)
    x = images(5)
    np.testing.assert_array_equal(client.predict(x), LocalClassifier(TinyNet()).predict(x))
    assert server.posts == 3 and client.requests == 3 and client.queries == 5


def test_client_honours_retry_after(scripted):
    server = scripted(status=503, failures=1, retry_after="1")
    scripted_client(server, backoff=0.01).predict(images(1))
    assert server.posts == 2 and server.times[1] - server.times[0] >= 0.95


def test_client_gives_up_after_its_retries_with_a_clear_error(scripted):
    server = scripted(status=503, failures=100)
    client = scripted_client(server)
    with pytest.raises(
        ClassifierUnavailable, match="after 4 attempts.*HTTP 503 scripted failure"
    ) as caught:
        client.predict(images(2))
    assert caught.value.status == 503
    assert server.posts == 4 and client.queries == 0


def test_client_does_not_retry_a_server_error(scripted):
    server = scripted(status=500, failures=100)
    with pytest.raises(ClassifierAPIError, match="HTTP 500 scripted failure") as caught:
        scripted_client(server).predict(images(2))
    assert caught.value.status == 500 and server.posts == 1


def test_client_retries_refused_connections_then_gives_up():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = HTTPClassifier(f"http://127.0.0.1:{port}", model="m", input_name="i",
                            output_name="o", binary=True, retries=2, backoff=0.01)  # fmt: skip
    with pytest.raises(ClassifierUnavailable, match="after 3 attempts.*ConnectError"):
        client.predict(images(1))
    assert client.requests == 3


def test_client_timeout_surfaces_as_a_clear_error(scripted):
    server = scripted(delay=5.0)
    client = scripted_client(server, timeout=0.2)
    with pytest.raises(ClassifierTimeout, match=r"POST .*/infer timed out after 0.2 s"):
        client.predict(images(1))
    assert client.requests == 1  # a slow service is not hammered with retries


def test_client_reconnects_when_the_server_dropped_its_idle_connection(model):
    server = start(model, request_timeout=0.3)  # idle connections are closed after 0.3 s
    try:
        client = HTTPClassifier(server.url, token=TOKEN, model="tiny", input_name="images",
                                output_name="logits", retries=0, binary=True)  # fmt: skip
        client.predict(images(2))
        time.sleep(1.0)  # meanwhile the server closes the idle keep-alive connection
        client.predict(images(2))
        assert client.queries == 4 and server.requests_served == 2 and client.requests == 2
    finally:
        stop(server)


# -- interoperability ---------------------------------------------------------------------
def test_tritonclient_queries_our_server_in_both_encodings(service):
    """NVIDIA's official Open Inference Protocol client (tritonclient[http]) against our
    server: health, metadata, and the same logits as local inference, JSON and binary."""
    triton = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    host, port = service.server_address
    client = triton.InferenceServerClient(f"{host}:{port}", network_timeout=30)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    # a fresh dict per call: tritonclient writes Inference-Header-Content-Length into it
    try:
        assert client.is_server_live(headers=dict(auth)) and client.is_server_ready(
            headers=dict(auth)
        )
        assert client.is_model_ready("tiny", headers=dict(auth))
        assert "binary_tensor_data" in client.get_server_metadata(headers=dict(auth))["extensions"]
        metadata = client.get_model_metadata("tiny", headers=dict(auth))
        assert metadata["inputs"][0] == {
            "name": "images",
            "datatype": "FP32",
            "shape": [-1, 3, 8, 8],
        }
        for k, (binary_in, binary_out) in enumerate(
            [(True, True), (False, False), (True, False), (False, True)]
        ):
            x = images(6, seed=20 + k)
            tensor = triton.InferInput("images", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary_in)
            wanted = triton.InferRequestedOutput("logits", binary_data=binary_out)
            result = client.infer(
                "tiny", [tensor], outputs=[wanted], request_id=f"r{k}", headers=dict(auth)
            )
            logits = result.as_numpy("logits")
            assert logits.dtype == np.float32
            assert logits.tobytes() == reference(x).tobytes(), (binary_in, binary_out)
            assert result.get_response()["id"] == f"r{k}"
        # No outputs named: tritonclient asks for all of them in binary (binary_data_output).
        result = client.infer("tiny", [tensor], headers=dict(auth))
        assert result.as_numpy("logits").tobytes() == reference(x).tobytes()
        with pytest.raises(InferenceServerException, match="bearer token"):
            client.infer("tiny", [tensor])
    finally:
        client.close()


MLSERVER_MODEL = '''
import os

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class LinearModel(MLModel):
    """logits = flatten(images) @ weight, with weight read from weight.npy (no pickle)."""

    async def load(self) -> bool:
        folder = os.path.dirname(os.path.abspath(__file__))
        self.weight = np.load(os.path.join(folder, "weight.npy"), allow_pickle=False)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        logits = (x.reshape(len(x), -1) @ self.weight).astype(np.float32)
        return InferenceResponse(
            model_name=self.name, outputs=[NumpyCodec.encode_output("logits", logits)]
        )
'''


def _free_ports(count: int) -> list[int]:
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_our_client_queries_an_mlserver_model(tmp_path):
    """Seldon's MLServer (an Open Inference Protocol server we did not write) serving a small
    linear model from a folder; our client finds the model, learns its names, falls back to
    JSON (MLServer 1.7 lists no binary_tensor_data extension) and gets exact logits."""
    if (
        importlib.util.find_spec("mlserver") is None
        or shutil.which("mlserver", path=str(Path(sys.executable).parent)) is None
    ):
        pytest.skip("mlserver is not installed (optional: pip install mlserver)")
    folder = tmp_path / "linear"
    folder.mkdir()
    (folder / "linear_model.py").write_text(MLSERVER_MODEL)
    weight = np.random.default_rng(5).random((192, NUM_CLASSES), dtype=np.float32)
    np.save(folder / "weight.npy", weight)
    (folder / "model-settings.json").write_text(json.dumps({
        "name": "linear", "implementation": "linear_model.LinearModel",
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, *INPUT_SHAPE]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, NUM_CLASSES]}],
    }))  # fmt: skip
    http_port, grpc_port, metrics_port = _free_ports(3)
    (tmp_path / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port,
        "metrics_port": metrics_port, "parallel_workers": 0,
    }))  # fmt: skip
    log = open(tmp_path / "mlserver.log", "wb")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlserver"), "start", str(tmp_path)],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        client = HTTPClassifier(f"http://127.0.0.1:{http_port}", retries=0, timeout=10)
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.ready():
                    break
            except ClassifierAPIError:
                pass
            assert process.poll() is None, (tmp_path / "mlserver.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlserver did not become ready in 60 s"
            time.sleep(0.5)
        x = images(7)
        logits = client.predict(x)
        assert client.model == "linear" and client.binary is False
        np.testing.assert_array_equal(logits, (x.reshape(7, -1) @ weight).astype(np.float32))
        client.close()
    finally:
        process.terminate()
        process.wait(30)
        log.close()


# -- the command line ---------------------------------------------------------------------
def _abuse(address: tuple[str, int], body: bytes, headers: dict[str, str]) -> None:
    """Aborted and malformed connections of every kind (each closed with a reset)."""
    head = (f"POST /v2/models/resnet18/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"{HEADER_LENGTH}: {headers[HEADER_LENGTH]}\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    payloads = [
        b"",  # connect, then reset
        head[:25],  # half a request line
        head,  # headers, no body
        head + body[: len(body) // 2],  # half the body
        head + body,  # a whole request, reset before the answer
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),  # a TLS hello
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # an HTTP/2 preface
        b"GET / HTTP/1.1\r\nContent-Length: 1_2\r\n\r\n",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",  # over h11's header limit
        b"\xff\xfe garbage \r\n\r\n",
    ]
    for _ in range(3):
        for payload in payloads:
            sock = socket.create_connection(address, timeout=5)
            sock.sendall(payload)
            if payload.startswith(b"GET") or payload.startswith(b"\xff"):
                sock.recv(4096)
            # SO_LINGER 0: close() sends a reset, as a crashed client would.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()


def test_serve_classifier_command_serves_a_checkpoint_and_quiet_means_quiet(tmp_path):
    import argparse

    source = resnet18(num_classes=10, small_input=True).eval()
    path = tmp_path / "served.pth"
    save_classifier_checkpoint(path, source, "resnet18", input_shape=(3, 16, 16))
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve-classifier", "--weights", str(path), "--port", "0"])
    assert args.func.__name__ == "run_serve" and args.host == "127.0.0.1"

    env = {**os.environ, "ZOOPT_CLASSIFIER_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "oracles.http_service", "serve-classifier", "--weights", str(path), "--port", "0", "--quiet", "--request-timeout", "2"]  # fmt: skip
    stderr = open(tmp_path / "stderr.txt", "w+b")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)  # fmt: skip
    try:
        banner = process.stdout.readline()
        url = re.search(r"on (http://127\.0\.0\.1:(\d+))/v2/models/resnet18 ", banner)
        assert url, banner + (tmp_path / "stderr.txt").read_text()
        client = HTTPClassifier(url.group(1), token=TOKEN, max_batch=8)
        x = images(8, shape=(3, 16, 16))
        np.testing.assert_array_equal(
            client.predict(x), LocalClassifier(source, max_batch=8).predict(x)
        )
        assert client.metadata()["outputs"][0]["shape"] == [-1, 10]
        assert client.input_shape == (3, 16, 16) and client.binary is True
        with pytest.raises(ClassifierAuthError):
            HTTPClassifier(url.group(1), model="resnet18").predict(x)
        body, headers = infer_body(x)
        _abuse(("127.0.0.1", int(url.group(2))), body, headers)
        np.testing.assert_array_equal(  # still serving
            client.predict(x), LocalClassifier(source, max_batch=8).predict(x)
        )
        client.close()
    finally:
        process.terminate()
        process.wait(10)
        process.stdout.close()
    stderr.seek(0)
    printed = stderr.read().decode(errors="replace")
    stderr.close()
    assert "Traceback" not in printed and len(printed) < 200, printed[:2000]


def test_import_oracles_does_not_import_torch_or_the_server_stack():
    code = (
        "import oracles, oracles.classifier, oracles.http_service, zoopt.certify, sys; "
        "print(sorted(m for m in ('torch', 'starlette', 'uvicorn') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


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
