"""Soak test: 20,000 mixed requests from 32 clients against a live server it starts.

    .venv/bin/python -m bench.soak [--requests 20000] [--clients 32]

Every JVP answer is checked against its own reference (closed forms in float64
numpy); the server's resident memory (from /proc) after warm-up (the first
10%) and at the end must differ by under 10%. Prints a table; exits 1 on any
wrong answer, failed request or RSS growth of 10% or more.
"""

from __future__ import annotations

import argparse
import base64
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import LiveServer  # noqa: E402

Check = Callable[[dict], bool]


def arr(obj: dict) -> np.ndarray:
    if "b64" in obj:
        return np.frombuffer(base64.b64decode(obj["b64"]), dtype="<f8").reshape(obj["shape"])
    return np.asarray(obj["data"], dtype=np.float64).reshape(obj["shape"])


def close(got: dict, want: np.ndarray) -> bool:
    return bool(np.allclose(arr(got), want, rtol=1e-10, atol=1e-12))


def make_request(rng: random.Random) -> tuple[str, str, dict | None, Check]:
    """One random request and the check of its answer."""
    kind = rng.randrange(6)
    n = rng.randint(1, 64)
    x = np.array([rng.uniform(-2, 2) for _ in range(n)])
    y = np.array([rng.uniform(-2, 2) for _ in range(n)])
    t = np.array([rng.uniform(-1, 1) for _ in range(n)])
    f64 = {"dtype": "float64"}
    if kind == 0:
        body = {"expression": "x**2 + y", "primals": {"x": x.tolist(), "y": y.tolist()},
                "tangents": {"x": t.tolist()}, "options": f64}  # fmt: skip
        return (
            "POST",
            "/jvp",
            body,
            lambda r: close(r["output"], x**2 + y) and close(r["jvp"], 2 * x * t),
        )
    if kind == 1:
        body = {"expression": "sin(x) * y", "primals": {"x": x.tolist(), "y": y.tolist()},
                "tangents": {"x": t.tolist(), "y": t.tolist()},
                "options": {**f64, "engine": "functional"}}  # fmt: skip
        return (
            "POST",
            "/jvp",
            body,
            lambda r: (
                close(r["output"], np.sin(x) * y)
                and close(r["jvp"], np.cos(x) * t * y + np.sin(x) * t)
            ),
        )
    if kind == 2:
        body = {"expression": "sum(exp(x) * x)", "primals": {"x": x.tolist()},
                "tangents": {"x": t.tolist()}, "options": {**f64, "encoding": "b64"}}  # fmt: skip
        return (
            "POST",
            "/jvp",
            body,
            lambda r: (
                close(r["output"], np.sum(np.exp(x) * x))
                and close(r["jvp"], np.sum(np.exp(x) * (1 + x) * t))
            ),
        )
    if kind == 3:
        m = np.array([[rng.uniform(-1, 1) for _ in range(4)] for _ in range(4)])
        dm = np.array([[rng.uniform(-1, 1) for _ in range(4)] for _ in range(4)])
        raw = base64.b64encode(m.astype("<f8").tobytes()).decode()
        wire = {"shape": [4, 4], "dtype": "float64", "b64": raw}
        body = {"expression": "a @ a", "primals": {"a": wire}, "tangents": {"a": dm.tolist()},
                "options": f64}  # fmt: skip
        return (
            "POST",
            "/jvp",
            body,
            lambda r: close(r["output"], m @ m) and close(r["jvp"], dm @ m + m @ dm),
        )
    if kind == 4:
        return "GET", "/models/linear", None, lambda r: r["name"] == "linear"
    bad = {"expression": "x.__class__", "primals": {"x": 1.0}}
    return "POST", "/jvp", bad, lambda r: r["error"]["type"] == "invalid_expression"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@dataclass
class Tally:
    done: int = 0
    wrong: int = 0
    failed: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    server = LiveServer()
    try:
        pid = server.process.pid
        tally = Tally()
        next_index = iter(range(args.requests))
        index_lock = threading.Lock()
        warm_up = max(1, args.requests // 10)
        rss: dict[str, int] = {}

        def client(worker: int) -> None:
            rng = random.Random(args.seed * 1000 + worker)
            with httpx.Client(base_url=server.url, timeout=120) as http:
                while True:
                    with index_lock:
                        i = next(next_index, None)
                    if i is None:
                        return
                    if i == warm_up:
                        rss["warm"] = rss_bytes(pid)
                    method, path, body, check = make_request(rng)
                    started = time.perf_counter()
                    try:
                        r = http.request(method, path, json=body)
                        ok = check(r.json())
                        status_ok = r.status_code in (200, 400)
                    except Exception as e:  # noqa: BLE001 - a soak test counts every failure
                        ok, status_ok = False, False
                        r = None
                        detail = repr(e)
                    elapsed = (time.perf_counter() - started) * 1e3
                    with tally.lock:
                        tally.done += 1
                        tally.latencies_ms.append(elapsed)
                        if not status_ok:
                            tally.failed += 1
                            if len(tally.examples) < 5:
                                tally.examples.append(detail if r is None else r.text[:200])
                        elif not ok:
                            tally.wrong += 1
                            if len(tally.examples) < 5:
                                tally.examples.append(f"{path}: {r.text[:200] if r else ''}")

        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(w,)) for w in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall_s = time.perf_counter() - started
        rss["end"] = rss_bytes(pid)
    finally:
        server.stop()

    growth = (rss["end"] - rss["warm"]) / rss["warm"] * 100
    lat = sorted(tally.latencies_ms)
    rows = [
        ("requests", f"{tally.done}"),
        ("clients", f"{args.clients}"),
        ("wrong results", f"{tally.wrong}"),
        ("failed requests", f"{tally.failed}"),
        ("wall time (s)", f"{wall_s:.1f}"),
        ("throughput (req/s)", f"{tally.done / wall_s:.0f}"),
        ("latency p50 (ms)", f"{statistics.median(lat):.1f}"),
        ("latency p99 (ms)", f"{lat[int(len(lat) * 0.99) - 1]:.1f}"),
        ("server RSS after warm-up (MiB)", f"{rss['warm'] / 2**20:.1f}"),
        ("server RSS at end (MiB)", f"{rss['end'] / 2**20:.1f}"),
        ("RSS growth (%)", f"{growth:+.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"| {'measure':<{width}} | value |")
    print(f"| {'-' * width} | ----- |")
    for k, v in rows:
        print(f"| {k:<{width}} | {v} |")
    for example in tally.examples:
        print("example:", example)
    return 0 if tally.wrong == 0 and tally.failed == 0 and growth < 10 else 1


if __name__ == "__main__":
    sys.exit(main())
