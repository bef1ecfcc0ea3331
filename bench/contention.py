"""Throughput beside a busy core: quiet against one CPU kept busy by another process.

    .venv/bin/python -m bench.contention            # about 4 minutes on 2 cores

For each server configuration, a small expression (``x**2 + y**2`` on 10x10,
JSON lists) and a 64-256-64 MLP from the model repository (a `torch.export`
program on x[32, 64], base64), once as a repository model is by default (no
batching: ``max_batch_size`` 0) and once with ``max_batch_size`` 64 in its
``config.json`` (dynamic batching on the engine's defaults), at 16 clients
(wrk), each measured quiet and
beside a bounded busy loop in another process. All servers are started first;
each round then visits every configuration and workload in turn, quiet and busy
(busy first in every other round), so a drift of the machine's other load hits
every row alike. The table shows the median of the rounds, their range, and
busy/quiet. Configurations:

* ``before``: torch's own default, one intra-op thread per core
  (``OMP_NUM_THREADS`` = the cores, OpenMP's wait policy), as before issue 22;
* ``default``: this service's defaults (NOTE [CPU threads] in
  app/engine/cpu_budget.py);
* ``taskset 1 CPU``: the defaults with the service started under ``taskset -c``
  to one CPU (as a cgroup quota would leave it), the busy loop on that CPU too;
* with ``--pool``: ``--workers 2`` (two API processes, each with its engine).

The threads column is what the service reports on ``GET /metrics``
(``jvp_cpu_usable`` / ``jvp_cpu_threads``). The load average before each round
is printed: other work on the machine skews every number, so compare rows of one
run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python bench/contention.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench import loadgen, servers, workloads  # noqa: E402
from bench.loadgen import WrkResult  # noqa: E402
from bench.run import Config, close_to, load_cell  # noqa: E402

MODEL = "mlp64"
BATCHED_MODEL = "mlp64-batched"  # the same program, its config.json allowing batches of 64
SMALL = "small expression"
MLP = "MLP (repository)"
BATCHED = "MLP, batching"


def say(text: str) -> None:
    print(text, flush=True)


# ---- the workloads --------------------------------------------------------------------------


def export_mlp(root: Path) -> tuple[bytes, np.ndarray]:
    """The 64-256-64 MLP as a repository program under ``root``; its request body (x[32, 64],
    tangent for x, base64) and the reference JVP (`torch.func.jvp` on the module)."""
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.net(x)
            return out

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        module = MLP().eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(module, (torch.randn(32, 64),), dynamic_shapes={"x": {0: batch}})
    for name, batch_size in ((MODEL, 0), (BATCHED_MODEL, 64)):
        (root / name).mkdir(parents=True)
        torch.export.save(program, root / name / "model.pt2")
        config = {
            "description": "64-256-64 MLP (bench)",
            "example_inputs": {"x": [32, 64]},
            "max_batch_size": batch_size,
        }
        (root / name / "config.json").write_text(json.dumps(config))
    body = workloads.mlp_body(model=MODEL)
    request = json.loads(body)

    def tensor(wire: dict[str, object]) -> torch.Tensor:
        import base64

        flat = np.frombuffer(base64.b64decode(str(wire["b64"])), dtype="<f4")
        return torch.from_numpy(flat.reshape(list(wire["shape"])).copy())  # type: ignore[call-overload]

    x, tx = tensor(request["primals"]["x"]), tensor(request["tangents"]["x"])
    with torch.no_grad():
        expected = torch.func.jvp(module, (x,), (tx,))[1].numpy()
    return body, expected


@dataclass
class Workload:
    name: str
    body: bytes
    expected: np.ndarray


# ---- the neighbour ---------------------------------------------------------------------------

_BUSY = """
import os, sys, time
if sys.argv[2]:
    os.sched_setaffinity(0, {int(sys.argv[2])})
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
"""


@contextmanager
def busy_core(seconds: float, cpu: int | None = None) -> Iterator[None]:
    """One process spinning on one CPU (``cpu``, or wherever the scheduler puts it) for at
    most ``seconds``; stopped when the block ends."""
    process = subprocess.Popen(
        [sys.executable, "-c", _BUSY, str(seconds), "" if cpu is None else str(cpu)]
    )
    try:
        time.sleep(0.2)  # let it reach its loop
        yield
    finally:
        process.kill()
        process.wait(timeout=10)


# ---- one configuration -----------------------------------------------------------------------


@dataclass
class Setup:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    cpu: int | None = None  # the one CPU the service (and the busy loop) runs on
    workers: int = 1


@dataclass
class Row:
    setup: str
    workload: str
    cpus: str
    quiet: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)
    error: str | None = None


def cpu_metrics(url: str) -> str:
    """``usable/threads`` as the service reports them on GET /metrics."""
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError as exc:
        return f"error: {exc}"
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("jvp_cpu_usable", "jvp_cpu_threads"):
            found[name] = int(float(value))
    if len(found) < 2:
        return "n/a"
    return f"{found['jvp_cpu_usable']}/{found['jvp_cpu_threads']}"


def start(setup: Setup, model_dir: Path) -> servers.Server | str:
    """The service of ``setup``, started (or why it did not start)."""
    env = {"JVP_MODEL_DIR": str(model_dir), **setup.env}
    if setup.workers > 1:
        env["JVP_JOB_RUNNER"] = "off"  # no job runner per process: none is used here
    server = servers.jvp_service(setup.name.split()[0].strip("-"), env)
    if setup.cpu is not None:
        server.argv = ["taskset", "-c", str(setup.cpu), *server.argv]
    if setup.workers > 1:
        server.argv += ["--workers", str(setup.workers)]
    try:
        return server.start()
    except RuntimeError as exc:
        return str(exc).splitlines()[0]


def measure(
    setups: list[Setup], model_dir: Path, loads: list[Workload], args: argparse.Namespace
) -> list[Row]:
    """Every setup's server started at once (idle ones wait on a condition), then rounds
    that visit each setup and workload in turn, quiet and busy: a drift of the machine's
    other load hits every row alike."""
    config = Config(
        sections=set(),
        duration_s=args.duration,
        warmup_s=0.0,
        clients=[],
        mlp_clients=args.clients,
        runs=1,
        big_budget_s=0.0,
        big_timeout_s=0.0,
        output=Path(os.devnull),
        quick=False,
    )
    warm = Config(**{**config.__dict__, "duration_s": 1.0})
    running: dict[str, servers.Server] = {}
    rows: dict[tuple[str, str], Row] = {}
    try:
        # Started side by side: each start is mostly waiting (imports, the engine's warm-up).
        with ThreadPoolExecutor(max_workers=len(setups) or 1) as pool:
            started = list(pool.map(lambda setup: start(setup, model_dir), setups))
        for setup, server in zip(setups, started, strict=True):
            cpus = server if isinstance(server, str) else cpu_metrics(server.url)
            for load in loads:
                row = rows[(setup.name, load.name)] = Row(setup.name, load.name, cpus)
                if isinstance(server, str):
                    row.error = f"did not start: {server}"
            if not isinstance(server, str):
                running[setup.name] = server
                say(f"  started {setup.name}: CPUs/threads {cpus}")
        checks = {load.name: close_to(load.expected, workloads.read_jvp_json) for load in loads}
        for setup in setups:  # a checked answer and a warm-up, each workload
            for load in loads:
                row = rows[(setup.name, load.name)]
                if setup.name in running and row.error is None:
                    first = load_cell(
                        running[setup.name], "/jvp", load.body, args.clients, warm,
                        checks[load.name],
                    )  # fmt: skip
                    row.error = first if isinstance(first, str) else None
        for r in range(args.rounds):
            load1, _, _ = os.getloadavg()
            say(f"round {r + 1} of {args.rounds} (load average {load1:.2f})")
            for setup in setups:
                for load in loads:
                    row = rows[(setup.name, load.name)]
                    if row.error is not None:
                        continue
                    server = running[setup.name]
                    for busy in (False, True) if r % 2 == 0 else (True, False):
                        if busy:
                            with busy_core(args.duration + 15, setup.cpu):
                                cell = load_cell(
                                    server, "/jvp", load.body, args.clients, config,
                                    checks[load.name],
                                )  # fmt: skip
                        else:
                            cell = load_cell(
                                server, "/jvp", load.body, args.clients, config,
                                checks[load.name],
                            )  # fmt: skip
                        if isinstance(cell, str):
                            row.error = cell
                            break
                        (row.busy if busy else row.quiet).append(cell.requests_per_s)
                        say(
                            f"  {setup.name[:28]:28} {load.name:17} "
                            f"{'busy ' if busy else 'quiet'} "
                            f"{cell.requests_per_s:8,.0f} req/s{_errors(cell)}"
                        )
    finally:
        for server in running.values():
            server.stop()
    return list(rows.values())


def _errors(cell: WrkResult) -> str:
    if cell.non_2xx or cell.socket_errors:
        return f" [{cell.non_2xx} non-2xx, {cell.socket_errors} socket errors]"
    return ""


# ---- the table -----------------------------------------------------------------------------


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def table(rows: list[Row]) -> str:
    head = "| setup | workload | CPUs/threads | quiet req/s | busy core req/s | busy/quiet |"
    lines = [head, "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if row.error:
            lines.append(f"| {row.setup} | {row.workload} | {row.cpus} | {row.error} | | |")
            continue
        ratio = (
            f"{statistics.median(row.busy) / statistics.median(row.quiet):.2f}x"
            if row.quiet and row.busy
            else "-"
        )
        lines.append(
            f"| {row.setup} | {row.workload} | {row.cpus} | {_spread(row.quiet)} | "
            f"{_spread(row.busy)} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=3.0, help="Seconds per cell (3).")
    parser.add_argument("--rounds", type=int, default=3, help="Quiet/busy pairs per cell (3).")
    parser.add_argument("--clients", type=int, default=16, help="wrk connections (16).")
    parser.add_argument(
        "--only",
        default="before,default,taskset",
        help="Configurations: before, default, taskset, pool (comma-separated).",
    )
    parser.add_argument("--pool", action="store_true", help="Add --workers 2 ('pool').")
    parser.add_argument(
        "--workloads",
        default="small,mlp,batching",
        help="Workloads: small, mlp, batching (comma-separated).",
    )
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="An extra environment variable for the 'default' configuration (repeatable).",
    )
    parser.add_argument(
        "--candidate",
        action="append",
        default=[],
        metavar="LABEL:KEY=VALUE,...",
        help="One more configuration to compare in the same run, e.g. "
        "'2 passive:JVP_NUM_THREADS=2,OMP_WAIT_POLICY=PASSIVE' (repeatable).",
    )
    args = parser.parse_args(argv)
    if loadgen.wrk_path() is None:
        say(loadgen.INSTALL_HINT)
        return 2
    cores = len(os.sched_getaffinity(0))
    chosen = {name.strip() for name in args.only.split(",") if name.strip()}
    if args.pool:
        chosen.add("pool")
    extra = dict(item.split("=", 1) for item in args.service_env)
    label = "default" + "".join(f" {k}={v}" for k, v in extra.items())
    setups = [
        s
        for key, s in [
            ("before", Setup("before (torch: a thread per core)", {"OMP_NUM_THREADS": str(cores)})),
            ("default", Setup(label, extra)),
            ("taskset", Setup("taskset 1 CPU", extra, cpu=min(os.sched_getaffinity(0)))),
            ("pool", Setup("--workers 2", extra, workers=2)),
        ]
        if key in chosen
    ]
    for text in args.candidate:
        name, _, pairs = text.partition(":")
        env = dict(pair.split("=", 1) for pair in pairs.split(",") if pair)
        setups.append(Setup(name.strip(), {**extra, **env}))
    if any(s.cpu is not None for s in setups) and shutil.which("taskset") is None:
        say("taskset not found (util-linux): the 'taskset' configuration is skipped")
        setups = [s for s in setups if s.cpu is None]
    inputs = workloads.seed_inputs((10, 10))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-contention-") as tmp:
        mlp_body, mlp_expected = export_mlp(Path(tmp))
        loads = [
            Workload(SMALL, workloads.jvp_json_body(inputs), workloads.expected_jvp(inputs)),
            Workload(MLP, mlp_body, mlp_expected),
            Workload(BATCHED, workloads.mlp_body(model=BATCHED_MODEL), mlp_expected),
        ]
        wanted = {name.strip() for name in args.workloads.split(",")}
        loads = [
            w for w, key in zip(loads, ("small", "mlp", "batching"), strict=True) if key in wanted
        ]
        rows = measure(setups, Path(tmp), loads, args)
    load1, _, _ = os.getloadavg()
    say(
        f"\n{args.clients} clients, {args.duration:g} s cells, {args.rounds} rounds each "
        f"(median, min-max), {cores} CPUs; load average at the end {load1:.2f}; "
        f"{time.monotonic() - started:.0f} s\n"
    )
    say(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
