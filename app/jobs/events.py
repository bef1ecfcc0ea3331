"""Word that a job finished, for `GET /jobs/{id}?wait_s=` (a client waiting without polling).

# NOTE [finished-job events]
A job finishes in whichever process writes its last outcome: this one (the local runner,
a cancel) or a Celery worker elsewhere. The store tells `JobEvents.notify` after its own
commits, and on PostgreSQL the same transaction sends ``NOTIFY jvp_job_finished, '<id>'``,
which PostgreSQL delivers to every listening connection when it commits: each API
process keeps one (`Listener`, a thread) and passes what it hears to its `JobEvents`.
Nothing relies on the word arriving: a waiter reads the job again at least every
`RECHECK_S`, so a listener that lost its connection (and is reconnecting) only makes a
wait end up to that much later. Job ids are random, so a channel shared by several
deployments on one database wakes nobody by mistake for long. What a wait costs is
bounded: at most MAX_WAIT_S (60 s) of an open connection, and one read of the job per
RECHECK_S, the store reads of a client polling once a second (the SDK's default).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable

log = logging.getLogger("app.jobs.events")

CHANNEL = "jvp_job_finished"
NOTIFY = f"SELECT pg_notify('{CHANNEL}', :job_id)"  # inside the transaction that ends the job
RECHECK_S = 1.0  # a waiter reads its job again this often, whatever it heard


class JobEvents:
    """Callbacks waiting for jobs to finish, called from any thread."""

    def __init__(self) -> None:
        self._waiting: dict[str, set[Callable[[], None]]] = defaultdict(set)
        self._lock = threading.Lock()

    def subscribe(self, job_id: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (in the notifying thread) each time `job_id` is said to have
        finished; returns the function that unsubscribes it."""
        with self._lock:
            self._waiting[job_id].add(callback)

        def unsubscribe() -> None:
            with self._lock:
                callbacks = self._waiting.get(job_id)
                if callbacks is not None:
                    callbacks.discard(callback)
                    if not callbacks:
                        del self._waiting[job_id]

        return unsubscribe

    def notify(self, job_id: str) -> None:
        """Call the job's callbacks; one that fails (its event loop closed meanwhile) is
        logged, never raised into the store's writer that notifies."""
        with self._lock:
            callbacks = list(self._waiting.get(job_id, ()))
        for callback in callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001 - the waiter is gone; the writer goes on
                log.debug("jobs: a waiter of job %s could not be woken", job_id, exc_info=True)


class Listener:
    """A thread that LISTENs on PostgreSQL for finished jobs and tells `events`; it
    reconnects (after `retry_s`) when its connection drops."""

    def __init__(self, conninfo: str, events: JobEvents, *, retry_s: float = 1.0) -> None:
        self.conninfo = conninfo
        self.events = events
        self.retry_s = retry_s
        self._stop = threading.Event()
        self.listening = threading.Event()  # set while a connection listens
        self._thread = threading.Thread(target=self._run, name="jobs-listener", daemon=True)

    def start(self) -> Listener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self.events.notify(note.payload)
            except Exception:  # noqa: BLE001 - the database went away: waiters recheck meanwhile
                log.warning("jobs: listening for finished jobs failed; retrying", exc_info=True)
            self.listening.clear()
            self._stop.wait(self.retry_s)
