"""GET /metrics: Prometheus text (app/metrics.py).

With API keys on it needs a key (inference or admin), like every route but
/healthz and /readyz, unless ``JVP_METRICS_PUBLIC=true`` opens it for a
scraper that cannot send one.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.auth import MetricsKeyDep
from app.metrics import Metrics
from app.schemas import ErrorBody

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        401: {"model": ErrorBody},
    },
)
async def read_metrics(request: Request, _: MetricsKeyDep) -> Response:
    """Prometheus metrics: requests, latency (queue and compute), queue depth, memory."""
    metrics: Metrics = request.app.state.metrics
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
