"""What the computing routes of the "derivatives" tag share (POST /jacobian, /hvp,
/linearize, /linearize/{id}/jvp, /vjp, /linearize/{id}/vjp, /solve): their router, the
errors they may answer, and how one is declared."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.body import JSONBodyRoute
from app.api.errors import error_responses

#: Every status a computing route may answer besides its 200 (each with the one error body).
ERRORS = error_responses(400, 401, 404, 408, 413, 422, 501, 503, 504, 507)


def derivatives_router() -> APIRouter:
    """A router of the "derivatives" tag whose JSON bodies are read by `JSONBodyRoute`."""
    return APIRouter(tags=["derivatives"], route_class=JSONBodyRoute)
