"""Alembic environment of the job store.

The service runs these migrations itself at start (`app.jobs.store.migrate`), handing the
connection over in ``config.attributes["connection"]``; the ``alembic`` command works too
with ``sqlalchemy.url`` set (``alembic -x`` is not needed).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from app.jobs.tables import Base

VERSION_TABLE = "jvp_alembic_version"

config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        url = config.get_main_option("sqlalchemy.url")
        if not url:
            raise RuntimeError("set sqlalchemy.url (the JVP_DATABASE_URL) to run migrations")
        with create_engine(url).connect() as conn:
            _migrate(conn)
    else:
        _migrate(connection)


def _migrate(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=True,  # SQLite alters tables by copying them
    )
    with context.begin_transaction():
        context.run_migrations()


run()
