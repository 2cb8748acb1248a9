"""A query-only classifier API: images in, logits out, every image counted.

The black-box defense (DeepZero Table 2; denoised smoothing, Salman et al. 2020) only ever
*queries* the classifier owner's model. :class:`ClassifierAPI` is that contract:
``predict(images (n, C, H, W) float32) -> logits (n, K) float32``, with ``.queries`` the
number of images answered so far. Two backends:

- :class:`LocalClassifier`: a torch module in this process (eval mode, no grad).
- :class:`HTTPClassifier`: any server that speaks the Open Inference Protocol (KServe V2:
  Triton, KServe, MLServer, TorchServe's KServe mode, OpenVINO Model Server, or our own
  :mod:`oracles.http_service`), over ``httpx`` with pooling, timeouts and retries.

Both split large requests into batches of at most ``max_batch`` images and can enforce a
query budget (``max_queries``): the images of a call are reserved under a lock before
anything is sent, so the budget holds exactly when many threads share one client.

This module imports numpy only at import time; httpx is imported when an HTTPClassifier is
built, torch when a LocalClassifier is.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.utils
import ipaddress
import math
import re
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from zoopt.oracle import Budget, OracleError

from .open_inference import (
    DATATYPES,
    HEADER_LENGTH,
    ProtocolError,
    decode_tensor,
    encode_message,
    encode_tensors,
    parse_header_length,
    split_body,
)

#: HTTP statuses worth retrying: rate-limited, or the gateway or service momentarily down.
TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
#: Cap on a server's ``Retry-After`` that we honour (seconds).
MAX_RETRY_AFTER_S = 60.0
#: Input datatypes the client can send (images are cast from float32).
INPUT_DATATYPES = ("FP32", "FP16", "FP64")
_MODEL_URL = re.compile(r"^(?P<root>.*?)/v2/models/(?P<model>[^/]+)/?$")


# -- errors -------------------------------------------------------------------------------
class ClassifierAPIError(RuntimeError):
    """A request to a classifier service failed. ``status`` is the HTTP status (or None)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ClassifierAuthError(ClassifierAPIError, PermissionError):
    """401: the bearer token is missing or wrong."""


class ClassifierRequestError(ClassifierAPIError, ValueError):
    """The service rejected the request (4xx); the message is the server's."""


class ClassifierUnavailable(ClassifierAPIError, ConnectionError):
    """Transient failures (connection errors, 429/502/503/504) persisted through all retries."""


class ClassifierTimeout(ClassifierAPIError, TimeoutError):
    """The service did not answer within ``timeout`` seconds."""


class NonFiniteLogits(ClassifierAPIError, OracleError):
    """The service returned NaN or infinite logits (``on_nonfinite="raise"``)."""


# -- the protocol -------------------------------------------------------------------------
@runtime_checkable
class ClassifierAPI(Protocol):
    """What a black-box classifier offers: logits for images, and a count of images sent."""

    queries: int

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Logits ``(n, K)`` float32 for images ``(n, C, H, W)`` float32."""
        ...


@runtime_checkable
class RowIndependent(Protocol):
    """A classifier that can say whether it maps each image on its own.

    ``rows_independent()`` is True when an image's logits are bit for bit the same whatever
    other images share its ``predict`` call, so a server may merge requests into one call
    (:mod:`oracles.batching`). A classifier without this method is never merged.
    """

    def rows_independent(self) -> bool: ...


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
    ``queries`` counts images whose logits came back. With ``max_queries`` a call reserves its
    ``n`` images under a lock before sending anything and raises
    :class:`~zoopt.oracle.BudgetExceeded` if spent + reserved + n would exceed the budget, so
    concurrent callers can never overspend it.
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
        if max_queries is not None and (
            isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 0
        ):
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
        #: images answered, images of calls in flight and the cap: zoopt's one Budget
        self.budget = Budget(max_queries)
        self.num_classes: int | None = None
        self._count_lock = threading.Lock()

    @property
    def queries(self) -> int:
        """Images whose logits came back (the budget's ``spent``)."""
        return self.budget.spent

    @property
    def max_queries(self) -> int | None:
        return self.budget.max_queries

    def _predict_batch(self, images: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _prepare(self) -> None:
        """Hook run before a call's images are checked (e.g. to learn the input shape)."""

    def _map_batches(
        self, fn: Callable[[np.ndarray], np.ndarray], batches: list[np.ndarray]
    ) -> list[np.ndarray]:
        """``[fn(b) for b in batches]``; a subclass may run them concurrently (all must have
        finished when this returns or raises)."""
        return [fn(batch) for batch in batches]

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Logits ``(n, K)`` float32 for images ``(n, C, H, W)`` float32; costs n queries."""
        self._prepare()
        images = check_images(images, input_shape=self.input_shape)
        n = images.shape[0]
        self.budget.reserve(n)  # check and reserve together: exact under concurrency
        answered = 0

        def one(batch: np.ndarray) -> np.ndarray:
            nonlocal answered
            logits = self._predict_batch(batch)
            with self._count_lock:
                self._check_logits(logits, batch.shape[0])
                self.budget.settle(batch.shape[0])
                answered += batch.shape[0]
            return logits

        try:
            batches = [images[s : s + self.max_batch] for s in range(0, n, self.max_batch)]
            parts = self._map_batches(one, batches)
        finally:
            with self._count_lock:
                self.budget.release(n - answered)
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
        name: the model's name; our server serves it as ``/v2/models/{name}``.
        min_batch: fewest rows handed to the module; a smaller batch is padded with copies
            of its last image, whose logits are dropped. Torch's CPU kernels take another
            path for a single row (oneDNN convolution, matrix-vector products) whose logits
            differ in the last bits from the same image's row in any larger batch; with the
            default 2, an image's logits do not depend on the batch it comes in (measured
            for ResNet-18 and a conv+linear net, batches 2 to 256), which is what lets our
            server merge requests exactly. 1 turns padding off.
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
        min_batch: int = 2,
    ):
        import torch

        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if isinstance(min_batch, bool) or not isinstance(min_batch, int) or min_batch < 1:
            raise ValueError(f"min_batch must be a positive integer, got {min_batch!r}")
        super().__init__(max_batch, input_shape=input_shape, max_queries=max_queries)
        self.min_batch = min_batch
        self._torch = torch
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.name = name or type(module).__name__

    @property
    def info(self) -> dict[str, Any]:
        """Model description (no weights, nothing secret)."""
        return {
            "backend": "torch",
            "name": self.name,
            "parameters": int(sum(p.numel() for p in self.module.parameters())),
            "device": str(self.device),
        }

    def rows_independent(self) -> bool:
        """Whether each image's logits are independent of the other images in its call:
        False while a submodule is in training mode (dropout; batch norm using the batch's
        statistics) or a batch norm keeps no running statistics (it always uses the
        batch's). Other layers that mix images are not detected (documented)."""
        torch = self._torch
        batch_norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
        for module in self.module.modules():
            if module.training:
                return False
            if isinstance(module, batch_norms) and module.running_mean is None:
                return False
        return True

    def _predict_batch(self, images: np.ndarray) -> np.ndarray:
        torch = self._torch
        if self.module.training:  # someone flipped it back: BN/dropout must not see queries
            self.module.eval()
        rows = images.shape[0]
        if rows < self.min_batch:  # see min_batch: one code path for every batch size
            images = np.concatenate([images, np.repeat(images[-1:], self.min_batch - rows, 0)])
        elif not images.flags.writeable:  # torch.from_numpy warns on read-only buffers
            images = images.copy()
        with torch.inference_mode():
            logits = self.module(torch.from_numpy(images).to(self.device))
        return logits[:rows].detach().to("cpu", torch.float32).numpy()

    def __repr__(self) -> str:
        return f"LocalClassifier({self.name}, device={self.device}, queries={self.queries})"


# -- HTTP backend -------------------------------------------------------------------------
class HTTPClassifier(BatchingClassifier):
    """A remote classifier behind any Open Inference Protocol (KServe V2) server, over httpx.

    Each batch is one ``POST {root}/v2/models/{model}/infer``: images as the model's input
    tensor (binary tensor data extension by default, else JSON ``data``), logits read from
    the output tensor, in either encoding. Names, datatype and input shape not given as
    arguments come from ``GET /v2/models/{model}`` on first use.

    Args:
        url: server root (``"http://127.0.0.1:8000"``) or a model URL
            (``"http://host:8000/v2/models/resnet50"``, which sets ``model``); http(s) only.
        token: bearer token, sent as ``Authorization: Bearer <token>``.
        timeout: seconds for each phase of a request (connect, write, each read); finite.
        retries: extra attempts after the first on connection errors and 429/502/503/504
            (so at most ``retries + 1`` requests per batch). Timeouts are not retried: a slow
            service would only get slower under repeated heavy requests.
        backoff: the delay before retry k (0-based) is ``backoff * 2**k`` seconds, or the
            server's ``Retry-After`` (seconds or an HTTP date) if longer, capped at 60 s.
        max_batch: largest number of images per request.
        model: model name; default from ``url``, else the only model that
            ``POST /v2/repository/index`` lists.
        input_name, output_name: tensor names; default the model's only input / output.
        datatype: input datatype (``"FP32"``, ``"FP16"`` or ``"FP64"``; images are cast);
            default the metadata's.
        binary: send and ask for binary tensors (``True``), or JSON ``data`` (``False``);
            ``None``: binary if the server lists the ``binary_tensor_data`` extension in
            ``GET /v2`` (Triton and our server do; MLServer 1.7 does not), else JSON.
        input_shape: expected ``(C, H, W)``; default the metadata's ``[-1, C, H, W]`` when
            fully known.
        max_queries: query budget (images), exact under concurrency; None for unlimited.
        on_nonfinite: ``"raise"`` (:class:`NonFiniteLogits` naming the first bad logit) or
            ``"inf"`` (record ``+inf`` for each NaN/inf logit), as in :mod:`zoopt.oracle`.
        max_in_flight: batches of one ``predict`` call sent concurrently (each on its own
            pooled connection) to keep a remote server busy; a batching server (ours,
            Triton's) merges them into fewer model calls (docs/classifier_api.md).
        verify: TLS verification for https (``httpx``'s ``verify``).

    Attributes:
        queries: images whose logits came back. The server may count more: a request whose
            response is lost and then retried is served twice.
        requests: inference requests attempted (the ones that carry images), retries and
            failed connections included; metadata and health requests are not counted.
        transport: the frozen :class:`Transport` (timeout, retries, backoff, max_in_flight,
            verify); ``timeout`` etc. read it.
        binding: the frozen :class:`TensorBinding` as given; ``model``, ``input_name``,
            ``output_name``, ``datatype`` and ``binary`` hold what was learned from the server.
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
        model: str | None = None,
        input_name: str | None = None,
        output_name: str | None = None,
        datatype: str | None = None,
        binary: bool | None = None,
        input_shape: Sequence[int] | None = None,
        max_queries: int | None = None,
        on_nonfinite: str = "raise",
        max_in_flight: int = 1,
        verify: Any = True,
    ):
        super().__init__(max_batch, input_shape=input_shape, max_queries=max_queries)
        self.transport = Transport(timeout, retries, backoff, max_in_flight, verify)
        self.binding = TensorBinding(model, input_name, output_name, datatype, binary, on_nonfinite)
        self.url, model = _split_model_url(url, model)
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError("token must be a non-empty string or None")
        hostname = urllib.parse.urlsplit(self.url).hostname or ""
        if token and self.url.startswith("http:") and not is_loopback_host(hostname):
            warnings.warn(
                f"sending a bearer token in clear text to {hostname}; use https", stacklevel=2
            )
        self.token = token
        # Learned from the server on first use where None (see metadata()).
        self.model, self.input_name, self.output_name = model, input_name, output_name
        self.datatype, self.binary = datatype, binary
        self.on_nonfinite = on_nonfinite
        self.requests = 0
        self._metadata: dict[str, Any] | None = None
        self._metadata_lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._client = self.transport.client({"Authorization": f"Bearer {token}"} if token else {})

    @property
    def timeout(self) -> float:
        """Seconds for each phase of a request (``transport.timeout``)."""
        return self.transport.timeout

    @property
    def retries(self) -> int:
        """Extra attempts on transient failures (``transport.retries``)."""
        return self.transport.retries

    @property
    def backoff(self) -> float:
        """Base delay before a retry, seconds (``transport.backoff``)."""
        return self.transport.backoff

    @property
    def max_in_flight(self) -> int:
        """Batches of one call sent at once (``transport.max_in_flight``)."""
        return self.transport.max_in_flight

    # -- public ---------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """The model's metadata (``GET /v2/models/{model}``), fetched once; fills in the
        model, tensor names, datatype and input shape not given to the constructor."""
        with self._metadata_lock:
            if self._metadata is None:
                self._metadata = self._resolve()
            return self._metadata

    def ready(self) -> bool:
        """Whether the server and the model answer ready (``/v2/health/ready`` and
        ``/v2/models/{model}/ready``): False on a 4xx/5xx answer, raises when unreachable."""
        for path in ("/v2/health/ready", None):
            if path is None:
                self.metadata()
                path = f"{self._model_path()}/ready"
            try:
                self._request("GET", path, None, {}, retries=0)
            except ClassifierAuthError:
                raise
            except ClassifierAPIError as exc:
                if exc.status is None:
                    raise
                return False
        return True

    def close(self) -> None:
        """Close the pooled connections (and the worker threads of ``max_in_flight``)."""
        self._client.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> HTTPClassifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"HTTPClassifier({self.url!r}, model={self.model!r}, queries={self.queries}, "
            f"requests={self.requests})"
        )

    # -- metadata -------------------------------------------------------------------------
    def _model_path(self) -> str:
        return f"/v2/models/{urllib.parse.quote(str(self.model), safe='')}"

    def _resolve(self) -> dict[str, Any]:
        if self.model is None:
            index = self._json(self._request("POST", "/v2/repository/index", b"{}", _JSON_HEADERS))
            names = sorted(
                {m.get("name") for m in index if isinstance(m, dict)}
                if isinstance(index, list)
                else []
            )
            if len(names) != 1 or not isinstance(names[0], str):
                raise ValueError(
                    f"{self.url} serves models {names}; pass model=NAME (or a /v2/models/NAME url)"
                )
            self.model = names[0]
        metadata = self._json(self._request("GET", self._model_path(), None, {}))
        if not isinstance(metadata, dict):
            raise ClassifierAPIError(
                f"{self.url}{self._model_path()}: metadata is not a JSON object"
            )
        inputs = _tensor_list(metadata, "inputs")
        outputs = _tensor_list(metadata, "outputs")
        spec = _pick(inputs, self.input_name, "input", self.model)
        self.input_name = spec["name"]
        self.output_name = _pick(outputs, self.output_name, "output", self.model)["name"]
        if self.datatype is None:
            datatype = spec.get("datatype")
            if datatype not in INPUT_DATATYPES:
                raise ClassifierAPIError(
                    f"model {self.model!r} takes {self.input_name!r} as {datatype!r}; this client "
                    f"sends images as one of {', '.join(INPUT_DATATYPES)}"
                )
            self.datatype = datatype
        shape = spec.get("shape")
        if (
            self.input_shape is None
            and isinstance(shape, list)
            and len(shape) == 4
            and all(isinstance(s, int) and s > 0 for s in shape[1:])
        ):
            self.input_shape = tuple(shape[1:])
        return metadata

    def _prepare(self) -> None:
        if self.model is None or self.input_name is None or self.output_name is None:
            self.metadata()
        elif self.datatype is None:
            self.datatype = "FP32"  # everything named: no metadata round trip needed
        if self.binary is None:
            with self._metadata_lock:
                if self.binary is None:
                    self.binary = self._server_has_binary_extension()

    def _server_has_binary_extension(self) -> bool:
        try:
            document = self._json(self._request("GET", "/v2", None, {}))
        except ClassifierRequestError:  # no server metadata endpoint: assume the core only
            return False
        extensions = document.get("extensions") if isinstance(document, dict) else None
        return isinstance(extensions, list) and "binary_tensor_data" in extensions

    # -- batching hooks -------------------------------------------------------------------
    def _map_batches(
        self, fn: Callable[[np.ndarray], np.ndarray], batches: list[np.ndarray]
    ) -> list[np.ndarray]:
        if self.max_in_flight == 1 or len(batches) == 1:
            return [fn(batch) for batch in batches]
        with self._metadata_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    self.max_in_flight, thread_name_prefix="zoopt-http"
                )
        futures = [self._executor.submit(fn, batch) for batch in batches]
        concurrent.futures.wait(futures)  # all settled (and counted) before we raise
        return [f.result() for f in futures]

    def _predict_batch(self, images: np.ndarray) -> np.ndarray:
        assert self.datatype is not None and self.output_name is not None
        x = images if self.datatype == "FP32" else images.astype(DATATYPES[self.datatype])
        specs, parts = encode_tensors([(str(self.input_name), x, self.binary)])
        document: dict[str, Any] = {
            "inputs": specs,
            "outputs": [{"name": self.output_name, "parameters": {"binary_data": self.binary}}],
        }
        if self.binary:
            document["parameters"] = {"binary_data_output": True}
        body, json_length = encode_message(document, parts)
        headers = dict(_JSON_HEADERS)
        if json_length is not None:
            headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(json_length)}
        path = f"{self._model_path()}/infer"
        response = self._request("POST", path, body, headers)
        try:
            logits = self._decode_logits(response, images.shape[0])
        except ProtocolError as exc:
            raise ClassifierAPIError(
                f"{self.url}{path} returned a bad response: {exc}", response.status_code
            ) from exc
        return logits

    def _decode_logits(self, response: Any, rows: int) -> np.ndarray:
        content = response.content
        header_length = parse_header_length(response.headers.get(HEADER_LENGTH), len(content))
        document, binary = split_body(content, header_length)
        outputs = document.get("outputs")
        if not isinstance(outputs, list):
            raise ProtocolError(f"outputs must be a list, got {type(outputs).__name__}")
        offset, found = 0, None
        for i, spec in enumerate(outputs):  # binary parts come in the order of the outputs
            array, offset = decode_tensor(spec, binary, offset, f"output {i}")
            if spec.get("name") == self.output_name:
                found = array
        if found is None:
            names = [s.get("name") for s in outputs if isinstance(s, dict)]
            raise ProtocolError(f"no output {self.output_name!r} among {names}")
        if found.dtype.kind != "f":
            raise ProtocolError(f"output {self.output_name!r} is {found.dtype}, expected floats")
        if found.ndim != 2 or found.shape[0] != rows:
            raise ProtocolError(
                f"output {self.output_name!r} has shape {list(found.shape)}, expected [{rows}, K]"
            )
        logits = np.array(found, dtype=np.float32)  # native order, writable, owns its data
        finite = np.isfinite(logits)
        if not finite.all():
            bad = np.unravel_index(int(np.argmin(finite)), logits.shape)
            if self.on_nonfinite == "raise":
                raise NonFiniteLogits(
                    f"{self.url}: the classifier returned a non-finite logit {logits[bad]} for "
                    f"image {bad[0]} of the batch, class {bad[1]} (set on_nonfinite='inf' to "
                    "treat such values as +inf)",
                    response.status_code,
                )
            logits[~finite] = np.inf
        return logits

    # -- transport ------------------------------------------------------------------------
    def _json(self, response: Any) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise ClassifierAPIError(
                f"{response.request.url} returned invalid JSON", response.status_code
            ) from exc

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        retries: int | None = None,
    ) -> Any:
        """One logical request, retried on transient failures; returns the httpx response."""
        import httpx

        target = f"{self.url}{path}"
        retries = self.retries if retries is None else retries
        failures: list[tuple[str, int | None]] = []
        retry_after = 0.0  # the last transient response's Retry-After, in seconds
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(self._retry_delay(attempt - 1, retry_after))
            retry_after = 0.0
            if method == "POST" and path.endswith("/infer"):
                with self._count_lock:
                    self.requests += 1
            try:
                response = self._client.request(method, target, content=body, headers=headers)
            except httpx.TimeoutException as exc:
                raise ClassifierTimeout(
                    f"{method} {target} timed out after {self.timeout:g} s ({type(exc).__name__})"
                ) from exc
            except httpx.TransportError as exc:  # refused, reset, closed early
                failures.append((f"{type(exc).__name__}: {exc}", None))
                continue
            except httpx.HTTPError as exc:
                raise ClassifierAPIError(f"{method} {target} failed: {exc}") from exc
            status = response.status_code
            if status in TRANSIENT_STATUSES:
                failures.append((f"HTTP {status} {_server_message(response.content)}", status))
                retry_after = _retry_after_seconds(response.headers.get("retry-after"))
                continue
            if status >= 300:
                raise _error_for_status(status, method, target, response.content)
            return response
        message, status = failures[-1]
        raise ClassifierUnavailable(
            f"{method} {target} failed after {retries + 1} attempts; last: {message}", status
        )

    def _retry_delay(self, retry_index: int, retry_after: float) -> float:
        return max(self.backoff * 2**retry_index, min(retry_after, MAX_RETRY_AFTER_S))


_JSON_HEADERS = {"Content-Type": "application/json"}


@dataclasses.dataclass(frozen=True)
class Transport:
    """How :class:`HTTPClassifier` talks to the server (checked on construction; see its
    arguments of the same names): per-phase ``timeout`` (s), ``retries`` and ``backoff`` (s)
    for transient failures, ``max_in_flight`` concurrent batches, TLS ``verify``."""

    timeout: float = 30.0
    retries: int = 3
    backoff: float = 0.5
    max_in_flight: int = 1
    verify: Any = True

    def __post_init__(self) -> None:
        if not _finite_number(self.timeout) or self.timeout <= 0:
            raise ValueError(
                f"timeout must be a positive finite number of seconds, got {self.timeout!r}"
            )
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be a non-negative integer, got {self.retries!r}")
        if not _finite_number(self.backoff) or self.backoff < 0:
            raise ValueError(
                f"backoff must be a non-negative finite number of seconds, got {self.backoff!r}"
            )
        if not _positive_int(self.max_in_flight):
            raise ValueError(
                f"max_in_flight must be a positive integer, got {self.max_in_flight!r}"
            )
        object.__setattr__(self, "timeout", float(self.timeout))
        object.__setattr__(self, "backoff", float(self.backoff))

    def client(self, headers: dict[str, str]) -> Any:
        """An ``httpx.Client`` with these settings: one pooled connection per batch in flight,
        no proxies or netrc from the environment, no redirects."""
        import httpx

        pool = max(4, self.max_in_flight)
        return httpx.Client(
            headers=headers,
            # Each phase bounded; waiting for a pooled connection is not (threads queue).
            timeout=httpx.Timeout(self.timeout, pool=None),
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
            trust_env=False,
            follow_redirects=False,
            verify=self.verify,
        )


@dataclasses.dataclass(frozen=True)
class TensorBinding:
    """The names and encodings :class:`HTTPClassifier` was given (None: learn them from the
    server), checked on construction."""

    model: str | None = None
    input_name: str | None = None
    output_name: str | None = None
    datatype: str | None = None
    binary: bool | None = None
    on_nonfinite: str = "raise"

    def __post_init__(self) -> None:
        if self.on_nonfinite not in ("raise", "inf"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'inf', got {self.on_nonfinite!r}")
        if self.binary is not None and not isinstance(self.binary, bool):
            raise ValueError(f"binary must be True, False or None, got {self.binary!r}")
        if self.datatype is not None and self.datatype not in INPUT_DATATYPES:
            raise ValueError(
                f"datatype must be one of {', '.join(INPUT_DATATYPES)}, got {self.datatype!r}"
            )
        for label in ("model", "input_name", "output_name"):
            value = getattr(self, label)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{label} must be a non-empty string or None, got {value!r}")


def _split_model_url(url: Any, model: str | None) -> tuple[str, str | None]:
    """``(server root, model)`` from a root or ``.../v2/models/NAME`` URL (http(s) only)."""
    if not isinstance(url, str):
        raise ValueError(f"url must be a string, got {url!r}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url must be http(s)://host[:port][/prefix], got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"url must not have a query or fragment, got {url!r}")
    root = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")).rstrip("/")
    found = _MODEL_URL.match(root)
    if not found:
        return root, model
    if model is not None and model != urllib.parse.unquote(found["model"]):
        raise ValueError(f"model={model!r} disagrees with the model in url {url!r}")
    return found["root"], urllib.parse.unquote(found["model"])


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# -- small helpers ------------------------------------------------------------------------
def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or IP literal) is this machine's loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _tensor_list(metadata: dict[str, Any], key: str) -> list[dict[str, Any]]:
    tensors = metadata.get(key)
    if not isinstance(tensors, list) or not all(
        isinstance(t, dict) and isinstance(t.get("name"), str) for t in tensors
    ):
        raise ClassifierAPIError(f"model metadata has no valid {key!r} list: {str(tensors)[:200]}")
    return tensors


def _pick(tensors: list[dict[str, Any]], name: str | None, kind: str, model: Any) -> dict[str, Any]:
    names = [t["name"] for t in tensors]
    if name is None:
        if len(tensors) != 1:
            raise ValueError(f"model {model!r} has {kind}s {names}; pass {kind}_name=")
        return tensors[0]
    for tensor in tensors:
        if tensor["name"] == name:
            return tensor
    raise ValueError(f"model {model!r} has no {kind} {name!r}; its {kind}s are {names}")


def _server_message(body: bytes) -> str:
    """The ``error`` field of a JSON error body, else a short printable prefix of it."""
    try:
        import json

        message = json.loads(body)["error"]
        if isinstance(message, str):
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return body[:200].decode("utf-8", "replace").strip()


def _retry_after_seconds(value: str | None) -> float:
    """Seconds from a ``Retry-After`` value: delta-seconds or an HTTP date; 0 if unusable."""
    if not value:
        return 0.0
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return 0.0
    if when is None or when.tzinfo is None:
        return 0.0
    return max(0.0, when.timestamp() - time.time())


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
