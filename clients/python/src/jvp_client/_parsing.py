"""Every answer of the service read by one parser (:func:`parse`); no I/O.

A reader turns a decoded body into a result; :func:`parse` decodes the body, turns
any reader error into one :class:`APIResponseValidationError` naming the route,
and puts the response's ``X-Request-ID`` on the result (``result.request_id``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import httpx

from ._base import OutputKind
from ._exceptions import APIResponseValidationError
from ._safetensors import SAFETENSORS, decode_safetensors
from ._tensors import Array, decode_tensor, decode_tensors
from ._tensors import _to_output as to_output
from ._types import (
    EvalShapeResult,
    GradientCheck,
    HVPResult,
    JacobianResult,
    JobInfo,
    JobResultsPage,
    JobTaskError,
    JobTaskResult,
    JVPResult,
    LinearizationInfo,
    ModelInfo,
    ShapeInfo,
)

__all__ = ["body_or_text", "parse", "parse_jvp"]

R = TypeVar("R")
_READ_ERRORS = (KeyError, TypeError, ValueError, AttributeError)


def parse(response: httpx.Response, what: str, read: Callable[[Any], R], body: Any = None) -> R:
    """``read(body)`` of a response (``body``: its JSON unless given), errors as
    :class:`APIResponseValidationError`, the request id on the result."""
    if body is None:
        body = _json(response)
    try:
        result = read(body)
    except _READ_ERRORS as exc:
        raise APIResponseValidationError(
            f"Unexpected {what} response: {exc}", response=response, body=body
        ) from exc
    with_id: R = _with_request_id(result, response.headers.get("x-request-id"))
    return with_id


def _with_request_id(result: Any, request_id: str | None) -> Any:
    """``result`` with ``request_id`` set (in each item of a list or tuple)."""
    if isinstance(result, (list, tuple)):
        return type(result)(_with_request_id(item, request_id) for item in result)
    if dataclasses.is_dataclass(result) and hasattr(result, "request_id"):
        return dataclasses.replace(result, request_id=request_id)  # type: ignore[type-var]
    return result


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise APIResponseValidationError(
            f"Expected a JSON body from {response.request.method} {response.request.url.path},"
            f" got {response.text[:200]!r}",
            response=response,
        ) from exc


def body_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _timing(body: Mapping[str, Any]) -> dict[str, float]:
    return {str(k): float(v) for k, v in (body.get("timing_ms") or {}).items()}


def _facts(body: Mapping[str, Any]) -> dict[str, Any]:
    """The fields every computing route answers beside its tensors."""
    return {
        "dtype": str(body.get("dtype", "")),
        "device": str(body.get("device", "")),
        "timing_ms": _timing(body),
        "raw": body,
    }


def _decode_map(obj: Any, kind: OutputKind) -> dict[str, Array]:
    """A ``{name: T}`` map of a response (jacobian blocks, hvp)."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected an object of names to tensors, got {type(obj).__name__}")
    return {
        str(name): decode_tensor(value, as_torch=kind.as_torch, device=kind.device)
        for name, value in obj.items()
    }


def _jvp_result(body: Mapping[str, Any], output: Any, jvp: Any) -> JVPResult:
    check = body.get("check")
    return JVPResult(
        output=output,
        jvp=jvp,
        engine=body.get("engine"),
        method=body.get("method"),
        check=None if check is None else GradientCheck.from_json(check),
        **_facts(body),
    )


def parse_jvp(response: httpx.Response, kind: OutputKind) -> JVPResult:
    """A ``POST /jvp`` answer, JSON or safetensors (NOTE [binary bodies] in ``_bodies.py``)."""
    media = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != SAFETENSORS:
        return parse(
            response,
            "/jvp",
            lambda b: _jvp_result(
                b,
                decode_tensors(b["output"], as_torch=kind.as_torch, device=kind.device),
                decode_tensors(b["jvp"], as_torch=kind.as_torch, device=kind.device),
            ),
        )
    try:
        tensors, metadata = decode_safetensors(response.content)
        body = json.loads(metadata.get("response", "{}"))
    except ValueError as exc:
        raise APIResponseValidationError(
            f"Unexpected /jvp response: not a valid safetensors body: {exc}", response=response
        ) from exc

    def pick(key: str) -> Array | list[Array]:
        def out(name: str) -> Array:
            array, wire = tensors[name]
            return to_output(array, wire, as_torch=kind.as_torch, device=kind.device)

        if key in tensors:
            return out(key)
        count = sum(1 for name in tensors if name.startswith(f"{key}/"))
        if not count:
            raise KeyError(f"no tensor {key!r} or {key + '/0'!r}")
        return [out(f"{key}/{i}") for i in range(count)]

    def read(b: Any) -> JVPResult:
        if not isinstance(b, dict):
            raise TypeError(f"the 'response' metadata is a {type(b).__name__}")
        return _jvp_result(b, pick("output"), pick("jvp"))

    return parse(response, "/jvp", read, body=body)


def read_jacobian(kind: OutputKind) -> Callable[[Any], JacobianResult]:
    def read(body: Any) -> JacobianResult:
        blocks = body["jacobian"]
        jacobian: dict[str, Array] | list[dict[str, Array]]
        if isinstance(blocks, list):
            jacobian = [_decode_map(block, kind) for block in blocks]
        else:
            jacobian = _decode_map(blocks, kind)
        output = decode_tensors(body["output"], as_torch=kind.as_torch, device=kind.device)
        return JacobianResult(output=output, jacobian=jacobian, **_facts(body))

    return read


def read_hvp(kind: OutputKind) -> Callable[[Any], HVPResult]:
    def read(body: Any) -> HVPResult:
        output = decode_tensor(body["output"], as_torch=kind.as_torch, device=kind.device)
        return HVPResult(output=output, hvp=_decode_map(body["hvp"], kind), **_facts(body))

    return read


def read_eval_shape(operation: str) -> Callable[[Any], EvalShapeResult]:
    def specs(value: Any) -> Any:
        if isinstance(value, dict) and "shape" in value:
            return ShapeInfo(tuple(int(d) for d in value["shape"]), str(value["dtype"]))
        if isinstance(value, dict):
            return {str(k): specs(v) for k, v in value.items()}
        if isinstance(value, list):
            return [specs(v) for v in value]
        raise TypeError(f"expected a shape, got {value!r}")

    name = {"linearize": "jvp", "solve": "solution"}.get(operation, operation)

    def read(body: Any) -> EvalShapeResult:
        cost = body["cost"]
        return EvalShapeResult(
            output=specs(body["output"]),
            result=specs(body[name]),
            flops=int(cost["flops"]),
            peak_bytes=int(cost["peak_bytes"]),
            raw=body,
        )

    return read


def read_linearize(kind: OutputKind) -> Callable[[Any], LinearizationInfo]:
    def read(body: Any) -> LinearizationInfo:
        session_id = body["id"]
        if not isinstance(session_id, str) or not session_id or "/" in session_id:
            raise ValueError(f"expected a session id, got {session_id!r}")
        return LinearizationInfo(
            id=session_id,
            output=decode_tensors(body["output"], as_torch=kind.as_torch, device=kind.device),
            expires_at=str(body["expires_at"]),
            wrt=[str(name) for name in body.get("wrt", [])],
            bytes=int(body.get("bytes", 0)),
            **_facts(body),
        )

    return read


def read_tensors(key: str, kind: OutputKind) -> Callable[[Any], Array | list[Array]]:
    """One tensor (or list) field of a body: ``jvp`` of ``POST /linearize/{id}/jvp``."""
    return lambda body: decode_tensors(body[key], as_torch=kind.as_torch, device=kind.device)


def read_models(body: Any) -> list[ModelInfo]:
    items = body["models"] if isinstance(body, dict) else body
    return [ModelInfo.from_json(item) for item in items]


def read_jobs_page(body: Any) -> tuple[list[JobInfo], int | None]:
    """``GET /jobs``: the jobs of one page and the next page's offset (None: the last)."""
    items = body["jobs"] if isinstance(body, dict) else body
    next_offset = body.get("next_offset") if isinstance(body, dict) else None
    return (
        [JobInfo.from_json(item) for item in items],
        None if next_offset is None else int(next_offset),
    )


def is_model(body: Any) -> bool:
    return isinstance(body, dict) and "name" in body and "inputs" in body


def is_job(body: Any) -> bool:
    return isinstance(body, dict) and "id" in body and "status" in body


def _task_result(item: Mapping[str, Any], kind: OutputKind) -> JobTaskResult:
    err = item.get("error")
    if err is None:
        return JobTaskResult(
            index=int(item["index"]),
            output=decode_tensors(item["output"], as_torch=kind.as_torch, device=kind.device),
            jvp=decode_tensors(item["jvp"], as_torch=kind.as_torch, device=kind.device),
        )
    if isinstance(err, Mapping):
        error = JobTaskError(
            type=err.get("type"), message=str(err.get("message", "")), param=err.get("param")
        )
    else:
        error = JobTaskError(type=None, message=str(err))
    return JobTaskResult(index=int(item["index"]), error=error)


def read_results_page(kind: OutputKind) -> Callable[[Any], JobResultsPage]:
    def read(body: Any) -> JobResultsPage:
        next_offset = body.get("next_offset")
        return JobResultsPage(
            results=[_task_result(item, kind) for item in body["results"]],
            next_offset=None if next_offset is None else int(next_offset),
        )

    return read
