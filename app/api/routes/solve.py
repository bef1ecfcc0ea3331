"""POST /solve: Newton-Krylov, linear and least-squares solves on the server."""

from __future__ import annotations

from app.api.auth import KeyDep
from app.api.deps import ArrivedDep, SolveServiceDep
from app.api.responses import ORJSONResponse
from app.api.routes.computing import ERRORS, derivatives_router
from app.schemas_solve import SolveRequest, SolveResponse

router = derivatives_router()


@router.post("/solve", response_model=SolveResponse, responses=ERRORS)
async def create_solve(
    body: SolveRequest, _: KeyDep, service: SolveServiceDep, arrived: ArrivedDep
) -> ORJSONResponse:
    """Solve f(primals) = 0 for the unknowns (newton_krylov), J δ = rhs (linear) or
    min ||f||² (least_squares) with exact JVPs (and VJPs) on the device: one request per
    solve. Not converging is a 200 with converged false and the history."""
    return ORJSONResponse(await service.solve(body, arrived))
