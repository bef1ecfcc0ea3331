"""The FastAPI application: settings, routes, error mapping, and the engine's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api import errors
from app.api.fastpath import JVPApp, JVPEndpoint
from app.api.middleware import BodyLimitMiddleware, KeyFirstMiddleware, RequestContextMiddleware
from app.api.routes import (
    derivatives,
    docs,
    health,
    jobs,
    jvp,
    metrics,
    models,
    shapes,
    solve,
    vjp,
)
from app.metrics import Metrics
from app.runtime import build
from app.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the engine starts in the lifespan (so `create_app()` is cheap)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Routes take what they use of it through app/api/deps.py.
        app.state.runtime = build(settings, metrics=app_metrics)
        await app.state.runtime.start()
        try:
            yield
        finally:
            await app.state.runtime.stop()

    app = JVPApp(
        title="JVP service",
        version="0.1.0",
        description="Jacobian-vector products by PyTorch forward-mode AD, over HTTP.",
        lifespan=lifespan,
        # None: FastAPI's defaults (on whenever an OpenTelemetry provider is configured).
        telemetry=None
        if settings.opentelemetry
        else {"tracing": False, "metrics": False, "logs": False},
        # Served by app/api/routes/docs.py, which asks for a key when keys are on.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app_metrics = Metrics()
    app.state.metrics = app_metrics
    errors.install(app)
    _add_middleware(app, settings, app_metrics)
    app.include_router(jvp.router)
    app.include_router(derivatives.router)
    app.include_router(vjp.router)
    app.include_router(solve.router)
    app.include_router(shapes.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(metrics.router)
    docs.install(app)  # /openapi.json (with the Bearer scheme), /docs, /redoc, their assets
    return app


def _add_middleware(app: JVPApp, settings: Settings, metrics: Metrics) -> None:
    """The request id and metrics, the key, the body limits: around every route, and
    around POST /jvp past the framework."""
    # Added last = outermost: the request id and metrics see the 401s, 413s and 408s too;
    # the key is checked before the body limits (NOTE [the key before the body]).
    limits = settings.max_body_bytes, settings.body_timeout_s
    app.add_middleware(BodyLimitMiddleware, *limits)
    app.add_middleware(KeyFirstMiddleware)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    if not settings.opentelemetry:
        # The same three around POST /jvp, past the framework (NOTE [POST /jvp past the
        # framework] in app/api/fastpath.py).
        app.jvp_stack = RequestContextMiddleware(
            KeyFirstMiddleware(BodyLimitMiddleware(JVPEndpoint(), *limits)),
            metrics=metrics,
        )
