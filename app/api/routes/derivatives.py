"""POST /jacobian, POST /hvp, POST /linearize, POST /linearize/{id}/jvp, DELETE /linearize/{id}."""

from __future__ import annotations

from fastapi import Response

from app.api.auth import KeyDep
from app.api.deps import ArrivedDep, DerivativeServiceDep
from app.api.errors import error_responses
from app.api.responses import ORJSONResponse
from app.api.routes.computing import ERRORS, derivatives_router
from app.schemas import (
    HVPRequest,
    HVPResponse,
    JacobianRequest,
    JacobianResponse,
    LinearizedJVPRequest,
    LinearizedJVPResponse,
    LinearizeRequest,
    LinearizeResponse,
)

router = derivatives_router()


@router.post("/jacobian", response_model=JacobianResponse, responses=ERRORS)
async def create_jacobian(
    body: JacobianRequest, _: KeyDep, service: DerivativeServiceDep, arrived: ArrivedDep
) -> ORJSONResponse:
    """The full Jacobian with respect to `wrt` (default: all inputs), by forward mode."""
    return ORJSONResponse(await service.jacobian(body, arrived))


@router.post("/hvp", response_model=HVPResponse, responses=ERRORS)
async def create_hvp(
    body: HVPRequest, _: KeyDep, service: DerivativeServiceDep, arrived: ArrivedDep
) -> ORJSONResponse:
    """Hessian-vector products of a scalar function by forward-over-reverse."""
    return ORJSONResponse(await service.hvp(body, arrived))


@router.post("/linearize", response_model=LinearizeResponse, responses=ERRORS)
async def create_linearization(
    body: LinearizeRequest, _: KeyDep, service: DerivativeServiceDep, arrived: ArrivedDep
) -> ORJSONResponse:
    """Linearize at the primals once; apply it to many tangents until it expires."""
    return ORJSONResponse(await service.linearize(body, arrived))


@router.post(
    "/linearize/{session_id}/jvp",
    response_model=LinearizedJVPResponse,
    responses=ERRORS,
)
async def create_linearized_jvp(
    session_id: str, body: LinearizedJVPRequest, _: KeyDep, service: DerivativeServiceDep
) -> ORJSONResponse:
    """J·t (or J·T with options.tangent_batch) from a linearize session."""
    return ORJSONResponse(await service.linearized_jvp(session_id, body))


@router.delete(
    "/linearize/{session_id}",
    status_code=204,
    responses=error_responses(401, 404),
)
async def delete_linearization(
    session_id: str, _: KeyDep, service: DerivativeServiceDep
) -> Response:
    """Drop a linearize session now (its memory leaves the budget)."""
    service.delete_session(session_id)
    return Response(status_code=204)
