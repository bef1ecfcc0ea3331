"""GET /models and GET /models/{name}."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.auth import KeyDep
from app.models.registry import ModelRegistry
from app.schemas import ErrorBody, ModelInfo, ModelList

router = APIRouter(prefix="/models", tags=["models"])


def _registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


@router.get("", response_model=ModelList, responses={401: {"model": ErrorBody}})
async def read_models(request: Request, _: KeyDep) -> dict[str, object]:
    """List the served models with their inputs, outputs, parameters and buffers."""
    return {"models": [m.info() for m in _registry(request).all()]}


@router.get(
    "/{name}",
    response_model=ModelInfo,
    responses={401: {"model": ErrorBody}, 404: {"model": ErrorBody}},
)
async def read_model(name: str, request: Request, _: KeyDep) -> dict[str, object]:
    """One model: inputs (-1 marks a size that may vary), outputs, parameters, buffers."""
    return _registry(request).get(name).info()
