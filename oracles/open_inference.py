"""The Open Inference Protocol (KServe V2) inference messages, encoded and decoded with numpy.

Shared by the client (:mod:`oracles.classifier`) and our server (:mod:`oracles.http_service`);
numpy and the standard library only, nothing here runs code from a message (no pickle).

An inference request or response is one JSON document, optionally followed by the raw bytes
of some tensors (the *binary tensor data extension*): the HTTP header
``Inference-Header-Content-Length`` gives the length in bytes of the JSON part, and each tensor
sent in binary has ``"parameters": {"binary_data_size": <bytes>}`` instead of ``"data"``; the
binary parts follow the JSON in the order of the tensors, little-endian, row-major.

    {"id": "7", "inputs": [{"name": "images", "datatype": "FP32", "shape": [2, 3, 32, 32],
                            "parameters": {"binary_data_size": 24576}}],
     "outputs": [{"name": "logits", "parameters": {"binary_data": true}}]}
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: HTTP header carrying the byte length of the JSON part of a body with binary tensors.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: The protocol's numeric datatypes and their little-endian numpy dtypes (BYTES is not
#: supported: no classifier here takes or returns strings).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
#: Most dimensions a tensor may declare (a classifier's are 2 or 4).
MAX_RANK = 8
_DECIMAL = re.compile(r"[0-9]{1,12}")


class ProtocolError(ValueError):
    """A message does not follow the protocol; the text says what is wrong (sent as a 400)."""


def datatype_of(dtype: np.dtype) -> str:
    """The protocol's name for a numpy dtype (byte order ignored), e.g. float32 -> ``"FP32"``."""
    for name, known in DATATYPES.items():
        if known.kind == np.dtype(dtype).kind and known.itemsize == np.dtype(dtype).itemsize:
            return name
    raise ValueError(f"dtype {dtype} has no Open Inference Protocol datatype")


def parse_header_length(value: str | None, body_length: int) -> int | None:
    """The JSON length from an ``Inference-Header-Content-Length`` value (None if absent).

    Raises:
        ProtocolError: not a plain decimal, or longer than the body of ``body_length`` bytes.
    """
    if value is None:
        return None
    value = value.strip()
    # Strictly digits: int() would also take "+5", " 5", "1_2" and "٥".
    if not _DECIMAL.fullmatch(value):
        raise ProtocolError(f"{HEADER_LENGTH} must be a decimal byte count, got {value!r}")
    length = int(value)
    if length > body_length:
        raise ProtocolError(
            f"{HEADER_LENGTH} is {length} but the body has only {body_length} bytes"
        )
    return length


def split_body(
    body: bytes | bytearray | memoryview, header_length: int | None
) -> tuple[dict, memoryview]:
    """``(json document, binary part)`` of a body; the binary part is empty without the
    extension. Raises :class:`ProtocolError` for invalid or non-object JSON."""
    view = memoryview(body)
    head = view if header_length is None else view[:header_length]
    binary = view[len(view) :] if header_length is None else view[header_length:]
    try:
        document = json.loads(bytes(head))
    except RecursionError:  # "[[[[..." nested past the parser's stack
        raise ProtocolError("JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        hint = (
            ""
            if header_length is not None
            else f" (binary tensors need the {HEADER_LENGTH} header)"
        )
        raise ProtocolError(f"body is not valid JSON: {exc}{hint}") from None
    if not isinstance(document, dict):
        raise ProtocolError(f"the JSON body must be an object, got {type(document).__name__}")
    return document, binary


def tensor_shape(spec: Mapping[str, Any], what: str) -> tuple[int, ...]:
    """The ``shape`` of tensor ``spec`` as a tuple of non-negative ints (``what`` names it)."""
    shape = spec.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise ProtocolError(
            f"{what}: shape must be a list of at most {MAX_RANK} non-negative integers, "
            f"got {shape!r}"
        )
    return tuple(shape)


def tensor_datatype(spec: Mapping[str, Any], what: str) -> str:
    """The ``datatype`` of tensor ``spec``, checked to be one of :data:`DATATYPES`."""
    datatype = spec.get("datatype")
    if datatype not in DATATYPES:
        raise ProtocolError(
            f"{what}: datatype must be one of {', '.join(DATATYPES)}, got {datatype!r}"
        )
    return datatype


def binary_size(spec: Mapping[str, Any], what: str) -> int | None:
    """``parameters.binary_data_size`` of tensor ``spec`` (bytes), or None if sent as JSON."""
    parameters = spec.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(f"{what}: parameters must be an object, got {parameters!r}")
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ProtocolError(f"{what}: binary_data_size must be a byte count, got {size!r}")
    return size


def decode_tensor(
    spec: Mapping[str, Any], binary: memoryview, offset: int, what: str
) -> tuple[np.ndarray, int]:
    """The array of tensor ``spec`` and the offset just past its binary data.

    Binary data is viewed in place (read-only, no copy) after checking that its size is
    exactly ``prod(shape) * itemsize``; JSON ``data`` (flat row-major, or nested) must hold
    numbers only and exactly ``prod(shape)`` of them. Raises :class:`ProtocolError`.
    """
    if not isinstance(spec, dict):
        raise ProtocolError(f"{what} must be an object, got {type(spec).__name__}")
    shape = tensor_shape(spec, what)
    datatype = tensor_datatype(spec, what)
    dtype = DATATYPES[datatype]
    count = math.prod(shape)
    size = binary_size(spec, what)
    if size is not None:
        if "data" in spec:
            raise ProtocolError(f"{what}: has both data and binary_data_size")
        if size != count * dtype.itemsize:
            raise ProtocolError(
                f"{what}: binary_data_size is {size} bytes but shape {list(shape)} of "
                f"{datatype} needs {count * dtype.itemsize}"
            )
        if offset + size > len(binary):
            raise ProtocolError(
                f"{what}: binary data ends after {len(binary) - offset} of {size} bytes"
            )
        array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset)
        return array.reshape(shape), offset + size
    data = spec.get("data")
    if not isinstance(data, list):
        raise ProtocolError(
            f"{what}: needs data (a JSON list) or parameters.binary_data_size, got "
            f"{type(data).__name__}"
        )
    try:
        # No dtype here: numpy would turn strings such as "nan" into numbers.
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError) as exc:  # ragged nesting, huge ints
        raise ProtocolError(f"{what}: data is not a regular array of numbers ({exc})") from None
    if array.dtype.kind not in "biuf" or (array.size == 0 and count):
        raise ProtocolError(f"{what}: data must hold numbers only, got {array.dtype} values")
    # numpy reads JSON true/false as 1/0 (and a list mixing them with numbers as numbers)
    if datatype != "BOOL" and (array.dtype.kind == "b" or _holds_bool(data)):
        raise ProtocolError(
            f"{what}: data holds JSON true/false, but {datatype} takes numbers only"
        )
    if array.size != count:
        raise ProtocolError(
            f"{what}: data has {array.size} values but shape {list(shape)} needs {count}"
        )
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range -> inf, checked later
        return array.astype(dtype, copy=False).reshape(shape), offset


def _holds_bool(data: list[Any]) -> bool:
    """Whether the (nested) JSON list ``data`` holds a ``true`` or ``false`` anywhere."""
    kinds = set(map(type, data))  # one pass in C per list
    if bool in kinds:
        return True
    return list in kinds and any(_holds_bool(v) for v in data if type(v) is list)


def encode_tensors(
    tensors: Sequence[tuple[str, np.ndarray, bool]],
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Tensor specs and binary parts for ``(name, array, binary)`` triples.

    A binary tensor gets ``parameters.binary_data_size`` and its little-endian bytes in the
    returned list; a JSON one gets ``data`` (flat, row-major; float32 values written as the
    shortest decimals that read back to the same float64, so they round-trip exactly).
    """
    specs, parts = [], []
    for name, array, binary in tensors:
        datatype = datatype_of(array.dtype)
        spec: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()
            spec["parameters"] = {"binary_data_size": len(raw)}
            parts.append(raw)
        else:
            spec["data"] = array.ravel().tolist()
        specs.append(spec)
    return specs, parts


def encode_message(document: dict[str, Any], parts: Sequence[bytes]) -> tuple[bytes, int | None]:
    """``(body, json length)``: the JSON document followed by the binary parts; the length is
    None (no ``Inference-Header-Content-Length``) when there are no binary parts.

    Non-finite floats are written as the ``NaN``/``Infinity`` tokens that Python's, Triton's
    and MLServer's JSON parsers read (strict JSON has no such values).
    """
    head = json.dumps(document, separators=(",", ":")).encode()
    if not parts:
        return head, None
    return b"".join([head, *parts]), len(head)
