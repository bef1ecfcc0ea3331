"""K single POST /jvp calls against one call with ``options.tangent_batch`` (K = 1, 8, 64).

    .venv/bin/python -m bench.tangent_batch [--repeat 5] [--ks 1,8,64]

Starts `jvp-service serve` on a free 127.0.0.1 port (CPU, its default settings),
sends the same K directions both ways over one keep-alive connection (b64
tensors, float32), and prints the median wall time of each way, the speed-up,
and the largest difference between the two answers (they must agree). Nothing is
asserted about speed; the table is the result.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wire(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"shape": list(a.shape), "dtype": "float32", "b64": base64.b64encode(a.data).decode()}


def unwire(obj: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(obj["b64"]), dtype="<f4").reshape(obj["shape"])


class Server:
    def __init__(self) -> None:
        self.url = f"http://{HOST}:{free_port()}"
        self.log = tempfile.NamedTemporaryFile(prefix="jvp-bench-", suffix=".log")  # noqa: SIM115
        port = self.url.rsplit(":", 1)[1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", port, "--log-level", "warning"],
            cwd=ROOT,
            env={**os.environ, "JVP_DEVICE": os.environ.get("JVP_DEVICE", "cpu")},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(Path(self.log.name).read_text(errors="replace"))
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("the server did not become ready within 120 s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.log.close()


WORKLOADS: dict[str, tuple[dict[str, Any], dict[str, tuple[int, ...]]]] = {
    # name: (request without tangents, the shape of each tangent)
    "x**2 + y**2, 10x10": (
        {"expression": "x**2 + y**2"},
        {"x": (10, 10), "y": (10, 10)},
    ),
    "mlp, x 32x64": ({"model": "mlp"}, {"x": (32, 64)}),
}


def median_ms(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times), result


def _jvps(post: Callable[[dict[str, Any]], dict[str, Any]], bodies: list[Any]) -> np.ndarray:
    return np.stack([unwire(post(body)["jvp"]) for body in bodies])


def run(url: str, ks: list[int], repeat: int) -> list[tuple[str, int, float, float, float]]:
    rng = np.random.default_rng(0)
    rows = []
    with httpx.Client(base_url=url, timeout=120) as client:

        def post(body: dict[str, Any]) -> dict[str, Any]:
            r = client.post("/jvp", json=body)
            r.raise_for_status()
            result: dict[str, Any] = r.json()
            return result

        for name, (request, shapes) in WORKLOADS.items():
            primals = {n: wire(rng.standard_normal(s)) for n, s in shapes.items()}
            options = {"dtype": "float32", "encoding": "b64"}
            for k in ks:
                directions = {n: rng.standard_normal((k, *s)) for n, s in shapes.items()}
                base = {**request, "primals": primals}
                single_bodies = [
                    {
                        **base,
                        "tangents": {n: wire(v[i]) for n, v in directions.items()},
                        "options": options,
                    }
                    for i in range(k)
                ]
                batch_body = {
                    **base,
                    "tangents": {n: wire(v) for n, v in directions.items()},
                    "options": {**options, "tangent_batch": True},
                }
                singles = partial(_jvps, post, single_bodies)
                batched = partial(_jvps, post, [batch_body])
                single_ms, single_out = median_ms(singles, repeat)
                batch_ms, batch_out = median_ms(batched, repeat)
                diff = float(np.abs(single_out - batch_out[0]).max())
                rows.append((name, k, single_ms, batch_ms, diff))
                print(
                    f"  {name:<20} K={k:<3} {single_ms:9.2f} ms vs {batch_ms:8.2f} ms",
                    file=sys.stderr,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per cell; the median counts")
    parser.add_argument("--ks", default="1,8,64", help="comma-separated K values")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    server = Server()
    try:
        rows = run(server.url, ks, args.repeat)
    finally:
        server.stop()
    print(
        "| workload | K | K single /jvp calls (ms) | one batched call (ms) | speed-up "
        "| max abs diff |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, k, single_ms, batch_ms, diff in rows:
        print(
            f"| {name} | {k} | {single_ms:.2f} | {batch_ms:.2f} | {single_ms / batch_ms:.1f}x "
            f"| {diff:.1e} |"
        )
    print(f"\n(median of {args.repeat} runs; CPU; float32; b64 tensors; one keep-alive connection)")


if __name__ == "__main__":
    main()
