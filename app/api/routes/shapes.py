"""POST /eval_shape: an operation's output shapes and cost, before (and without) computing."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError

from app.api.auth import KeyDep
from app.api.body import JSONBodyRoute
from app.api.responses import ORJSONResponse
from app.schemas import ErrorBody, EvalShapeRequest, EvalShapeResponse
from app.services.shapes import InvalidBody, ShapeService

router = APIRouter(tags=["derivatives"], route_class=JSONBodyRoute)

ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 408, 413, 422)}


@router.post("/eval_shape", response_model=EvalShapeResponse, responses=ERRORS)  # type: ignore[arg-type]
async def create_eval_shape(body: EvalShapeRequest, request: Request, _: KeyDep) -> ORJSONResponse:
    """The shapes and dtypes of what an operation (jvp, jacobian, hvp, linearize) would
    answer, and its estimated FLOPs and peak bytes; tensors may be given as
    ``{"shape", "dtype"}`` without data. Over a limit: the 413 the operation would get."""
    service: ShapeService = request.app.state.shapes
    fields = body.model_dump(exclude_unset=True)
    try:
        return ORJSONResponse(await asyncio.to_thread(service.evaluate, fields))
    except InvalidBody as e:
        raise RequestValidationError(e.errors) from None
