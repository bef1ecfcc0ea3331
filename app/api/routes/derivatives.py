"""POST /jacobian, POST /hvp, POST /linearize, POST /linearize/{id}/jvp, DELETE /linearize/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.api.auth import KeyDep
from app.api.body import JSONBodyRoute
from app.api.middleware import SCOPE_ARRIVED
from app.api.responses import ORJSONResponse
from app.schemas import (
    ErrorBody,
    HVPRequest,
    HVPResponse,
    JacobianRequest,
    JacobianResponse,
    LinearizedJVPRequest,
    LinearizedJVPResponse,
    LinearizeRequest,
    LinearizeResponse,
)
from app.services.derivatives import DerivativeService

router = APIRouter(tags=["derivatives"], route_class=JSONBodyRoute)

ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 408, 413, 422, 501, 503, 504, 507)}


def _service(request: Request) -> DerivativeService:
    service: DerivativeService = request.app.state.derivatives
    return service


def _arrived(request: Request) -> float | None:
    arrived: float | None = request.scope.get(SCOPE_ARRIVED)
    return arrived


@router.post("/jacobian", response_model=JacobianResponse, responses=ERRORS)  # type: ignore[arg-type]
async def create_jacobian(body: JacobianRequest, request: Request, _: KeyDep) -> ORJSONResponse:
    """The full Jacobian with respect to `wrt` (default: all inputs), by forward mode."""
    return ORJSONResponse(await _service(request).jacobian(body, _arrived(request)))


@router.post("/hvp", response_model=HVPResponse, responses=ERRORS)  # type: ignore[arg-type]
async def create_hvp(body: HVPRequest, request: Request, _: KeyDep) -> ORJSONResponse:
    """Hessian-vector products of a scalar function by forward-over-reverse."""
    return ORJSONResponse(await _service(request).hvp(body, _arrived(request)))


@router.post("/linearize", response_model=LinearizeResponse, responses=ERRORS)  # type: ignore[arg-type]
async def create_linearization(
    body: LinearizeRequest, request: Request, _: KeyDep
) -> ORJSONResponse:
    """Linearize at the primals once; apply it to many tangents until it expires."""
    return ORJSONResponse(await _service(request).linearize(body, _arrived(request)))


@router.post(
    "/linearize/{session_id}/jvp",
    response_model=LinearizedJVPResponse,
    responses=ERRORS,  # type: ignore[arg-type]
)
async def create_linearized_jvp(
    session_id: str, body: LinearizedJVPRequest, request: Request, _: KeyDep
) -> ORJSONResponse:
    """J·t (or J·T with options.tangent_batch) from a linearize session."""
    return ORJSONResponse(await _service(request).linearized_jvp(session_id, body))


@router.delete(
    "/linearize/{session_id}",
    status_code=204,
    responses={401: {"model": ErrorBody}, 404: {"model": ErrorBody}},
)
async def delete_linearization(session_id: str, request: Request, _: KeyDep) -> Response:
    """Drop a linearize session now (its memory leaves the budget)."""
    _service(request).delete_session(session_id)
    return Response(status_code=204)
