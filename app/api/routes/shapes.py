"""POST /eval_shape: an operation's output shapes and cost, before (and without) computing."""

from __future__ import annotations

import asyncio

from fastapi.exceptions import RequestValidationError

from app.api.auth import KeyDep
from app.api.deps import ShapeServiceDep
from app.api.errors import error_responses
from app.api.responses import ORJSONResponse
from app.api.routes.computing import derivatives_router
from app.schemas import EvalShapeRequest, EvalShapeResponse
from app.services.shapes import InvalidBody

router = derivatives_router()

ERRORS = error_responses(400, 401, 404, 408, 413, 422)


@router.post("/eval_shape", response_model=EvalShapeResponse, responses=ERRORS)
async def create_eval_shape(
    body: EvalShapeRequest, _: KeyDep, service: ShapeServiceDep
) -> ORJSONResponse:
    """The shapes and dtypes of what an operation (jvp, jacobian, hvp, linearize) would
    answer, and its estimated FLOPs and peak bytes; tensors may be given as
    ``{"shape", "dtype"}`` without data. Over a limit: the 413 the operation would get."""
    fields = body.model_dump(exclude_unset=True)
    try:
        return ORJSONResponse(await asyncio.to_thread(service.evaluate, fields))
    except InvalidBody as e:
        raise RequestValidationError(e.errors) from None
