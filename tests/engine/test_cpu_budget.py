"""The CPU plan: usable CPUs from affinity and the cgroup quota, and the thread count chosen
for them (NOTE [CPU threads] in app/engine/cpu_budget.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from app.engine.cpu_budget import (
    CHOSEN_BY,
    StepThreads,
    apply_to_environ,
    auto_threads,
    cgroup_cpu_limit,
    parse_cpu_max,
    plan,
    this_process_cpus,
    usable_cpus,
)
from app.engine.engine import Engine
from app.engine.target import Materialized, Target
from app.engine.task import JVPTask
from tests.engine.evaluations import jvp_evaluation

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("200000 100000", 2.0),
        ("max 100000", None),
        ("50000 100000\n", 0.5),
        ("150000 100000", 1.5),
        ("400000", 4.0),  # the period defaults to 100000
    ],
)
def test_parse_cpu_max(text: str, cpus: float | None) -> None:
    assert parse_cpu_max(text) == cpus


@pytest.mark.parametrize("text", ["", "a b", "100 0", "1 2 3"])
def test_parse_cpu_max_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpu_max(text)


def _cgroup(tmp_path: Path, own: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        folder = root / rel
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cpu.max").write_text(text)
    (root / own.lstrip("/")).mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def test_cgroup_cpu_limit_missing_file_is_no_limit(tmp_path: Path) -> None:
    root, proc = _cgroup(tmp_path, "/", {})
    assert cgroup_cpu_limit(root, proc) is None
    assert cgroup_cpu_limit(tmp_path / "absent", tmp_path / "absent-too") is None


def test_cgroup_cpu_limit_reads_the_root_in_a_container(tmp_path: Path) -> None:
    # In a container's cgroup namespace /proc/self/cgroup says "0::/" and the quota is
    # the mount's own cpu.max.
    root, proc = _cgroup(tmp_path, "/", {".": "200000 100000"})
    assert cgroup_cpu_limit(root, proc) == 2.0


def test_cgroup_cpu_limit_takes_the_tightest_of_the_path(tmp_path: Path) -> None:
    root, proc = _cgroup(
        tmp_path,
        "/kubepods.slice/pod1/ctr",
        {".": "max 100000", "kubepods.slice": "800000 100000", "kubepods.slice/pod1": "max"},
    )
    (root / "kubepods.slice/pod1/ctr/cpu.max").write_text("150000 100000")
    assert cgroup_cpu_limit(root, proc) == 1.5
    (root / "kubepods.slice/pod1/ctr/cpu.max").write_text("max 100000")
    assert cgroup_cpu_limit(root, proc) == 8.0


def test_cgroup_cpu_limit_skips_an_unreadable_file(tmp_path: Path) -> None:
    root, proc = _cgroup(tmp_path, "/a", {".": "garbage", "a": "300000 100000"})
    assert cgroup_cpu_limit(root, proc) == 3.0


@pytest.mark.parametrize(
    ("affinity", "quota", "usable"),
    [(2, None, 2), (64, 2.0, 2), (64, 1.5, 1), (64, 0.5, 1), (1, 8.0, 1), (4, 3.999, 3)],
)
def test_usable_cpus_affinity_bounded_by_quota(
    affinity: int, quota: float | None, usable: int
) -> None:
    assert usable_cpus(affinity, quota) == usable


def test_this_process_cpus_follows_affinity() -> None:
    assert this_process_cpus() <= len(os.sched_getaffinity(0))
    if cgroup_cpu_limit() is None:
        assert this_process_cpus() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("usable", "processes", "threads"),
    [(1, 1, 1), (2, 1, 1), (3, 1, 2), (8, 1, 7), (8, 2, 3), (2, 2, 1), (3, 4, 1)],
)
def test_auto_threads_leaves_a_cpu_to_each_event_loop(
    usable: int, processes: int, threads: int
) -> None:
    assert auto_threads(usable, processes) == threads


def test_plan_auto_on_two_cpus_is_one_thread_without_a_wait_policy() -> None:
    cpu = plan(0, environ={}, usable=2)
    assert (cpu.threads, cpu.source, cpu.wait_policy) == (1, "auto", None)


def test_plan_auto_with_several_threads_sleeps_at_the_barrier() -> None:
    cpu = plan(0, environ={}, usable=8)
    assert (cpu.threads, cpu.wait_policy) == (7, "PASSIVE")
    assert plan(0, environ={"OMP_WAIT_POLICY": "ACTIVE"}, usable=8).wait_policy == "ACTIVE"


def test_plan_explicit_num_threads_wins() -> None:
    cpu = plan(3, environ={"OMP_NUM_THREADS": "5"}, usable=1)
    assert (cpu.threads, cpu.source, cpu.wait_policy) == (3, "JVP_NUM_THREADS", None)


def test_plan_omp_num_threads_wins_over_auto() -> None:
    cpu = plan(0, environ={"OMP_NUM_THREADS": "4"}, usable=2)
    assert (cpu.threads, cpu.source) == (4, "OMP_NUM_THREADS")
    # A value that is no positive count is ignored, as OpenMP does.
    assert plan(0, environ={"OMP_NUM_THREADS": "zero"}, usable=2).source == "auto"


def test_apply_to_environ_sets_what_is_unset_and_keeps_the_rest() -> None:
    env: dict[str, str] = {}
    apply_to_environ(plan(0, environ=env, usable=8), env)
    assert env == {"OMP_NUM_THREADS": "7", "OMP_WAIT_POLICY": "PASSIVE", CHOSEN_BY: "1"}
    # What the CLI set is read back as its own choice (uvicorn's workers inherit it).
    assert plan(0, environ=env, usable=8).source == "auto"
    mine = {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}
    apply_to_environ(plan(0, environ=mine, usable=8), mine)
    assert mine == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}


def test_step_threads_small_work_on_one_thread_large_on_the_pool() -> None:
    calls: list[int] = []
    steps = StepThreads(4, calls.append, large_ms=2.0)
    assert steps.before("mlp") == 1  # never timed: one thread, and timed there
    steps.record("mlp", 0.4)
    assert steps.before("mlp") == 1  # 0.4 ms: small
    assert steps.before("mlp", items=8) == 4  # a batch of eight is 3.2 ms of work
    steps.record("mlp", 0.1)  # timed on the pool: not a one-thread time, ignored
    assert steps.before("mlp") == 1
    steps.record("big", 30.0)
    assert steps.before("big") == 4
    assert steps.before(None) == 1  # an operation (no work key): one thread
    assert calls == [1, 4, 1, 4, 1]  # set only when it changes


def _threads_target(seen: list[int]) -> Target:
    def build(dtype: torch.dtype, device: torch.device) -> Materialized:
        def call(args: tuple[torch.Tensor, ...], state: object) -> tuple[torch.Tensor]:
            if jvp_evaluation():
                seen.append(torch.get_num_threads())  # on the worker's thread, computing
            return (torch.sin(args[0]),)

        return Materialized(call, {}, {})

    return Target("threads", ("x",), True, build)


@pytest.mark.parametrize(("large_ms", "third"), [(1e9, 1), (0.0, 2)])
def test_device_worker_sets_its_threads_from_the_works_size(large_ms: float, third: int) -> None:
    before = torch.get_num_threads()
    engine = Engine([CPU], max_queue=16)
    worker = engine.workers[CPU]
    worker.step_threads = StepThreads(2, torch.set_num_threads, large_ms=large_ms)
    engine.start()
    try:
        seen: list[int] = []
        target = _threads_target(seen)
        x = torch.linspace(-1, 1, 5, dtype=torch.float64)
        for _ in range(3):  # the first run is not timed, the second is: the third decides
            result = engine.submit(JVPTask(target, (x,), (torch.ones_like(x),), {}, x.dtype, CPU))
            torch.testing.assert_close(result.result(timeout=30).jvps[0], torch.cos(x))
        assert seen == [1, 1, third]
    finally:
        engine.stop()
        torch.set_num_threads(before)
