"""Two revisions of this service side by side on one machine: `python -m bench.revisions BASE`.

A throughput number is only comparable with another measured on the same machine in the
same hour: a shared 2-core machine gives the same build anything from 1,000 to 3,300
small requests/s depending on what else runs (bench/README.md). This benchmark answers
the question a change must answer ("is it slower than before?") by measuring both
revisions in alternating rounds, so that whatever else the machine does falls on both:

- BASE (and HEAD, default: this working tree) are checked out into temporary git
  worktrees and served by this checkout's virtual environment (the dependencies are the
  same; the code is the revision's: the server starts in that worktree).
- Each round serves every workload from each revision in turn (the order alternates from
  round to round), a fresh server per revision and round.
- The table gives each revision's median over the rounds and the median and range of the
  per-round ratios HEAD/BASE, the number to read.

Workloads: ``small`` (x**2 + y**2 on 10x10 float64, tangent for x, JSON, wrk at each
``--clients``, the same body as `make bench`'s section 1) and ``big`` (the same on
2048x2048 float32 as one safetensors request: the median seconds of ``--runs`` requests).
With ``--nice`` (root only) servers, wrk and this process run at nice -19, so that other work on the
machine takes less of their time; on kernels that group processes by session
(``/proc/sys/kernel/sched_autogroup_enabled`` = 1) nice only counts within a group, which
the report says.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python bench/revisions.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench import loadgen, roundtrip, servers, workloads  # noqa: E402

ROOT = servers.ROOT
WORKTREE = "working tree"
AUTOGROUP = Path("/proc/sys/kernel/sched_autogroup_enabled")


@dataclass
class Revision:
    label: str
    path: Path
    commit: str


@dataclass
class Samples:
    """Per-round numbers of one cell, for each revision (req/s, or seconds for `big`)."""

    by_revision: dict[str, list[float]] = field(default_factory=dict)


def git(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout.strip()


@contextlib.contextmanager
def checked_out(revs: list[str]) -> Iterator[list[Revision]]:
    """Each revision in a temporary detached worktree (the working tree as it is)."""
    made: list[Path] = []
    out: list[Revision] = []
    with tempfile.TemporaryDirectory(prefix="bench-revisions-") as tmp:
        try:
            for rev in revs:
                if rev == WORKTREE:
                    dirty = " + uncommitted changes" if git("status", "--porcelain") else ""
                    head = git("rev-parse", "--short", "HEAD")
                    out.append(Revision(WORKTREE, ROOT, head + dirty))
                    continue
                commit = git("rev-parse", "--short", rev)
                path = Path(tmp) / commit
                git("worktree", "add", "--detach", "--quiet", str(path), commit)
                made.append(path)
                out.append(Revision(rev, path, commit))
            yield out
        finally:
            for path in made:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(path)],
                    cwd=ROOT,
                    capture_output=True,
                    timeout=120,
                )


def server_for(rev: Revision, nice: bool) -> servers.Server:
    server = servers.jvp_service(f"jvp-{rev.commit}")
    server.cwd = rev.path  # `python -m app.cli` imports the revision's app/ from there
    server.env["PYTHONPATH"] = str(rev.path)
    if nice:
        server.argv = ["nice", "-n", "-19", *server.argv]
    return server


def small(server: servers.Server, clients: int, args: argparse.Namespace) -> float:
    inputs = workloads.seed_inputs((10, 10))
    body = workloads.jvp_json_body(inputs)
    url = server.url + "/jvp"
    probe = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
    probe.raise_for_status()
    got = workloads.read_jvp_json(probe.content)
    if not np.allclose(got, workloads.expected_jvp(inputs)):
        raise RuntimeError(f"{server.name}: wrong JVP")
    loadgen.run_wrk(url, body, connections=clients, duration_s=args.warmup, nice=args.nice)
    result = loadgen.run_wrk(
        url, body, connections=clients, duration_s=args.duration, nice=args.nice
    )
    if not result.ok:
        raise RuntimeError(f"{server.name}: {result.non_2xx} non-2xx answers")
    return result.requests_per_s


def big(server: servers.Server, args: argparse.Namespace) -> float:
    inputs = workloads.seed_inputs((2048, 2048), seed=2)
    body = workloads.jvp_binary_body(inputs)
    headers = {"Content-Type": workloads.SAFETENSORS, "Accept": workloads.SAFETENSORS}
    seconds = []
    with roundtrip.Client(120.0) as client:  # what `make bench` times big requests with
        for i in range(args.runs + 1):
            start = time.perf_counter()
            response = client.post(server.url + "/jvp", content=body, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"{server.name}: {response.status_code} on the big request")
            if i:  # the first is a warm-up
                seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure(revs: list[Revision], args: argparse.Namespace) -> dict[str, Samples]:
    cells: dict[str, Samples] = {}
    for round_ in range(args.rounds):
        order = revs if round_ % 2 == 0 else revs[::-1]
        for rev in order:
            with server_for(rev, args.nice) as server:
                for clients in args.clients if "small" in args.workloads else []:
                    rps = small(server, clients, args)
                    key = f"small, {clients} clients (req/s)"
                    cells.setdefault(key, Samples()).by_revision.setdefault(rev.label, [])
                    cells[key].by_revision[rev.label].append(rps)
                    print(f"  round {round_ + 1} {rev.label:12} {key}: {rps:,.0f}", flush=True)
                if "big" in args.workloads:
                    s = big(server, args)
                    key = "big, 4M safetensors (s, lower is better)"
                    cells.setdefault(key, Samples()).by_revision.setdefault(rev.label, [])
                    cells[key].by_revision[rev.label].append(s)
                    print(f"  round {round_ + 1} {rev.label:12} {key}: {s:.3f}", flush=True)
    return cells


def table(revs: list[Revision], cells: dict[str, Samples]) -> str:
    base, head = revs[0].label, revs[1].label
    lines = [
        f"| workload | {base} | {head} | {head}/{base} (median, range over rounds) |",
        "| --- | --- | --- | --- |",
    ]
    for key, samples in cells.items():
        a, b = samples.by_revision[base], samples.by_revision[head]
        ratios = [y / x for x, y in zip(a, b, strict=True)]
        fmt = (lambda v: f"{v:.3f}") if key.startswith("big") else (lambda v: f"{v:,.0f}")
        lines.append(
            f"| {key} | {fmt(statistics.median(a))} | {fmt(statistics.median(b))} | "
            f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="the revision to compare against (a commit, tag, branch)")
    parser.add_argument("head", nargs="?", default=WORKTREE, help="default: this working tree")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of wrk before each")
    parser.add_argument("--clients", type=int, nargs="+", default=[8])
    parser.add_argument("--runs", type=int, default=5, help="requests per big cell")
    parser.add_argument(
        "--workloads", nargs="+", choices=["small", "big"], default=["small", "big"]
    )
    parser.add_argument("--nice", action="store_true", help="servers and wrk at nice -19")
    args = parser.parse_args(argv)
    if loadgen.wrk_path() is None and "small" in args.workloads:
        print(loadgen.INSTALL_HINT, file=sys.stderr)
        return 2
    if args.nice and os.geteuid() != 0:
        print("--nice needs root (a negative nice value)", file=sys.stderr)
        return 2
    if args.nice:
        os.nice(-19)  # this process too: it sends the big requests and reads their answers
    with checked_out([args.base, args.head]) as revs:
        for rev in revs:
            print(f"{rev.label}: {rev.commit} ({rev.path})")
        load = os.getloadavg()[0]
        cells = measure(revs, args)
    print(f"\nload average at start {load:.2f}, at end {os.getloadavg()[0]:.2f}", end="")
    if args.nice and AUTOGROUP.exists() and AUTOGROUP.read_text().strip() == "1":
        print("; sched_autogroup is on: nice counted only within this session", end="")
    print("\n")
    print(table(revs, cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
