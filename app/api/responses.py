"""JSON responses through orjson, which writes numpy arrays without Python lists, and
safetensors responses streamed from the tensors' memory."""

from __future__ import annotations

from typing import Any

import orjson
import torch
from fastapi.responses import JSONResponse
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.wire.safetensors import SAFETENSORS, SafetensorsBody

SEND_CHUNK_BYTES = 1 << 20


class ORJSONResponse(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class SafetensorsResponse(Response):
    """A response streaming a safetensors file from the tensors' own memory.

    The header is built in `app.wire.safetensors.encode_response`; the tensor bytes are
    sent as views of the tensors, 1 MiB at a time, so uvicorn's flow control paces them
    and nothing is copied into one body first (NOTE [safetensors in place]).
    """

    media_type = SAFETENSORS

    def __init__(self, file: SafetensorsBody) -> None:
        self.status_code = 200
        self.background = None
        self.body = file.header
        self.tensors = file.tensors
        length = len(file.header) + sum(t.nbytes for t in file.tensors)
        self.raw_headers = [
            (b"content-length", str(length).encode()),
            (b"content-type", SAFETENSORS.encode()),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": True})
        for tensor in self.tensors:
            data = tensor.reshape(-1).view(torch.uint8).numpy().data
            for start in range(0, len(data), SEND_CHUNK_BYTES):
                chunk = data[start : start + SEND_CHUNK_BYTES]
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
