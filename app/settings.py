"""The one settings class: every knob is a ``JVP_*`` environment variable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Service settings, read from ``JVP_*`` environment variables at start-up."""

    model_config = SettingsConfigDict(env_prefix="JVP_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address `jvp-service serve` binds.")
    port: int = Field(8000, ge=0, le=65535, description="Port `jvp-service serve` binds.")
    model_dir: Path | None = Field(
        None, description="Model repository: <dir>/<name>/model.pt2 (+ optional config.json)."
    )
    device: str = Field(
        "auto",
        description="Devices to start workers on: 'auto' (cpu plus every GPU), or a "
        "comma-separated list such as 'cpu' or 'cuda:0,cuda:1'.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Inference keys (Bearer)."
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Admin keys (Bearer)."
    )

    # Limits. Each one answers 413 (or 400 for expression syntax) with the limit in the message.
    max_expression_length: int = Field(2000, ge=1, description="Characters per expression.")
    max_expression_nodes: int = Field(500, ge=1, description="AST nodes per expression.")
    max_expression_depth: int = Field(50, ge=1, description="AST nesting depth per expression.")
    max_tensor_elements: int = Field(16_777_216, ge=1, description="Elements per tensor (16M).")
    max_request_elements: int = Field(
        67_108_864, ge=1, description="Elements across all tensors of one request (64M)."
    )
    max_dims: int = Field(8, ge=0, description="Dimensions per tensor.")
    max_request_bytes: int = Field(
        0,
        ge=0,
        description="Estimated peak bytes one request's computation may need (its inputs, "
        "every intermediate and result while they live, from the abstract evaluation); 0: a "
        "quarter of the device's memory (the machine's, or its cgroup's, for the CPU), read at "
        "start-up.",
    )
    max_request_flops: int = Field(
        10**14,
        ge=1,
        description="Estimated floating-point operations of one request's computation "
        "(100 TFLOP; 413 past it).",
    )
    max_body_bytes: int = Field(
        268_435_456, ge=1, description="Bytes per request body (256 MiB), counted while it streams."
    )

    # Connections (app/api/middleware.py, and uvicorn through app/cli.py).
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Seconds a request's body may take to arrive, from its headers; past it "
        "408 and the connection is closed (a client that stops sending holds nothing).",
    )
    limit_concurrency: int = Field(
        2048,
        ge=1,
        description="uvicorn's limit_concurrency: connections (or requests in flight) one "
        "server process holds at once; past it uvicorn answers 503 at once.",
    )
    timeout_keep_alive_s: int = Field(
        5,
        ge=1,
        description="uvicorn's timeout_keep_alive: seconds an idle kept-alive connection "
        "stays open between requests.",
    )

    # Engine.
    max_queue: int = Field(1024, ge=1, description="Work items waiting per device before 503.")
    request_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Deadline of one request, from its arrival: reading the body, waiting "
        "in the queue and computing. Work that cannot finish in the time left (its estimated "
        "FLOPs at the device's measured rate) is a 504 at once.",
    )
    num_threads: int = Field(
        0,
        ge=0,
        description="torch.set_num_threads (intra-op threads, fixed); 0 chooses from the CPUs "
        "this process may use (affinity, cgroup quota), less one for the event loop, shared "
        "by --workers, or OMP_NUM_THREADS when set (NOTE [CPU threads] in "
        "app/engine/cpu_budget.py).",
    )
    max_batch_size: int = Field(
        32,
        ge=1,
        description="Dynamic batching: compatible plain JVPs (same target, dtype, device, "
        "shapes) waiting together run as one vmapped JVP of at most this many; 1 turns it off.",
    )
    batch_wait_us: int = Field(
        500,
        ge=0,
        description="Microseconds a busy device worker waits for more compatible items after "
        "taking the first (never when it was idle: a lone request runs at once).",
    )
    inline_max_us: int = Field(
        150,
        ge=0,
        description="A CPU JVP measured to take at most this many microseconds of CPU time runs "
        "on the event loop's thread while the device worker is idle, skipping the hand-off "
        "to the worker thread, which costs more than such work; 0 never.",
    )

    # Operations.
    metrics_public: bool = Field(
        False, description="Serve GET /metrics without a key even when API keys are on."
    )
    docs_public: bool = Field(
        False,
        description="Serve the /docs and /redoc pages without a key even when API keys are on "
        "(the page asks for a key; /openapi.json still needs one).",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text or as JSON objects (one per line)."
    )
    log_level: str = Field(
        "info", description="Log level of `jvp-service serve` and `worker` (--log-level wins)."
    )
    opentelemetry: bool = Field(
        False,
        description="FastAPI's own OpenTelemetry spans, metrics and logs through the global "
        "OpenTelemetry providers (configure them, e.g. with opentelemetry-instrument). Off by "
        "default: its per-request check costs a small request about 5% of its throughput, "
        "and GET /metrics already has the service's own Prometheus metrics.",
    )

    # Batch jobs (app/jobs).
    database_url: str = Field(
        "sqlite:///./jvp-jobs.db",
        description="The job store (SQLAlchemy URL): SQLite (WAL, synchronous=FULL) or "
        "PostgreSQL ('postgresql+psycopg://user@host/db').",
    )
    job_runner: Literal["local", "off"] = Field(
        "local",
        description="'local' runs job tasks in this process on the device workers; 'off' only "
        "stores jobs (another process runs them).",
    )
    job_concurrency: int = Field(
        64,
        ge=1,
        description="Job tasks in flight at once in this process (queued on a worker or "
        "computing); interactive requests still go first.",
    )
    job_retention_s: float = Field(
        604_800.0, gt=0, description="Seconds a finished job is kept before it is removed (7 d)."
    )
    max_job_tasks: int = Field(100_000, ge=1, description="Tasks per job (413 past it).")
    max_job_body_bytes: int = Field(
        268_435_456, ge=1, description="Bytes of one POST /jobs body (256 MiB; 413 past it)."
    )

    # Scale-out: Celery workers on a RabbitMQ (or Redis) broker, PostgreSQL as the job store
    # (app/jobs/celery_*, app/jobs/leases.py).
    jobs_backend: Literal["local", "celery"] = Field(
        "local",
        description="'local' runs job tasks in the API process (JVP_JOB_RUNNER); 'celery' "
        "stores jobs in JVP_DATABASE_URL and enqueues their task ids to JVP_BROKER_URL for "
        "`jvp-service worker` processes (the API then runs no job runner).",
    )
    broker_url: str = Field(
        "amqp://guest:guest@127.0.0.1:5672//",
        description="The Celery broker (celery backend only): RabbitMQ ('amqp://...', the "
        "default: a chunk of a worker whose connection drops is requeued at once) or Redis "
        "('redis://...': redelivered only after JVP_CELERY_VISIBILITY_TIMEOUT_S when a worker "
        "vanishes before starting it; NOTE [task leases]).",
    )
    celery_queue: str = Field("jvp", min_length=1, description="The Celery queue of job tasks.")
    celery_chunk_size: int = Field(
        0,
        ge=0,
        description="Tasks of one job that share a function, options and shapes go to the "
        "broker in chunks of at most this many; a worker computes a chunk as one batch. 0 "
        "(the default) sizes them by the job: a 16th of its tasks, 16 to 512, and at most "
        "32 MiB of inputs per chunk.",
    )
    max_task_attempts: int = Field(
        3,
        ge=1,
        description="Times a task may start on a worker; a task whose worker was lost this "
        "many times is recorded as failed ('worker lost N times') instead of retried.",
    )
    celery_task_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="Seconds a worker waits for one chunk; tasks unfinished by then fail "
        "with a deadline error. Must be below JVP_CELERY_VISIBILITY_TIMEOUT_S.",
    )
    celery_visibility_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="Seconds before Redis gives a chunk whose worker vanished (no ack) to "
        "another worker; longer than the longest chunk (JVP_CELERY_TASK_TIMEOUT_S).",
    )
    celery_lease_s: float = Field(
        20.0,
        ge=2,
        description="Seconds a worker holds the tasks it computes; it renews them every "
        "quarter of this while computing. Tasks of a worker that stops renewing (killed, "
        "stopped, its machine gone) are sent again once their lease lapses.",
    )
    celery_broker_heartbeat_s: float = Field(
        10.0,
        ge=0,
        description="AMQP heartbeat of a worker's broker connection (RabbitMQ): a worker "
        "that stops answering loses its connection, and its unacknowledged chunk is "
        "requeued, after about this long. 0 turns heartbeats off.",
    )
    celery_dispatch_delay_s: float = Field(
        0.0,
        ge=0,
        description="Test and drill hook: seconds the API's dispatcher sleeps after each "
        "chunk it sends (tests/scaleout kill an API process mid-dispatch). Keep 0.",
    )
    celery_task_delay_s: float = Field(
        0.0,
        ge=0,
        description="Test and drill hook: seconds a worker sleeps after starting a chunk, "
        "before computing it (tests/scaleout kill workers mid-chunk). Keep 0.",
    )

    # Beyond one JVP: /jacobian, /hvp, /linearize.
    max_jacobian_elements: int = Field(
        4096,
        ge=1,
        description="Input (and parameter) elements a /jacobian may differentiate with "
        "respect to: one forward-mode column each (413 past it).",
    )
    linearize_ttl_s: float = Field(
        300.0, gt=0, description="Seconds a /linearize session lives after it was made."
    )
    linearize_max_session_bytes: int = Field(
        268_435_456,
        ge=1,
        description="Estimated bytes one /linearize session may hold (256 MiB; 413 past it).",
    )
    linearize_budget_bytes: int = Field(
        2_147_483_648,
        ge=1,
        description="Estimated bytes all live /linearize sessions may hold together "
        "(2 GiB; 503 with Retry-After past it).",
    )
    linearize_sweep_s: float = Field(
        10.0, gt=0, description="Seconds between sweeps that drop expired /linearize sessions."
    )

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        # Accept "k1,k2" as well as a JSON list, so a plain env var works.
        if isinstance(value, str):
            stripped = value.strip()
            if stripped.startswith("["):
                return json.loads(stripped)
            return [k.strip() for k in stripped.split(",") if k.strip()]
        return value
