"""Closed-loop load with `wrk` (POST through bench/wrk/post.lua) and a parser for its report.

`wrk` keeps `connections` requests in flight for `duration_s` and, with
``--latency``, prints the latency percentiles this module reads back.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

POST_LUA = Path(__file__).resolve().parent / "wrk" / "post.lua"
INSTALL_HINT = "wrk not found: install it with `sudo apt-get install -y wrk` (Debian/Ubuntu)"

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_DURATION = re.compile(r"^([\d.]+)(us|ms|s|m|h)$")


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    requests_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    non_2xx: int
    socket_errors: int

    @property
    def ok(self) -> bool:
        return self.requests > 0 and self.non_2xx == 0


def wrk_path() -> str | None:
    return shutil.which("wrk")


def parse_duration_ms(text: str) -> float:
    """'812.00us' -> 0.812, '1.20ms' -> 1.2, '2.01s' -> 2010.0."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"Expected a wrk duration such as '1.20ms', got {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    """Read requests/s, p50/p99, the request count, non-2xx answers and socket errors."""
    percentiles: dict[str, float] = {}
    in_distribution = False
    requests = 0
    duration_s = 0.0
    rps: float | None = None
    non_2xx = 0
    socket_errors = 0
    for raw in output.splitlines():
        line = raw.strip()
        if line.startswith("Latency Distribution"):
            in_distribution = True
            continue
        if in_distribution:
            match = re.match(r"^(\d+)%\s+(\S+)$", line)
            if match:
                percentiles[match.group(1)] = parse_duration_ms(match.group(2))
                continue
            in_distribution = False
        match = re.match(r"^(\d+) requests in ([\d.]+)(us|ms|s|m|h),", line)
        if match:
            requests = int(match.group(1))
            duration_s = parse_duration_ms(match.group(2) + match.group(3)) / 1e3
        elif line.startswith("Requests/sec:"):
            rps = float(line.split()[1])
        elif line.startswith("Non-2xx or 3xx responses:"):
            non_2xx = int(line.split()[-1])
        elif line.startswith("Socket errors:"):
            socket_errors = sum(int(n) for n in re.findall(r"\d+", line))
    if rps is None:
        raise ValueError(f"wrk printed no 'Requests/sec' line:\n{output[-2000:]}")
    return WrkResult(
        requests=requests,
        duration_s=duration_s,
        requests_per_s=rps,
        p50_ms=percentiles.get("50"),
        p99_ms=percentiles.get("99"),
        non_2xx=non_2xx,
        socket_errors=socket_errors,
    )


def run_wrk(
    url: str,
    body: bytes,
    *,
    connections: int,
    duration_s: float,
    content_type: str = "application/json",
    accept: str | None = None,
    threads: int | None = None,
    timeout_s: float = 10.0,
    nice: bool = False,
) -> WrkResult:
    """POST `body` to `url` from `connections` clients for `duration_s`; wrk's report, parsed
    (``nice``: wrk at nice -19, as bench/revisions.py --nice runs the servers)."""
    exe = wrk_path()
    if exe is None:
        raise RuntimeError(INSTALL_HINT)
    # The server shares the machine with wrk: two wrk threads at most.
    threads = threads or max(1, min(2, connections, os.cpu_count() or 1))
    with tempfile.NamedTemporaryFile(prefix="wrk-body-", suffix=".bin") as body_file:
        body_file.write(body)
        body_file.flush()
        env = {
            **os.environ,
            "WRK_BODY_FILE": body_file.name,
            "WRK_CONTENT_TYPE": content_type,
            "WRK_ACCEPT": accept or "",
        }
        argv = [
            *(["nice", "-n", "-19"] if nice else []),
            exe,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(duration_s))}s",
            f"--timeout={max(1, round(timeout_s))}s",
            "--latency",
            "-s",
            str(POST_LUA),
            url,
        ]
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=duration_s + timeout_s + 30
        )
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    return parse_wrk(done.stdout)
