"""POST /solve: Newton-Krylov, linear and least-squares solves on the server."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.auth import KeyDep
from app.api.body import JSONBodyRoute
from app.api.deps import ArrivedDep, SolveServiceDep
from app.api.errors import error_responses
from app.api.responses import ORJSONResponse
from app.schemas_solve import SolveRequest, SolveResponse

router = APIRouter(tags=["derivatives"], route_class=JSONBodyRoute)

ERRORS = error_responses(400, 401, 404, 408, 413, 422, 501, 503, 504, 507)


@router.post("/solve", response_model=SolveResponse, responses=ERRORS)
async def create_solve(
    body: SolveRequest, _: KeyDep, service: SolveServiceDep, arrived: ArrivedDep
) -> ORJSONResponse:
    """Solve f(primals) = 0 for the unknowns (newton_krylov), J δ = rhs (linear) or
    min ||f||² (least_squares) with exact JVPs (and VJPs) on the device: one request per
    solve. Not converging is a 200 with converged false and the history."""
    return ORJSONResponse(await service.solve(body, arrived))
