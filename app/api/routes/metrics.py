"""GET /metrics: Prometheus text (app/metrics.py).

With API keys on it needs a key (inference or admin), like every route but
/healthz and /readyz, unless ``JVP_METRICS_PUBLIC=true`` opens it for a
scraper that cannot send one.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from fastapi.responses import Response

from app.api.auth import MetricsKeyDep
from app.api.deps import MetricsDep, OptionalJobServiceDep
from app.metrics import JOB_TASK_STATES
from app.schemas import ErrorBody

log = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        401: {"model": ErrorBody},
    },
)
async def read_metrics(
    _: MetricsKeyDep, metrics: MetricsDep, jobs: OptionalJobServiceDep
) -> Response:
    """Prometheus metrics: requests, latency (queue and compute), queue depth, memory."""
    if jobs is not None:
        try:
            counts = await asyncio.to_thread(jobs.store.active_task_counts)
        except Exception:  # noqa: BLE001 - the store is down: the gauge keeps its last values
            log.warning("metrics: counting job tasks failed", exc_info=True)
        else:
            for state in JOB_TASK_STATES:
                metrics.set_job_tasks(state, counts.get(state, 0))
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
