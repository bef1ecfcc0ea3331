"""The binary body of ``POST /jvp``: ``application/x-safetensors`` in and out.

A request is one safetensors file: tensors named ``primals/<input>``,
``tangents/<input>`` and ``parameter_tangents/<parameter>``, and the rest of the
request (``expression`` or ``model``, ``options``) as a JSON object in the
metadata under ``"request"``. A response (with ``Accept: application/x-safetensors``)
holds ``output`` and ``jvp`` (``output/0``, ``jvp/0``, ... for several outputs), and
the rest (dtype, device, engine, method, timing_ms, check) as JSON in the metadata
under ``"response"``. The format is an 8-byte header length, a JSON header
(names, dtypes, shapes, offsets) and raw little-endian bytes: nothing is
unpickled. Tensors are read in place from the body and the answer is streamed
from the tensors' own memory, with the same checks as the ``safetensors``
library (NOTE [safetensors in place] in app/api/body.py); tests check both ways
against that library.

Every malformed body is an `InvalidRequest` (422) saying what was expected; size
limits are `TooLarge` (413), as for JSON bodies.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import torch
from pydantic import ValidationError

from app.engine.errors import InvalidRequest
from app.schemas import JVPRequest
from app.wire.codec import Limits, checked_shape

SAFETENSORS = "application/x-safetensors"
GROUPS = ("primals", "tangents", "parameter_tangents")
DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


def _header(body: np.ndarray) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets, metadata)."""
    if len(body) < 8:
        raise InvalidRequest(
            f"The body is not a safetensors file: {len(body)} bytes, fewer than the 8-byte "
            "header length",
            param="body",
        )
    (size,) = struct.unpack("<Q", body[:8].tobytes())
    if size > min(MAX_HEADER_BYTES, len(body) - 8):
        raise InvalidRequest(
            f"The body is not a safetensors file: its header claims {size} bytes, the body "
            f"holds {len(body) - 8} after the length",
            param="body",
        )
    header = _json_object(
        body[8 : 8 + size].data,
        "body",
        lambda e: f"The body is not a safetensors file: its header is not JSON ({e})",
        lambda _: "The body is not a safetensors file: its header is not a JSON object",
    )
    return header, 8 + size


def _json_object(
    data: bytes | memoryview | str,
    param: str,
    not_json: Callable[[Exception], str],
    not_object: Callable[[Any], str],
) -> dict[str, Any]:
    """``data`` parsed as a JSON object; a 400 with ``not_json(error)`` or
    ``not_object(value)`` otherwise."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(not_json(e), param=param) from None
    if not isinstance(value, dict):
        raise InvalidRequest(not_object(value), param=param)
    return value


def _request_metadata(header: dict[str, Any]) -> dict[str, Any]:
    metadata = header.get("__metadata__") or {}
    text = metadata.get("request") if isinstance(metadata, dict) else None
    if text is None:
        raise InvalidRequest(
            "The safetensors metadata needs 'request': a JSON object with 'expression' or "
            "'model' (and optional 'options')",
            param="request",
        )
    request = _json_object(
        text,
        "request",
        lambda e: f"The 'request' metadata is not valid JSON: {e}",
        lambda v: f"The 'request' metadata must be a JSON object, got {type(v).__name__}",
    )
    inline = [k for k in GROUPS if k in request]
    if inline:
        raise InvalidRequest(
            f"The 'request' metadata holds {inline[0]!r}; in a safetensors body tensors are "
            f"tensors named '{inline[0]}/<name>'",
            param=f"request.{inline[0]}",
        )
    return request


def _check_entry(name: str, entry: object, limits: Limits) -> tuple[str, str, torch.dtype]:
    """The group and name of one header entry, and its dtype, after checking them."""
    group, _, short = name.partition("/")
    if group not in GROUPS or not short:
        raise InvalidRequest(
            f"Unexpected tensor {name!r}; expected names primals/<input>, tangents/<input> or "
            "parameter_tangents/<parameter>",
            param=name,
        )
    param = f"{group}.{short}"
    if not isinstance(entry, dict):
        raise InvalidRequest(f"Tensor {name!r} has no dtype and shape in the header", param=param)
    dtype = DTYPES.get(str(entry.get("dtype")))
    if dtype is None:
        raise InvalidRequest(
            f"Tensor {name!r} has dtype {entry.get('dtype')!r}; expected one of "
            f"{', '.join(DTYPES)}",
            param=param,
        )
    checked_shape(entry.get("shape"), param, limits, what=f"the shape of tensor {name!r}")
    return group, short, dtype


def _buffer(body: bytes | memoryview) -> np.ndarray:
    """The body as writable uint8 memory that tensors may view in place.

    A large body arrives writable already (`app.api.body.read_body`); a small one is bytes,
    copied once so that the tensors viewing it are writable like any other tensor.
    """
    writable = body if isinstance(body, memoryview) and not body.readonly else bytearray(body)
    return np.frombuffer(writable, dtype=np.uint8)


def _data_offsets(
    name: str, entry: dict[str, Any], dtype: torch.dtype, data_bytes: int
) -> tuple[int, int]:
    """``data_offsets`` of one header entry, checked against its dtype, shape and the body."""
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_bytes
    ):
        raise InvalidRequest(
            f"The body is not a valid safetensors file: tensor {name!r} has data_offsets "
            f"{offsets!r}; expected [begin, end] within the {data_bytes} data bytes",
            param="body",
        )
    begin, end = offsets
    expected = math.prod(entry["shape"]) * dtype.itemsize
    if end - begin != expected:
        raise InvalidRequest(
            f"The body is not a valid safetensors file: tensor {name!r} holds {end - begin} "
            f"bytes; its dtype and shape {entry['shape']} need {expected}",
            param="body",
        )
    return begin, end


def _tensor(
    buffer: np.ndarray, start: int, end: int, shape: list[int], dtype: torch.dtype
) -> torch.Tensor:
    """The tensor stored at ``buffer[start:end]``, viewing the body in place when aligned."""
    count = (end - start) // dtype.itemsize
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    if start % dtype.itemsize:
        # Kernels may assume element alignment; safetensors' own writer pads the header to
        # 8 bytes, so only a hand-made body lands here, and it pays one copy.
        return torch.frombuffer(bytearray(buffer[start:end]), dtype=dtype).reshape(shape)
    # Read as the bytes lie: safetensors is little-endian, as are the hosts torch runs on.
    return torch.frombuffer(buffer, dtype=dtype, offset=start, count=count).reshape(shape)


def decode_request(body: bytes | memoryview, limits: Limits) -> JVPRequest:
    """A `JVPRequest` whose tensors are CPU tensors viewing the body (NOTE [safetensors in
    place])."""
    buffer = _buffer(body)
    header, data_start = _header(buffer)
    request = _request_metadata(header)
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    checked = {name: _check_entry(name, entry, limits) for name, entry in entries.items()}
    data_bytes = len(buffer) - data_start
    spans = sorted(
        (_data_offsets(name, entries[name], dtype, data_bytes), name)
        for name, (_, _, dtype) in checked.items()
    )
    # As the safetensors library checks: the tensors tile the data section, no gap, no
    # overlap, so no tensor reads another's bytes.
    position = 0
    for (begin, end), name in spans:
        if begin != position:
            raise InvalidRequest(
                f"The body is not a valid safetensors file: tensor {name!r} starts at data "
                f"byte {begin}, expected {position} (tensors must be contiguous, without gaps "
                "or overlaps)",
                param="body",
            )
        position = end
    if position != data_bytes:
        raise InvalidRequest(
            f"The body is not a valid safetensors file: its tensors end at data byte "
            f"{position}, the body holds {data_bytes}",
            param="body",
        )
    groups: dict[str, dict[str, torch.Tensor]] = {g: {} for g in GROUPS}
    for (begin, end), name in spans:
        group, short, dtype = checked[name]
        try:
            groups[group][short] = _tensor(
                buffer, data_start + begin, data_start + end, entries[name]["shape"], dtype
            )
        except (ValueError, TypeError, OverflowError, IndexError) as e:
            # As in app.wire.codec.decode_tensor: what torch raises on a malformed tensor is a 422.
            raise InvalidRequest(
                f"Tensor {name!r} cannot be built: {type(e).__name__}: {str(e)[:200]}",
                param=f"{group}.{short}",
            ) from None
    try:
        return JVPRequest.model_validate({**request, **groups})
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        message = f"{where}: {first.get('msg', 'invalid')}"
        if first.get("type") == "extra_forbidden":
            message = f"Unknown field '{where}'"
        raise InvalidRequest(
            f"Invalid 'request' metadata: {message}", param=f"request.{where}"
        ) from None


# Response dtypes: the float ones requests may use, and whatever else a model returns.
SAFETENSORS_NAMES = {
    **{dtype: name for name, dtype in DTYPES.items()},
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class SafetensorsBody:
    """A safetensors file as its header and the tensors whose bytes follow it, in order (sent
    from the tensors' own memory by app/api/responses.py, NOTE [safetensors in place])."""

    header: bytes
    tensors: list[torch.Tensor]


def encode_response(
    outputs: tuple[torch.Tensor, ...],
    jvps: tuple[torch.Tensor, ...],
    single: bool,
    fields: dict[str, Any],
) -> SafetensorsBody:
    """The safetensors response body: ``output``/``jvp`` (or ``output/i``/``jvp/i``) and
    ``fields`` as JSON under the ``"response"`` metadata."""
    if single:
        named = [("output", outputs[0]), ("jvp", jvps[0])]
    else:
        named = [
            (f"{kind}/{i}", t)
            for i, (o, j) in enumerate(zip(outputs, jvps, strict=True))
            for kind, t in (("output", o), ("jvp", j))
        ]
    header: dict[str, Any] = {"__metadata__": {"response": orjson.dumps(fields).decode()}}
    tensors: list[torch.Tensor] = []
    offset = 0
    for name, t in named:
        t = t.detach().cpu().contiguous()
        header[name] = {
            "dtype": SAFETENSORS_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
        tensors.append(t)
    text = orjson.dumps(header)
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return SafetensorsBody(struct.pack("<Q", len(text)) + text, tensors)
