"""Job throughput with Celery workers against the local runner, on the same job, in one run.

    .venv/bin/python bench/celery_throughput.py [--tasks 2000] [--workers 1,2] [--broker amqp]

Needs this machine's PostgreSQL (127.0.0.1:5432, db test) and RabbitMQ (127.0.0.1:5672,
the default broker; --broker redis: Redis 127.0.0.1:6379 db 15). Makes two fresh
PostgreSQL schemas (one per backend) and a queue of its own, then times one job of
--tasks tasks (`sin(x) * y + x**2` on 64 float32 elements, tangents for x and y, b64
tensors) from POST /jobs to `completed`: on one `jvp-service serve` with the local
runner (JVP_JOBS_BACKEND=local), and on one `jvp-service serve` with
JVP_JOBS_BACKEND=celery with, for each worker count, that many `jvp-service worker
--device cpu` processes. Every runner goes --rounds times (3), in turn, and the table
shows each one's median. Every process computes with one torch thread and the default
settings otherwise (--chunk-size sets JVP_CELERY_CHUNK_SIZE). Prints the load average
before and after, a table with the ratios, and PASS/FAIL against the targets of issue 20
(from POST /jobs to `completed`, waited for as the SDK waits: GET /jobs/{id}?wait_s=): one
worker at least 0.8x the local runner, two workers at least 1.5x one; then the most two
workers could reach over one on this machine from the CPU seconds measured (NOTE [the
two-worker bound]). The table's last columns leave out the POST itself (decoding and
storing the job in the API process, the same for every runner), and show every round.
Removes the schemas and the queue at the end.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BROKERS = {"amqp": "amqp://guest:guest@127.0.0.1:5672//", "redis": "redis://127.0.0.1:6379/15"}
ONE_WORKER_TARGET = 0.8  # one worker's tasks/s over the local runner's
TWO_WORKERS_TARGET = 1.5  # two workers' over one's


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


def wait(check: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def serve(env: dict[str, str], log: Any) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = start(["serve", "--port", str(port), "--log-level", "warning"], env, log)

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait(ready, 120, "the API")
    return api, url


POSTS: list[float] = []  # seconds each timed POST /jobs took to answer 202
CPUS: list[dict[str, float]] = []  # CPU seconds each timed job took, by kind of process
POST_CPUS: list[float] = []  # CPU seconds of the whole machine during each timed POST /jobs
KINDS = ("API", "workers", "PostgreSQL", "RabbitMQ", "Redis", "bench", "other")
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """Each process's CPU seconds so far (user + system, from /proc) and its kind; empty
    where there is no /proc."""
    found: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # it ended meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        found[int(entry.name)] = (kind_of(int(entry.name), name, cmd), stat_seconds(stat))
    return found


def stat_seconds(stat: str) -> float:
    """User + system CPU seconds in a /proc/<pid>/stat line (after the command in parentheses,
    which may hold spaces)."""
    utime, stime = stat[stat.rindex(")") + 2 :].split()[11:13]
    return (int(utime) + int(stime)) / TICK


def kind_of(pid: int, name: str, cmd: str) -> str:
    if "app.cli serve" in cmd:
        return "API"
    if "app.cli worker" in cmd:
        return "workers"
    if name.startswith("postgres"):
        return "PostgreSQL"
    if name.startswith("beam") or "rabbitmq" in cmd:
        return "RabbitMQ"
    if name.startswith("redis"):
        return "Redis"
    return "bench" if pid == os.getpid() else "other"


def cpu_spent(before: dict[int, tuple[str, float]]) -> float:
    """CPU seconds the processes of `before` spent since, in all (their /proc stat only:
    about 1 ms for a machine's hundred processes, read while a job runs)."""
    total = 0.0
    for pid, (_, seconds) in before.items():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue  # it ended meanwhile
        total += stat_seconds(stat) - seconds
    return total


def cpu_since(before: dict[int, tuple[str, float]]) -> dict[str, float]:
    spent = dict.fromkeys(KINDS, 0.0)
    for pid, (kind, seconds) in cpu_by_process().items():
        spent[kind] += seconds - (before[pid][1] if pid in before else 0.0)
    return spent


def time_job(url: str, body: dict[str, Any]) -> float:
    """Seconds from POST /jobs to `completed` (every task done, none failed), as the SDK's
    `wait` sees it: the service answers its poll as the job ends. The body is encoded, and
    the HTTP client made, before the clock starts: neither the client's JSON encoder nor its
    set-up is the service's time. One client over one connection, as the SDK's: a new httpx
    client per poll costs about 20 ms of CPU (its SSL context), which on 2 cores is taken
    from the workers being measured."""
    content = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=url, timeout=120) as http:
        cpu = cpu_by_process()
        t0 = time.perf_counter()
        r = http.post("/jobs", content=content, headers=headers)
        r.raise_for_status()
        POSTS.append(time.perf_counter() - t0)
        POST_CPUS.append(cpu_spent(cpu))
        job_id = r.json()["id"]

        deadline = time.monotonic() + 1800
        while True:  # each poll answered at the job's end (GET /jobs/{id}?wait_s=), as the SDK's
            job = http.get(f"/jobs/{job_id}", params={"wait_s": 30}).json()
            if job["status"] == "completed":
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for job {job_id}: {job}")
        if job["failed"]:
            raise SystemExit(f"{job['failed']} tasks failed")
        seconds = time.perf_counter() - t0
        CPUS.append(cpu_since(cpu))
        return seconds


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    os.killpg(process.pid, sig)
    process.wait(timeout=30)


def time_local(env: dict[str, str], body: dict[str, Any], logdir: Path) -> float:
    with (logdir / "local.log").open("wb") as log:
        api, url = serve({**env, "JVP_JOBS_BACKEND": "local"}, log)
        try:
            time_job(url, job_body(256))  # warm: the expression compiled, the engine's paths
            return time_job(url, body)
        finally:
            stop(api)


def time_workers(
    url: str, env: dict[str, str], workers: int, body: dict[str, Any], logdir: Path
) -> float:
    logs = [(logdir / f"worker-{workers}-{i}.log").open("wb") for i in range(workers)]
    procs = [start(["worker", "--device", "cpu"], env, log) for log in logs]
    try:
        for i in range(workers):
            path = logdir / f"worker-{workers}-{i}.log"
            wait(ready(path), 120, f"worker {i}")
        time_job(url, job_body(256 * workers))  # warm every worker (16 chunks: each gets some)
        return time_job(url, body)
    finally:
        for p in procs:
            stop(p, signal.SIGKILL)
        for log in logs:
            log.close()


def ready(log: Path) -> Callable[[], bool]:
    """Whether the worker writing `log` built its engine (its pool child warmed up)."""
    return lambda: b"engine ready" in log.read_bytes()


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def verdict(value: float, target: float) -> str:
    return f"{value:.2f}x ({'PASS' if value >= target else 'FAIL'}: target >= {target}x)"


@dataclass
class Run:
    """One run of the benchmark: for each runner, per round, (seconds, of which the POST)."""

    tasks: int
    broker: str
    rows: dict[str, list[tuple[float, float]]]
    load_before: str
    load_after: str
    cpu: dict[str, list[dict[str, float]]]  # per runner, per round: CPU seconds by kind
    post_cpu: dict[str, list[float]]  # per runner, per round: CPU seconds during the POST


def new_schema(admin: Any) -> str:
    schema = f"jvp_bench_{uuid.uuid4().hex[:8]}"
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    return schema


# A long function on purpose: the run's setup and teardown (schemas, queue, API) in one place.
def measure(
    tasks: int, workers: list[int], broker: str = "amqp", chunk_size: int = 0, rounds: int = 3
) -> Run:
    """Time the local runner, then each count of Celery workers, on one job of `tasks`;
    `rounds` times in turn (local, 1, 2, local, 1, 2, ...), so that a burst of other work
    on the machine falls on one cell of one round rather than on one runner."""
    admin = create_engine(PG)
    schemas = [new_schema(admin), new_schema(admin)]  # the local runner's, the workers'
    queue = f"jvp-bench-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "JVP_BROKER_URL": BROKERS[broker],
        "JVP_CELERY_QUEUE": queue,
        "JVP_NUM_THREADS": "1",
        "JVP_DEVICE": "cpu",
    }
    if chunk_size:
        env["JVP_CELERY_CHUNK_SIZE"] = str(chunk_size)
    local_env, celery_env = (
        {**env, "JVP_DATABASE_URL": f"{PG}?options=-csearch_path%3D{schema}"} for schema in schemas
    )
    logdir = Path(tempfile.mkdtemp(prefix="jvp-celery-bench-"))
    body = job_body(tasks)
    before = load()
    local = "local runner (in the API process)"
    rows: dict[str, list[tuple[float, float]]] = {local: []}
    cpu: dict[str, list[dict[str, float]]] = {local: []}
    post_cpu: dict[str, list[float]] = {local: []}
    try:
        with (logdir / "api.log").open("wb") as log:
            api, url = serve({**celery_env, "JVP_JOBS_BACKEND": "celery"}, log)
            try:
                for r in range(rounds):
                    rows[local].append((time_local(local_env, body, logdir), POSTS[-1]))
                    cpu[local].append(CPUS[-1])
                    post_cpu[local].append(POST_CPUS[-1])
                    for n in workers:
                        seconds = time_workers(url, celery_env, n, body, logdir)
                        name = f"{n} Celery worker(s), {broker}"
                        rows.setdefault(name, []).append((seconds, POSTS[-1]))
                        cpu.setdefault(name, []).append(CPUS[-1])
                        post_cpu.setdefault(name, []).append(POST_CPUS[-1])
                    done = ", ".join(f"{tasks / v[-1][0]:.0f}" for v in rows.values())
                    print(f"round {r + 1}: tasks/s {done}", file=sys.stderr)
            finally:
                stop(api)
    finally:
        with admin.begin() as conn:
            for schema in schemas:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
        drop_queue(broker, queue)
    return Run(tasks, broker, rows, before, load(), cpu, post_cpu)


def markdown(run: Run) -> list[str]:
    """The table, the ratios and PASS/FAIL, as markdown lines (bench/run.py's section 5)."""
    med = {
        name: (statistics.median(s for s, _ in cells), statistics.median(p for _, p in cells))
        for name, cells in run.rows.items()
    }
    rates = [run.tasks / seconds for seconds, _ in med.values()]
    rounds = len(next(iter(run.rows.values())))
    out = [
        f"{run.tasks} tasks of `sin(x) * y + x**2` on 64 float32 (b64), from POST /jobs to "
        f"`completed`, one torch thread per process, {os.cpu_count()} CPUs, the median of "
        f"{rounds} rounds taken in turn, load average {run.load_before} before, "
        f"{run.load_after} after:",
        "",
        "| runner | seconds | of which POST /jobs | tasks/s | ratio | tasks/s after the 202 "
        "| tasks/s by round |",
        "| ------ | ------- | ------------------- | ------- | ----- | --------------------- "
        "| ---------------- |",
    ]
    for i, ((name, (seconds, post)), rate) in enumerate(zip(med.items(), rates, strict=True)):
        ratio = f"{rate / rates[0]:.2f}x local"
        if i == 2:
            ratio += f", {rate / rates[1]:.2f}x one"
        after = run.tasks / (seconds - post)
        by_round = ", ".join(f"{run.tasks / s:.0f}" for s, _ in run.rows[name])
        out.append(
            f"| {name} | {seconds:.2f} | {post:.2f} | {rate:.0f} | {ratio} | {after:.0f} "
            f"| {by_round} |"
        )
    out += ["", *cpu_table(run, med)]
    out.append("")
    if len(rates) > 1:
        out.append(
            f"- one worker / local runner: {verdict(rates[1] / rates[0], ONE_WORKER_TARGET)}"
        )
    if len(rates) > 2:
        out.append(
            f"- two workers / one worker: {verdict(rates[2] / rates[1], TWO_WORKERS_TARGET)}"
        )
        out.append(bound(run, med))
    return out


def bound(run: Run, med: dict[str, tuple[float, float]]) -> str:
    """The most two workers could gain over one on this machine, from what was measured.

    # NOTE [the two-worker bound]
    The two-worker job cannot end before its POST /jobs has answered (nothing is stored
    before: the POST is the same serial work for every runner), nor before the rest of
    its CPU seconds, spread perfectly over the machine's cores, are spent. So it takes at
    least P + (C - Cp) / cores, P the POST's seconds, C the job's CPU seconds (every
    process of the machine), Cp those spent during the POST; one worker's measured
    seconds over that bound is the most any scheduling of the same work could reach."""
    names = list(med)
    one, two = med[names[1]][0], names[2]
    post = med[two][1]
    cpu = statistics.median(sum(c.values()) for c in run.cpu[two])
    during_post = statistics.median(run.post_cpu[two])
    cores = os.cpu_count() or 1
    floor = post + max(0.0, cpu - during_post) / cores
    return (
        f"- the most two workers could reach over one here: {one / floor:.2f}x (one worker's "
        f"{one:.2f} s over the two-worker job's least possible {floor:.2f} s: its POST, "
        f"{post:.2f} s with {during_post:.2f} CPU-s, then its other {cpu - during_post:.2f} "
        f"CPU-s spread perfectly over {cores} cores; NOTE [the two-worker bound])"
    )


def cpu_table(run: Run, med: dict[str, tuple[float, float]]) -> list[str]:
    """CPU seconds of each runner's timed job by kind of process (the median of the rounds;
    the whole machine's, not only this benchmark's), and the cores busy on average."""
    kinds = [k for k in KINDS if any(c[k] >= 0.005 for cells in run.cpu.values() for c in cells)]
    out = [
        "CPU seconds of the timed job by process (median of the rounds), and the cores that "
        "kept busy on average over it (CPU seconds / seconds):",
        "",
        "| runner | " + " | ".join(kinds) + " | all | cores busy |",
        "| ------ | " + " | ".join("-" * len(k) for k in kinds) + " | --- | ---------- |",
    ]
    for name, cells in run.cpu.items():
        spent = {k: statistics.median(c[k] for c in cells) for k in kinds}
        total = statistics.median(sum(c.values()) for c in cells)
        busy = total / med[name][0]
        out.append(
            f"| {name} | "
            + " | ".join(f"{spent[k]:.2f}" for k in kinds)
            + f" | {total:.2f} | {busy:.2f} of {os.cpu_count()} |"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument(
        "--chunk-size", type=int, default=0, help="JVP_CELERY_CHUNK_SIZE (default: its default)"
    )
    parser.add_argument("--workers", default="1,2", help="worker process counts to time")
    parser.add_argument("--broker", choices=sorted(BROKERS), default="amqp")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every runner in turn")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    run = measure(args.tasks, workers, args.broker, args.chunk_size, args.rounds)
    print("\n" + "\n".join(markdown(run)))


def drop_queue(broker: str, queue: str) -> None:
    if broker == "amqp":
        import kombu

        with kombu.Connection(BROKERS["amqp"], connect_timeout=3) as conn:
            conn.default_channel.queue_delete(queue)
        return
    import redis

    client = redis.Redis.from_url(BROKERS["redis"])
    client.delete(queue, f"_kombu.binding.{queue}")
    client.close()


if __name__ == "__main__":
    main()
