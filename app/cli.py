"""The `jvp-service` command."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
from pathlib import Path

import uvicorn

from app.engine import cpu_budget  # imports no torch
from app.logs import configure_logging
from app.settings import Settings

log = logging.getLogger("app.cli")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure_warning(host: str, settings: Settings) -> str | None:
    """The warning to log when the service listens beyond this machine with no API keys."""
    if is_loopback(host) or settings.api_keys:
        return None
    return (
        f"Listening on {host} with no API keys: anyone who can reach this address can "
        "use the service. Set JVP_API_KEYS (and JVP_ADMIN_KEYS), or bind 127.0.0.1."
    )


def workers_count(text: str) -> int:
    """``--workers``: a positive count, or ``auto`` for one process per usable CPU (affinity
    and cgroup quota, NOTE [CPU threads] in app/engine/cpu_budget.py)."""
    if text.strip().lower() == "auto":
        return cpu_budget.this_process_cpus()
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a positive count or 'auto', got {text!r}")
    return count


LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default=None,  # Settings.log_level (JVP_LOG_LEVEL), read with the other settings
        help="Lowest level logged (default JVP_LOG_LEVEL or info); 'warning' drops the access "
        "log and the start-up summary.",
    )


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("jvp-service")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jvp-service", description="The JVP service.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="Serve the HTTP API (settings from JVP_* variables).")
    serve.add_argument("--host", help="Address to bind (default JVP_HOST or 127.0.0.1).")
    serve.add_argument("--port", type=int, help="Port to bind (default JVP_PORT or 8000).")
    add_log_level(serve)
    serve.add_argument(
        "--workers",
        type=workers_count,
        default=1,
        help="API processes (uvicorn workers; default 1), or 'auto': one per usable CPU, each "
        "computing on one thread (README 'CPU threads'). POST /jvp is stateless; for batch "
        "jobs across processes use JVP_JOBS_BACKEND=celery (README 'Scaling out').",
    )
    worker = sub.add_parser(
        "worker",
        help="Run a Celery worker that computes batch-job tasks (JVP_JOBS_BACKEND=celery: "
        "broker JVP_BROKER_URL, store JVP_DATABASE_URL).",
    )
    worker.add_argument(
        "--device",
        help="Device of this worker process, e.g. cpu or cuda:1 (default: JVP_DEVICE; with "
        "auto, one worker process per GPU, or one on the CPU without a GPU).",
    )
    worker.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="Pool processes per worker process, each with its own engine (default 1: the "
        "device worker thread already computes one batch at a time).",
    )
    add_log_level(worker)
    sub.add_parser(
        "worker-ping",
        help="Exit 0 if a Celery worker of this host answers a ping, else 1 (a healthcheck).",
    )
    models = sub.add_parser("models", help="Model repository tools.")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    check = models_sub.add_parser(
        "check",
        help="Load each model of a repository and run one JVP on random inputs; "
        "exit code 1 if any fails.",
    )
    check.add_argument("dir", type=Path, help="The repository folder (as JVP_MODEL_DIR).")
    return parser


def exit_if_store_unusable(settings: Settings) -> None:
    """One line naming the URL, the file and the setting, not a traceback at start-up
    (NOTE [job store preflight] in app/preflight.py)."""
    from app.preflight import store_problem  # imports SQLAlchemy: only when serving

    problem = store_problem(settings.database_url)
    if problem:
        raise SystemExit(f"jvp-service: {problem}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "models":
        _models(args)
    settings = Settings()  # the one place the CLI reads JVP_* variables
    if args.command == "worker":
        _worker(args, settings)
    elif args.command == "worker-ping":
        _worker_ping(settings)
    elif args.command == "serve":
        _serve(args, settings)


def _models(args: argparse.Namespace) -> None:
    if args.models_command == "check":
        from app.models.check import main as check_main  # imports torch: only when asked

        raise SystemExit(check_main(args.dir))


def _worker(args: argparse.Namespace, settings: Settings) -> None:
    log_level = args.log_level or settings.log_level
    configure_logging(settings.log_format, log_level)
    # Before torch is imported (NOTE [CPU threads] in app/engine/cpu_budget.py).
    cpu_budget.apply_to_environ(cpu_budget.plan(settings.num_threads, processes=args.concurrency))
    exit_if_store_unusable(settings)
    from app.jobs.celery_app import worker_main  # imports celery: only when asked

    raise SystemExit(worker_main(settings, args.device, args.concurrency, log_level))


def _worker_ping(settings: Settings) -> None:
    from app.jobs.celery_app import ping_local_workers

    names = ping_local_workers(settings)
    print("\n".join(names) or "no worker of this host answered")
    raise SystemExit(0 if names else 1)


def _serve(args: argparse.Namespace, settings: Settings) -> None:
    log_level = args.log_level or settings.log_level
    configure_logging(settings.log_format, log_level)
    host = args.host or settings.host
    warning = exposure_warning(host, settings)
    if warning:
        log.warning(warning)
    if args.workers > 1 and settings.jobs_backend == "local" and settings.job_runner == "local":
        log.warning(
            "--workers %d with the local job runner: each API process runs job tasks and "
            "puts back those it finds running at start. Use JVP_JOBS_BACKEND=celery "
            "(README 'Scaling out'), or JVP_JOB_RUNNER=off on all but one process.",
            args.workers,
        )
    exit_if_store_unusable(settings)
    # The app's settings (its start-up summary) and uvicorn's workers see where it listens.
    os.environ["JVP_HOST"], os.environ["JVP_PORT"] = host, str(args.port or settings.port)
    # OpenMP reads its pool size and wait policy once, when torch is imported (in
    # app.api.app, below): set them first, for this process and uvicorn's workers alike
    # (NOTE [CPU threads] in app/engine/cpu_budget.py).
    cpu_budget.apply_to_environ(cpu_budget.plan(settings.num_threads, processes=args.workers))
    # uvicorn shuts down gracefully on SIGTERM (stops accepting, finishes requests in
    # flight, then runs the lifespan's shutdown), and then raises the signal again with
    # the handler it found: make that one a no-op so a clean stop exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(
        "app.api.app:create_app",
        factory=True,
        host=host,
        port=args.port or settings.port,
        log_level=log_level,
        workers=args.workers,
        # Connections: at most this many at once (uvicorn answers 503 past it), and idle
        # kept-alive ones closed after this long; a body that stops arriving is closed
        # by app/api/middleware.py (JVP_BODY_TIMEOUT_S).
        limit_concurrency=settings.limit_concurrency,
        timeout_keep_alive=settings.timeout_keep_alive_s,
        log_config=None,  # configure_logging above: one format, request ids
        # uvicorn builds each access line's arguments even when the level drops it.
        access_log=logging.getLogger("uvicorn.access").isEnabledFor(logging.INFO),
    )


if __name__ == "__main__":
    main()
