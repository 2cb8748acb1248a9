"""The classifier owner's side: an Open Inference Protocol (KServe V2) server for one model.

Starlette on uvicorn (h11 for HTTP/1.1): parsing, framing and the connection's life are
theirs; this module adds the protocol's endpoints, a bounded queue with dynamic batching
(:mod:`oracles.batching`), Prometheus metrics (``prometheus_client``), limits and deadlines
(docs/classifier_api.md):

- ``GET /v2/health/live``, ``GET /v2/health/ready``: ``{"live": true}``, ``{"ready": true}``.
- ``GET /v2``: server metadata (name, version, extensions: ``binary_tensor_data``,
  ``statistics``).
- ``GET /v2/models/{name}[/versions/1]``: model metadata: ``inputs`` ``[{"name": "images",
  "datatype": "FP32", "shape": [-1, C, H, W]}]``, ``outputs`` ``[{"name": "logits",
  "datatype": "FP32", "shape": [-1, K]}]``.
- ``GET /v2/models/{name}[/versions/1]/ready``: ``{"name": ..., "ready": true}``.
- ``GET /v2/models/{name}[/versions/1]/stats``: Triton's statistics extension (counts and
  nanoseconds of successes, failures, queueing and compute; per batch size).
- ``POST /v2/models/{name}[/versions/1]/infer``: images ``(n, C, H, W)`` FP32 in, logits
  ``(n, K)`` FP32 out, as JSON ``data`` or with the binary tensor data extension
  (``Inference-Header-Content-Length``; binary output when the request asks for it with
  ``outputs[i].parameters.binary_data`` or ``parameters.binary_data_output``).
- ``POST /v2/repository/index``: ``[{"name": ..., "version": "1", "state": "READY"}]``.
- ``GET /metrics``: Prometheus text (requests, images, failures by status, queue and compute
  time, batch sizes, queue depth, connections).

Errors are ``{"error": "..."}`` with a 4xx status naming the problem (400 bad tensor, 401
token, 404 unknown model or path, 405 method, 408 body not received within
``request_timeout``, 413 body over ``max_request_bytes``, 415 compressed body, 503 queue full
or queue timeout, with ``Retry-After``), or a generic 500 when the model raised (details only
in the server log). Malformed HTTP (e.g. conflicting or non-numeric ``Content-Length``) never
reaches us: h11 answers it with a plain-text 400 and closes the connection.

Deadlines: a connection must deliver a request's headers within ``request_timeout`` of
opening (or of the previous response), then its body within ``request_timeout``; only then
does the request enter the queue, so slow senders cost a connection, never a queue place.
Each client address may hold ``max_connections_per_client`` connections. Model calls run one
at a time on a worker thread; the event loop keeps serving others (health answers at once).

All settings are one frozen :class:`ServerSettings`; the CLI flags, :func:`make_server`'s
keywords and the table in the docs are derived from its fields.

CLI: :func:`add_serve_parser` / :func:`run_serve` implement ``zoopt serve-classifier``; the
same command runs as ``python -m oracles.http_service serve-classifier ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import hmac
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .batching import BatchRecord, DynamicBatcher, QueueFull, QueueTimeout
from .classifier import ClassifierAPI, RowIndependent, check_images, is_loopback_host
from .open_inference import (
    HEADER_LENGTH,
    ProtocolError,
    decode_tensor,
    encode_message,
    encode_tensors,
    parse_header_length,
    split_body,
)

log = logging.getLogger(__name__)

#: Body limit when the input shape is unknown (bytes).
DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20
#: JSON text per float32 pixel when sizing the default body limit: clients write float32
#: values as float64 decimals such as ``0.37454012036323547,`` (about 20 characters).
JSON_BYTES_PER_VALUE = 24
#: Room for the request's JSON header on top of the tensor data (bytes).
HEADER_ALLOWANCE = 64 * 2**10
#: A rejected body up to this size is left for uvicorn to drain, so the client reads our
#: answer and keeps its connection; above it we answer ``Connection: close``.
DRAIN_LIMIT_BYTES = 1 * 2**20
#: Environment variable the CLI reads the token from (keeps it out of ``ps`` listings).
TOKEN_ENV_VAR = "ZOOPT_CLASSIFIER_TOKEN"
#: Architectures the CLI can build (the keys of ``oracles.resnet.ARCHITECTURES``; listed
#: here so that building the parser does not import torch).
ARCH_CHOICES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
#: The one model version we serve.
MODEL_VERSION = "1"
SERVER_NAME = "zoopt"
SERVER_VERSION = "2"
#: Seconds a refused client is asked to wait (``Retry-After``) when the queue is full.
RETRY_AFTER_S = 1
#: Histogram buckets: images per model call, and seconds (queue and compute time).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


# -- settings -----------------------------------------------------------------------------
def _setting(
    default: Any, help: str, *, flag: str | None = "", env: str | None = None, **cli: Any
) -> Any:
    """A :class:`ServerSettings` field. ``flag``: the CLI flag ("" derives ``--name-with-
    dashes`` from the field, None: no flag); ``env``: an environment variable holding the
    CLI's default; ``cli``: argparse keywords (``cli_default`` replaces the default on the
    command line only)."""
    metadata = {"help": help, "flag": flag, "env": env, "cli": cli}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """Every setting of the server, checked on construction (``ValueError`` naming the value).

    Build one directly or let :func:`make_server` build it from keywords; ``None`` fields
    that the classifier can fill (model name, input shape, body limit) are resolved there.
    """

    host: str = _setting(
        "127.0.0.1", "interface to bind; binding beyond loopback without a token warns"
    )
    port: int = _setting(0, "TCP port; 0 picks a free one", cli_default=8000, type=int)
    token: str | None = _setting(
        None, "bearer token required on every endpoint (prefer the environment variable to "
        "the flag: argv is visible in ps)", env=TOKEN_ENV_VAR,
    )  # fmt: skip
    model_name: str | None = _setting(
        None, "NAME in /v2/models/NAME (default: the classifier's name, the architecture)"
    )
    input_name: str = _setting("images", "name of the input tensor")
    output_name: str = _setting("logits", "name of the output tensor")
    input_shape: tuple[int, ...] | None = _setting(
        None, "expected (C, H, W) (default: the classifier's input_shape)", flag=None
    )
    num_classes: int | None = _setting(
        None, "K in the metadata (default: learned from the first answer)", flag=None
    )
    max_batch: int = _setting(256, "most images per request, and per merged model call", type=int)
    max_request_bytes: int | None = _setting(
        None, "largest body (413 above); default room for max_batch images as JSON (24 bytes "
        "a value) + 64 KiB, else 64 MiB", flag="--max-request-mb", type=float, metavar="MiB",
    )  # fmt: skip
    dynamic_batching: bool = _setting(
        True, "merge waiting requests into one model call (only for classifiers whose "
        "rows_independent() is True)", flag="--no-dynamic-batching", action="store_false",
    )  # fmt: skip
    max_batch_delay_ms: float = _setting(
        2.0, "milliseconds the oldest request waits for company when the model is idle",
        flag="--max-batch-delay", type=float, metavar="MS",
    )  # fmt: skip
    max_queue: int = _setting(
        256, "most requests waiting for the model; beyond, 503 with Retry-After", type=int
    )
    queue_timeout: float = _setting(
        20.0, "seconds a request may wait for its model call; then 503 with Retry-After",
        type=float,
    )  # fmt: skip
    max_connections: int = _setting(1024, "open connections in all (more are closed)", type=int)
    max_connections_per_client: int = _setting(
        128, "open connections per client IP address (more are closed)", type=int
    )
    request_timeout: float = _setting(
        30.0, "seconds for a request's headers, then for its body", type=float
    )
    shutdown_timeout: float = _setting(
        30.0, "on SIGINT/SIGTERM: seconds to answer the queued requests before exiting",
        type=float,
    )  # fmt: skip
    log_requests: bool = _setting(
        False, "log one line per request (the CLI logs them unless --quiet)",
        flag="--quiet", action="store_false", cli_default=True,
    )  # fmt: skip

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_connections", "max_connections_per_client"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("request_timeout", "queue_timeout", "shutdown_timeout"):
            value = getattr(self, name)
            if not (_finite_number(value) and value > 0):
                raise ValueError(f"{name} must be positive finite seconds, got {value!r}")
        if not (_finite_number(self.max_batch_delay_ms) and self.max_batch_delay_ms >= 0):
            raise ValueError(
                f"max_batch_delay_ms must be finite and >= 0, got {self.max_batch_delay_ms!r}"
            )
        if self.token is not None and (not isinstance(self.token, str) or not self.token):
            raise ValueError("token must be a non-empty string or None")
        names = {"input_name": self.input_name, "output_name": self.output_name}
        if self.model_name is not None:
            names["model_name"] = self.model_name
        for label, value in names.items():
            if not isinstance(value, str) or not value or "/" in value or not value.isprintable():
                raise ValueError(
                    f"{label} must be a non-empty printable string without '/', got {value!r}"
                )
        if self.input_shape is not None:
            shape = self.input_shape
            if len(shape) != 3 or any(int(s) < 1 for s in shape):
                raise ValueError(f"input_shape must be (C, H, W) of positive ints, got {shape!r}")
            object.__setattr__(self, "input_shape", tuple(int(s) for s in shape))
        if self.max_request_bytes is not None and (
            isinstance(self.max_request_bytes, bool)
            or not isinstance(self.max_request_bytes, int)
            or self.max_request_bytes < 1
        ):
            raise ValueError(
                f"max_request_bytes must be a positive integer, got {self.max_request_bytes!r}"
            )

    @property
    def body_limit(self) -> int:
        """``max_request_bytes``, or its default for ``max_batch`` and ``input_shape``."""
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        if self.input_shape is None:
            return DEFAULT_MAX_REQUEST_BYTES
        return (
            self.max_batch * math.prod(self.input_shape) * JSON_BYTES_PER_VALUE + HEADER_ALLOWANCE
        )


def settings_table() -> str:
    """The Markdown table of :class:`ServerSettings` (docs/classifier_api.md holds it)."""
    rows = ["| keyword | flag | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(ServerSettings):
        flag = _flag(field)
        shown = "—" if flag is None else f"`{flag}`"
        default = f"`{field.default!r}`"
        if field.metadata["env"]:
            default += f" (CLI: `${field.metadata['env']}`)"
        elif "cli_default" in field.metadata["cli"]:
            default += f" (CLI: `{field.metadata['cli']['cli_default']!r}`)"
        rows.append(f"| `{field.name}` | {shown} | {default} | {field.metadata['help']} |")
    return "\n".join(rows)


def _flag(field: dataclasses.Field) -> str | None:
    flag = field.metadata["flag"]
    return "--" + field.name.replace("_", "-") if flag == "" else flag


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class RequestRejected(Exception):
    """Answer the request with ``status`` and ``{"error": message}`` (plus ``headers``)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# -- what the server did ------------------------------------------------------------------
class ServiceMetrics:
    """Prometheus metrics (own registry per server) plus the totals of the statistics
    endpoint. Updated on the event loop thread only.

    Metric names (all labelled ``model``): ``zoopt_inference_requests_total`` (answered 200),
    ``zoopt_inference_images_total``, ``zoopt_inference_failures_total{status}``,
    ``zoopt_inference_queue_seconds``, ``zoopt_inference_compute_seconds`` and
    ``zoopt_inference_batch_size`` (histograms, one sample per model call or request),
    ``zoopt_inference_queue_depth``; ``zoopt_connections_open`` and
    ``zoopt_connections_refused_total{reason}``.
    """

    def __init__(self, model_name: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"registry": self.registry}
        self.model_name = model_name
        self.requests = Counter(
            "zoopt_inference_requests",
            "Inference requests answered with logits",
            ["model"],
            **labels,
        )
        self.images = Counter(
            "zoopt_inference_images", "Images answered with logits", ["model"], **labels
        )
        self.failures = Counter(
            "zoopt_inference_failures", "Inference requests answered with an error, by HTTP status",
            ["model", "status"], **labels,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "zoopt_inference_queue_seconds", "Seconds from a complete request to its model call",
            ["model"], buckets=SECONDS_BUCKETS, **labels,
        )  # fmt: skip
        self.compute_seconds = Histogram(
            "zoopt_inference_compute_seconds", "Seconds per model call",
            ["model"], buckets=SECONDS_BUCKETS, **labels,
        )  # fmt: skip
        self.batch_size = Histogram(
            "zoopt_inference_batch_size", "Images per model call",
            ["model"], buckets=BATCH_SIZE_BUCKETS, **labels,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "zoopt_inference_queue_depth", "Requests waiting for a model call", ["model"], **labels
        )
        self.connections_open = Gauge("zoopt_connections_open", "Open client connections", **labels)
        self.connections_refused = Counter(
            "zoopt_connections_refused", "Connections closed at once, by the cap they hit",
            ["reason"], **labels,
        )  # fmt: skip
        # Triton's statistics extension: (count, nanoseconds) totals.
        self.success = [0, 0]
        self.fail = [0, 0]
        self.queue = [0, 0]
        self.compute = [0, 0]
        self.executions = 0
        self.inferences = 0
        self.last_inference_ms = 0
        self.per_batch_size: dict[int, list[int]] = {}

    def request_done(self, status: int, seconds: float, images: int) -> None:
        nanoseconds = int(seconds * 1e9)
        if status == 200:
            self.requests.labels(self.model_name).inc()
            self.images.labels(self.model_name).inc(images)
            self.success[0] += 1
            self.success[1] += nanoseconds
            self.inferences += images
            self.last_inference_ms = int(time.time() * 1000)
        else:
            self.failures.labels(self.model_name, str(status)).inc()
            self.fail[0] += 1
            self.fail[1] += nanoseconds

    def batch_done(self, record: BatchRecord) -> None:
        for waited in record.queue_seconds:
            self.queue_seconds.labels(self.model_name).observe(waited)
            self.queue[0] += 1
            self.queue[1] += int(waited * 1e9)
        if record.compute_seconds is None:
            return
        self.compute_seconds.labels(self.model_name).observe(record.compute_seconds)
        self.batch_size.labels(self.model_name).observe(record.images)
        nanoseconds = int(record.compute_seconds * 1e9)
        self.compute[0] += 1
        self.compute[1] += nanoseconds
        self.executions += 1
        per = self.per_batch_size.setdefault(record.images, [0, 0])
        per[0] += 1
        per[1] += nanoseconds

    def statistics(self) -> dict[str, Any]:
        """``GET /v2/models/{name}/stats`` in Triton's format (times in nanoseconds)."""

        def duration(pair: list[int]) -> dict[str, int]:
            return {"count": pair[0], "ns": pair[1]}

        zero = {"count": 0, "ns": 0}
        return {
            "model_stats": [
                {
                    "name": self.model_name,
                    "version": MODEL_VERSION,
                    "last_inference": self.last_inference_ms,
                    "inference_count": self.inferences,
                    "execution_count": self.executions,
                    "inference_stats": {
                        "success": duration(self.success),
                        "fail": duration(self.fail),
                        "queue": duration(self.queue),
                        "compute_input": zero,
                        "compute_infer": duration(self.compute),
                        "compute_output": zero,
                    },
                    "batch_stats": [
                        {
                            "batch_size": size,
                            "compute_input": zero,
                            "compute_infer": duration(pair),
                            "compute_output": zero,
                        }
                        for size, pair in sorted(self.per_batch_size.items())
                    ],
                }
            ]
        }


class ClassifierServer:
    """One classifier served over the Open Inference Protocol; build it with :func:`make_server`.

    The listening socket is bound at construction (``server_address`` and ``url`` are known
    at once); :func:`serve_forever` or :func:`serve_in_background` run it on uvicorn.

    Attributes:
        settings: the resolved :class:`ServerSettings` (model name, input shape filled in).
        queries_served: images answered since start; requests_served: successful infers.
        num_classes: K, from the settings or learned from the first answer (else None).
        batching: whether waiting requests are merged (``dynamic_batching`` and the
            classifier is :class:`~oracles.classifier.RowIndependent`; asked again before
            every merge).
        metrics: the :class:`ServiceMetrics` behind ``/metrics`` and ``/stats``.
    """

    def __init__(self, sock: socket.socket, classifier: ClassifierAPI, settings: ServerSettings):
        assert settings.model_name is not None
        self.socket = sock
        self.classifier = classifier
        self.settings = settings
        self.num_classes = settings.num_classes
        self.queries_served = 0
        self.requests_served = 0
        self.server_address: tuple[str, int] = sock.getsockname()[:2]
        self.batching = settings.dynamic_batching and isinstance(classifier, RowIndependent)
        self._merging = self.batching  # what the last merge decision was (for the log)
        if settings.dynamic_batching and not self.batching:
            log.warning(
                "%s has no rows_independent(): each request is its own model call",
                type(classifier).__name__,
            )
        self.metrics = ServiceMetrics(settings.model_name)
        # One worker: model calls run one at a time, off the event loop.
        self._model_thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="zoopt-model"
        )
        self.batcher = DynamicBatcher(
            self.predict,
            self._model_thread,
            max_batch=settings.max_batch,
            max_queue=settings.max_queue,
            queue_timeout=settings.queue_timeout,
            max_delay=settings.max_batch_delay_ms / 1000,
            merge_allowed=self._merge_allowed,
            on_batch=self.metrics.batch_done,
        )
        self.metrics.queue_depth.labels(settings.model_name).set_function(
            lambda: self.batcher.waiting
        )
        self.connections: Counter[str] = Counter()  # open connections per client address
        self.metrics.connections_open.set_function(lambda: sum(self.connections.values()))
        self.app = _build_app(self)
        self._uvicorn = _build_uvicorn(self)
        self._thread: threading.Thread | None = None

    @property
    def model_name(self) -> str:
        assert self.settings.model_name is not None
        return self.settings.model_name

    @property
    def max_request_bytes(self) -> int:
        return self.settings.body_limit

    @property
    def url(self) -> str:
        """``http://host:port`` of the bound socket."""
        host, port = self.server_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def _merge_allowed(self) -> bool:
        if not self.batching:
            return False
        allowed = bool(self.classifier.rows_independent())  # type: ignore[attr-defined]
        if allowed != self._merging:  # log changes only, not every batch
            self._merging = allowed
            log.warning(
                "the classifier's rows are %s: %s requests",
                "independent again" if allowed else "not independent (e.g. training mode)",
                "merging" if allowed else "not merging",
            )
        return allowed

    def metadata(self) -> dict[str, Any]:
        """The model metadata document (``GET /v2/models/{name}``)."""
        shape = [-1, *(self.settings.input_shape or (-1, -1, -1))]
        return {
            "name": self.model_name,
            "versions": [MODEL_VERSION],
            "platform": "pytorch",
            "inputs": [{"name": self.settings.input_name, "datatype": "FP32", "shape": shape}],
            "outputs": [
                {
                    "name": self.settings.output_name,
                    "datatype": "FP32",
                    "shape": [-1, -1 if self.num_classes is None else self.num_classes],
                }
            ],
            "parameters": {
                "max_batch_size": self.settings.max_batch,
                "dynamic_batching": self.batching,
            },
        }

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Logits ``(n, K)`` float32 for validated images ``(n, C, H, W)``; runs on the model
        thread (one call at a time), once per batch of merged requests."""
        logits = np.asarray(self.classifier.predict(images), dtype=np.float32)
        if logits.ndim != 2 or logits.shape[0] != images.shape[0]:
            raise RuntimeError(f"classifier returned shape {logits.shape} for {images.shape}")
        if self.num_classes is None:
            self.num_classes = int(logits.shape[1])
        return logits

    # -- running --------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Serve on this thread until Ctrl-C/SIGTERM (in the main thread) or
        :meth:`shutdown`; either way the queued requests are answered first (up to
        ``shutdown_timeout`` s)."""
        try:
            self._uvicorn.run(sockets=[self.socket])
        except KeyboardInterrupt:
            pass

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, answer the queued requests (up to ``shutdown_timeout`` s), stop;
        wait up to ``timeout`` s (default: ``shutdown_timeout`` + 1) for the serving thread
        if :func:`serve_in_background` started one."""
        self.batcher.close()
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(self.settings.shutdown_timeout + 1 if timeout is None else timeout)

    def server_close(self) -> None:
        """Close the listening socket and the model thread (safe to call twice)."""
        self.socket.close()
        self._model_thread.shutdown(wait=False)


# -- the ASGI application -----------------------------------------------------------------
def _build_app(server: ClassifierServer) -> Any:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    settings = server.settings

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        return JSONResponse({"error": message}, status, headers=headers)

    def endpoint(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        """Bearer check, then ``handler``; RequestRejected -> its 4xx, a client gone -> no
        answer, no traceback (uvicorn drops responses to disconnected clients)."""

        async def wrapped(request: Request, *extra: Any) -> Response:
            try:
                _check_token(settings.token, request.headers.get("authorization", ""))
                return await handler(request, *extra)
            except RequestRejected as exc:
                headers = dict(exc.headers)
                if _unread_body_is_large(request):
                    headers["Connection"] = "close"  # not worth draining
                return error(exc.status, exc.message, headers)
            except ClientDisconnect:
                return Response(status_code=499)

        return wrapped

    def check_model(request: Request) -> None:
        name = request.path_params["model"]
        version = request.path_params.get("version", MODEL_VERSION)
        if name != server.model_name:
            raise RequestRejected(
                404, f"unknown model {name!r}; this server serves {server.model_name!r}"
            )
        if version != MODEL_VERSION:
            raise RequestRejected(
                404, f"unknown version {version!r} of {name!r}; the only one is {MODEL_VERSION!r}"
            )

    @endpoint
    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    @endpoint
    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": True})

    @endpoint
    async def server_metadata(request: Request) -> Response:
        extensions = ["binary_tensor_data", "statistics"]
        return JSONResponse(
            {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": extensions}
        )

    @endpoint
    async def repository_index(request: Request) -> Response:
        return JSONResponse(
            [{"name": server.model_name, "version": MODEL_VERSION, "state": "READY"}]
        )

    @endpoint
    async def model_metadata(request: Request) -> Response:
        check_model(request)
        return JSONResponse(server.metadata())

    @endpoint
    async def model_ready(request: Request) -> Response:
        check_model(request)
        return JSONResponse({"name": server.model_name, "ready": True})

    @endpoint
    async def model_statistics(request: Request) -> Response:
        check_model(request)
        return JSONResponse(server.metrics.statistics())

    @endpoint
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def infer(request: Request) -> Response:
        started = time.perf_counter()
        images = [0]  # set by _infer once the images are decoded
        response = await counted(request, images)
        server.metrics.request_done(response.status_code, time.perf_counter() - started, images[0])
        return response

    @endpoint
    async def counted(request: Request, images: list[int]) -> Response:
        check_model(request)
        return await _infer(server, request, images)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: f"unknown path {request.url.path!r}", 405: "method not allowed"}.get(
            exc.status_code, str(exc.detail)
        )
        return error(exc.status_code, message, dict(exc.headers or {}))

    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    routes = [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_metadata),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/metrics", metrics),
    ]
    for prefix in (model, versioned):
        routes += [
            Route(prefix, model_metadata),
            Route(prefix + "/ready", model_ready),
            Route(prefix + "/stats", model_statistics),
            Route(prefix + "/infer", infer, methods=["POST"]),
        ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def _check_token(expected: str | None, authorization: str) -> None:
    """Constant-time bearer check; raises RequestRejected(401) when wrong or missing."""
    if expected is None:
        return
    scheme, _, provided = authorization.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(
        provided.strip().encode(), expected.encode()
    ):
        return
    raise RequestRejected(
        401,
        "missing or wrong bearer token",
        {"WWW-Authenticate": 'Bearer realm="zoopt-classifier"'},
    )


def _unread_body_is_large(request: Any) -> bool:
    if getattr(request, "_stream_consumed", False):
        return False
    headers = request.headers
    if "transfer-encoding" in headers:
        return True
    return int(headers.get("content-length", "0") or 0) > DRAIN_LIMIT_BYTES


async def _read_body(request: Any, limit: int, timeout: float) -> bytes:
    """The whole body within ``timeout`` seconds and ``limit`` bytes (408 / 413 otherwise)."""
    chunks: list[bytes] = []
    size = 0
    try:
        # One deadline for the whole body: a byte now and then does not extend it.
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestRejected(
                        413,
                        f"body exceeds max_request_bytes={limit}",
                        {"Connection": "close"},
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise RequestRejected(
            408,
            f"request body not received within {timeout:g} s ({size} bytes arrived)",
            {"Connection": "close"},
        ) from None
    return b"".join(chunks)


async def _infer(server: ClassifierServer, request: Any, images_seen: list[int]) -> Any:
    """The infer endpoint after the token and model checks; ``images_seen[0]`` is set to the
    request's image count once decoded (for the metrics)."""
    from starlette.responses import Response

    settings = server.settings
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise RequestRejected(415, f"Content-Encoding {encoding!r} is not supported; send identity")
    limit = settings.body_limit
    declared = request.headers.get("content-length")
    if declared is not None and int(declared) > limit:  # h11 checked the digits
        raise RequestRejected(413, f"body of {declared} bytes exceeds max_request_bytes={limit}")
    body = await _read_body(request, limit, settings.request_timeout)
    # The body is complete: only now may the request enter the queue.
    loop = asyncio.get_running_loop()
    header_value = request.headers.get(HEADER_LENGTH.lower())
    try:
        header_length = parse_header_length(header_value, len(body))
        # Large JSON bodies take a while to parse: keep that off the event loop.
        decode = _decode_infer_request
        if header_length is None and len(body) > 64 * 2**10:
            parsed = await loop.run_in_executor(None, decode, settings, body, header_length)
        else:
            parsed = decode(settings, body, header_length)
    except (ProtocolError, TypeError, ValueError) as exc:
        raise RequestRejected(400, str(exc)) from None
    images, request_id, binary_output = parsed
    images_seen[0] = images.shape[0]
    retry = {"Retry-After": str(RETRY_AFTER_S)}
    try:
        logits = await server.batcher.submit(images)
    except QueueFull:
        raise RequestRejected(
            503,
            f"queue full: {server.batcher.waiting} requests wait (max_queue="
            f"{settings.max_queue}){'; shutting down' if server.batcher.closed else ''}; "
            "retry later",
            retry,
        ) from None
    except QueueTimeout:
        raise RequestRejected(
            503, f"waited queue_timeout={settings.queue_timeout:g} s for the model; retry later",
            retry,
        ) from None  # fmt: skip
    except Exception:
        log.exception("predict failed for a batch holding a request of shape %s", images.shape)
        return Response(
            b'{"error": "internal error while predicting"}', 500, media_type="application/json"
        )
    server.queries_served += images.shape[0]
    server.requests_served += 1
    specs, parts = encode_tensors([(settings.output_name, logits, binary_output)])
    document: dict[str, Any] = {
        "model_name": server.model_name,
        "model_version": MODEL_VERSION,
        "outputs": specs,
    }
    if request_id is not None:
        document["id"] = request_id
    payload, json_length = encode_message(document, parts)
    if json_length is None:
        return Response(payload, 200, media_type="application/json")
    return Response(
        payload,
        200,
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(json_length)},
    )


def _decode_infer_request(
    settings: ServerSettings, body: bytes, header_length: int | None
) -> tuple[np.ndarray, str | None, bool]:
    """``(images, request id, binary output?)`` from an infer body; raises ProtocolError,
    TypeError or ValueError naming the problem."""
    document, binary = split_body(body, header_length)
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f"id must be a string, got {request_id!r}")
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise ProtocolError(
            f"inputs must be a list with the one input {settings.input_name!r}, got "
            f"{_preview(inputs)}"
        )
    spec = inputs[0]
    if not isinstance(spec, dict) or spec.get("name") != settings.input_name:
        name = spec.get("name") if isinstance(spec, dict) else spec
        raise ProtocolError(f"unknown input {name!r}; the model's input is {settings.input_name!r}")
    what = f"input {settings.input_name!r}"
    if spec.get("datatype") != "FP32":
        raise ProtocolError(f"{what}: datatype must be FP32, got {spec.get('datatype')!r}")
    shape = spec.get("shape")
    if isinstance(shape, list) and shape and isinstance(shape[0], int):
        # Before touching the data: a batch over the limit is refused by its declared shape.
        if shape[0] > settings.max_batch:
            raise ProtocolError(
                f"batch of {shape[0]} images exceeds max_batch={settings.max_batch}"
            )
    array, used = decode_tensor(spec, binary, 0, what)
    if used != len(binary):
        raise ProtocolError(
            f"{len(binary) - used} bytes of binary data follow the tensors (sizes disagree)"
        )
    images = check_images(array, input_shape=settings.input_shape, max_batch=settings.max_batch)
    binary_output = _wants_binary_output(document, settings.output_name)
    return images, request_id, binary_output


def _wants_binary_output(document: dict[str, Any], output_name: str) -> bool:
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(f"parameters must be an object, got {_preview(parameters)}")
    binary = parameters.get("binary_data_output", False)
    outputs = document.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise ProtocolError(f"outputs must be a list, got {_preview(outputs)}")
        for spec in outputs:
            name = spec.get("name") if isinstance(spec, dict) else spec
            if name != output_name:
                raise ProtocolError(
                    f"unknown output {name!r}; the model's output is {output_name!r}"
                )
            output_parameters = spec.get("parameters") or {}
            if not isinstance(output_parameters, dict):
                raise ProtocolError(
                    f"output parameters must be an object, got {output_parameters!r}"
                )
            binary = output_parameters.get("binary_data", binary)
    if not isinstance(binary, bool):
        raise ProtocolError(
            f"binary_data / binary_data_output must be true or false, got {binary!r}"
        )
    return binary


def _preview(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- uvicorn ------------------------------------------------------------------------------
def _build_uvicorn(server: ClassifierServer) -> Any:
    import uvicorn

    settings = server.settings
    level = "info" if settings.log_requests else "error"
    config = uvicorn.Config(
        server.app,
        http=_protocol_with_limits(server),
        loop="asyncio",
        lifespan="off",
        ws="none",
        interface="asgi3",
        log_config=None,  # leave the embedding program's logging alone
        log_level=level,
        access_log=settings.log_requests,
        server_header=False,
        date_header=False,
        proxy_headers=False,  # never trust X-Forwarded-* from clients
        # No limit_concurrency: uvicorn counts connections still sending their headers
        # against it and answers 503 to everyone once they fill it; our protocol caps
        # connections per client address instead.
        limit_concurrency=None,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=settings.shutdown_timeout,
        # h11's own limit on the request line + headers (bytes).
        h11_max_incomplete_event_size=16 * 2**10,
    )
    if settings.log_requests:
        logging.getLogger("uvicorn.access").propagate = True
    return uvicorn.Server(config)


def _protocol_with_limits(server: ClassifierServer) -> type:
    """uvicorn's h11 protocol plus what it lacks:

    - a header deadline: a connection that has not delivered a request's headers
      ``request_timeout`` s after opening (or after our last response) is closed (uvicorn's
      keep-alive timer is reset by every byte, so a trickling client would hold its
      connection forever);
    - connection caps: beyond ``max_connections_per_client`` open connections from one IP
      address, or ``max_connections`` in all, a new connection is closed at once.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    settings = server.settings
    timeout = settings.request_timeout
    open_per_address = server.connections
    refused = server.metrics.connections_refused

    class LimitedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _address: str | None = None  # set while this connection counts against the caps

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            address = str(peer[0]) if peer else "unknown"
            if open_per_address[address] >= settings.max_connections_per_client:
                refused.labels("per_client").inc()
                transport.close()
                return
            if sum(open_per_address.values()) >= settings.max_connections:
                refused.labels("total").inc()
                transport.close()
                return
            self._address = address
            open_per_address[address] += 1
            self._arm_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            if self._address is not None:
                open_per_address[self._address] -= 1
                if not open_per_address[self._address]:
                    del open_per_address[self._address]
                self._address = None
            super().connection_lost(exc)

        def _arm_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(timeout, self._deadline_expired)

        def _deadline_expired(self) -> None:
            self._deadline = None
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                if self.conn.our_state is not h11.ERROR:
                    try:
                        self.conn.send(h11.ConnectionClosed())
                    except h11.LocalProtocolError:
                        pass
                self.transport.close()

    return LimitedH11Protocol


# -- building and running -----------------------------------------------------------------
def make_server(
    classifier: ClassifierAPI, settings: ServerSettings | None = None, **overrides: Any
) -> ClassifierServer:
    """A bound (not yet serving) Open Inference Protocol server for ``classifier``.

    Args:
        classifier: any :class:`~oracles.classifier.ClassifierAPI` (usually a
            LocalClassifier; it is batched only if it is
            :class:`~oracles.classifier.RowIndependent`).
        settings: a :class:`ServerSettings` (default: all defaults).
        **overrides: any :class:`ServerSettings` field by keyword, e.g. ``port=0,
            token="...", max_batch=64`` (the keywords of earlier versions still work,
            except ``max_concurrent``, which the queue replaced).

    ``model_name`` defaults to the classifier's ``name`` attribute (else ``"classifier"``)
    and ``input_shape`` to its ``input_shape``. Run it with :func:`serve_forever` (blocking)
    or :func:`serve_in_background`.
    """
    known = {f.name for f in dataclasses.fields(ServerSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        hint = (
            " (max_concurrent became a queue: see max_queue and queue_timeout)"
            if "max_concurrent" in unknown
            else ""
        )
        raise TypeError(f"unknown server settings {unknown}{hint}; known: {sorted(known)}")
    if not callable(getattr(classifier, "predict", None)):
        raise TypeError(f"classifier must have a predict method, got {type(classifier).__name__}")
    if settings is not None and not isinstance(settings, ServerSettings):
        raise TypeError(
            f"settings must be a ServerSettings, got {settings!r} (pass host=..., port=... "
            "by keyword)"
        )
    settings = dataclasses.replace(settings or ServerSettings(), **overrides)
    resolved = {}
    if settings.model_name is None:
        resolved["model_name"] = getattr(classifier, "name", None) or "classifier"
    if settings.input_shape is None and getattr(classifier, "input_shape", None) is not None:
        resolved["input_shape"] = tuple(classifier.input_shape)  # type: ignore[attr-defined]
    settings = dataclasses.replace(settings, **resolved)
    if settings.token is None and not is_loopback_host(settings.host):
        warnings.warn(
            f"binding the classifier service to {settings.host!r} without a token: anyone who "
            "can reach this port can query the model; set a token (and put TLS in front)",
            stacklevel=2,
        )
    sock = _listening_socket(settings.host, settings.port)
    try:
        return ClassifierServer(sock, classifier, settings)
    except BaseException:
        sock.close()
        raise


def _listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` and listening.

    Created with ``proto=IPPROTO_TCP`` (``socket.create_server`` leaves it 0): asyncio turns
    Nagle's algorithm off only on sockets that say they are TCP, and with Nagle on, each
    response's second write waits for the client's delayed ACK (~40 ms a request).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        # the CLI prints OSErrors in one line: name the address, not just "[Errno 98]"
        raise OSError(
            exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc} (--host/--port)"
        ) from exc
    except BaseException:
        sock.close()
        raise
    return sock


def serve_forever(server: ClassifierServer) -> None:
    """Serve until Ctrl-C/SIGTERM (or ``server.shutdown()`` from another thread), answering
    the queued requests (up to ``shutdown_timeout`` s) before returning; then close. In the
    main thread, SIGTERM then ends in a normal return, so a CLI exits with status 0."""
    main = threading.current_thread() is threading.main_thread()
    # uvicorn handles SIGTERM like Ctrl-C (stop accepting, drain), then re-raises it to the
    # previous handler: this one makes that a normal return instead of death.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None) if main else None
    try:
        server.serve_forever()
    finally:
        server.server_close()
        if main:
            signal.signal(signal.SIGTERM, previous)


def serve_in_background(
    server: ClassifierServer, startup_timeout: float = 30.0
) -> threading.Thread:
    """Serve from a daemon thread, returning once the server accepts connections; stop with
    ``server.shutdown(); server.server_close()``."""
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="zoopt-serve")
    server._thread = thread
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server._uvicorn.started:
        if not thread.is_alive():
            raise RuntimeError(f"the classifier server on {server.url} stopped while starting")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the classifier server on {server.url} did not start in time")
        time.sleep(0.01)
    return thread


# -- CLI ----------------------------------------------------------------------------------
def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve-classifier`` to an ``argparse`` subparsers object; returns its parser.

    The loader's flags are written here; the server's come from :class:`ServerSettings`.
    The parser's default ``func`` is :func:`run_serve`.
    """
    parser = subparsers.add_parser(
        "serve-classifier",
        help="serve a classifier over the Open Inference Protocol (KServe V2)",
        description=(
            "Serve a ResNet classifier as a query-only Open Inference Protocol (KServe V2) "
            "API: POST /v2/models/NAME/infer, GET /v2/models/NAME, GET /v2/health/ready, "
            "GET /metrics. Waiting requests are queued and merged into one model call. "
            "WEIGHTS is a torch state dict (torchvision keys) or a checkpoint written by "
            "oracles.resnet.save_classifier_checkpoint."
        ),
    )
    parser.add_argument("--weights", required=True, type=Path, help="weights file (torch.save)")
    parser.add_argument(
        "--arch",
        choices=ARCH_CHOICES,
        default=None,
        help="default: the checkpoint's, else resnet50",
    )
    parser.add_argument(
        "--input-shape", type=_int_list, default=None, metavar="C,H,W",
        help="expected image shape, e.g. 3,224,224 (default: the checkpoint's, else unchecked)",
    )  # fmt: skip
    parser.add_argument(
        "--mean", type=_float_list, default=None, help="per-channel mean, e.g. 0.485,0.456,0.406"
    )
    parser.add_argument("--std", type=_float_list, default=None, help="per-channel std")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--torch-threads", type=int, default=None, metavar="N",
        help="torch's intra-op threads (default: torch's, one per core); 1 can be faster on "
        "a machine busy with other work",
    )  # fmt: skip
    for field in dataclasses.fields(ServerSettings):
        flag = _flag(field)
        if flag is None:
            continue
        cli = dict(field.metadata["cli"])
        default = cli.pop("cli_default", field.default)
        shown = f"${field.metadata['env']}" if field.metadata["env"] else repr(default)
        if field.metadata["env"]:
            default = os.environ.get(field.metadata["env"], default)
        parser.add_argument(
            flag,
            dest=field.name,
            default=default,
            help=f"{field.metadata['help']} (default {shown})",
            **cli,
        )
    parser.set_defaults(func=run_serve)
    return parser


def settings_from_args(args: argparse.Namespace, **resolved: Any) -> ServerSettings:
    """The :class:`ServerSettings` of parsed ``serve-classifier`` arguments (``resolved``:
    fields the loader knows, e.g. ``num_classes``)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerSettings) if _flag(f)}
    if values["max_request_bytes"] is not None:  # the flag is in MiB
        values["max_request_bytes"] = int(values["max_request_bytes"] * 2**20)
    values["token"] = values["token"] or None
    return ServerSettings(**{**values, **resolved})


def run_serve(args: argparse.Namespace) -> int:
    """Load the weights, bind, print the URL, serve until Ctrl-C or SIGTERM (both answer the
    queued requests first). Returns the exit code 0."""
    from .classifier import LocalClassifier
    from .resnet import load_classifier

    if args.torch_threads is not None:
        if args.torch_threads < 1:
            raise ValueError(f"--torch-threads must be positive, got {args.torch_threads}")
        import torch

        torch.set_num_threads(args.torch_threads)
    logging.basicConfig(
        level=logging.INFO if args.log_requests else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    module, spec = load_classifier(
        args.weights, args.arch, input_shape=args.input_shape, mean=args.mean, std=args.std
    )
    settings = settings_from_args(args, num_classes=spec["num_classes"])
    classifier = LocalClassifier(
        module,
        device=args.device,
        max_batch=settings.max_batch,
        input_shape=spec["input_shape"],
        name=spec["arch"],
    )
    server = make_server(classifier, settings)
    auth = "bearer token" if settings.token else "no auth"
    print(
        f"serving {spec['arch']} ({spec['num_classes']} classes, input {spec['input_shape']}) "
        f"on {server.url}/v2/models/{server.model_name} ({auth}); Ctrl-C stops",
        flush=True,
    )
    serve_forever(server)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m oracles.http_service serve-classifier ...`` (until zoopt's CLI has it)."""
    parser = argparse.ArgumentParser(prog="python -m oracles.http_service")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


if __name__ == "__main__":
    sys.exit(main())
