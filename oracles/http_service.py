"""The classifier owner's side: an Open Inference Protocol (KServe V2) server for one model.

Starlette on uvicorn (h11 for HTTP/1.1): parsing, framing and the connection's life are
theirs; this module adds the protocol's endpoints, limits and deadlines (docs/classifier_api.md):

- ``GET /v2/health/live``, ``GET /v2/health/ready``: ``{"live": true}``, ``{"ready": true}``.
- ``GET /v2``: server metadata (name, version, extensions: ``binary_tensor_data``).
- ``GET /v2/models/{name}[/versions/1]``: model metadata: ``inputs`` ``[{"name": "images",
  "datatype": "FP32", "shape": [-1, C, H, W]}]``, ``outputs`` ``[{"name": "logits",
  "datatype": "FP32", "shape": [-1, K]}]``.
- ``GET /v2/models/{name}[/versions/1]/ready``: ``{"name": ..., "ready": true}``.
- ``POST /v2/models/{name}[/versions/1]/infer``: images ``(n, C, H, W)`` FP32 in, logits
  ``(n, K)`` FP32 out, as JSON ``data`` or with the binary tensor data extension
  (``Inference-Header-Content-Length``; binary output when the request asks for it with
  ``outputs[i].parameters.binary_data`` or ``parameters.binary_data_output``).
- ``POST /v2/repository/index``: ``[{"name": ..., "version": "1", "state": "READY"}]``.

Errors are ``{"error": "..."}`` with a 4xx status naming the problem (400 bad tensor, 401
token, 404 unknown model or path, 405 method, 408 body not received within
``request_timeout``, 413 body over ``max_request_bytes``, 415 compressed body, 503 busy with
``Retry-After``), or a generic 500 when the model raised (details only in the server log).
Malformed HTTP (e.g. conflicting or non-numeric ``Content-Length``) never reaches us: h11
answers it with a plain-text 400 and closes the connection.

Deadlines: a connection must deliver a request's headers within ``request_timeout`` of
opening (or of the previous response), then its body within ``request_timeout``; only then
does the request take one of ``max_concurrent`` slots, so slow senders never hold a slot.
Model calls run one at a time on a worker thread; the event loop keeps serving others.

CLI: :func:`add_serve_parser` / :func:`run_serve` implement ``zoopt serve-classifier``; the
same command runs as ``python -m oracles.http_service serve-classifier ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hmac
import logging
import math
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .classifier import ClassifierAPI, check_images, is_loopback_host
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


class RequestRejected(Exception):
    """Answer the request with ``status`` and ``{"error": message}`` (plus ``headers``)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class ClassifierServer:
    """One classifier served over the Open Inference Protocol; build it with :func:`make_server`.

    The listening socket is bound at construction (``server_address`` and ``url`` are known
    at once); :func:`serve_forever` or :func:`serve_in_background` run it on uvicorn.

    Attributes:
        model_name, input_name, output_name: the names in the protocol's messages.
        queries_served: images answered since start; requests_served: successful infers.
        num_classes: K, from the constructor or learned from the first answer (else None).
    """

    def __init__(
        self,
        sock: socket.socket,
        classifier: ClassifierAPI,
        *,
        model_name: str,
        input_name: str,
        output_name: str,
        token: str | None,
        max_request_bytes: int,
        max_batch: int,
        input_shape: tuple[int, ...] | None,
        num_classes: int | None,
        max_concurrent: int,
        max_connections: int,
        request_timeout: float,
        log_requests: bool,
    ):
        self.socket = sock
        self.classifier = classifier
        self.model_name = model_name
        self.input_name = input_name
        self.output_name = output_name
        self.token = token
        self.max_request_bytes = max_request_bytes
        self.max_batch = max_batch
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.max_concurrent = max_concurrent
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.log_requests = log_requests
        self.queries_served = 0
        self.requests_served = 0
        self.server_address: tuple[str, int] = sock.getsockname()[:2]
        self._in_flight = 0  # touched only on the event loop's thread
        # One worker: model calls run one at a time, off the event loop.
        self._model_thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="zoopt-model"
        )
        self.app = _build_app(self)
        self._uvicorn = _build_uvicorn(self)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the bound socket."""
        host, port = self.server_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def metadata(self) -> dict[str, Any]:
        """The model metadata document (``GET /v2/models/{name}``)."""
        shape = [-1, *(self.input_shape or (-1, -1, -1))]
        return {
            "name": self.model_name,
            "versions": [MODEL_VERSION],
            "platform": "pytorch",
            "inputs": [{"name": self.input_name, "datatype": "FP32", "shape": shape}],
            "outputs": [
                {
                    "name": self.output_name,
                    "datatype": "FP32",
                    "shape": [-1, -1 if self.num_classes is None else self.num_classes],
                }
            ],
            "parameters": {"max_batch_size": self.max_batch},
        }

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Logits ``(n, K)`` float32 for validated images ``(n, C, H, W)``; runs on the model
        thread (one call at a time)."""
        logits = np.asarray(self.classifier.predict(images), dtype=np.float32)
        if logits.ndim != 2 or logits.shape[0] != images.shape[0]:
            raise RuntimeError(f"classifier returned shape {logits.shape} for {images.shape}")
        self.queries_served += images.shape[0]
        self.requests_served += 1
        if self.num_classes is None:
            self.num_classes = int(logits.shape[1])
        return logits

    # -- running --------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Serve on this thread until Ctrl-C (in the main thread) or :meth:`shutdown`."""
        try:
            self._uvicorn.run(sockets=[self.socket])
        except KeyboardInterrupt:
            pass

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop serving (in-flight requests get up to ``timeout`` s); wait for the serving
        thread if :func:`serve_in_background` started one."""
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def server_close(self) -> None:
        """Close the listening socket and the model thread (safe to call twice)."""
        self.socket.close()
        self._model_thread.shutdown(wait=False)


# -- the ASGI application -----------------------------------------------------------------
def _build_app(server: ClassifierServer) -> Any:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        return JSONResponse({"error": message}, status, headers=headers)

    def endpoint(
        handler: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        """Bearer check, then ``handler``; RequestRejected -> its 4xx, a client gone -> no
        answer, no traceback (uvicorn drops responses to disconnected clients)."""

        async def wrapped(request: Request) -> Response:
            try:
                _check_token(server.token, request.headers.get("authorization", ""))
                return await handler(request)
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
        return JSONResponse(
            {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]}
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
    async def infer(request: Request) -> Response:
        check_model(request)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise RequestRejected(
                415, f"Content-Encoding {encoding!r} is not supported; send identity"
            )
        declared = request.headers.get("content-length")
        if declared is not None and int(declared) > server.max_request_bytes:  # h11 checked digits
            raise RequestRejected(
                413,
                f"body of {declared} bytes exceeds max_request_bytes={server.max_request_bytes}",
            )
        body = await _read_body(request, server.max_request_bytes, server.request_timeout)
        # The body is complete: only now may the request hold a slot.
        if server._in_flight >= server.max_concurrent:
            raise RequestRejected(503, "server busy; retry later", {"Retry-After": "1"})
        server._in_flight += 1
        try:
            return await _infer(server, request, body)
        finally:
            server._in_flight -= 1

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
    ]
    for prefix in (model, versioned):
        routes += [
            Route(prefix, model_metadata),
            Route(prefix + "/ready", model_ready),
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


async def _infer(server: ClassifierServer, request: Any, body: bytes) -> Any:
    from starlette.responses import Response

    loop = asyncio.get_running_loop()
    header_value = request.headers.get(HEADER_LENGTH.lower())
    try:
        header_length = parse_header_length(header_value, len(body))
        # Large JSON bodies take a while to parse: keep that off the event loop.
        decode = _decode_infer_request
        if header_length is None and len(body) > 64 * 2**10:
            parsed = await loop.run_in_executor(None, decode, server, body, header_length)
        else:
            parsed = decode(server, body, header_length)
    except (ProtocolError, TypeError, ValueError) as exc:
        raise RequestRejected(400, str(exc)) from None
    images, request_id, binary_output = parsed
    try:
        logits = await loop.run_in_executor(server._model_thread, server.predict, images)
    except Exception:
        log.exception("predict failed for a batch of shape %s", images.shape)
        return Response(
            b'{"error": "internal error while predicting"}',
            500,
            media_type="application/json",
        )
    specs, parts = encode_tensors([(server.output_name, logits, binary_output)])
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
    server: ClassifierServer, body: bytes, header_length: int | None
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
            f"inputs must be a list with the one input {server.input_name!r}, got "
            f"{_preview(inputs)}"
        )
    spec = inputs[0]
    if not isinstance(spec, dict) or spec.get("name") != server.input_name:
        name = spec.get("name") if isinstance(spec, dict) else spec
        raise ProtocolError(f"unknown input {name!r}; the model's input is {server.input_name!r}")
    what = f"input {server.input_name!r}"
    if spec.get("datatype") != "FP32":
        raise ProtocolError(f"{what}: datatype must be FP32, got {spec.get('datatype')!r}")
    shape = spec.get("shape")
    if isinstance(shape, list) and shape and isinstance(shape[0], int):
        # Before touching the data: a batch over the limit is refused by its declared shape.
        if shape[0] > server.max_batch:
            raise ProtocolError(f"batch of {shape[0]} images exceeds max_batch={server.max_batch}")
    array, used = decode_tensor(spec, binary, 0, what)
    if used != len(binary):
        raise ProtocolError(
            f"{len(binary) - used} bytes of binary data follow the tensors (sizes disagree)"
        )
    images = check_images(array, input_shape=server.input_shape, max_batch=server.max_batch)
    binary_output = _wants_binary_output(document, server.output_name)
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

    protocol = _protocol_with_header_deadline(server.request_timeout)
    level = "info" if server.log_requests else "error"
    config = uvicorn.Config(
        server.app,
        http=protocol,
        loop="asyncio",
        lifespan="off",
        ws="none",
        interface="asgi3",
        log_config=None,  # leave the embedding program's logging alone
        log_level=level,
        access_log=server.log_requests,
        server_header=False,
        date_header=False,
        proxy_headers=False,  # never trust X-Forwarded-* from clients
        # uvicorn answers 503 once this many connections are open: with the deadlines, it
        # bounds the bodies held in memory to max_connections * max_request_bytes.
        limit_concurrency=server.max_connections,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=max(1.0, server.request_timeout),
        # h11's own limit on the request line + headers (bytes).
        h11_max_incomplete_event_size=16 * 2**10,
    )
    if server.log_requests:
        logging.getLogger("uvicorn.access").propagate = True
    return uvicorn.Server(config)


def _protocol_with_header_deadline(timeout: float) -> type:
    """uvicorn's h11 protocol plus the deadline it lacks: a connection that has not delivered
    a request's headers ``timeout`` s after opening (or after our last response) is closed.
    uvicorn's keep-alive timer is reset by every byte, so a trickling client would hold its
    connection forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
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

    return DeadlineH11Protocol


# -- building and running -----------------------------------------------------------------
def make_server(
    classifier: ClassifierAPI,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    max_request_bytes: int | None = None,
    max_batch: int = 256,
    *,
    model_name: str | None = None,
    input_name: str = "images",
    output_name: str = "logits",
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    max_concurrent: int = 4,
    max_connections: int = 64,
    request_timeout: float = 30.0,
    log_requests: bool = False,
) -> ClassifierServer:
    """A bound (not yet serving) Open Inference Protocol server for ``classifier``.

    Args:
        classifier: any :class:`~oracles.classifier.ClassifierAPI` (usually a LocalClassifier).
        host: interface to bind; loopback by default. Binding elsewhere without a token warns.
        port: TCP port; 0 picks a free one (read it from ``server.server_address``).
        token: bearer token required on every endpoint; None disables auth.
        max_request_bytes: largest body accepted (413 above). Default: room for ``max_batch``
            images of ``input_shape`` as JSON text (24 bytes a value), else 64 MiB.
        max_batch: most images per request (400 above).
        model_name: the ``{name}`` in ``/v2/models/{name}``; default the classifier's
            ``name`` attribute, else ``"classifier"``.
        input_name, output_name: the tensor names in metadata and messages.
        input_shape: expected ``(C, H, W)`` (400 otherwise); default the classifier's
            ``input_shape`` attribute, if any.
        num_classes: K for the metadata; default learned from the first answer.
        max_concurrent: requests decoded or predicted at once; more get 503 + ``Retry-After``.
        max_connections: open connections before uvicorn answers 503.
        request_timeout: seconds for a request's headers, and then for its body.
        log_requests: log one line per request (and uvicorn's warnings) at INFO.

    Run it with :func:`serve_forever` (blocking) or :func:`serve_in_background`.
    """
    for name, value in (
        ("max_batch", max_batch),
        ("max_concurrent", max_concurrent),
        ("max_connections", max_connections),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not callable(getattr(classifier, "predict", None)):
        raise TypeError(f"classifier must have a predict method, got {type(classifier).__name__}")
    if token is not None and (not isinstance(token, str) or not token):
        raise ValueError("token must be a non-empty string or None")
    if not (
        isinstance(request_timeout, int | float)
        and not isinstance(request_timeout, bool)
        and math.isfinite(request_timeout)
        and request_timeout > 0
    ):
        raise ValueError(
            f"request_timeout must be positive finite seconds, got {request_timeout!r}"
        )
    model_name = model_name or getattr(classifier, "name", None) or "classifier"
    for label, value in (
        ("model_name", model_name),
        ("input_name", input_name),
        ("output_name", output_name),
    ):
        if not isinstance(value, str) or not value or "/" in value or not value.isprintable():
            raise ValueError(
                f"{label} must be a non-empty printable string without '/', got {value!r}"
            )
    if input_shape is None:
        input_shape = getattr(classifier, "input_shape", None)
    if input_shape is not None:
        if len(input_shape) != 3 or any(int(s) < 1 for s in input_shape):
            raise ValueError(f"input_shape must be (C, H, W) of positive ints, got {input_shape!r}")
        input_shape = tuple(int(s) for s in input_shape)
    if max_request_bytes is None:
        max_request_bytes = (
            DEFAULT_MAX_REQUEST_BYTES
            if input_shape is None
            else max_batch * math.prod(input_shape) * JSON_BYTES_PER_VALUE + HEADER_ALLOWANCE
        )
    if (
        isinstance(max_request_bytes, bool)
        or not isinstance(max_request_bytes, int)
        or max_request_bytes < 1
    ):
        raise ValueError(f"max_request_bytes must be a positive integer, got {max_request_bytes!r}")
    if token is None and not is_loopback_host(host):
        warnings.warn(
            f"binding the classifier service to {host!r} without a token: anyone who can reach "
            "this port can query the model; set a token (and put TLS in front)",
            stacklevel=2,
        )
    sock = _listening_socket(host, port)
    try:
        return ClassifierServer(
            sock,
            classifier,
            model_name=model_name,
            input_name=input_name,
            output_name=output_name,
            token=token,
            max_request_bytes=max_request_bytes,
            max_batch=max_batch,
            input_shape=input_shape,
            num_classes=num_classes,
            max_concurrent=max_concurrent,
            max_connections=max_connections,
            request_timeout=float(request_timeout),
            log_requests=log_requests,
        )
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
    """Serve until Ctrl-C (or ``server.shutdown()`` from another thread), then close."""
    try:
        server.serve_forever()
    finally:
        server.server_close()


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

    The parser's default ``func`` is :func:`run_serve`.
    """
    parser = subparsers.add_parser(
        "serve-classifier",
        help="serve a classifier over the Open Inference Protocol (KServe V2)",
        description=(
            "Serve a ResNet classifier as a query-only Open Inference Protocol (KServe V2) "
            "API: POST /v2/models/NAME/infer, GET /v2/models/NAME, GET /v2/health/ready. "
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
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one")
    parser.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV_VAR),
        help=f"bearer token (default: ${TOKEN_ENV_VAR}; prefer the variable, argv is visible in ps)",
    )  # fmt: skip
    parser.add_argument("--max-batch", type=int, default=256, help="most images per request")
    parser.add_argument("--max-request-mb", type=float, default=None, help="body limit in MiB")
    parser.add_argument("--max-concurrent", type=int, default=4, help="requests processed at once")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--model-name", default=None, help="NAME in /v2/models/NAME (default: the architecture)"
    )
    parser.add_argument(
        "--request-timeout", type=float, default=30.0,
        help="seconds for a request's headers, then for its body (default 30)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="log errors only, no request lines")
    parser.set_defaults(func=run_serve)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    """Load the weights, bind, print the URL, serve until Ctrl-C. Returns the exit code 0."""
    from .classifier import LocalClassifier
    from .resnet import load_classifier

    logging.basicConfig(
        level=logging.ERROR if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    module, spec = load_classifier(
        args.weights, args.arch, input_shape=args.input_shape, mean=args.mean, std=args.std
    )
    classifier = LocalClassifier(
        module,
        device=args.device,
        max_batch=args.max_batch,
        input_shape=spec["input_shape"],
        name=spec["arch"],
    )
    max_request_bytes = None if args.max_request_mb is None else int(args.max_request_mb * 2**20)
    server = make_server(
        classifier,
        host=args.host,
        port=args.port,
        token=args.token or None,
        max_request_bytes=max_request_bytes,
        max_batch=args.max_batch,
        model_name=args.model_name,
        num_classes=spec["num_classes"],
        max_concurrent=args.max_concurrent,
        request_timeout=args.request_timeout,
        log_requests=not args.quiet,
    )
    auth = "bearer token" if server.token else "no auth"
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
