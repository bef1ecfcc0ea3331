"""The Celery app on the broker (RabbitMQ by default, or Redis), shared by the API process
that sends chunks (app/jobs/celery_backend.py) and the worker that computes them
(app/jobs/celery_app.py, NOTE [celery delivery]): its delivery settings, the task's name,
and the message's ranges.
It imports neither side, so the web app and the worker import nothing of each other."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery
from sqlalchemy.exc import OperationalError

from app.settings import Settings

TASK_NAME = "jvp.run_chunk"


def is_redis(settings: Settings) -> bool:
    return settings.broker_url.split(":", 1)[0] in ("redis", "rediss")


def transport_options(settings: Settings) -> dict[str, Any]:
    """Redis transport options: the visibility timeout, and a restore sweep frequent enough
    to honour it (kombu's default sweeps about every 100 s). None on RabbitMQ."""
    if not is_redis(settings):
        return {}
    visibility = settings.celery_visibility_timeout_s
    return {
        "visibility_timeout": visibility,
        "unacked_restore_interval": max(1.0, min(10.0, visibility / 4)),
        "unacked_restore_throttle": 1,
    }


def make_celery(settings: Settings, task: Callable[..., Any] | None = None) -> Celery:
    """The Celery app of these settings; ``task``: the chunk task to register (a worker's,
    app/jobs/celery_app.py `run_chunk`; an API process only sends it by name)."""
    if (
        is_redis(settings)
        and settings.celery_visibility_timeout_s <= settings.celery_task_timeout_s
    ):
        raise ValueError(
            "JVP_CELERY_VISIBILITY_TIMEOUT_S "
            f"({settings.celery_visibility_timeout_s:g}) must be longer than "
            f"JVP_CELERY_TASK_TIMEOUT_S ({settings.celery_task_timeout_s:g}): a chunk still "
            "computing would be handed to a second worker"
        )
    app = Celery("jvp", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        # AMQP heartbeats only where something answers them: the worker's event loop does;
        # an API process's producer connection has no loop to (NOTE [task leases]).
        broker_heartbeat=settings.celery_broker_heartbeat_s if task is not None else 0,
        task_default_queue=settings.celery_queue,
        task_serializer="json",
        accept_content=["json"],  # ids only; never pickle
        task_ignore_result=True,  # results go to the job store
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=True,  # `jvp-service worker-ping`
    )
    if task is None:
        return app
    app.task(
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        # The store was unreachable: try again later, from the start of the chunk.
        autoretry_for=(OperationalError,),
        retry_backoff=True,
        retry_backoff_max=60,
        max_retries=20,
    )(task)
    return app


def ranges_of(idxs: list[int]) -> list[list[int]]:
    """Sorted indices as [start, stop) ranges: [0, 1, 2, 5] -> [[0, 3], [5, 6]]."""
    out: list[list[int]] = []
    for i in idxs:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out
