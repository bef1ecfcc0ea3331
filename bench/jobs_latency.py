"""Interactive latency while a batch job runs: p50/p99 of POST /jvp with and without a job.

    .venv/bin/python bench/jobs_latency.py [--tasks 10000] [--requests 300]

Starts `jvp-service serve` on a free port with a fresh SQLite job store, times sequential
POST /jvp requests with the service idle, then submits a job of --tasks tasks and times
the same requests while it runs, and prints a table. Job tasks run at BATCH priority on
the same device worker, behind interactive requests, so /jvp waits at most for the one
batch task computing when it arrives.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
JVP_BODY = {
    "expression": "sin(x) * y + x**2",
    "primals": {"x": [0.1 * i for i in range(16)], "y": [0.2 * i for i in range(16)]},
    "tangents": {"x": [1.0] * 16},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server(db: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "JVP_DATABASE_URL": f"sqlite:///{db}", "JVP_DEVICE": "cpu"}
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the service did not become ready")


def time_requests(client: httpx.Client, n: int) -> list[float]:
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        response = client.post("/jvp", json=JVP_BODY)
        latencies.append((time.perf_counter() - started) * 1e3)
        response.raise_for_status()
    return latencies


def percentile(values: list[float], q: int) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks in the batch job")
    parser.add_argument("--requests", type=int, default=300, help="timed /jvp requests per row")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_server(Path(tmp) / "jobs.db")
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                time_requests(client, 20)  # warm up
                idle = time_requests(client, args.requests)

                tasks = [
                    {
                        "primals": {"x": [0.001 * i + j for j in range(16)], "y": [1.0] * 16},
                        "tangents": {"x": [1.0] * 16},
                    }
                    for i in range(args.tasks)
                ]
                body = {"expression": JVP_BODY["expression"], "tasks": tasks}
                job = client.post("/jobs", json=body).json()
                while client.get(f"/jobs/{job['id']}").json()["status"] == "queued":
                    time.sleep(0.01)
                before = client.get(f"/jobs/{job['id']}").json()
                started = time.monotonic()
                busy = time_requests(client, args.requests)
                elapsed = time.monotonic() - started
                after = client.get(f"/jobs/{job['id']}").json()
        finally:
            process.terminate()
            process.wait(timeout=60)

    ran = after["done"] - before["done"]
    still_running = after["status"] == "running"
    rows = [
        ("idle", idle, "-"),
        (f"job of {args.tasks} tasks running", busy, f"{ran / elapsed:.0f}"),
    ]
    print(f"POST /jvp latency, {args.requests} sequential requests per row (ms)")
    print(f"| {'condition':<30} | {'p50':>7} | {'p99':>7} | {'max':>7} | {'job tasks/s':>11} |")
    print(f"| {'-' * 30} | {'-' * 7} | {'-' * 7} | {'-' * 7} | {'-' * 11} |")
    for name, values, rate in rows:
        print(
            f"| {name:<30} | {percentile(values, 50):7.2f} | {percentile(values, 99):7.2f} | "
            f"{max(values):7.2f} | {rate:>11} |"
        )
    print(
        f"job: {before['done']} -> {after['done']} of {after['total']} tasks done while timing"
        + ("" if still_running else " (the job finished before the timing did: raise --tasks)")
    )


if __name__ == "__main__":
    main()
