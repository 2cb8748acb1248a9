"""The classifier owner's side: a prediction service over HTTP, standard library only.

Endpoints (see docs/classifier_api.md):

- ``POST /predict``: body is one ``.npy`` array (``np.save``) of float32 images
  ``(n, C, H, W)``; the response is a ``.npy`` of float32 logits ``(n, K)``.
- ``GET /health``: JSON with model info, input shape, class count, limits, queries served.

Errors are JSON ``{"error": "..."}`` naming the problem: 400 malformed array / wrong dtype /
wrong ndim or shape / batch too large / non-finite values, 401 missing or wrong bearer token,
404 unknown path, 411 no Content-Length, 413 body over the limit, 503 too many concurrent
requests (with ``Retry-After``), 500 the model failed (details only in the server log).

Request bodies are parsed by :func:`oracles.classifier.decode_npy`, which never unpickles.
The server binds to loopback by default and warns when exposed without a token. Inference
is serialised by a lock; at most ``max_concurrent`` requests hold a body in memory at once.

CLI: :func:`add_serve_parser` / :func:`run_serve` implement ``zoopt serve-classifier``; the
same command runs as ``python -m oracles.http_service serve-classifier ...``.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import math
import os
import socket
import sys
import threading
import urllib.parse
import warnings
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from .classifier import (
    ClassifierAPI,
    NpyFormatError,
    check_images,
    decode_npy,
    encode_npy,
    is_loopback_host,
)

log = logging.getLogger(__name__)

#: Body limit when the input shape is unknown (bytes).
DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20
#: Room for the .npy header on top of the array data (bytes).
NPY_HEADER_ALLOWANCE = 4096
#: Bodies we reject up to this size are still read and discarded, so the client sees our
#: answer instead of a connection reset and the keep-alive connection stays usable.
DRAIN_LIMIT_BYTES = 1 * 2**20
#: Environment variable the CLI reads the token from (keeps it out of ``ps`` listings).
TOKEN_ENV_VAR = "ZOOPT_CLASSIFIER_TOKEN"
#: Architectures the CLI can build (the keys of ``oracles.resnet.ARCHITECTURES``; listed
#: here so that building the parser does not import torch).
ARCH_CHOICES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class ClassifierServer(ThreadingHTTPServer):
    """A :class:`ThreadingHTTPServer` serving one classifier; build it with :func:`make_server`.

    Attributes:
        queries_served: images answered by ``/predict`` since start.
        requests_served: successful ``/predict`` requests since start.
    """

    daemon_threads = True  # a hung client must not block shutdown

    def __init__(
        self,
        address: tuple[str, int],
        classifier: ClassifierAPI,
        *,
        token: str | None,
        max_request_bytes: int,
        max_batch: int,
        input_shape: tuple[int, ...] | None,
        num_classes: int | None,
        max_concurrent: int,
        request_timeout: float,
        log_requests: bool,
    ):
        if ":" in address[0]:  # an IPv6 literal such as ::1
            self.address_family = socket.AF_INET6
        super().__init__(address, PredictionHandler)
        self.classifier = classifier
        self.token = token
        self.max_request_bytes = max_request_bytes
        self.max_batch = max_batch
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.request_timeout = request_timeout
        self.log_requests = log_requests
        self.queries_served = 0
        self.requests_served = 0
        self._predict_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_concurrent)

    @property
    def url(self) -> str:
        """``http://host:port`` of the bound socket."""
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def health(self) -> dict[str, Any]:
        """The ``/health`` document."""
        return {
            "status": "ok",
            "model": dict(
                getattr(self.classifier, "info", {"name": type(self.classifier).__name__})
            ),
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "dtype": "float32",
            "num_classes": self.num_classes,
            "max_batch": self.max_batch,
            "max_request_bytes": self.max_request_bytes,
            "auth": "bearer" if self.token else "none",
            "queries_served": self.queries_served,
            "requests_served": self.requests_served,
        }

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Logits ``(n, K)`` float32 for validated images; one model call at a time."""
        with self._predict_lock:
            logits = np.asarray(self.classifier.predict(images), dtype=np.float32)
            if logits.ndim != 2 or logits.shape[0] != images.shape[0]:
                raise RuntimeError(f"classifier returned shape {logits.shape} for {images.shape}")
            self.queries_served += images.shape[0]
            self.requests_served += 1
            if self.num_classes is None:
                self.num_classes = int(logits.shape[1])
        return logits


class PredictionHandler(BaseHTTPRequestHandler):
    """Routes ``GET /health`` and ``POST /predict`` (HTTP/1.1, keep-alive)."""

    protocol_version = "HTTP/1.1"
    server_version = "zoopt-classifier/1"
    # Headers and body go out in two writes; with Nagle on, the client's delayed ACK would
    # add ~40 ms to every response.
    disable_nagle_algorithm = True
    server: ClassifierServer

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # socket timeout against stalled clients
        super().setup()

    # -- routes ---------------------------------------------------------------------------
    def do_GET(self) -> None:
        if self._path() != "/health":
            self._send_json(404, {"error": f"unknown path {self._path()!r}; try GET /health"})
        elif self._authorized():
            self._send_json(200, self.server.health())

    def do_POST(self) -> None:
        length = self._content_length()
        if length is None:
            return
        if self._path() != "/predict":
            self._reject(404, f"unknown path {self._path()!r}; try POST /predict", length)
            return
        if not self._authorized(length):
            return
        if length > self.server.max_request_bytes:
            self._reject(
                413,
                f"body of {length} bytes exceeds max_request_bytes={self.server.max_request_bytes}",
                length,
            )
            return
        if not self.server._slots.acquire(blocking=False):
            self._reject(503, "server busy; retry later", length, retry_after=1)
            return
        try:
            self._predict(length)
        finally:
            self.server._slots.release()

    def _predict(self, length: int) -> None:
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            self._send_json(400, {"error": f"body ended after {len(body)} of {length} bytes"})
            return
        try:
            images = check_images(
                decode_npy(body),
                input_shape=self.server.input_shape,
                max_batch=self.server.max_batch,
            )
        except (NpyFormatError, TypeError, ValueError) as exc:
            self._send_json(400, {"error": str(exc)})
            return
        try:
            logits = self.server.predict(images)
        except Exception:
            log.exception("predict failed for a batch of shape %s", images.shape)
            self._send_json(500, {"error": "internal error while predicting"})
            return
        self._send(200, encode_npy(logits), "application/x-npy")

    # -- request helpers ------------------------------------------------------------------
    def _path(self) -> str:
        return urllib.parse.urlsplit(self.path).path

    def _content_length(self) -> int | None:
        """The declared body length, or None after answering 411/400."""
        raw = self.headers.get("Content-Length")
        if raw is None:
            self.close_connection = True  # we can't tell where the body ends
            self._send_json(411, {"error": "Content-Length is required (no chunked bodies)"})
            return None
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._send_json(400, {"error": f"invalid Content-Length {raw!r}"})
            return None
        return length

    def _authorized(self, unread_body: int = 0) -> bool:
        """Check the bearer token in constant time; answer 401 and return False if wrong."""
        expected = self.server.token
        if expected is None:
            return True
        scheme, _, provided = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            provided.strip().encode(), expected.encode()
        ):
            return True
        self._reject(401, "missing or wrong bearer token", unread_body, authenticate=True)
        return False

    def _reject(
        self,
        status: int,
        message: str,
        unread_body: int,
        *,
        retry_after: int | None = None,
        authenticate: bool = False,
    ) -> None:
        """Answer an error before reading the body: drain a small body, else close."""
        if 0 < unread_body <= DRAIN_LIMIT_BYTES:
            self.rfile.read(unread_body)
        elif unread_body > 0:
            self.close_connection = True
        extra = {}
        if retry_after is not None:
            extra["Retry-After"] = str(retry_after)
        if authenticate:
            extra["WWW-Authenticate"] = 'Bearer realm="zoopt-classifier"'
        self._send_json(status, {"error": message}, extra)

    # -- response helpers -----------------------------------------------------------------
    def _send_json(self, status: int, document: dict, extra: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(document).encode(), "application/json", extra)

    def _send(
        self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if self.server.log_requests:
            super().log_message(format, *args)


def make_server(
    classifier: ClassifierAPI,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    max_request_bytes: int | None = None,
    max_batch: int = 256,
    *,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    max_concurrent: int = 4,
    request_timeout: float = 30.0,
    log_requests: bool = False,
) -> ClassifierServer:
    """A bound (not yet serving) prediction server for ``classifier``.

    Args:
        classifier: any :class:`~oracles.classifier.ClassifierAPI` (usually a LocalClassifier).
        host: interface to bind; loopback by default. Binding elsewhere without a token warns.
        port: TCP port; 0 picks a free one (read it from ``server.server_address``).
        token: bearer token required on every endpoint; None disables auth.
        max_request_bytes: largest body accepted (413 above). Default: room for ``max_batch``
            images of ``input_shape`` if known, else 64 MiB.
        max_batch: most images per request (400 above).
        input_shape: expected ``(C, H, W)`` (400 otherwise); default the classifier's
            ``input_shape`` attribute, if any.
        num_classes: K for ``/health``; default learned from the first answer.
        max_concurrent: requests processed at once; more get 503 + ``Retry-After``.
        request_timeout: socket timeout per connection (seconds) against stalled clients.
        log_requests: log one line per request to stderr.

    Run it with :func:`serve_forever` (blocking) or :func:`serve_in_background`.
    """
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    if (
        isinstance(max_concurrent, bool)
        or not isinstance(max_concurrent, int)
        or max_concurrent < 1
    ):
        raise ValueError(f"max_concurrent must be a positive integer, got {max_concurrent!r}")
    if not callable(getattr(classifier, "predict", None)):
        raise TypeError(f"classifier must have a predict method, got {type(classifier).__name__}")
    if token is not None and (not isinstance(token, str) or not token):
        raise ValueError("token must be a non-empty string or None")
    if not (isinstance(request_timeout, int | float) and request_timeout > 0):
        raise ValueError(f"request_timeout must be positive seconds, got {request_timeout!r}")
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
            else max_batch * math.prod(input_shape) * 4 + NPY_HEADER_ALLOWANCE
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
    return ClassifierServer(
        (host, port),
        classifier,
        token=token,
        max_request_bytes=max_request_bytes,
        max_batch=max_batch,
        input_shape=input_shape,
        num_classes=num_classes,
        max_concurrent=max_concurrent,
        request_timeout=float(request_timeout),
        log_requests=log_requests,
    )


def serve_forever(server: ClassifierServer, poll_interval: float = 0.5) -> None:
    """Serve until Ctrl-C (or ``server.shutdown()`` from another thread), then close."""
    try:
        server.serve_forever(poll_interval)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def serve_in_background(server: ClassifierServer) -> threading.Thread:
    """Serve from a daemon thread; stop with ``server.shutdown(); server.server_close()``."""
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    return thread


# -- CLI ----------------------------------------------------------------------------------
def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve-classifier`` to an ``argparse`` subparsers object; returns its parser.

    The parser's default ``func`` is :func:`run_serve`.
    """
    parser = subparsers.add_parser(
        "serve-classifier",
        help="serve a classifier's logits over HTTP (POST /predict, GET /health)",
        description=(
            "Serve a ResNet classifier as a query-only prediction API. WEIGHTS is a torch "
            "state dict (torchvision keys) or a checkpoint written by "
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
    parser.add_argument("--quiet", action="store_true", help="don't log each request")
    parser.set_defaults(func=run_serve)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    """Load the weights, bind, print the URL, serve until Ctrl-C. Returns the exit code 0."""
    from .classifier import LocalClassifier
    from .resnet import load_classifier

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
        num_classes=spec["num_classes"],
        max_concurrent=args.max_concurrent,
        log_requests=not args.quiet,
    )
    auth = "bearer token" if server.token else "no auth"
    print(
        f"serving {spec['arch']} ({spec['num_classes']} classes, input {spec['input_shape']}) "
        f"on {server.url} ({auth}); Ctrl-C stops",
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
