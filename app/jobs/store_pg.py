"""The job store's result write on PostgreSQL as two statements, whatever the chunk's size.

# NOTE [bulk result writes]
`JobStore.record` on SQLite reads the tasks' statuses, then updates them one row at a
time (executemany). On PostgreSQL the same guarantees (a task written only while it has
not ended, only by the worker that holds it, counted once) fit in one UPDATE over
`unnest` of the outcomes' columns, its WHERE the guard: PostgreSQL locks each row it
updates and re-checks the WHERE on the newest version of a row another transaction
changed meanwhile, so of two writers of one task the second finds it ended and writes
nothing. RETURNING says which were written, for the job's counters, bumped (and the job
completed) by a second statement. (`t.idx BETWEEN lo AND hi` besides the join bounds the
rows PostgreSQL reads to the chunk's range of the primary key, whatever its statistics
say: without it, it read every queued task of the job, 24 ms a chunk at 20,000 tasks,
growing with the job.) Measured in bench/README.md ("Where a worker's time
goes"): a chunk's results took 1 + 2 per row round trips before, now 2.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.jobs.events import NOTIFY
from app.jobs.store import Outcome
from app.jobs.tables import CANCELLED, DONE, FAILED

WRITE = text(
    """
    UPDATE jvp_job_tasks AS t
    SET status = v.status, result = v.result, error_type = v.error_type,
        error_message = v.error_message, error_param = v.error_param
    FROM unnest(
        CAST(:idx AS integer[]), CAST(:status AS text[]), CAST(:result AS bytea[]),
        CAST(:error_type AS text[]), CAST(:error_message AS text[]), CAST(:error_param AS text[])
    ) AS v(idx, status, result, error_type, error_message, error_param)
    WHERE t.job_id = :job_id AND t.idx = v.idx AND t.idx BETWEEN :lo AND :hi
      AND (t.status = 'running' OR (t.status = 'queued' AND v.status <> 'queued'))
      AND (CAST(:worker AS text) IS NULL OR t.worker = CAST(:worker AS text))
    RETURNING v.status
    """
)

# ACTIVE job statuses (app/jobs/store.py) and the completed one, as in app/jobs/tables.py.
COUNT = text(
    """
    UPDATE jvp_jobs
    SET done = done + :ended, failed = failed + :failed, cancelled = cancelled + :cancelled,
        updated_at = :at,
        status = CASE WHEN status IN ('queued', 'running')
                           AND done + :ended + cancelled + :cancelled >= total
                      THEN 'completed' ELSE status END,
        finished_at = CASE WHEN status IN ('queued', 'running')
                           AND done + :ended + cancelled + :cancelled >= total
                      THEN :at ELSE finished_at END
    WHERE id = :job_id
    RETURNING status
    """
)


def write(
    s: Session, job_id: str, group: Sequence[Outcome], worker: str | None, at: datetime
) -> tuple[int, bool]:
    """Write one job's outcomes (NOTE [bulk result writes]). Returns how many were written,
    and whether they completed the job (then NOTIFY says so at commit: NOTE [finished-job
    events] in app/jobs/events.py)."""
    errors = [o.error or (None, None, None) for o in group]
    written = Counter(
        s.execute(
            WRITE,
            {
                "job_id": job_id,
                "worker": worker,
                "lo": min(o.idx for o in group),
                "hi": max(o.idx for o in group),
                "idx": [o.idx for o in group],
                "status": [str(o.kind) for o in group],
                "result": [o.result for o in group],
                "error_type": [e[0] for e in errors],
                "error_message": [e[1] for e in errors],
                "error_param": [e[2] for e in errors],
            },
        ).scalars()
    )
    completed = False
    if written:
        status = s.execute(
            COUNT,
            {
                "job_id": job_id,
                "ended": written[DONE] + written[FAILED],
                "failed": written[FAILED],
                "cancelled": written[CANCELLED],
                "at": at,
            },
        ).scalar()
        completed = status == "completed"
        if completed:
            s.execute(text(NOTIFY), {"job_id": job_id})
    return sum(written.values()), completed
