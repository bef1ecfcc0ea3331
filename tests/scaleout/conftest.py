"""Scale-out fixtures: the real RabbitMQ (127.0.0.1:5672, guest/guest, the default broker)
or Redis (127.0.0.1:6379, db 15), a queue of its own per test on either; the real
PostgreSQL (127.0.0.1:5432, db test, a schema of its own per test); real `jvp-service
worker` and `jvp-service serve` subprocesses, with the default timeouts.

Without a broker or PostgreSQL these tests skip with the reason; with CI set they fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import kombu
import pytest
import redis
from sqlalchemy import select

from app.jobs.store import JobStore
from app.jobs.tables import TaskRow
from tests.conftest import ROOT, LiveServer
from tests.jobs.conftest import postgresql_url  # noqa: F401 - the fixture, reused

REDIS_URL = "redis://127.0.0.1:6379/15"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def need(reason: str) -> None:
    """CI machines run Redis and PostgreSQL: there a missing one is a failure, not a skip."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def redis_url() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as e:
        need(f"Redis at 127.0.0.1:6379 is not reachable: {type(e).__name__}")
    finally:
        client.close()
    yield REDIS_URL


@pytest.fixture
def amqp_url() -> Iterator[str]:
    try:
        with kombu.Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as e:  # noqa: BLE001 - the reason goes in the skip message
        need(f"RabbitMQ at 127.0.0.1:5672 is not reachable: {type(e).__name__}")
    yield AMQP_URL


def wait_for(check: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class Worker:
    """`jvp-service worker --device cpu` in a process group of its own (parent + pool child)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="jvp-worker-", suffix=".log")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--device", "cpu"],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"worker exited with {self.process.returncode}:\n{self.output()}"
                )
            return " ready." in self.output() and bool(self.children())

        wait_for(ready, timeout_s, "the worker to be ready")

    def children(self) -> set[int]:
        """Pids of the pool children (they compute; the task rows name them)."""
        try:
            path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            return {int(p) for p in path.read_text().split()}
        except OSError:
            return set()

    def kill(self) -> None:
        """SIGKILL the whole worker (parent and children) at once."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        """SIGSTOP the whole worker: it keeps its connections open and never answers again
        (until `kill`)."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")


class Cluster:
    """Workers and API processes that share one store (a PostgreSQL schema) and one queue."""

    def __init__(self, database_url: str, broker_url: str) -> None:
        self.queue = f"jvp-test-{uuid.uuid4().hex[:12]}"
        self.env = {
            **os.environ,
            "JVP_JOBS_BACKEND": "celery",
            "JVP_DATABASE_URL": database_url,
            "JVP_BROKER_URL": broker_url,
            "JVP_CELERY_QUEUE": self.queue,
            "JVP_NUM_THREADS": "1",
            "JVP_LOG_LEVEL": "info",
        }
        self.broker_url = broker_url
        self.store = JobStore(database_url)
        self.workers: list[Worker] = []
        self.apis: list[LiveServer] = []

    def worker(self, **env: str) -> Worker:
        worker = Worker({**self.env, **env})
        self.workers.append(worker)
        return worker

    def api(self, **env: str) -> LiveServer:
        api = LiveServer(env={**self.env, **env})
        self.apis.append(api)
        return api

    def tasks(self, job_id: str) -> dict[int, TaskRow]:
        with self.store.reading() as s:
            rows = s.scalars(select(TaskRow).where(TaskRow.job_id == job_id)).all()
            return {r.idx: r for r in rows}

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()  # no test here is about a graceful stop: don't wait for one
            worker.log.close()
        for api in self.apis:
            api.stop()
        self.store.close()
        if self.broker_url.startswith("amqp"):
            with kombu.Connection(self.broker_url, connect_timeout=3) as conn:
                conn.default_channel.queue_delete(self.queue)
            return
        client = redis.Redis.from_url(REDIS_URL)
        try:
            client.delete(self.queue, f"_kombu.binding.{self.queue}")
            # Messages of a killed worker that were never acknowledged.
            for tag, value in client.hscan_iter("unacked"):
                if json.loads(value)[2] == self.queue:
                    client.hdel("unacked", tag)
                    client.zrem("unacked_index", tag)
        finally:
            client.close()

    def logs(self) -> str:
        return "\n".join(
            [f"--- worker {i}\n{w.output()}" for i, w in enumerate(self.workers)]
            + [f"--- api {i}\n{a.output()}" for i, a in enumerate(self.apis)]
        )


@pytest.fixture(params=["amqp"])
def broker(request: pytest.FixtureRequest) -> str:
    """The broker URL of a test: RabbitMQ (the default broker); a test that holds for both
    parametrizes it indirectly with ["amqp", "redis"]."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def cluster(
    postgresql_url: str,  # noqa: F811 - the fixture imported above
    broker: str,
    request: pytest.FixtureRequest,
) -> Iterator[Cluster]:
    c = Cluster(postgresql_url, broker)
    try:
        yield c
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(c.logs())
        c.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    setattr(item, f"rep_{report.when}", report)  # the cluster fixture prints logs on failure
    return report
