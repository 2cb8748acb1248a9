"""A query-only classifier API: images in, logits out, every image counted.

The black-box defense (DeepZero Table 2; denoised smoothing, Salman et al. 2020) only ever
*queries* the classifier owner's model. :class:`ClassifierAPI` is that contract:
``predict(images (n, C, H, W) float32) -> logits (n, K) float32``, with ``.queries`` the
number of images sent so far. Two backends:

- :class:`LocalClassifier`: a torch module in this process (eval mode, no grad).
- :class:`HTTPClassifier`: a remote service (:mod:`oracles.http_service`), standard library
  only, with retries and exponential backoff on transient failures.

Both split large requests into batches of at most ``max_batch`` images and can enforce a
query budget (``max_queries``, raising :class:`zoopt.oracle.BudgetExceeded` before sending).

The wire format is one ``.npy`` array per body (:func:`encode_npy` / :func:`decode_npy`);
decoding parses the header ourselves and never unpickles. This module imports numpy only;
torch is imported when a :class:`LocalClassifier` is built.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import json
import math
import socket
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from zoopt.oracle import BudgetExceeded

#: Largest .npy header we parse (numpy's own default limit).
MAX_NPY_HEADER_BYTES = 10_000
#: HTTP statuses worth retrying: the gateway or the service is momentarily unavailable.
TRANSIENT_STATUSES = frozenset({502, 503, 504})
#: Cap on a server's ``Retry-After`` that we honour (seconds).
MAX_RETRY_AFTER_S = 60.0


# -- errors -------------------------------------------------------------------------------
class ClassifierAPIError(RuntimeError):
    """A request to a classifier service failed. ``status`` is the HTTP status (or None)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ClassifierAuthError(ClassifierAPIError, PermissionError):
    """401: the bearer token is missing or wrong."""


class ClassifierRequestError(ClassifierAPIError, ValueError):
    """The service rejected the request (400/413); the message is the server's."""


class ClassifierUnavailable(ClassifierAPIError, ConnectionError):
    """Transient failures (connection errors, 502/503/504) persisted through all retries."""


class ClassifierTimeout(ClassifierAPIError, TimeoutError):
    """The service did not answer within ``timeout`` seconds."""


class NpyFormatError(ValueError):
    """A body is not one well-formed, non-object ``.npy`` array."""


# -- the protocol -------------------------------------------------------------------------
@runtime_checkable
class ClassifierAPI(Protocol):
    """What a black-box classifier offers: logits for images, and a count of images sent."""

    queries: int

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Logits ``(n, K)`` float32 for images ``(n, C, H, W)`` float32."""
        ...


# -- wire format --------------------------------------------------------------------------
def encode_npy(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a ``.npy`` file (``np.save``, pickling disabled)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(body: bytes | bytearray | memoryview) -> np.ndarray:
    """The array in a ``.npy`` body, read without ever unpickling.

    We parse the header ourselves and check that the data length matches the declared
    shape and dtype *before* allocating, so a lying header can't make us allocate memory.
    The result is read-only and views ``body``.

    Raises:
        NpyFormatError: bad magic, unsupported version, malformed header, object dtype,
            or a data length that doesn't match the header (truncated or trailing bytes).
    """
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
    except ValueError as exc:
        raise NpyFormatError(f"body is not a .npy array ({exc})") from exc
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    if version not in readers:
        raise NpyFormatError(f"unsupported .npy format version {version}; use np.save")
    try:
        shape, fortran_order, dtype = readers[version](stream, max_header_size=MAX_NPY_HEADER_BYTES)
    except ValueError as exc:
        raise NpyFormatError(f"malformed .npy header ({exc})") from exc
    if dtype.hasobject:
        raise NpyFormatError(
            f"object arrays are not accepted (dtype {dtype}); they would need unpickling"
        )
    if any(s < 0 for s in shape):
        raise NpyFormatError(f"negative dimension in .npy shape {shape}")
    count = math.prod(shape)
    offset = stream.tell()
    expected_bytes = count * dtype.itemsize
    actual_bytes = len(body) - offset
    if actual_bytes != expected_bytes:
        raise NpyFormatError(
            f".npy data is {actual_bytes} bytes but shape {shape} of dtype {dtype} needs "
            f"{expected_bytes} ({'truncated' if actual_bytes < expected_bytes else 'trailing bytes'})"
        )
    flat = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape[::-1]).T if fortran_order else flat.reshape(shape)


def check_images(
    images: Any, *, input_shape: Sequence[int] | None = None, max_batch: int | None = None
) -> np.ndarray:
    """Validate a batch of images; return it as a C-contiguous native float32 array.

    Args:
        images: ``(n, C, H, W)`` float32 (any byte order), n >= 1.
        input_shape: the expected ``(C, H, W)``, if known.
        max_batch: the largest n accepted, if limited.

    Raises:
        TypeError: not an array, or not float32.
        ValueError: wrong ndim or shape, empty, over ``max_batch``, or non-finite values.
    """
    if not isinstance(images, np.ndarray):
        raise TypeError(f"images must be a numpy array, got {type(images).__name__}")
    if images.dtype.kind != "f" or images.dtype.itemsize != 4:
        raise TypeError(f"images must have dtype float32, got {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"images must be 4-D (n, C, H, W), got ndim={images.ndim} {images.shape}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (n=0)")
    if input_shape is not None and tuple(images.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"images must have shape (n, {', '.join(map(str, input_shape))}), got {images.shape}"
        )
    if max_batch is not None and images.shape[0] > max_batch:
        raise ValueError(f"batch of {images.shape[0]} images exceeds max_batch={max_batch}")
    finite = np.isfinite(images)
    if not finite.all():
        bad = np.unravel_index(int(np.argmin(finite)), images.shape)
        raise ValueError(f"images must be finite; images{list(map(int, bad))} = {images[bad]}")
    return np.ascontiguousarray(images, dtype=np.float32)


def as_label_function(
    classifier: ClassifierAPI, preprocess: Callable[[np.ndarray], np.ndarray] | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """``images -> labels (n,) int64``: argmax of ``classifier``'s logits, after ``preprocess``
    (e.g. a denoiser). This is the base classifier that :func:`zoopt.certify.certify` smooths.
    """

    def labels(images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, dtype=np.float32)
        if preprocess is not None:
            x = np.asarray(preprocess(x), dtype=np.float32)
        return np.argmax(classifier.predict(x), axis=1).astype(np.int64)

    return labels


# -- shared batching and counting ---------------------------------------------------------
class BatchingClassifier:
    """Splits requests into batches of at most ``max_batch``, counts queries, checks a budget.

    Subclasses implement ``_predict_batch(images (m, C, H, W) float32) -> (m, K) float32``.
    ``queries`` counts images whose logits came back.
    """

    def __init__(
        self,
        max_batch: int = 256,
        *,
        input_shape: Sequence[int] | None = None,
        max_queries: int | None = None,
    ):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if max_queries is not None and (not isinstance(max_queries, int) or max_queries < 0):
            raise ValueError(
                f"max_queries must be a non-negative integer or None, got {max_queries!r}"
            )
        if input_shape is not None:
            if len(input_shape) != 3 or any(int(s) < 1 for s in input_shape):
                raise ValueError(
                    f"input_shape must be (C, H, W) of positive ints, got {input_shape!r}"
                )
            input_shape = tuple(int(s) for s in input_shape)
        self.max_batch = max_batch
        self.input_shape: tuple[int, ...] | None = input_shape
        self.max_queries = max_queries
        self.num_classes: int | None = None
        self.queries = 0
        self._count_lock = threading.Lock()

    def _predict_batch(self, images: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Logits ``(n, K)`` float32 for images ``(n, C, H, W)`` float32; costs n queries."""
        images = check_images(images, input_shape=self.input_shape)
        n = images.shape[0]
        if self.max_queries is not None and self.queries + n > self.max_queries:
            raise BudgetExceeded(self.queries, self.max_queries, None, math.inf)
        parts = []
        for start in range(0, n, self.max_batch):
            batch = images[start : start + self.max_batch]
            logits = self._predict_batch(batch)
            self._check_logits(logits, batch.shape[0])
            with self._count_lock:
                self.queries += batch.shape[0]
            parts.append(logits)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _check_logits(self, logits: Any, rows: int) -> None:
        if not isinstance(logits, np.ndarray) or logits.dtype != np.float32 or logits.ndim != 2:
            raise ClassifierAPIError(
                f"the classifier returned {type(logits).__name__} "
                f"{getattr(logits, 'dtype', '')}{tuple(getattr(logits, 'shape', ()))}, "
                "expected float32 logits of shape (n, K)"
            )
        if logits.shape[0] != rows:
            raise ClassifierAPIError(
                f"the classifier returned {logits.shape[0]} rows for {rows} images"
            )
        if self.num_classes is None:
            self.num_classes = int(logits.shape[1])
        elif logits.shape[1] != self.num_classes:
            raise ClassifierAPIError(
                f"the classifier returned {logits.shape[1]} classes, earlier {self.num_classes}"
            )


# -- local backend ------------------------------------------------------------------------
class LocalClassifier(BatchingClassifier):
    """A torch module behind the query-only API (eval mode, ``torch.inference_mode``).

    Args:
        module: maps float32 ``(m, C, H, W)`` tensors to logits ``(m, K)``.
        device: where the module runs (``"cpu"``, ``"cuda"``, ...).
        max_batch: largest batch handed to the module at once.
        input_shape: the expected ``(C, H, W)``, checked on every call if given.
        max_queries: query budget (images); None for unlimited.
        name: model name reported by the service's ``/health``.
    """

    def __init__(
        self,
        module: Any,
        device: str = "cpu",
        max_batch: int = 256,
        *,
        input_shape: Sequence[int] | None = None,
        max_queries: int | None = None,
        name: str | None = None,
    ):
        import torch

        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        super().__init__(max_batch, input_shape=input_shape, max_queries=max_queries)
        self._torch = torch
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.name = name or type(module).__name__

    @property
    def info(self) -> dict[str, Any]:
        """Model description for ``/health`` (no weights, nothing secret)."""
        return {
            "backend": "torch",
            "name": self.name,
            "parameters": int(sum(p.numel() for p in self.module.parameters())),
            "device": str(self.device),
        }

    def _predict_batch(self, images: np.ndarray) -> np.ndarray:
        torch = self._torch
        if self.module.training:  # someone flipped it back: BN/dropout must not see queries
            self.module.eval()
        if not images.flags.writeable:  # torch.from_numpy warns on read-only buffers
            images = images.copy()
        with torch.inference_mode():
            logits = self.module(torch.from_numpy(images).to(self.device))
        return logits.detach().to("cpu", torch.float32).numpy()

    def __repr__(self) -> str:
        return f"LocalClassifier({self.name}, device={self.device}, queries={self.queries})"


# -- HTTP backend -------------------------------------------------------------------------
class HTTPClassifier(BatchingClassifier):
    """A remote classifier service (:mod:`oracles.http_service`) over HTTP(S), stdlib only.

    Each batch is one ``POST {url}/predict`` with a ``.npy`` body; the response is a ``.npy``
    of float32 logits. One keep-alive connection is reused (calls are serialised by a lock).

    Args:
        url: service root, e.g. ``"http://127.0.0.1:8000"`` (http or https only).
        token: bearer token, sent as ``Authorization: Bearer <token>``.
        timeout: seconds for each socket operation (connect, send, each read).
        retries: extra attempts after the first on connection errors and 502/503/504
            (so at most ``retries + 1`` requests per batch). Timeouts are not retried: a slow
            service would only get slower under repeated heavy requests.
        backoff: the delay before retry k (0-based) is ``backoff * 2**k`` seconds, or the
            server's ``Retry-After`` if longer (capped at 60 s).
        max_batch: largest number of images per request.
        input_shape, max_queries: as in :class:`BatchingClassifier`.

    Attributes:
        queries: images whose logits came back. The server may count more: a request whose
            response is lost and then retried is served twice.
        requests: HTTP requests attempted, retries and failed connections included.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_batch: int = 256,
        *,
        input_shape: Sequence[int] | None = None,
        max_queries: int | None = None,
    ):
        super().__init__(max_batch, input_shape=input_shape, max_queries=max_queries)
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host[:port][/prefix], got {url!r}")
        if not (isinstance(timeout, int | float) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative integer, got {retries!r}")
        if not (isinstance(backoff, int | float) and backoff >= 0):
            raise ValueError(f"backoff must be a non-negative number of seconds, got {backoff!r}")
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError("token must be a non-empty string or None")
        if token and parts.scheme == "http" and not is_loopback_host(parts.hostname):
            warnings.warn(
                f"sending a bearer token in clear text to {parts.hostname}; use https",
                stacklevel=2,
            )
        self.url = url.rstrip("/")
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self.token = token
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.requests = 0
        self._connection: http.client.HTTPConnection | None = None
        self._connection_lock = threading.Lock()

    # -- public ---------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """The service's ``GET /health`` JSON (model info, input shape, classes, queries)."""
        status, _, body = self._request("GET", "/health", None, {})
        try:
            return json.loads(body)
        except ValueError as exc:
            raise ClassifierAPIError(f"{self.url}/health returned invalid JSON", status) from exc

    def close(self) -> None:
        """Close the kept-alive connection (a later call reopens one)."""
        with self._connection_lock:
            self._drop_connection()

    def __repr__(self) -> str:
        return f"HTTPClassifier({self.url!r}, queries={self.queries}, requests={self.requests})"

    # -- batching hook --------------------------------------------------------------------
    def _predict_batch(self, images: np.ndarray) -> np.ndarray:
        headers = {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}
        status, _, body = self._request("POST", "/predict", encode_npy(images), headers)
        try:
            logits = decode_npy(body)
        except NpyFormatError as exc:
            raise ClassifierAPIError(
                f"{self.url}/predict returned a bad body: {exc}", status
            ) from exc
        if logits.dtype.kind == "f" and logits.dtype.itemsize == 4:
            logits = np.array(logits, dtype=np.float32)  # native order, writable, owns its data
        return logits

    # -- transport ------------------------------------------------------------------------
    def _request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        """One logical request, retried on transient failures; returns (status, headers, body)."""
        if self.token:
            headers = {**headers, "Authorization": f"Bearer {self.token}"}
        target = f"{self.url}{path}"
        failures: list[str] = []
        retry_after = 0.0  # the last transient response's Retry-After, in seconds
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self._retry_delay(attempt - 1, retry_after))
            retry_after = 0.0
            try:
                status, response_headers, response_body = self._send_once(
                    method, path, body, headers
                )
            except TimeoutError as exc:  # before OSError: it is one
                raise ClassifierTimeout(
                    f"{method} {target} timed out after {self.timeout:g} s ({exc})"
                ) from exc
            except (http.client.HTTPException, OSError) as exc:  # refused, reset, closed early
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if status in TRANSIENT_STATUSES:
                failures.append(f"HTTP {status} {_server_message(response_body)}")
                retry_after = _retry_after_seconds(response_headers)
                continue
            if status >= 300:
                raise _error_for_status(status, method, target, response_body)
            return status, response_headers, response_body
        raise ClassifierUnavailable(
            f"{method} {target} failed after {self.retries + 1} attempts; last: {failures[-1]}",
            status=_last_status(failures),
        )

    def _retry_delay(self, retry_index: int, retry_after: float) -> float:
        return max(self.backoff * 2**retry_index, min(retry_after, MAX_RETRY_AFTER_S))

    def _send_once(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        with self._connection_lock:
            self.requests += 1
            if self._connection is not None:
                try:
                    return self._exchange(self._connection, method, path, body, headers)
                except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                    # The server closed the idle kept-alive connection before reading this
                    # request: resend at once on a fresh one, without spending a retry.
                    self.requests += 1
            return self._exchange(self._open_connection(), method, path, body, headers)

    def _exchange(
        self,
        connection: http.client.HTTPConnection,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
    ) -> tuple[int, dict[str, str], bytes]:
        """One request/response on ``connection`` (dropped afterwards unless reusable)."""
        try:
            connection.request(method, f"{self._prefix}{path}", body=body, headers=headers)
            response = connection.getresponse()
            response_body = response.read()
        except BaseException:
            self._drop_connection()  # its state is unknown: never reuse it
            raise
        if response.will_close:
            self._drop_connection()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response_body

    def _open_connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        connection = cls(self._host, self._port, timeout=self.timeout)
        connection.connect()
        # http.client sends headers and body in separate writes: without TCP_NODELAY, Nagle's
        # algorithm and the server's delayed ACK stall each request by ~40 ms.
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connection = connection
        return connection

    def _drop_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


# -- small helpers ------------------------------------------------------------------------
def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or IP literal) is this machine's loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _server_message(body: bytes) -> str:
    """The ``error`` field of a JSON error body, else a short printable prefix of it."""
    try:
        message = json.loads(body)["error"]
        if isinstance(message, str):
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return body[:200].decode("utf-8", "replace")


def _retry_after_seconds(headers: dict[str, str]) -> float:
    try:
        return max(0.0, float(headers.get("retry-after", "0")))
    except ValueError:  # an HTTP date: not worth parsing for a short backoff
        return 0.0


def _last_status(failures: list[str]) -> int | None:
    last = failures[-1] if failures else ""
    return int(last.split()[1]) if last.startswith("HTTP ") else None


def _error_for_status(status: int, method: str, target: str, body: bytes) -> ClassifierAPIError:
    message = _server_message(body)
    if status == 401:
        return ClassifierAuthError(
            f"{method} {target}: 401 unauthorized ({message}); check the token", status
        )
    if status == 413:
        return ClassifierRequestError(
            f"{method} {target}: 413 request too large ({message}); lower max_batch", status
        )
    if 400 <= status < 500:
        return ClassifierRequestError(f"{method} {target}: {status} {message}", status)
    return ClassifierAPIError(f"{method} {target}: HTTP {status} {message}", status)
