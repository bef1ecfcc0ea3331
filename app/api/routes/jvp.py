"""POST /jvp: a JSON or safetensors body (app/wire/safetensors.py); JSON or safetensors back.

The route reads the body itself: JSON through orjson (several times faster than
the standard library's parser FastAPI would use on large tensors), safetensors
through app/wire/safetensors.py. The OpenAPI schema still shows `JVPRequest` as the JSON
body (``openapi_extra``), beside the binary one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.responses import Response

from app.api.auth import KeyDep
from app.api.body import SMALL_BODY_BYTES, is_json, media_type, parse_json, read_body
from app.api.deps import JVPServiceDep
from app.api.errors import error_responses
from app.api.middleware import SCOPE_ARRIVED
from app.api.responses import ORJSONResponse, SafetensorsResponse
from app.engine.errors import UnsupportedMediaType
from app.schemas import JVPRequest, JVPResponse
from app.services.jvp import JVPService
from app.wire.safetensors import SAFETENSORS, decode_request

router = APIRouter(tags=["jvp"])

ERRORS = error_responses(400, 401, 404, 408, 413, 415, 422, 501, 503, 504, 507)
_BINARY = {
    "schema": {"type": "string", "format": "binary"},
}


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` written in place (OpenAPI has no $defs)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(dict(defs[ref.removeprefix("#/$defs/")]))
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": _inline(JVPRequest.model_json_schema())},
        SAFETENSORS: {
            **_BINARY,
            "description": "A safetensors file: tensors primals/<input>, tangents/<input>, "
            "parameter_tangents/<parameter>; the rest of the request as JSON in the "
            'metadata under "request".',
        },
    },
}


def _wants_safetensors(accept: str | None) -> bool:
    return bool(accept) and any(
        media_type(part) == SAFETENSORS for part in (accept or "").split(",")
    )


def parse_json_body(body: bytes | memoryview) -> JVPRequest:
    """The JSON body as a `JVPRequest`, with FastAPI's validation errors (app/api/errors.py)."""
    if not body:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
        )
    data = parse_json(body)
    try:
        return JVPRequest.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
        ) from None


JVP_PATH = "/jvp"


@router.post(
    JVP_PATH,
    response_model=JVPResponse,
    responses={**ERRORS, 200: {"content": {SAFETENSORS: _BINARY}}},
    openapi_extra={"requestBody": REQUEST_BODY},
)
async def create_jvp(request: Request, _: KeyDep, service: JVPServiceDep) -> Response:
    """Compute f(primals) and the Jacobian-vector product J·tangents by forward-mode AD.

    The body is JSON (`JVPRequest`) or, with ``Content-Type: application/x-safetensors``,
    a safetensors file; ``Accept: application/x-safetensors`` answers in safetensors.
    """
    # Usually answered by app/api/fastpath.py before FastAPI is reached (NOTE [POST /jvp past
    # the framework]); this route describes /jvp in the OpenAPI document, and serves it
    # when that is off (JVP_OPENTELEMETRY, a root path).
    return await answer_jvp(request, service)


async def answer_jvp(request: Request, service: JVPService) -> Response:
    """POST /jvp: the body in either media type, the JVP, the answer (the key was checked
    before, by app.api.middleware.KeyFirstMiddleware)."""
    media = media_type(request.headers.get("content-type"))
    raw = await read_body(request)
    # A large body is read off the event loop, so it never stalls other requests; a
    # small one is cheaper to read here (NOTE [small requests inline] in app/services/jvp.py).
    small = len(raw) < SMALL_BODY_BYTES
    if is_json(media):
        body = parse_json_body(raw) if small else await asyncio.to_thread(parse_json_body, raw)
    elif media == SAFETENSORS:
        body = (
            decode_request(raw, service.limits)
            if small
            else await asyncio.to_thread(decode_request, raw, service.limits)
        )
    else:
        raise UnsupportedMediaType(
            f"Unsupported Content-Type {media!r} for POST /jvp; expected application/json "
            f"or {SAFETENSORS}",
            param="Content-Type",
        )
    arrived = request.scope.get(SCOPE_ARRIVED)
    if _wants_safetensors(request.headers.get("accept")):
        return SafetensorsResponse(
            await service.jvp_safetensors(body, small=small, arrived=arrived)
        )
    return ORJSONResponse(await service.jvp(body, small=small, arrived=arrived))
