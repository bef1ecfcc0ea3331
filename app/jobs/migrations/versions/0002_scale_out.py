"""Scale-out columns: which worker ran a task, the batch key tasks are chunked by, and when
a job's task ids went to the broker.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


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
