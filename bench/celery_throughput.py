"""Job throughput with Celery workers: tasks/s with 1 and 2 worker processes on the CPU.

    .venv/bin/python bench/celery_throughput.py [--tasks 2000] [--chunk-size 16] [--workers 1,2]

Needs the Redis (127.0.0.1:6379, db 15) and PostgreSQL (127.0.0.1:5432, db test) of this
machine. Makes a fresh PostgreSQL schema and a queue of its own, starts one
`jvp-service serve` (JVP_JOBS_BACKEND=celery) and, for each worker count, that many
`jvp-service worker --device cpu` processes (one torch thread each), waits until they are
ready, submits one job of --tasks tasks (`sin(x) * y + x**2` on 64 float32 elements,
tangents for x and y, b64 tensors) and times it from POST /jobs to `completed`. Prints a
table; removes the schema and the queue at the end.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/15"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def b64(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return {"shape": list(a.shape), "dtype": "float32", "b64": base64.b64encode(a.data).decode()}


def job_body(tasks: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "expression": "sin(x) * y + x**2",
        "options": {"encoding": "b64"},
        "tasks": [
            {
                "primals": {"x": b64(rng.standard_normal(64)), "y": b64(rng.standard_normal(64))},
                "tangents": {"x": b64(rng.standard_normal(64)), "y": b64(rng.standard_normal(64))},
            }
            for _ in range(tasks)
        ],
    }


def start(args: list[str], env: dict[str, str], log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def run(env: dict[str, str], url: str, workers: int, tasks: int, logdir: Path) -> float:
    logs = [(logdir / f"worker-{workers}-{i}.log").open("wb") for i in range(workers)]
    procs = [start(["worker", "--device", "cpu"], env, log) for log in logs]
    try:
        for i in range(workers):
            path = logdir / f"worker-{workers}-{i}.log"
            wait(lambda p=path: b" ready." in p.read_bytes(), 120, f"worker {i}")
        time.sleep(5)  # pool children build and warm up their engines
        body = job_body(tasks)
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/jobs", json=body, timeout=120)
        r.raise_for_status()
        job_id = r.json()["id"]

        def completed() -> bool:
            job = httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()
            if job["status"] == "completed" and job["failed"]:
                raise SystemExit(f"{job['failed']} tasks failed")
            return bool(job["status"] == "completed")

        wait(completed, 1800, "the job")
        return time.perf_counter() - t0
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for log in logs:
            log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--workers", default="1,2", help="worker process counts to time")
    args = parser.parse_args()

    schema = f"jvp_bench_{uuid.uuid4().hex[:8]}"
    queue = f"jvp-bench-{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    env = {
        **os.environ,
        "JVP_JOBS_BACKEND": "celery",
        "JVP_DATABASE_URL": f"{PG}?options=-csearch_path%3D{schema}",
        "JVP_BROKER_URL": REDIS,
        "JVP_CELERY_QUEUE": queue,
        "JVP_CELERY_CHUNK_SIZE": str(args.chunk_size),
        "JVP_NUM_THREADS": "1",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logdir = Path(tempfile.mkdtemp(prefix="jvp-celery-bench-"))
    api_log = (logdir / "api.log").open("wb")
    api = start(["serve", "--port", str(port), "--log-level", "warning"], env, api_log)
    rows = []
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait(ready, 120, "the API")
        for n in (int(w) for w in args.workers.split(",")):
            seconds = run(env, url, n, args.tasks, logdir)
            rows.append((n, args.tasks, args.chunk_size, seconds, args.tasks / seconds))
            print(f"{n} worker(s): {args.tasks / seconds:.0f} tasks/s", file=sys.stderr)
    finally:
        os.killpg(api.pid, signal.SIGTERM)
        api.wait(timeout=30)
        api_log.close()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
        client = redis.Redis.from_url(REDIS)
        client.delete(queue, f"_kombu.binding.{queue}")
        client.close()

    print(f"\nJob throughput, `sin(x) * y + x**2` on 64 float32, {os.cpu_count()} CPUs:\n")
    print("| worker processes | tasks | chunk size | seconds | tasks/s |")
    print("| ---------------- | ----- | ---------- | ------- | ------- |")
    for n, tasks, chunk, seconds, rate in rows:
        print(f"| {n:16d} | {tasks:5d} | {chunk:10d} | {seconds:7.2f} | {rate:7.0f} |")


if __name__ == "__main__":
    main()
