"""The FastAPI application: settings, routes, error mapping, and the engine's lifespan."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import torch
from fastapi import FastAPI

from app import errors
from app.derivatives import start_derivatives
from app.engine import cpu_budget
from app.engine.devices import available_devices, parse_device
from app.engine.worker import Engine
from app.fastpath import JVPApp, JVPEndpoint
from app.jobs import start_jobs
from app.metrics import Metrics
from app.middleware import BodyLimitMiddleware, KeyFirstMiddleware, RequestContextMiddleware
from app.models.builtin import BUILTINS
from app.models.registry import ModelRegistry
from app.models.repository import load_repository
from app.routes import derivatives, docs, health, jobs, jvp, metrics, models, shapes
from app.service import JVPService
from app.settings import Settings
from app.shapes import ShapeService
from app.startup import startup_summary

log = logging.getLogger("app")


def select_devices(setting: str) -> list[torch.device]:
    present = available_devices()
    if setting == "auto":
        return present
    return [parse_device(name.strip(), present) for name in setting.split(",") if name.strip()]


def build_registry(settings: Settings) -> ModelRegistry:
    registry = ModelRegistry()
    for make in BUILTINS:
        registry.add(make())
    if settings.model_dir is not None:
        loaded, failures = load_repository(settings.model_dir)
        for model in loaded:
            registry.add(model)
        for name, reason in failures.items():
            log.error("model repository: %s not served: %s", name, reason)
    return registry


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the engine starts in the lifespan (so `create_app()` is cheap)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        cpu = cpu_budget.plan(settings.num_threads)  # NOTE [CPU threads]
        # The wait policy only counts if it was in the environment when torch started.
        cpu = replace(cpu, wait_policy=os.environ.get("OMP_WAIT_POLICY") or None)
        if torch.get_num_threads() != cpu.threads:
            torch.set_num_threads(cpu.threads)
        app_metrics.set_cpu(cpu.usable, torch.get_num_threads())
        engine = Engine(select_devices(settings.device), max_queue=settings.max_queue)
        cpu_worker = engine.workers.get(torch.device("cpu"))
        if cpu_worker is not None and cpu.source == "auto" and cpu.threads > 1:
            # Small work on one thread, large on the pool (NOTE [CPU threads]).
            cpu_worker.step_threads = cpu_budget.StepThreads(cpu.threads, torch.set_num_threads)
        registry = build_registry(settings)
        app.state.engine = engine
        app.state.registry = registry
        app.state.service = JVPService(settings, engine, registry, metrics=app_metrics)
        app.state.derivatives, sweeper = start_derivatives(settings, app.state.service)
        app.state.shapes = ShapeService(app.state.derivatives)
        app_metrics.bind_engine(engine)
        engine.start()  # warms every device up, then marks the engine ready
        # Everything made so far (torch, the models, the app) lives as long as the process.
        # Frozen, the garbage collector stops rescanning it: a full collection took
        # ~120 ms on this project's 2-core machine (250k objects), a stall that showed as
        # the p99 latency of small requests under load.
        gc.collect()
        gc.freeze()
        try:
            app.state.jobs = await start_jobs(settings, app.state.service)  # after the engine
            names, devices = [m.name for m in registry.all()], [str(d) for d in engine.workers]
            log.info("%s", startup_summary(settings, names, devices, cpu.describe()))
            try:
                yield
            finally:
                await app.state.jobs.stop()  # unfinished tasks stay queued in the store
        finally:
            sweeper.stop()  # and drops every linearize session
            engine.stop()

    app = JVPApp(
        title="JVP service",
        version="0.1.0",
        description="Jacobian-vector products by PyTorch forward-mode AD, over HTTP.",
        lifespan=lifespan,
        # None: FastAPI's defaults (on whenever an OpenTelemetry provider is configured).
        telemetry=None
        if settings.opentelemetry
        else {"tracing": False, "metrics": False, "logs": False},
        # Served by app/routes/docs.py, which asks for a key when keys are on.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app_metrics = Metrics()
    app.state.metrics = app_metrics
    errors.install(app)
    # Added last = outermost: the request id and metrics see the 401s, 413s and 408s too;
    # the key is checked before the body limits (NOTE [the key before the body]).
    limits = settings.max_body_bytes, settings.body_timeout_s
    app.add_middleware(BodyLimitMiddleware, *limits)
    app.add_middleware(KeyFirstMiddleware)
    app.add_middleware(RequestContextMiddleware, metrics=app_metrics)
    if not settings.opentelemetry:
        # The same three around POST /jvp, past the framework (NOTE [POST /jvp past the
        # framework] in app/fastpath.py).
        app.jvp_stack = RequestContextMiddleware(
            KeyFirstMiddleware(BodyLimitMiddleware(JVPEndpoint(), *limits)),
            metrics=app_metrics,
        )
    app.include_router(jvp.router)
    app.include_router(derivatives.router)
    app.include_router(shapes.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(metrics.router)
    docs.install(app)  # /openapi.json (with the Bearer scheme), /docs, /redoc, their assets
    return app
