"""Reading a request body: a large one straight into one numpy buffer.

NOTE [safetensors in place]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
A 4M-element JVP moves 48 MB in and 32 MB out, and on this project's 2-core
machine every fresh large allocation costs as much as the copy into it (CPython
faults in 4 KiB pages; numpy asks the kernel for huge pages). Measured there for
48 MB: ``b"".join`` of the received chunks 27 ms, the same chunks copied into one
``np.empty`` buffer 8 ms; ``safetensors.deserialize`` (a new bytearray per
tensor) 18 ms; ``safetensors.torch.save`` of the 32 MB answer 32 ms. So:

- a large body is read straight into one numpy buffer sized by Content-Length
  (`read_body`);
- a safetensors body's tensors are views of that buffer (`app.wire.safetensors.decode_request`
  checks the header's offsets as the safetensors library does: in bounds, sized by
  dtype and shape, tiling the data without gaps or overlaps);
- a safetensors answer is streamed from the result tensors' own memory
  (`app.api.responses.SafetensorsResponse`), 1 MiB per ASGI message.

The safetensors library stays the reference: tests read every answer with
``safetensors.torch.load`` and build requests with ``safetensors.torch.save``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import orjson
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from app.engine.errors import InvalidRequest, UnsupportedMediaType

SMALL_BODY_BYTES = 65_536


def media_type(header: str | None) -> str | None:
    """``application/json`` of ``application/json; charset=utf-8``; None for no header."""
    if not header:
        return None
    return header.split(";", 1)[0].strip().lower()


def is_json(media: str | None) -> bool:
    # No Content-Type is read as JSON, as FastAPI does.
    return media is None or media == "application/json" or media.endswith("+json")


def parse_json(body: bytes | memoryview) -> Any:
    """The body parsed by orjson; invalid JSON (also JSON nested deeper than orjson's
    1024 levels) is FastAPI's ``json_invalid`` validation error, a 422 (app/api/errors.py)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", e.pos),
                    "msg": "JSON decode error",
                    "input": {},
                    # Where, as a person reads the body: orjson counts lines and columns from 1.
                    "ctx": {"error": f"{e.msg} at line {e.lineno}, column {e.colno}"},
                }
            ]
        ) from None


class JSONBodyRoute(APIRoute):
    """A route whose JSON body is parsed here, by orjson, before FastAPI validates it.

    FastAPI parses with the standard library's ``json``, which answers a deeply nested
    body with a RecursionError that FastAPI turns into a 400 (and /jvp, which parses
    with orjson, answered the same body 422). Parsed here, every route gives the one
    answer, 422 ``invalid_request``, and large bodies parse several times faster, off
    the event loop as /jvp does. FastAPI then finds the parsed body in Starlette's
    cache (``request._json``). Subclasses may read the body their own way
    (`read_body`, e.g. with a limit of their own).
    """

    async def read_body(self, request: Request) -> bytes:
        return await request.body()

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def parsed(request: Request) -> Response:
            media = media_type(request.headers.get("content-type"))
            if not is_json(media):
                # As POST /jvp answers: `curl -d` sends application/x-www-form-urlencoded,
                # which FastAPI would validate as a form ("Input should be a valid
                # dictionary"). Refused before the body is read.
                raise UnsupportedMediaType(
                    f"Unsupported Content-Type {media!r} for {request.method} "
                    f"{request.url.path}; expected application/json",
                    param="Content-Type",
                )
            raw = await self.read_body(request)
            if raw:
                request._json = (
                    parse_json(raw)
                    if len(raw) < SMALL_BODY_BYTES
                    else await asyncio.to_thread(parse_json, raw)
                )
            return await handler(request)

        return parsed


async def read_body(request: Request) -> bytes | memoryview:
    """The body: bytes when small or of unknown length, else a writable view of one
    numpy buffer."""
    declared = request.headers.get("content-length", "")
    if not declared.isdigit() or int(declared) < SMALL_BODY_BYTES:
        return await request.body()
    # BodyLimitMiddleware has already refused a Content-Length over the limit.
    buffer = np.empty(int(declared), dtype=np.uint8)
    filled = 0
    async for chunk in request.stream():
        end = filled + len(chunk)
        if end > len(buffer):  # uvicorn frames the body by Content-Length; never expected
            raise InvalidRequest(
                f"The body is longer than its Content-Length of {len(buffer)} bytes",
                param="Content-Length",
            )
        buffer[filled:end] = np.frombuffer(chunk, dtype=np.uint8)
        filled = end
    return buffer[:filled].data
