"""Job-store fixtures: a fresh SQLite file, a fresh PostgreSQL schema (dropped after), and a
migrated store on each."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from app.jobs.store import JobStore

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _pg_available() -> str | None:
    try:
        engine = create_engine(PG_SERVER, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
    except Exception as e:  # noqa: BLE001 - the reason goes in the skip message
        return f"PostgreSQL at 127.0.0.1:5432/test is not reachable: {type(e).__name__}"
    return None


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/jobs.db"


@pytest.fixture
def postgresql_url() -> Iterator[str]:
    """A URL whose connections use a schema of their own, created here and dropped after."""
    reason = _pg_available()
    if reason:
        # CI machines run PostgreSQL: there a missing server is a failure, not a skip.
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    schema = f"jvp_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_SERVER)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_SERVER}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """The same store tests on both databases."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def store(db_url: str) -> Iterator[JobStore]:
    """A migrated store on each database, closed after."""
    s = JobStore(db_url)
    s.migrate()
    try:
        yield s
    finally:
        s.close()
