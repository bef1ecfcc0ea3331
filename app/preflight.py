"""Can the job store be used? One line saying why not, before the server starts.

NOTE [job store preflight]
The default store, ``sqlite:///./jvp-jobs.db``, is a file in the working directory. Where
that directory is not writable (a container running as a non-root user in a folder owned by
root) SQLite could not create its file, and the server died at start with ``unable to open
database file`` under a 56-frame traceback naming neither the file nor ``JVP_DATABASE_URL``.
`jvp-service serve` runs `store_problem` first and exits with its one line instead: the URL
(password hidden), the file's absolute path, what is wrong with it, and the setting to change.
A SQLite database needs its folder writable, not only its file: SQLite writes its ``-wal``
and ``-shm`` files beside it. Anything else (PostgreSQL down, a file that is not a database)
is found by connecting and reading, as the server's first query would. This module imports
SQLAlchemy only, not torch (nor app.jobs, which does): it runs before
`jvp-service serve` sets the CPU threads (NOTE [CPU threads] in app/engine/cpu_budget.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

SETTING = "JVP_DATABASE_URL"


def _sqlite_path(database: str | None) -> Path | None:
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).absolute()


def _file_problem(path: Path) -> str | None:
    folder = path.parent
    who = f"uid {os.getuid()}" if hasattr(os, "getuid") else "this user"
    try:
        if not folder.is_dir():
            return f"its folder {folder} does not exist"
        exists = path.exists()
    except OSError as exc:  # a folder above it that this user may not enter
        return f"its folder {folder} cannot be reached by this process ({who}): {exc.strerror}"
    if exists and not os.access(path, os.R_OK | os.W_OK):
        return f"the file is not writable by this process ({who})"
    if not os.access(folder, os.W_OK | os.X_OK):
        return (
            f"its folder {folder} is not writable by this process ({who}); SQLite creates "
            "the file and its -wal and -shm files there"
        )
    return None


def store_problem(url: str) -> str | None:
    """None when the job store at ``url`` can be opened and read; else one line naming the
    URL, the path (SQLite), the problem and the setting."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        return f"{SETTING}={url!r} is not a database URL ({exc}); e.g. sqlite:////data/jvp-jobs.db"
    shown = parsed.render_as_string(hide_password=True)
    path = _sqlite_path(parsed.database) if parsed.get_backend_name() == "sqlite" else None
    where = f"the job store {shown} ({path})" if path else f"the job store {shown}"
    hint = f"set {SETTING} to a writable location (e.g. sqlite:////data/jvp-jobs.db)"
    if path is not None:
        problem = _file_problem(path)
        if problem:
            return f"Cannot open {where}: {problem}; {hint}."
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(parsed)
        try:
            with engine.connect() as connection:
                connection.execute(
                    text("SELECT count(*) FROM sqlite_master" if path else "SELECT 1")
                )
        finally:
            engine.dispose()
    except Exception as exc:  # any driver's error: reported, not raised
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"Cannot open {where}: {reason}; check {SETTING}."
    return None
