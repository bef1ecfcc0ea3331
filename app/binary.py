"""The binary body of ``POST /jvp``: ``application/x-safetensors`` in and out.

A request is one safetensors file: tensors named ``primals/<input>``,
``tangents/<input>`` and ``parameter_tangents/<parameter>``, and the rest of the
request (``expression`` or ``model``, ``options``) as a JSON object in the
metadata under ``"request"``. A response (with ``Accept: application/x-safetensors``)
holds ``output`` and ``jvp`` (``output/0``, ``jvp/0``, ... for several outputs), and
the rest (dtype, device, engine, method, timing_ms, check) as JSON in the metadata
under ``"response"``. Tensors are read and written by the ``safetensors`` library
(a JSON header and raw little-endian bytes): nothing is unpickled.

Every malformed body is an `InvalidRequest` (422) saying what was expected; size
limits are `TooLarge` (413), as for JSON bodies.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson
import safetensors
import safetensors.torch
import torch
from pydantic import ValidationError

from app.codec import Limits, check_limits
from app.engine.errors import InvalidRequest
from app.schemas import JVPRequest

SAFETENSORS = "application/x-safetensors"
GROUPS = ("primals", "tangents", "parameter_tangents")
DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


def _header(body: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets, metadata)."""
    if len(body) < 8:
        raise InvalidRequest(
            f"The body is not a safetensors file: {len(body)} bytes, fewer than the 8-byte "
            "header length",
            param="body",
        )
    (size,) = struct.unpack("<Q", body[:8])
    if size > min(MAX_HEADER_BYTES, len(body) - 8):
        raise InvalidRequest(
            f"The body is not a safetensors file: its header claims {size} bytes, the body "
            f"holds {len(body) - 8} after the length",
            param="body",
        )
    try:
        header = orjson.loads(body[8 : 8 + size])
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(
            f"The body is not a safetensors file: its header is not JSON ({e})", param="body"
        ) from None
    if not isinstance(header, dict):
        raise InvalidRequest(
            "The body is not a safetensors file: its header is not a JSON object", param="body"
        )
    return header


def _request_metadata(header: dict[str, Any]) -> dict[str, Any]:
    metadata = header.get("__metadata__") or {}
    text = metadata.get("request") if isinstance(metadata, dict) else None
    if text is None:
        raise InvalidRequest(
            "The safetensors metadata needs 'request': a JSON object with 'expression' or "
            "'model' (and optional 'options')",
            param="request",
        )
    try:
        request = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(
            f"The 'request' metadata is not valid JSON: {e}", param="request"
        ) from None
    if not isinstance(request, dict):
        raise InvalidRequest(
            f"The 'request' metadata must be a JSON object, got {type(request).__name__}",
            param="request",
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
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise InvalidRequest(
            f"Tensor {name!r} has shape {shape!r}; expected a list of non-negative integers",
            param=param,
        )
    check_limits(shape, param, limits)
    return group, short, dtype


def decode_request(body: bytes, limits: Limits) -> JVPRequest:
    """A `JVPRequest` whose tensors are CPU tensors, from a safetensors body."""
    header = _header(body)
    request = _request_metadata(header)
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    checked = {name: _check_entry(name, entry, limits) for name, entry in entries.items()}
    try:
        views = safetensors.deserialize(body)
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: the body is malformed
        raise InvalidRequest(
            f"The body is not a valid safetensors file: {str(e)[:300]}", param="body"
        ) from None
    groups: dict[str, dict[str, torch.Tensor]] = {g: {} for g in GROUPS}
    for name, view in views:
        group, short, dtype = checked[name]
        data, shape = view["data"], view["shape"]
        # `deserialize` hands out a bytearray per tensor: torch reads it in place, no copy.
        tensor = (
            torch.frombuffer(data, dtype=dtype).reshape(shape)
            if len(data)
            else torch.empty(shape, dtype=dtype)
        )
        groups[group][short] = tensor
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


def encode_response(
    outputs: tuple[torch.Tensor, ...],
    jvps: tuple[torch.Tensor, ...],
    single: bool,
    fields: dict[str, Any],
) -> bytes:
    """The safetensors response: ``output``/``jvp`` (or ``output/i``/``jvp/i``) and
    ``fields`` as JSON under the ``"response"`` metadata."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def own(t: torch.Tensor) -> torch.Tensor:
        # safetensors writes views (a batch's slices) as they are, but refuses one tensor
        # under two names (an output returned twice): copy only then.
        t = t.detach().cpu().contiguous()
        if t.numel() and t.data_ptr() in seen:
            t = t.clone()
        seen.add(t.data_ptr())
        return t

    if single:
        tensors["output"], tensors["jvp"] = own(outputs[0]), own(jvps[0])
    else:
        for i, (o, j) in enumerate(zip(outputs, jvps, strict=True)):
            tensors[f"output/{i}"], tensors[f"jvp/{i}"] = own(o), own(j)
    return safetensors.torch.save(tensors, metadata={"response": orjson.dumps(fields).decode()})
