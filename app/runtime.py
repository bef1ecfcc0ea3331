"""The composition root: what one process serves with, built from its settings in one place.

`build(settings)` makes the engine (one worker per device, not yet started), the model
registry, and the services over them (/jvp, the derivatives, /eval_shape); `Runtime.start`
starts them (the engine warms every device up, then takes work) and, in the web app, the
linearize session sweeper and the batch-job backend; `Runtime.stop` stops them in reverse.
The web app (app/api/app.py), the Celery worker (app/jobs/celery_app.py) and the CLI
build their objects here, so each is built the same way wherever it runs.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass, replace

import torch

from app.engine import cpu_budget
from app.engine.devices import available_devices, parse_device
from app.engine.engine import Engine
from app.jobs import JobService, start_jobs
from app.metrics import Metrics
from app.models.builtin import BUILTINS
from app.models.registry import ModelRegistry
from app.models.repository import load_repository
from app.services.derivatives import DerivativeService, SessionSweeper, derivative_service
from app.services.jvp import JVPService
from app.services.shapes import ShapeService
from app.services.solve import SolveService
from app.services.vjp import VJPService
from app.settings import Settings
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


def plan_threads(settings: Settings, metrics: Metrics | None) -> cpu_budget.CPUPlan:
    """Torch's thread pool for this process (NOTE [CPU threads] in app/engine/cpu_budget.py)."""
    cpu = cpu_budget.plan(settings.num_threads)
    # The wait policy only counts if it was in the environment when torch started.
    cpu = replace(cpu, wait_policy=os.environ.get("OMP_WAIT_POLICY") or None)
    if torch.get_num_threads() != cpu.threads:
        torch.set_num_threads(cpu.threads)
    if metrics is not None:
        metrics.set_cpu(cpu.usable, torch.get_num_threads())
    return cpu


@dataclass(frozen=True)
class Services:
    """The HTTP-free services (app/services/) the routes and the job runners call."""

    jvp: JVPService
    derivatives: DerivativeService
    vjp: VJPService
    solve: SolveService
    shapes: ShapeService  # /eval_shape, over derivatives, vjp and solve


@dataclass
class Runtime:
    """One process's engine, models and services; `jobs` once `start` opened the job store."""

    settings: Settings
    engine: Engine
    registry: ModelRegistry
    services: Services
    sweeper: SessionSweeper
    metrics: Metrics | None = None
    jobs: JobService | None = None
    cpu: str = ""  # the thread plan, in words, for the start-up summary

    def start_engine(self) -> None:
        """Warm every device up, then take work (all a Celery worker starts)."""
        self.engine.start()

    async def start(self) -> None:
        """The web app's start: the engine, the session sweeper, then the job backend."""
        self.sweeper.start()
        try:
            self.start_engine()
            # Everything made so far (torch, the models, the app) lives as long as the
            # process. Frozen, the garbage collector stops rescanning it: a full collection
            # took ~120 ms on this project's 2-core machine (250k objects), a stall that
            # showed as the p99 latency of small requests under load.
            gc.collect()
            gc.freeze()
            self.jobs = await start_jobs(self.settings, self.services.jvp)  # after the engine
            names = [m.name for m in self.registry.all()]
            devices = [str(d) for d in self.engine.workers]
            log.info("%s", startup_summary(self.settings, names, devices, self.cpu))
        except BaseException:
            self.sweeper.stop()
            self.engine.stop()
            raise

    async def stop(self) -> None:
        """Unfinished job tasks stay queued in the store; every linearize session is dropped."""
        try:
            if self.jobs is not None:
                await self.jobs.stop()
        finally:
            self.sweeper.stop()
            self.engine.stop()


def build(settings: Settings, *, metrics: Metrics | None = None, plan_cpu: bool = True) -> Runtime:
    """Everything one process serves with, nothing started yet. ``plan_cpu``: size torch's
    thread pool by NOTE [CPU threads] (the web app); a Celery worker sets JVP_NUM_THREADS
    only when given, as it always has."""
    if plan_cpu:
        cpu = plan_threads(settings, metrics)
    elif settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    engine = Engine(select_devices(settings.device), max_queue=settings.max_queue)
    cpu_worker = engine.workers.get(torch.device("cpu"))
    if plan_cpu and cpu_worker is not None and cpu.source == "auto" and cpu.threads > 1:
        # Small work on one thread, large on the pool (NOTE [CPU threads]).
        cpu_worker.step_threads = cpu_budget.StepThreads(cpu.threads, torch.set_num_threads)
    registry = build_registry(settings)
    service = JVPService(settings, engine, registry, metrics=metrics)
    derivatives, sweeper = derivative_service(settings, service)
    if metrics is not None:
        metrics.bind_engine(engine)
    vjp = VJPService(service, derivatives.store)
    solve = SolveService(service)
    services = Services(service, derivatives, vjp, solve, ShapeService(derivatives, vjp, solve))
    runtime = Runtime(settings, engine, registry, services, sweeper, metrics)
    runtime.cpu = cpu.describe() if plan_cpu else f"{torch.get_num_threads()} thread(s)"
    return runtime
