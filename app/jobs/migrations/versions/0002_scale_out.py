"""Scale-out columns: which worker ran a task, the batch key tasks are chunked by, and when
a job's task ids went to the broker.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("jvp_job_tasks") as batch:
        batch.add_column(sa.Column("worker", sa.String(255), nullable=True))
        batch.add_column(sa.Column("batch_key", sa.String(64), nullable=True))
    with op.batch_alter_table("jvp_jobs") as batch:
        batch.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jvp_jobs") as batch:
        batch.drop_column("dispatched_at")
    with op.batch_alter_table("jvp_job_tasks") as batch:
        batch.drop_column("batch_key")
        batch.drop_column("worker")
