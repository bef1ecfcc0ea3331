"""Task progress: the Newton iterations a solve task computing on a Celery worker has done,
written by that worker while it computes, read by GET /jobs/{id} in any API process (NOTE
[progress across processes] in app/jobs/leases.py).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    with op.batch_alter_table("jvp_job_tasks") as batch:
        batch.add_column(sa.Column("progress", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jvp_job_tasks") as batch:
        batch.drop_column("progress")
