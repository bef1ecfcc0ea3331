"""Prometheus metrics, one registry per app (so apps in one test process stay independent).

Served as text by ``GET /metrics`` (app/api/routes/metrics.py). What is measured:

* ``jvp_http_requests_total{route, method, status}`` and
  ``jvp_http_request_duration_seconds{route}``: every HTTP request, by route
  template (``/models/{name}``, never the raw path), from app/api/middleware.py;
  ``jvp_http_requests_in_flight``.
* ``jvp_queue_seconds{device}`` and ``jvp_compute_seconds{device}``: the two
  halves of a JVP's time on the device worker (``JVPResult.queue_ms`` and
  ``compute_ms``), observed by app/services/jvp.py.
* ``jvp_batch_size{device}``: work items per device-worker run (the batching
  code observes it; 1 without batching).
* ``jvp_queue_depth{device}``: items waiting per device worker, read at scrape time.
* ``jvp_job_tasks_total{status}`` (tasks that ended: ``completed``, ``failed``,
  ``cancelled``), fed by the job runner through :meth:`Metrics.job_task_ended`, and
  ``jvp_job_tasks_active{state}`` (``queued``, ``running`` now, in the whole store),
  counted from the store at each scrape (app/api/routes/metrics.py).
* ``jvp_cpu_usable`` and ``jvp_cpu_threads``: the CPUs this process may use and
  the intra-op threads chosen for them at start (NOTE [CPU threads] in
  app/engine/cpu_budget.py).
* ``jvp_device_memory_bytes{device}``: ``torch.cuda.memory_allocated`` per CUDA
  device; for ``cpu``, the resident set size of the process. The process
  collector adds ``process_resident_memory_bytes`` and friends.
"""

from __future__ import annotations

import functools
import os
import resource
from typing import TYPE_CHECKING, Any

import torch
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

if TYPE_CHECKING:
    from app.engine.engine import Engine

    # Seconds: from 100 us (a tiny expression's queue wait) to a minute (the default deadline).
    from app.engine.task import JVPResult
    from app.engine.worker import DeviceWorker
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
JOB_TASK_STATES = ("queued", "running")


def process_rss_bytes() -> int:
    """The resident set size of this process now (Linux /proc), else its peak (getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if os.uname().sysname == "Darwin" else peak * 1024


def _depth(worker: DeviceWorker) -> int:
    return worker.depth


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return process_rss_bytes()


class Metrics:
    """The metrics of one app, in a registry of its own."""

    # A long method on purpose: one declaration per metric, in the order /metrics lists them.
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # (metric, label values) -> its child: `labels()` checks and locks on every call,
        # and a small request would make five such calls.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        ProcessCollector(registry=r)
        self.requests = Counter(
            "jvp_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "jvp_http_request_duration_seconds",
            "Time from the request's first byte to its last response byte.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "jvp_http_requests_in_flight", "HTTP requests being handled now.", registry=r
        )
        self.queue_seconds = Histogram(
            "jvp_queue_seconds",
            "Time a JVP waited in its device worker's queue.",
            ["device"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "jvp_compute_seconds",
            "Time a JVP computed on its device worker.",
            ["device"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "jvp_batch_size",
            "Work items run together in one device-worker step.",
            ["device"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "jvp_queue_depth", "Work items waiting per device worker.", ["device"], registry=r
        )
        self.device_memory = Gauge(
            "jvp_device_memory_bytes",
            "Memory allocated on each device (CUDA: torch.cuda.memory_allocated; cpu: RSS).",
            ["device"],
            registry=r,
        )
        self.job_tasks_total = Counter(
            "jvp_job_tasks",
            "Batch-job tasks that ended, by status (completed, failed, cancelled).",
            ["status"],
            registry=r,
        )
        self.job_tasks = Gauge(
            "jvp_job_tasks_active",
            "Batch-job tasks now queued or running.",
            ["state"],
            registry=r,
        )
        for state in JOB_TASK_STATES:
            self.job_tasks.labels(state=state).set(0)
        self.cpu_usable = Gauge(
            "jvp_cpu_usable",
            "CPUs this process may use: its affinity, bounded by the cgroup CPU quota.",
            registry=r,
        )
        self.cpu_threads = Gauge(
            "jvp_cpu_threads",
            "Intra-op threads torch computes with (NOTE [CPU threads]).",
            registry=r,
        )

    def set_cpu(self, usable: int, threads: int) -> None:
        """The CPU plan chosen at start (app/engine/cpu_budget.py)."""
        self.cpu_usable.set(usable)
        self.cpu_threads.set(threads)

    def bind_engine(self, engine: Engine) -> None:
        """Read queue depth and device memory from this engine's workers at scrape time."""
        for device, worker in engine.workers.items():
            label = str(device)
            self.queue_depth.labels(device=label).set_function(functools.partial(_depth, worker))
            self.device_memory.labels(device=label).set_function(
                functools.partial(device_memory_bytes, device)
            )

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once per distinct label values."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            if len(self._children) >= 10_000:  # label values are bounded; this is a guard
                self._children.clear()
            found = self._children[key] = metric.labels(*values)
        return found

    def observe_request(self, route: str, method: str, status: str, seconds: float) -> None:
        self.child(self.requests, route, method, status).inc()
        self.child(self.request_seconds, route).observe(seconds)

    def observe_result(self, device: torch.device, result: JVPResult) -> None:
        label = str(device)
        self.child(self.queue_seconds, label).observe(result.queue_ms / 1e3)
        self.child(self.compute_seconds, label).observe(result.compute_ms / 1e3)

    def observe_batch(self, device: torch.device, size: int) -> None:
        self.child(self.batch_size, str(device)).observe(size)

    def job_task_ended(self, status: str, count: int = 1) -> None:
        """Hook for the job runner: ``count`` tasks ended with ``status``."""
        self.job_tasks_total.labels(status=status).inc(count)

    def set_job_tasks(self, state: str, count: int) -> None:
        """Hook for the job runner: ``count`` tasks are now in ``state`` (queued or running)."""
        self.job_tasks.labels(state=state).set(count)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
