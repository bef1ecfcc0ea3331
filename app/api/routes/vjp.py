"""POST /vjp, POST /linearize/{id}/vjp: reverse mode (vector-Jacobian products)."""

from __future__ import annotations

from app.api.auth import KeyDep
from app.api.deps import ArrivedDep, VJPServiceDep
from app.api.responses import ORJSONResponse
from app.api.routes.computing import ERRORS, derivatives_router
from app.schemas_vjp import (
    LinearizedVJPRequest,
    LinearizedVJPResponse,
    VJPRequest,
    VJPResponse,
)

router = derivatives_router()


@router.post("/vjp", response_model=VJPResponse, responses=ERRORS)
async def create_vjp(
    body: VJPRequest, _: KeyDep, service: VJPServiceDep, arrived: ArrivedDep
) -> ORJSONResponse:
    """Jᵀ·u by reverse-mode AD (torch.func.vjp) with respect to `wrt` (default: all inputs);
    501 naming an operator without a backward formula."""
    return ORJSONResponse(await service.vjp(body, arrived))


@router.post(
    "/linearize/{session_id}/vjp",
    response_model=LinearizedVJPResponse,
    responses=ERRORS,
)
async def create_linearized_vjp(
    session_id: str, body: LinearizedVJPRequest, _: KeyDep, service: VJPServiceDep
) -> ORJSONResponse:
    """Jᵀ·u (or Jᵀ·U with options.cotangent_batch) from a session made with
    options.transpose."""
    return ORJSONResponse(await service.linearized_vjp(session_id, body))
