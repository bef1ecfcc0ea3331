"""What a route takes from the process: Annotated FastAPI dependencies for the runtime's
services (app/runtime.py builds them once; the app's lifespan puts the `Runtime` on
``app.state``), so a route names what it needs in its signature and no route reads
``request.app.state`` itself.

Each dependency takes only the `Request`, so none adds a parameter to the OpenAPI
document; each is ``async`` (FastAPI runs a plain ``def`` dependency in a thread pool, a
hop on every request). ``POST /jvp`` past the framework (app/api/fastpath.py) calls
`jvp_service` directly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

from fastapi import Depends, Request

from app.api.middleware import SCOPE_ARRIVED
from app.engine.engine import Engine
from app.jobs import JobService
from app.metrics import Metrics
from app.models.registry import ModelRegistry
from app.runtime import Runtime
from app.services.derivatives import DerivativeService
from app.services.jvp import JVPService
from app.services.shapes import ShapeService
from app.services.solve import SolveService
from app.services.vjp import VJPService
from app.settings import Settings

T = TypeVar("T")


def _of_runtime(part: Callable[[Runtime], T]) -> Callable[[Request], Awaitable[T]]:
    """A dependency that returns ``part`` of the app's `Runtime`."""

    async def dependency(request: Request) -> T:
        return part(request.app.state.runtime)

    return dependency


async def settings(request: Request) -> Settings:
    """The app's settings (there before the runtime is built)."""
    found: Settings = request.app.state.settings
    return found


async def metrics(request: Request) -> Metrics:
    """The app's metrics (there before the runtime is built)."""
    found: Metrics = request.app.state.metrics
    return found


engine = _of_runtime(lambda r: r.engine)
registry = _of_runtime(lambda r: r.registry)
jvp_service = _of_runtime(lambda r: r.services.jvp)
derivative_service = _of_runtime(lambda r: r.services.derivatives)
vjp_service = _of_runtime(lambda r: r.services.vjp)
shape_service = _of_runtime(lambda r: r.services.shapes)
solve_service = _of_runtime(lambda r: r.services.solve)


async def job_service(request: Request) -> JobService:
    """The batch-job service (the runtime opens the job store as it starts)."""
    runtime: Runtime = request.app.state.runtime
    jobs = runtime.jobs
    assert jobs is not None, "the job service is opened in the app's lifespan"
    return jobs


async def optional_job_service(request: Request) -> JobService | None:
    """The job service, or None before the runtime started it (GET /metrics)."""
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    return None if runtime is None else runtime.jobs


async def arrived(request: Request) -> float | None:
    """``time.monotonic()`` when the request arrived (app/api/middleware.py): its deadline
    starts there."""
    found: float | None = request.scope.get(SCOPE_ARRIVED)
    return found


SettingsDep = Annotated[Settings, Depends(settings)]
MetricsDep = Annotated[Metrics, Depends(metrics)]
EngineDep = Annotated[Engine, Depends(engine)]
RegistryDep = Annotated[ModelRegistry, Depends(registry)]
JVPServiceDep = Annotated[JVPService, Depends(jvp_service)]
DerivativeServiceDep = Annotated[DerivativeService, Depends(derivative_service)]
VJPServiceDep = Annotated[VJPService, Depends(vjp_service)]
ShapeServiceDep = Annotated[ShapeService, Depends(shape_service)]
SolveServiceDep = Annotated[SolveService, Depends(solve_service)]
JobServiceDep = Annotated[JobService, Depends(job_service)]
OptionalJobServiceDep = Annotated[JobService | None, Depends(optional_job_service)]
ArrivedDep = Annotated[float | None, Depends(arrived)]
