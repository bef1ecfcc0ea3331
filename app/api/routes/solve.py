"""POST /solve: Newton-Krylov, linear and least-squares solves on the server."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.api.auth import KeyDep
from app.api.body import JSONBodyRoute
from app.api.middleware import SCOPE_ARRIVED
from app.api.responses import ORJSONResponse
from app.schemas import ErrorBody
from app.schemas_solve import SolveRequest, SolveResponse
from app.services.solve import SolveService

router = APIRouter(tags=["derivatives"], route_class=JSONBodyRoute)

ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 408, 413, 422, 501, 503, 504, 507)}


def _service(request: Request) -> SolveService:
    service: SolveService = request.app.state.runtime.solve
    return service


@router.post("/solve", response_model=SolveResponse, responses=ERRORS)  # type: ignore[arg-type]
async def create_solve(body: SolveRequest, request: Request, _: KeyDep) -> ORJSONResponse:
    """Solve f(primals) = 0 for the unknowns (newton_krylov), J δ = rhs (linear) or
    min ||f||² (least_squares) with exact JVPs (and VJPs) on the device: one request per
    solve. Not converging is a 200 with converged false and the history."""
    arrived: float | None = request.scope.get(SCOPE_ARRIVED)
    return ORJSONResponse(await _service(request).solve(body, arrived))
