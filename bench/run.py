"""`make bench`: this service against its peers, side by side, in one run.

Sections (``--only 1,3`` picks some):

1. small requests: x**2 + y**2 on 10x10 at 1, 8 and 64 clients (wrk) against a
   plain FastAPI JSON echo and the Tesseract runtime serving the same function;
2. the built-in `mlp` at 64 clients with dynamic batching on and off, and
   64 separate `torch.func.jvp` vs one `vmap` in process;
3. one 4M-element JVP (2048x2048) through JSON lists, base64 and the binary
   (safetensors) body, against in-process `torch.func.jvp`, a raw-bytes echo
   and the Tesseract runtime;
4. peak RSS of every server process;
5. batch jobs: the local runner against one and two Celery workers on the same job
   (bench/celery_throughput.py; needs this machine's PostgreSQL and RabbitMQ).

It prints the tables as it goes and writes them, the targets with PASS/FAIL and
the machine to docs/benchmarks.md. Everything listens on 127.0.0.1 and every run
is bounded in time. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench import loadgen, roundtrip, servers, workloads  # noqa: E402
from bench.loadgen import WrkResult  # noqa: E402

LACKS_IT = "n/a (server lacks it)"
# Statuses a server without the binary body answers with (no route, media type, or parse).
LACKS_STATUSES = (404, 415, 422)
BATCH_ON = {"JVP_MAX_BATCH_SIZE": "64", "JVP_BATCH_WAIT_US": "2000"}
BATCH_OFF = {"JVP_MAX_BATCH_SIZE": "1"}
SMALL_SHAPE = (10, 10)
BIG_SHAPE = (2048, 2048)
RAW_ECHO = "raw echo (48 MB in, 32 MB out)"
IN_PROCESS = "in-process torch.func.jvp"
SLOW_REQUEST_S = 2.0  # a big request slower than this counts its checked first run
LOAD_AT_START = 0.0  # other work on the machine skews every number: the report shows it

Check = Callable[[bytes], bool]


@dataclass
class Config:
    sections: set[int]
    duration_s: float
    warmup_s: float
    clients: list[int]
    mlp_clients: int
    runs: int
    big_budget_s: float
    big_timeout_s: float
    output: Path
    quick: bool
    service_env: dict[str, str] = field(default_factory=dict)


@dataclass
class Results:
    small: dict[tuple[str, int], WrkResult | str] = field(default_factory=dict)
    small_inprocess: dict[str, float] = field(default_factory=dict)
    mlp: dict[str, WrkResult | str] = field(default_factory=dict)
    mlp_rounds: dict[str, list[str]] = field(default_factory=dict)
    mlp_inprocess: dict[str, float] = field(default_factory=dict)
    big: dict[str, list[float] | str] = field(default_factory=dict)
    rss: list[tuple[str, str, float | None]] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)  # section 5's markdown lines
    notes: list[str] = field(default_factory=list)


def say(text: str) -> None:
    print(text, flush=True)


# ---- servers ------------------------------------------------------------------------------


class Fleet:
    """Servers started on first use, stopped when no later section needs them."""

    def __init__(
        self, workdir: Path, results: Results, service_env: dict[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        self.results = results
        self.service_env = service_env or {}
        self.running: dict[str, servers.Server] = {}
        self.failed: dict[str, str] = {}
        self.used_for: dict[str, list[str]] = {}

    def _make(self, key: str) -> servers.Server:
        if key == "jvp-service":
            return servers.jvp_service(env=self.service_env)
        if key == "jvp-service (batching on)":
            return servers.jvp_service("batch-on", {**self.service_env, **BATCH_ON})
        if key == "jvp-service (batching off)":
            return servers.jvp_service("batch-off", {**self.service_env, **BATCH_OFF})
        if key == "FastAPI echo":
            return servers.uvicorn_app("echo", "bench.peers.echo_app:app")
        if key == "raw echo":
            return servers.uvicorn_app("raw-echo", "bench.peers.raw_echo_app:app")
        if key == "Tesseract runtime":
            return servers.tesseract_runtime(self.workdir / "tesseract-runs")
        raise KeyError(key)

    def get(self, key: str, purpose: str) -> servers.Server | str:
        """The running server, or why it could not start."""
        if key in self.failed:
            return self.failed[key]
        uses = self.used_for.setdefault(key, [])
        if purpose not in uses:
            uses.append(purpose)
        if key in self.running:
            return self.running[key]
        if key == "Tesseract runtime":
            if not (servers.TESSERACT_VENV / "bin" / "tesseract-runtime").exists():
                say(f"  installing {servers.TESSERACT_REQUIREMENT} into {servers.TESSERACT_VENV}")
            reason = servers.ensure_tesseract_venv(self.workdir / "tesseract-pip.log")
            if reason is not None:
                self.failed[key] = f"not run: {reason}"
                self.results.notes.append(f"Tesseract runtime: {reason}")
                return self.failed[key]
        server = self._make(key)
        say(f"  starting {key}")
        try:
            server.start()
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            self.failed[key] = f"did not start: {first}"
            self.results.notes.append(f"{key}: {exc}")
            return self.failed[key]
        self.running[key] = server
        return server

    def stop(self, key: str) -> None:
        server = self.running.pop(key, None)
        if server is None:
            return
        server.stop()
        self.results.rss.append((key, ", ".join(self.used_for.get(key, [])), server.peak_mib))

    def stop_all_but(self, keep: set[str]) -> None:
        for key in list(self.running):
            if key not in keep:
                self.stop(key)


# ---- one measurement ------------------------------------------------------------------------


def _error_text(response: httpx.Response | roundtrip.Reply) -> str:
    text = response.text.strip().replace("\n", " ")
    return f"error {response.status_code}: {text[:120]}"


def load_cell(
    server: servers.Server | str,
    path: str,
    body: bytes,
    clients: int,
    config: Config,
    check: Check,
    accept: str | None = None,
) -> WrkResult | str:
    """One wrk run (after a checked probe request and a warm-up), or why there is none."""
    if isinstance(server, str):
        return server
    if loadgen.wrk_path() is None:
        return "wrk missing"
    url = server.url + path
    headers = {"Content-Type": "application/json", **({"Accept": accept} if accept else {})}
    try:
        probe = httpx.post(url, content=body, headers=headers, timeout=30.0)
    except httpx.HTTPError as exc:
        return f"error: {exc}"
    if probe.status_code != 200:
        return _error_text(probe)
    if not check(probe.content):
        return "wrong answer"

    def drain() -> None:
        # wrk leaves up to `clients` requests in flight when it stops, and the server still
        # computes them: one more request, answered after that backlog, lets the next run
        # start on an idle server.
        try:
            httpx.post(url, content=body, headers=headers, timeout=120.0)
        except httpx.HTTPError:
            pass

    try:
        if config.warmup_s > 0:
            loadgen.run_wrk(
                url, body, connections=clients, duration_s=config.warmup_s, accept=accept
            )
            drain()
        result = loadgen.run_wrk(
            url, body, connections=clients, duration_s=config.duration_s, accept=accept
        )
        drain()
        return result
    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
        return f"wrk failed: {exc}"


def big_cell(
    client: roundtrip.Client,
    server: servers.Server | str,
    path: str,
    body: bytes,
    config: Config,
    check: Check,
    content_type: str = "application/json",
    accept: str | None = None,
    binary: bool = False,
) -> list[float] | str:
    """Seconds of `config.runs` single requests (after a checked warm-up), or why none."""
    if isinstance(server, str):
        return server
    url = server.url + path
    headers = {"Content-Type": content_type, **({"Accept": accept} if accept else {})}

    def once() -> tuple[float, roundtrip.Reply]:
        start = time.perf_counter()
        response = client.post(url, content=body, headers=headers)
        return time.perf_counter() - start, response

    try:
        first_s, response = once()
    except TimeoutError:
        return f"timeout (> {config.big_timeout_s:.0f} s)"
    except roundtrip.ERRORS as exc:
        return f"error: {exc!r}"
    if binary and response.status_code in LACKS_STATUSES:
        return LACKS_IT
    if response.status_code != 200:
        return _error_text(response)
    if not check(response.content):
        return "wrong answer"
    # A request of seconds needs no warm-up: the checked one counts, and the rest of the
    # runs fit in the cell's time budget (at least one sample either way).
    samples = [first_s] if first_s > SLOW_REQUEST_S else []
    left_s = config.big_budget_s - (first_s if samples else 0.0)
    runs = min(config.runs - len(samples), int(left_s / first_s))
    if not samples:
        runs = max(1, runs)
    for _ in range(runs):
        try:
            seconds, response = once()
        except roundtrip.ERRORS as exc:
            return f"error after {len(samples)} runs: {exc!r}"
        if response.status_code != 200:
            return _error_text(response)
        samples.append(seconds)
    return samples


def close_to(expected: np.ndarray, read: Callable[[bytes], np.ndarray]) -> Check:
    def check(body: bytes) -> bool:
        try:
            got = read(body)
        except (KeyError, ValueError, TypeError):
            return False
        return got.shape == expected.shape and bool(
            np.allclose(got, expected, rtol=1e-5, atol=1e-6)
        )

    return check


def read_binary_or_json(body: bytes) -> np.ndarray:
    if body[:1] == b"{":
        return workloads.read_jvp_json(body)
    return workloads.read_jvp_binary(body)


# ---- sections ------------------------------------------------------------------------------


def section_small(fleet: Fleet, config: Config, results: Results) -> None:
    say("\n[1] small requests: x**2 + y**2 on 10x10, tangent for x")
    inputs = workloads.seed_inputs(SMALL_SHAPE)
    expected = workloads.expected_jvp(inputs)
    jvp_body = workloads.jvp_json_body(inputs)
    peers: list[tuple[str, str, bytes, Check, str | None]] = [
        ("jvp-service", "/jvp", jvp_body, close_to(expected, workloads.read_jvp_json), None),
        ("FastAPI echo", "/echo", jvp_body, close_to(inputs["tx"], workloads.read_echo), None),
        (
            "Tesseract runtime",
            "/jacobian_vector_product",
            workloads.tesseract_body(inputs, "json"),
            close_to(expected, workloads.read_tesseract_jvp),
            workloads.tesseract_accept("json"),
        ),
    ]
    for key, path, body, check, accept in peers:
        server = fleet.get(key, "1")
        for clients in config.clients:
            cell = load_cell(server, path, body, clients, config, check, accept)
            results.small[(key, clients)] = cell
            say(f"  {key:18} {clients:3} clients: {fmt_load(cell)}")
    results.small_inprocess = workloads.inprocess_small(SMALL_SHAPE)
    for name, us in results.small_inprocess.items():
        say(f"  in-process {name}: {us:.1f} µs per JVP")


def section_mlp(fleet: Fleet, config: Config, results: Results) -> None:
    say(f"\n[2] mlp 64-256-64 on x[32, 64], {config.mlp_clients} clients")
    body = workloads.mlp_body()
    on, off = "jvp-service (batching on)", "jvp-service (batching off)"
    running = {key: fleet.get(key, "2") for key in (on, off)}
    # Rounds in the order on, off, off, on: a drift in the machine's other load hits both alike.
    rounds: dict[str, list[WrkResult | str]] = {on: [], off: []}
    for key in (on, off, off, on):
        cell = load_cell(running[key], "/jvp", body, config.mlp_clients, config, _is_jvp_json)
        rounds[key].append(cell)
        say(f"  {key:27}: {fmt_load(cell)}")
    for key, cells in rounds.items():
        results.mlp[key] = merge_rounds(cells)
        results.mlp_rounds[key] = [
            f"{c.requests_per_s:,.0f}" if isinstance(c, WrkResult) else c for c in cells
        ]
        fleet.stop(key)
    results.mlp_inprocess = workloads.inprocess_mlp()
    sep, vm = results.mlp_inprocess["separate"], results.mlp_inprocess["vmap"]
    say(f"  in-process: 64 separate jvp {sep:.1f} ms, one vmap {vm:.1f} ms ({sep / vm:.1f}x)")


def section_jobs(results: Results) -> None:
    """Section 5: bench/celery_throughput.py's table (its own API and worker processes, after
    the other sections' servers stopped); a note instead when a service is missing."""
    from bench import celery_throughput

    try:
        run = celery_throughput.measure(2000, [1, 2])
    except (Exception, SystemExit) as e:  # noqa: BLE001 - PostgreSQL or RabbitMQ missing
        results.notes.append(f"Section 5 (batch jobs) did not run: {type(e).__name__}: {e}")
        return
    results.jobs = celery_throughput.markdown(run)
    say("\n".join(results.jobs))


def merge_rounds(cells: list[WrkResult | str]) -> WrkResult | str:
    """All requests over all time; the worse p50 and p99 of the rounds; the first error."""
    for cell in cells:
        if isinstance(cell, str):
            return cell
    done = [c for c in cells if isinstance(c, WrkResult)]
    requests = sum(c.requests for c in done)
    duration_s = sum(c.duration_s for c in done)
    p50s = [c.p50_ms for c in done if c.p50_ms is not None]
    p99s = [c.p99_ms for c in done if c.p99_ms is not None]
    return WrkResult(
        requests=requests,
        duration_s=duration_s,
        requests_per_s=requests / duration_s if duration_s else 0.0,
        p50_ms=max(p50s) if p50s else None,
        p99_ms=max(p99s) if p99s else None,
        non_2xx=sum(c.non_2xx for c in done),
        socket_errors=sum(c.socket_errors for c in done),
    )


def _is_jvp_json(body: bytes) -> bool:
    try:
        return workloads.read_jvp_json(body).shape == (32, 64)
    except (KeyError, ValueError, TypeError):
        return False


def section_big(fleet: Fleet, config: Config, results: Results) -> None:
    say("\n[3] one 4M-element JVP: x**2 + y**2 on 2048x2048 float32, tangent for x")
    inputs = workloads.seed_inputs(BIG_SHAPE, seed=2)
    expected = workloads.expected_jvp(inputs)
    results.big[IN_PROCESS] = workloads.inprocess_big(inputs, config.runs)
    say(f"  {IN_PROCESS:34}: {fmt_big(results.big[IN_PROCESS])}")
    raw = np.concatenate([inputs["x"].ravel(), inputs["y"].ravel(), inputs["tx"].ravel()])
    raw_body = raw.tobytes()

    def raw_check(body: bytes) -> bool:
        return len(body) == len(raw_body) * 2 // 3

    jvp = fleet.get("jvp-service", "3")
    tesseract = fleet.get("Tesseract runtime", "3")
    raw_echo = fleet.get("raw echo", "3")
    json_check = close_to(expected, workloads.read_jvp_json)
    tess_check = close_to(expected, workloads.read_tesseract_jvp)
    cells: list[tuple[str, Callable[[], list[float] | str]]] = []
    with roundtrip.Client(config.big_timeout_s) as client:
        cells = [
            (
                RAW_ECHO,
                lambda: big_cell(
                    client,
                    raw_echo,
                    "/echo",
                    raw_body,
                    config,
                    raw_check,
                    content_type="application/octet-stream",
                ),
            ),
            (
                "jvp-service binary (safetensors)",
                lambda: big_cell(
                    client,
                    jvp,
                    "/jvp",
                    workloads.jvp_binary_body(inputs),
                    config,
                    close_to(expected, read_binary_or_json),
                    content_type=workloads.SAFETENSORS,
                    accept=workloads.SAFETENSORS,
                    binary=True,
                ),
            ),
            (
                "jvp-service base64 (form 3)",
                lambda: big_cell(
                    client, jvp, "/jvp", workloads.jvp_b64_body(inputs), config, json_check
                ),
            ),
            (
                "jvp-service JSON lists (form 1)",
                lambda: big_cell(
                    client, jvp, "/jvp", workloads.jvp_json_body(inputs), config, json_check
                ),
            ),
            (
                "Tesseract runtime base64",
                lambda: big_cell(
                    client,
                    tesseract,
                    "/jacobian_vector_product",
                    workloads.tesseract_body(inputs, "base64"),
                    config,
                    tess_check,
                    accept=workloads.tesseract_accept("base64"),
                ),
            ),
            (
                "Tesseract runtime JSON lists",
                lambda: big_cell(
                    client,
                    tesseract,
                    "/jacobian_vector_product",
                    workloads.tesseract_body(inputs, "json"),
                    config,
                    tess_check,
                    accept=workloads.tesseract_accept("json"),
                ),
            ),
        ]
        for label, measure in cells:
            results.big[label] = measure()
            say(f"  {label:34}: {fmt_big(results.big[label])}")


# ---- formatting -----------------------------------------------------------------------------


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "?"
    return f"{ms:.2f}" if ms < 10 else f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}"


def fmt_load(cell: WrkResult | str | None) -> str:
    if cell is None:
        return "not run"
    if isinstance(cell, str):
        return cell
    if cell.requests == 0:
        return f"no answer completed in {cell.duration_s:.0f} s"
    text = (
        f"{cell.requests_per_s:,.0f} req/s "
        f"(p50 {fmt_ms(cell.p50_ms)} / p99 {fmt_ms(cell.p99_ms)} ms)"
    )
    if cell.non_2xx or cell.socket_errors:
        text += f" [{cell.non_2xx} non-2xx, {cell.socket_errors} socket errors]"
    return text


def fmt_big(cell: list[float] | str | None) -> str:
    if cell is None:
        return "not run"
    if isinstance(cell, str):
        return cell
    return (
        f"min {fmt_ms(min(cell) * 1e3)} ms, median {fmt_ms(statistics.median(cell) * 1e3)} ms "
        f"({len(cell)} runs)"
    )


def _rps(cell: WrkResult | str | None) -> float | None:
    if isinstance(cell, WrkResult) and cell.ok:
        return cell.requests_per_s
    return None


def _median_s(cell: list[float] | str | None) -> float | None:
    return statistics.median(cell) if isinstance(cell, list) and cell else None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None
    bound: float
    at_least: bool  # value >= bound passes (else value <= bound passes)

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "n/a"
        passed = self.value >= self.bound if self.at_least else self.value <= self.bound
        return "PASS" if passed else "FAIL"


def targets(results: Results) -> list[Target]:
    small8 = {key: _rps(results.small.get((key, 8))) for key in _small_keys()}
    big = {label: _median_s(cell) for label, cell in results.big.items()}
    floor = None
    if big.get(RAW_ECHO) and big.get(IN_PROCESS):
        floor = big[RAW_ECHO] + big[IN_PROCESS]  # type: ignore[operator]
    binary = big.get("jvp-service binary (safetensors)")
    tess = [v for k, v in big.items() if k.startswith("Tesseract") and v is not None]
    return [
        Target(
            "Small, 8 clients: jvp-service req/s ≥ 3x the Tesseract runtime",
            _div(small8["jvp-service"], small8["Tesseract runtime"]),
            3.0,
            True,
        ),
        Target(
            "Small, 8 clients: jvp-service req/s ≥ 0.7x the FastAPI echo",
            _div(small8["jvp-service"], small8["FastAPI echo"]),
            0.7,
            True,
        ),
        Target(
            "MLP, 64 clients: batching on ≥ 2.5x batching off (req/s)",
            _div(
                _rps(results.mlp.get("jvp-service (batching on)")),
                _rps(results.mlp.get("jvp-service (batching off)")),
            ),
            2.5,
            True,
        ),
        Target(
            "4M JVP: binary ≤ 1.3x (raw echo + in-process JVP), medians",
            _div(binary, floor),
            1.3,
            False,
        ),
        Target(
            "4M JVP: base64 ≤ 2.5x (raw echo + in-process JVP), medians",
            _div(big.get("jvp-service base64 (form 3)"), floor),
            2.5,
            False,
        ),
        Target(
            "4M JVP: binary ≥ 3x faster than the Tesseract runtime (its fastest encoding)",
            _div(min(tess) if tess else None, binary),
            3.0,
            True,
        ),
    ]


def _small_keys() -> list[str]:
    return ["jvp-service", "FastAPI echo", "Tesseract runtime"]


def machine() -> list[tuple[str, str]]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except OSError:
        pass
    import torch

    wrk = loadgen.wrk_path()
    wrk_version = "missing"
    if wrk:
        done = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10)
        wrk_version = (done.stdout or done.stderr).splitlines()[0].split(" Copyright")[0]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=servers.ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    return [
        ("CPU", cpu),
        ("cores", str(os.cpu_count())),
        ("RAM", ram),
        ("OS", platform.platform()),
        ("Python", platform.python_version()),
        ("torch", torch.__version__),
        ("wrk", wrk_version),
        ("commit", commit or "?"),
        ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("load average (1 min) at start / end", f"{LOAD_AT_START:.2f} / {os.getloadavg()[0]:.2f}"),
    ]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _load_md(cell: WrkResult | str | None) -> str:
    if isinstance(cell, WrkResult) and cell.requests == 0:
        return fmt_load(cell)
    if isinstance(cell, WrkResult):
        text = f"{cell.requests_per_s:,.0f} ({fmt_ms(cell.p50_ms)} / {fmt_ms(cell.p99_ms)})"
        if cell.non_2xx or cell.socket_errors:
            text += f" ⚠ {cell.non_2xx} non-2xx, {cell.socket_errors} socket errors"
        return text
    return "not run" if cell is None else cell


def report(config: Config, results: Results) -> str:
    out = ["# Benchmarks", ""]
    out += [
        "Written by `make bench` (`bench/run.py`"
        + (" --quick" if config.quick else "")
        + "); see bench/README.md for what each number means. "
        f"Load cells ran {config.duration_s:.0f} s each after a {config.warmup_s:.0f} s "
        f"warm-up; single big requests {config.runs} runs each after a checked warm-up.",
        "",
        "## Machine",
        "",
    ]
    env = ", ".join(f"`{k}={v}`" for k, v in config.service_env.items()) or "none"
    about = [*machine(), ("extra jvp-service environment (--service-env)", env)]
    out += _table(["", ""], [[k, v] for k, v in about])
    if 1 in config.sections:
        out += ["", "## 1. Small requests: x**2 + y**2 on 10x10, tangent for x", ""]
        out += ["req/s (p50 / p99 latency in ms), wrk, one body per request:", ""]
        rows = [
            [key] + [_load_md(results.small.get((key, c))) for c in config.clients]
            for key in _small_keys()
        ]
        out += _table(["server"] + [f"{c} clients" for c in config.clients], rows)
        if results.small_inprocess:
            out += ["", "In process, one thread of this machine (no HTTP):", ""]
            out += _table(
                ["JVP", "µs per call"],
                [[k, f"{v:.1f}"] for k, v in results.small_inprocess.items()],
            )
    if 2 in config.sections:
        out += [
            "",
            f"## 2. MLP 64-256-64 on x[32, 64], tangent for x, {config.mlp_clients} clients",
            "",
            "Base64 tensors both ways. Batching on: "
            "`JVP_MAX_BATCH_SIZE=64 JVP_BATCH_WAIT_US=2000`; off: `JVP_MAX_BATCH_SIZE=1`. "
            "Both servers run at once and take turns (on, off, off, on); req/s is all "
            "requests over all rounds.",
            "",
        ]
        out += _table(
            ["server", "req/s (worst p50 / p99 ms)", "req/s per round"],
            [
                [key, _load_md(cell), ", ".join(results.mlp_rounds.get(key, []))]
                for key, cell in results.mlp.items()
            ],
        )
        if results.mlp_inprocess:
            sep, vm = results.mlp_inprocess["separate"], results.mlp_inprocess["vmap"]
            out += [
                "",
                f"In process: 64 separate `torch.func.jvp` {sep:.1f} ms, the same 64 as one "
                f"`torch.func.vmap` over the JVP {vm:.1f} ms ({sep / vm:.1f}x).",
            ]
    if 3 in config.sections:
        out += [
            "",
            "## 3. One 4M-element JVP: x**2 + y**2 on 2048x2048 float32, tangent for x",
            "",
            "Round trip of one request (send 48 MB of tensors, receive output and JVP) "
            "over one kept-open connection (the standard library's http.client, "
            "bench/roundtrip.py), after a warm-up request whose answer is checked against "
            "numpy.",
            "",
        ]
        floor = None
        big = {label: _median_s(cell) for label, cell in results.big.items()}
        raw_s = big.get(RAW_ECHO)
        inproc_s = big.get(IN_PROCESS)
        if raw_s and inproc_s:
            floor = raw_s + inproc_s
        rows = []
        for label, cell in results.big.items():
            if isinstance(cell, list):
                reference = label in (RAW_ECHO, IN_PROCESS)
                ratio = None if reference else _div(statistics.median(cell), floor)
                rows.append(
                    [
                        label,
                        fmt_ms(min(cell) * 1e3),
                        fmt_ms(statistics.median(cell) * 1e3),
                        str(len(cell)),
                        f"{ratio:.2f}x" if ratio is not None else "",
                    ]
                )
            else:
                rows.append([label, cell, "", "", ""])
        out += _table(["path", "min ms", "median ms", "runs", "vs raw echo + in-process"], rows)
    out += ["", "## 4. Peak RSS of each server process (VmHWM)", ""]
    out += _table(
        ["server", "sections", "peak RSS MiB"],
        [[k, used, f"{mib:.0f}" if mib is not None else "?"] for k, used, mib in results.rss],
    )
    if results.jobs:
        out += ["", "## 5. Batch jobs: the local runner and Celery workers", "", *results.jobs]
    out += ["", "## Targets", ""]
    rows = []
    for t in targets(results):
        rows.append(
            [
                t.name,
                f"{t.value:.2f}" if t.value is not None else "n/a",
                ("≥ " if t.at_least else "≤ ") + f"{t.bound:g}",
                t.verdict,
            ]
        )
    out += _table(["target", "measured", "needed", "result"], rows)
    if results.notes:
        out += ["", "## Notes", ""] + [f"- {note.splitlines()[0]}" for note in results.notes]
    out += [
        "",
        "Caveats: wrk, the server and (for the in-process rows) torch share the same cores; "
        "the Tesseract runtime runs as shipped (`tesseract-runtime serve`, one worker, its "
        "access log and per-request run folder on) and its JVP endpoint returns only the JVP, "
        "while this service returns the output too.",
        "",
    ]
    return "\n".join(out)


# ---- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="Short cells (3 s, 2 runs).")
    parser.add_argument("--only", default="1,2,3,5", help="Sections to run, e.g. '1,3'.")
    parser.add_argument("--duration", type=float, help="Seconds per load cell (default 5).")
    parser.add_argument("--warmup", type=float, help="Warm-up seconds per load cell (default 1).")
    parser.add_argument("--runs", type=int, help="Timed runs per big request (default 5).")
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="An environment variable for every jvp-service server (repeatable), e.g. "
        "OMP_WAIT_POLICY=PASSIVE; the report lists them.",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=servers.ROOT / "docs" / "benchmarks.md",
        help="Markdown report (default docs/benchmarks.md).",
    )
    args = parser.parse_args(argv)
    try:
        sections = {int(s) for s in args.only.split(",") if s.strip()}
    except ValueError:
        parser.error(f"--only expects section numbers such as '1,3', got {args.only!r}")
    bad = [item for item in args.service_env if "=" not in item]
    if bad:
        parser.error(f"--service-env expects NAME=VALUE, got {bad[0]!r}")
    if not sections <= {1, 2, 3, 4, 5}:
        parser.error(f"--only expects sections among 1, 2, 3, 5 (4 always runs), got {args.only!r}")
    return Config(
        sections=sections,
        duration_s=args.duration or (3.0 if args.quick else 5.0),
        warmup_s=args.warmup if args.warmup is not None else 1.0,
        clients=[1, 8, 64],
        mlp_clients=64,
        runs=args.runs or (2 if args.quick else 5),
        big_budget_s=10.0 if args.quick else 25.0,
        big_timeout_s=120.0,
        output=args.output,
        quick=args.quick,
        service_env=dict(item.split("=", 1) for item in args.service_env),
    )


def main(argv: list[str] | None = None) -> int:
    global LOAD_AT_START
    LOAD_AT_START = os.getloadavg()[0]
    config = parse_args(argv)
    results = Results()
    if loadgen.wrk_path() is None and config.sections & {1, 2}:
        say(loadgen.INSTALL_HINT)
        results.notes.append(loadgen.INSTALL_HINT)
    started = time.monotonic()
    needs = {
        1: {"jvp-service", "FastAPI echo", "Tesseract runtime"},
        2: set(),
        3: {"jvp-service", "raw echo", "Tesseract runtime"},
    }
    with tempfile.TemporaryDirectory(prefix="jvp-bench-") as tmp:
        fleet = Fleet(Path(tmp), results, config.service_env)
        try:
            for number, run in ((1, section_small), (2, section_mlp), (3, section_big)):
                if number not in config.sections:
                    continue
                run(fleet, config, results)
                later = set().union(*(needs[n] for n in config.sections if n > number))
                fleet.stop_all_but(later)
        finally:
            fleet.stop_all_but(set())
    if 5 in config.sections:
        section_jobs(results)
    text = report(config, results)
    config.output.parent.mkdir(parents=True, exist_ok=True)
    config.output.write_text(text)
    say("\n" + text)
    say(f"wrote {config.output} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
