"""POST /vjp, POST /linearize/{id}/vjp: reverse mode (vector-Jacobian products)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.api.auth import KeyDep
from app.api.body import JSONBodyRoute
from app.api.middleware import SCOPE_ARRIVED
from app.api.responses import ORJSONResponse
from app.schemas import ErrorBody
from app.schemas_vjp import (
    LinearizedVJPRequest,
    LinearizedVJPResponse,
    VJPRequest,
    VJPResponse,
)
from app.services.vjp import VJPService

router = APIRouter(tags=["derivatives"], route_class=JSONBodyRoute)

ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 408, 413, 422, 501, 503, 504, 507)}


def _service(request: Request) -> VJPService:
    service: VJPService = request.app.state.vjp
    return service


@router.post("/vjp", response_model=VJPResponse, responses=ERRORS)  # type: ignore[arg-type]
async def create_vjp(body: VJPRequest, request: Request, _: KeyDep) -> ORJSONResponse:
    """Jᵀ·u by reverse-mode AD (torch.func.vjp) with respect to `wrt` (default: all inputs);
    501 naming an operator without a backward formula."""
    arrived: float | None = request.scope.get(SCOPE_ARRIVED)
    return ORJSONResponse(await _service(request).vjp(body, arrived))


@router.post(
    "/linearize/{session_id}/vjp",
    response_model=LinearizedVJPResponse,
    responses=ERRORS,  # type: ignore[arg-type]
)
async def create_linearized_vjp(
    session_id: str, body: LinearizedVJPRequest, request: Request, _: KeyDep
) -> ORJSONResponse:
    """Jᵀ·u (or Jᵀ·U with options.cotangent_batch) from a session made with
    options.transpose."""
    return ORJSONResponse(await _service(request).linearized_vjp(session_id, body))
