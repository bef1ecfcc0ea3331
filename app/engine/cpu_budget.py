"""How many intra-op threads torch gets: from the CPUs this process may really use.

Imports no torch: `jvp-service serve` calls `apply_to_environ` before torch is
imported, since OpenMP reads its pool size and wait policy once, at start.

# NOTE [CPU threads]
PyTorch sizes its OpenMP pool from the machine's cores, and its threads spin at
every parallel region's barrier. When another process takes one of those cores,
the op waits a time slice for the descheduled thread, every op. Measured on the
project's 2-core machine with one bounded busy loop in another process, one
64-256-64 MLP JVP on x[32, 64] in process: 456 µs on one thread, 3,535 µs on two
(2,048 rows: 45 against 83 ms); over HTTP (bench/contention.py) the default of two
threads served 496 requests/s quiet and 11/s beside the busy loop (issue 22).
``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at the barrier) holds under contention
(654 µs against 423 µs on one thread) but doubles small work on a quiet machine
(1,157 against 559 µs): a second thread pays only for large work (2,048 rows: 18
against 30 ms quiet), and never beside a busy core.

So the default (``JVP_NUM_THREADS=0``):

* the usable CPUs: ``os.sched_getaffinity`` (taskset, cpusets), bounded by the
  cgroup CPU quota (``cpu.max``, "200000 100000" = 2 CPUs; a fraction rounds
  down, since a throttled cgroup stalls every thread until the next period);
* shared by the API processes (``--workers N``): each gets its share;
* less one for the event loop, which parses and answers every request on its own
  core (and runs tiny work inline), at least one: on 2 CPUs one thread, which
  the small JVPs this service mostly sees lose nothing by (they gain nothing
  from a second thread: torch only splits an op past its grain size);
* with more than one thread, ``OMP_WAIT_POLICY=PASSIVE`` unless it is set, so a
  descheduled thread does not stall the others, and `StepThreads` on the CPU
  device worker: a step whose work took under ``LARGE_WORK_MS`` of CPU on one
  thread runs on one thread (``torch.set_num_threads`` sets the calling thread's
  team only, 0.3 µs a pair), so the passive pool's wake-ups are paid by large
  work and batches only, which gain from it.

``JVP_NUM_THREADS`` set wins (fixed: no size rule), as does ``OMP_NUM_THREADS``
in the environment. The chosen numbers are on ``GET /metrics``
(``jvp_cpu_usable``, ``jvp_cpu_threads``) and in the start-up log.

More CPUs for more requests: processes (``--workers N``, ``--workers auto``),
not device-worker threads, since forward AD's level is per process (NOTE [one
dual level per process]): such threads would take turns under one lock. In the
quietest run ``--workers 2`` served the repository MLP 1.6x one process (2.2x
beside the busy core) but the small expression 0.62x (it computes inline on the
event loop already), so it is offered (``auto``: one per usable CPU), not the
default. That run, default settings, quiet / busy core: small expression 3,483 /
1,969 requests/s (0.57x), MLP 906 / 560 (0.62x), against torch's default 2,523 /
2,430 and 510 / 74 (0.14x). Measurements: README "CPU threads", bench/README.md
("Throughput beside a busy core").
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Hashable, Mapping, MutableMapping
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Set by the CLI beside OMP_NUM_THREADS, so the app knows the number was chosen here.
CHOSEN_BY = "JVP_CPU_THREADS_CHOSEN"


def parse_cpu_max(text: str) -> float | None:
    """The CPUs a cgroup v2 ``cpu.max`` allows: ``"200000 100000"`` -> 2.0; ``"max 100000"``
    (no quota) -> None. Raises ValueError for anything else."""
    parts = text.split()
    if len(parts) not in (1, 2):
        raise ValueError(f"Expected cpu.max as '<quota|max> [period]', got {text!r}")
    quota = parts[0]
    period = int(parts[1]) if len(parts) == 2 else 100_000
    if period <= 0:
        raise ValueError(f"Expected a positive cpu.max period, got {text!r}")
    if quota == "max":
        return None
    return int(quota) / period


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path | None = None) -> float | None:
    """The tightest cgroup v2 CPU quota over this process's cgroup and its parents (as
    ``/proc/self/cgroup`` names it, under ``root``), or None when there is none or no file
    can be read (no cgroup v2, a host root cgroup)."""
    dirs = [root]
    try:
        text = (proc_cgroup or Path("/proc/self/cgroup")).read_text()
        own = next((line[3:] for line in text.splitlines() if line.startswith("0::")), "")
        path = root / own.strip().lstrip("/")
        while path != root and root in path.parents:
            dirs.append(path)
            path = path.parent
    except OSError:
        pass
    limits = []
    for directory in dirs:
        try:
            limit = parse_cpu_max((directory / "cpu.max").read_text())
        except (OSError, ValueError):
            continue
        if limit is not None:
            limits.append(limit)
    return min(limits) if limits else None


def usable_cpus(affinity: int, quota: float | None) -> int:
    """CPUs a process may run on: ``affinity`` CPUs in its mask, bounded by a ``quota`` of
    CPUs (rounded down), at least 1."""
    if quota is not None:
        affinity = min(affinity, math.floor(quota + 1e-9))
    return max(1, affinity)


def this_process_cpus() -> int:
    """`usable_cpus` of this process: ``os.sched_getaffinity`` and the cgroup quota."""
    return usable_cpus(len(os.sched_getaffinity(0)), cgroup_cpu_limit())


def auto_threads(usable: int, processes: int = 1) -> int:
    """Intra-op threads for one of ``processes`` API processes on ``usable`` CPUs: its share,
    less one CPU for its event loop, at least one (NOTE [CPU threads])."""
    share = max(1, usable // max(1, processes))
    return max(1, share - 1)


@dataclass(frozen=True)
class CPUPlan:
    """What this process's torch computes with on the CPU, and why."""

    usable: int  # CPUs this process may use (affinity, cgroup quota)
    threads: int  # intra-op threads
    source: str  # "JVP_NUM_THREADS", "OMP_NUM_THREADS" or "auto"
    wait_policy: str | None  # OMP_WAIT_POLICY, None: OpenMP's default (spin, then sleep)

    def describe(self) -> str:
        policy = self.wait_policy or "OpenMP's default"
        return (
            f"{self.usable} usable CPU(s); {self.threads} intra-op thread(s) ({self.source}); "
            f"OMP_WAIT_POLICY {policy}"
        )


def plan(
    num_threads: int = 0,
    *,
    processes: int = 1,
    environ: Mapping[str, str] | None = None,
    usable: int | None = None,
) -> CPUPlan:
    """The thread count: ``num_threads`` (JVP_NUM_THREADS) when set, else OMP_NUM_THREADS
    from ``environ`` when set, else `auto_threads` of the usable CPUs."""
    env = os.environ if environ is None else environ
    usable = this_process_cpus() if usable is None else usable
    policy = env.get("OMP_WAIT_POLICY") or None
    if num_threads > 0:
        return CPUPlan(usable, num_threads, "JVP_NUM_THREADS", policy)
    omp = _positive_int(env.get("OMP_NUM_THREADS"))
    if omp is not None:
        source = "auto" if env.get(CHOSEN_BY) else "OMP_NUM_THREADS"
        return CPUPlan(usable, omp, source, policy)
    threads = auto_threads(usable, processes)
    return CPUPlan(usable, threads, "auto", policy or ("PASSIVE" if threads > 1 else None))


def apply_to_environ(cpu: CPUPlan, environ: MutableMapping[str, str] | None = None) -> None:
    """Export the plan for torch to read at import (and uvicorn's worker processes to
    inherit): OMP_NUM_THREADS and, where the plan sets one, OMP_WAIT_POLICY. Call before
    torch is imported; a variable already set is kept."""
    env = os.environ if environ is None else environ
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(cpu.threads)
        if cpu.source == "auto":
            env[CHOSEN_BY] = "1"
    if cpu.wait_policy and "OMP_WAIT_POLICY" not in env:
        env["OMP_WAIT_POLICY"] = cpu.wait_policy


def _positive_int(text: str | None) -> int | None:
    try:
        value = int((text or "").strip().split(",")[0])
    except ValueError:
        return None
    return value if value > 0 else None


# NOTE [CPU threads]: work under this much CPU time on one thread runs on one thread.
LARGE_WORK_MS = 2.0


@dataclass(eq=False)
class StepThreads:
    """Per device-worker step, the intra-op threads: one for small work, the pool for large
    (NOTE [CPU threads]). Small work gains nothing from a team, and a team is what stalls
    beside a busy core; large work (at least ``large_ms`` of CPU time on one thread) is
    split. Work never timed runs on one thread, and is timed there. ``set_threads`` is
    `torch.set_num_threads`, which sets the calling thread's OpenMP team size only (and
    costs well under a microsecond), so call `before` on the worker's own thread."""

    pool: int
    set_threads: Callable[[int], None]
    _: KW_ONLY
    large_ms: float = LARGE_WORK_MS
    max_keys: int = 1024
    _now: int = field(default=0, init=False)  # what was last set (0: not yet)
    # CPU ms of one item on one thread, by work key
    _single_ms: dict[Hashable, float] = field(default_factory=dict, init=False)

    def before(self, key: Hashable | None, items: int = 1) -> int:
        """Set the threads for a step of ``items`` items of work ``key``; the count set."""
        cost = self._single_ms.get(key) if key is not None else None
        want = self.pool if cost is not None and cost * items >= self.large_ms else 1
        if want != self._now:
            self.set_threads(want)
            self._now = want
        return want

    def record(self, key: Hashable | None, cpu_ms: float) -> None:
        """The thread CPU time of one item that ran alone, on one thread (else ignored)."""
        if key is None or self._now != 1:
            return
        if len(self._single_ms) >= self.max_keys and key not in self._single_ms:
            self._single_ms.clear()
        old = self._single_ms.get(key)
        self._single_ms[key] = cpu_ms if old is None else min(old, cpu_ms)
