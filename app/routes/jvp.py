"""POST /jvp."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.auth import KeyDep
from app.responses import ORJSONResponse
from app.schemas import ErrorBody, JVPRequest, JVPResponse
from app.service import JVPService

router = APIRouter(tags=["jvp"])

ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 422, 501, 503, 504, 507)}


@router.post("/jvp", response_model=JVPResponse, responses=ERRORS)  # type: ignore[arg-type]
async def create_jvp(body: JVPRequest, request: Request, _: KeyDep) -> ORJSONResponse:
    """Compute f(primals) and the Jacobian-vector product J·tangents by forward-mode AD."""
    service: JVPService = request.app.state.service
    return ORJSONResponse(await service.jvp(body))
