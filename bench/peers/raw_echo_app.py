"""A FastAPI app that reads raw bytes and returns some of them: the floor for big requests.

The 4M-element JVP sends three float32 tensors (48 MB) and gets two back
(32 MB), so by default this returns the first two thirds of the body;
``?out_bytes=N`` chooses another size.
"""

from fastapi import FastAPI, Request, Response

app = FastAPI()


@app.get("/healthz")
async def read_health() -> dict[str, str]:
    """Liveness."""
    return {"status": "ok"}


@app.post("/echo")
async def create_echo(request: Request, out_bytes: int | None = None) -> Response:
    """Read the whole body and answer with `out_bytes` of it (default two thirds)."""
    body = await request.body()
    size = len(body) * 2 // 3 if out_bytes is None else max(0, min(out_bytes, len(body)))
    return Response(memoryview(body)[:size].tobytes(), media_type="application/octet-stream")
