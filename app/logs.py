"""Logging: a request id on every line, and JSON lines when ``JVP_LOG_FORMAT=json``.

The request id lives in a context variable that :mod:`app.api.middleware` sets for
each HTTP request (each request runs in a task of its own, so the value never
leaks into another request); :class:`RequestIdFilter` copies it onto every log
record, ``"-"`` outside a request.

    >>> import logging
    >>> token = request_id.set("abc123")
    >>> record = logging.LogRecord("app", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    >>> RequestIdFilter().filter(record) and record.request_id
    'abc123'
    >>> import json
    >>> json.loads(JSONFormatter().format(record))["request_id"]
    'abc123'
    >>> request_id.reset(token)
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (the current request's id, or ``"-"``) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get() or "-"
        return True


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id (and exc_info)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id.get() or "-",
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(log_format: Literal["text", "json"] = "text", level: str = "INFO") -> None:
    """Send every logger (uvicorn's too) to one stderr handler with the request-id filter."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        JSONFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's loggers propagate to the root (uvicorn.run is given log_config=None).
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(level.upper())
    # One start-up summary line (app/startup.py) instead of Alembic's migration set-up lines
    # and uvicorn's start-up lines; their warnings and errors still show, and --log-level
    # debug shows everything. A filter, since uvicorn sets its loggers' levels again.
    quiet = root.level > logging.DEBUG
    logging.getLogger("alembic").setLevel(logging.WARNING if quiet else root.level)
    lifecycle = logging.getLogger("uvicorn.error")
    for old_filter in [f for f in lifecycle.filters if isinstance(f, _WarningsOnly)]:
        lifecycle.removeFilter(old_filter)
    if quiet:
        lifecycle.addFilter(_WarningsOnly())


class _WarningsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING
