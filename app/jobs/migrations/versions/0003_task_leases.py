"""Task leases: until when the worker computing a task holds it (NOTE [task leases] in
app/jobs/leases.py). A running task whose lease lapsed goes back to the queue.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    with op.batch_alter_table("jvp_job_tasks") as batch:
        batch.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jvp_job_tasks") as batch:
        batch.drop_column("lease_until")
