"""A plain FastAPI app that parses a JSON body and returns it: the floor for small requests.

Served by uvicorn with the settings `jvp-service serve` uses (bench/servers.py).
"""

from typing import Any

from fastapi import FastAPI

app = FastAPI()


@app.get("/healthz")
async def read_health() -> dict[str, str]:
    """Liveness."""
    return {"status": "ok"}


@app.post("/echo")
async def create_echo(body: dict[str, Any]) -> dict[str, Any]:
    """Return the JSON body as it came."""
    return body
