"""Models: list and read (inference keys), load and unload from the repository (admin keys).

Repository management follows Triton's explicit mode: nothing changes until an
admin asks. ``POST /models/{name}/load`` (re)reads ``<JVP_MODEL_DIR>/<name>``;
``DELETE /models/{name}`` stops serving it. A failed (re)load changes nothing,
so the version already loaded keeps serving. Built-in models can be neither
overwritten nor unloaded (422).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from app.api.auth import AdminDep, KeyDep
from app.api.deps import RegistryDep, SettingsDep
from app.api.errors import error_responses
from app.models.repository import load_into, unload_from
from app.schemas import ModelInfo, ModelList

router = APIRouter(prefix="/models", tags=["models"])

# One repository change at a time (two loads of one name must not race).
_changes = threading.Lock()


class ModelUnloaded(BaseModel):
    name: str
    state: Literal["unloaded"]


@router.get("", response_model=ModelList, responses=error_responses(401))
async def read_models(_: KeyDep, registry: RegistryDep) -> dict[str, object]:
    """List the served models: state, inputs (-1 marks a size that may vary), outputs,
    parameters, buffers, parameter count and source."""
    return {"models": [m.info() for m in registry.all()]}


@router.get(
    "/{name}",
    response_model=ModelInfo,
    responses=error_responses(401, 404),
)
async def read_model(name: str, _: KeyDep, registry: RegistryDep) -> dict[str, object]:
    """One model: inputs (-1 marks a size that may vary), outputs, parameters, buffers."""
    return registry.get(name).info()


@router.post(
    "/{name}/load",
    response_model=ModelInfo,
    responses=error_responses(401, 403, 404, 422),
)
async def load_model(
    name: str, _: AdminDep, registry: RegistryDep, settings: SettingsDep
) -> dict[str, object]:
    """(Re)load ``<JVP_MODEL_DIR>/<name>`` (admin key). 404: no such folder; 422: the program
    or config.json is invalid (the old version, if any, keeps serving) or a built-in's name."""

    def load() -> dict[str, object]:
        with _changes:
            return load_into(registry, settings.model_dir, name).info()

    return await asyncio.to_thread(load)


@router.delete(
    "/{name}",
    response_model=ModelUnloaded,
    responses=error_responses(401, 403, 404, 422),
)
async def unload_model(name: str, _: AdminDep, registry: RegistryDep) -> dict[str, object]:
    """Stop serving a repository model (admin key); its files stay. Built-ins: 422."""

    def unload() -> dict[str, object]:
        with _changes:
            unload_from(registry, name)
        return {"name": name, "state": "unloaded"}

    return await asyncio.to_thread(unload)
