"""GET /healthz and GET /readyz (no key needed)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import EngineDep
from app.api.errors import error_responses
from app.engine.errors import Overloaded
from app.schemas import Status

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Status)
async def read_health() -> dict[str, str]:
    """200 while the process runs."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Status, responses=error_responses(503))
async def read_ready(engine: EngineDep) -> dict[str, str]:
    """200 once the engine can take work, else 503."""
    if not engine.ready:
        raise Overloaded("The engine is starting; retry shortly", retry_after_s=1)
    return {"status": "ready"}
