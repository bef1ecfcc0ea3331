"""Tiny CPU work runs on the caller's thread when the worker is idle (NOTE [tiny work runs
inline] in app/engine/worker.py), with the same numbers, one dual level at a time."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest
import torch

from app.engine.batching import work_key
from app.engine.engine import Engine
from app.engine.target import Materialized, Target
from app.engine.task import JVPTask
from app.engine.worker import FIRST_INLINE_MAX_ELEMENTS
from tests.engine.evaluations import jvp_evaluation

CPU = torch.device("cpu")


def recording_target(
    fn: Callable[[torch.Tensor], torch.Tensor],
    threads: list[str],
    *,
    operations: int | None,
    key: str = "t",
) -> Target:
    """A one-input target that records the thread each JVP evaluation ran on (not the
    forward-coverage check's pass, which runs under a dispatch mode on the same thread:
    NOTE [forward mode: exact or refused])."""

    def build(dtype: torch.dtype, device: torch.device) -> Materialized:
        def call(args: tuple[torch.Tensor, ...], state: object) -> tuple[torch.Tensor]:
            if jvp_evaluation():
                threads.append(threading.current_thread().name)
            return (fn(args[0]),)

        return Materialized(fn=call, parameters={}, buffers={})

    return Target(key, ("x",), True, build, operations=operations)


def task_for(target: Target, x: torch.Tensor, t: torch.Tensor) -> JVPTask:
    return JVPTask(target, (x,), (t,), {}, torch.float64, CPU)


def started_engine(inline_max_us: int = 150) -> Engine:
    engine = Engine([CPU], max_queue=16)
    engine.configure_batching(max_batch_size=8, batch_wait_us=0, inline_max_us=inline_max_us)
    engine.start()
    return engine


def run(engine: Engine, task: JVPTask) -> tuple[torch.Tensor, torch.Tensor]:
    async def go() -> tuple[torch.Tensor, torch.Tensor]:
        result = await engine.run(task, timeout_s=10)
        return result.outputs[0], result.jvps[0]

    return asyncio.run(go())


def busy(seconds: float) -> None:
    """Spend ``seconds`` of this thread's CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


# A limit far above what these tiny targets take, so a loaded machine cannot flip them.
GENEROUS_US = 20_000


def test_small_expression_runs_on_the_callers_thread_with_the_reference_numbers() -> None:
    engine = started_engine(GENEROUS_US)
    try:
        threads: list[str] = []
        target = recording_target(lambda x: torch.sin(x) * x, threads, operations=2)
        x = torch.linspace(-2, 2, 50, dtype=torch.float64)
        t = torch.cos(x)
        for _ in range(3):
            out, jvp = run(engine, task_for(target, x, t))
            ref_out, ref_jvp = torch.func.jvp(lambda v: torch.sin(v) * v, (x,), (t,))
            torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
            torch.testing.assert_close(jvp, ref_jvp, rtol=1e-15, atol=1e-15)
        assert threads == [threading.current_thread().name] * 3
    finally:
        engine.stop()


def test_untimed_model_goes_to_the_worker_and_once_timed_tiny_runs_inline() -> None:
    engine = started_engine(GENEROUS_US)
    try:
        threads: list[str] = []
        target = recording_target(torch.tanh, threads, operations=None)  # a model: no count
        x = torch.ones(4, dtype=torch.float64)
        for _ in range(6):
            out, jvp = run(engine, task_for(target, x, x))
            torch.testing.assert_close(jvp, x * (1 - torch.tanh(x) ** 2))
        assert threads[0] == "jvp-worker-cpu"  # never timed: the worker times it
        assert threads[-1] == threading.current_thread().name  # timed tiny: inline
    finally:
        engine.stop()


def test_large_or_long_work_stays_in_the_worker() -> None:
    engine = started_engine()
    try:
        threads: list[str] = []
        big = torch.ones(FIRST_INLINE_MAX_ELEMENTS + 1, dtype=torch.float64)
        run(engine, task_for(recording_target(torch.sin, threads, operations=1), big, big))
        many_ops = recording_target(torch.sin, threads, operations=1000, key="long")
        run(engine, task_for(many_ops, torch.ones(3), torch.ones(3)))
        assert threads == ["jvp-worker-cpu"] * 2
    finally:
        engine.stop()


def test_work_timed_above_the_limit_stays_in_the_worker() -> None:
    engine = started_engine(inline_max_us=150)
    try:
        threads: list[str] = []

        def slow_sin(x: torch.Tensor) -> torch.Tensor:
            busy(0.002)  # 2 ms of CPU time, well past 150 µs
            return torch.sin(x)

        target = recording_target(slow_sin, threads, operations=None, key="busy")
        for _ in range(5):
            run(engine, task_for(target, torch.ones(3), torch.ones(3)))
        assert threads == ["jvp-worker-cpu"] * 5
    finally:
        engine.stop()


def test_inline_max_us_zero_turns_it_off() -> None:
    engine = started_engine(inline_max_us=0)
    try:
        threads: list[str] = []
        target = recording_target(torch.sin, threads, operations=1)
        for _ in range(3):
            run(engine, task_for(target, torch.ones(3), torch.ones(3)))
        assert threads == ["jvp-worker-cpu"] * 3
    finally:
        engine.stop()


def test_never_inline_while_the_worker_computes_something_longer() -> None:
    """One dual level per process: a tiny item must not start while the worker is inside
    a step that is not tiny; it queues behind it instead."""
    engine = started_engine(GENEROUS_US)
    try:
        started, release = threading.Event(), threading.Event()

        def wait(x: torch.Tensor) -> torch.Tensor:
            started.set()
            release.wait(10)
            return x * 2

        slow_threads: list[str] = []
        slow = recording_target(wait, slow_threads, operations=None, key="slow")
        running = engine.submit(task_for(slow, torch.ones(3), torch.ones(3)))
        started.wait(10)
        threads: list[str] = []
        tiny = recording_target(torch.sin, threads, operations=1, key="tiny")
        worker = engine.workers[CPU]
        tiny_task = task_for(tiny, torch.ones(3), torch.ones(3))
        assert worker.try_inline(tiny_task, work_key(tiny_task)) is None
        assert threads == []  # nothing ran beside the slow step
        release.set()
        running.result(timeout=10)
        assert worker.try_inline(tiny_task, work_key(tiny_task)) is not None
        assert threads == [threading.current_thread().name]
    finally:
        release.set()
        engine.stop()


def test_inline_errors_reach_the_caller_and_the_engine_keeps_serving() -> None:
    from app.engine.errors import InvalidRequest

    engine = started_engine(GENEROUS_US)
    try:
        threads: list[str] = []

        def fails(x: torch.Tensor) -> torch.Tensor:
            # Its first evaluation, the coverage check's, raises: recorded here.
            threads.append(threading.current_thread().name)
            raise ValueError("bad value")

        with pytest.raises(InvalidRequest, match="bad value"):
            run(
                engine,
                task_for(recording_target(fails, threads, operations=1), x := torch.ones(2), x),
            )
        assert threads == [threading.current_thread().name]
        ok = recording_target(torch.exp, threads, operations=1, key="ok")
        _, jvp = run(engine, task_for(ok, torch.zeros(2, dtype=torch.float64), x.double()))
        torch.testing.assert_close(jvp, torch.ones(2, dtype=torch.float64))
    finally:
        engine.stop()


def test_one_slow_inline_run_does_not_send_tiny_work_to_the_worker() -> None:
    # A garbage collection inside one run used to push a JVP that costs near the limit
    # over it for good (NOTE [tiny work runs inline]): one run now moves the estimate 2%.
    engine = started_engine(inline_max_us=5_000)
    try:
        threads: list[str] = []
        slow = [0.0]

        def fn(x: torch.Tensor) -> torch.Tensor:
            busy(slow[0])
            return x * x

        target = recording_target(fn, threads, operations=1)
        x = torch.linspace(-1, 1, 10, dtype=torch.float64)
        for _ in range(3):
            run(engine, task_for(target, x, torch.ones_like(x)))
        slow[0] = 0.3  # 300 ms of CPU: 2% of it alone is past the limit
        run(engine, task_for(target, x, torch.ones_like(x)))
        slow[0] = 0.0
        out, jvp = run(engine, task_for(target, x, torch.ones_like(x)))
        torch.testing.assert_close(jvp, 2 * x, rtol=0, atol=0)
        assert threads == [threading.current_thread().name] * 5
        key = work_key(task_for(target, x, torch.ones_like(x)))
        assert engine.workers[CPU]._cpu_ms[key] * 1e3 < 5_000
    finally:
        engine.stop()


def test_inline_estimate_worker_runs_take_the_lowest_inline_runs_the_median(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = started_engine(inline_max_us=150)
    try:
        worker = engine.workers[CPU]
        task = task_for(recording_target(torch.sin, [], operations=None), *torch.ones(2, 3))
        key = ("some", "work")
        # A stopped CPU clock: each run is timed at exactly the seconds given, not those
        # plus whatever the bookkeeping between the two readings cost on a loaded machine.
        monkeypatch.setattr(time, "thread_time", lambda: 100.0)

        def record(seconds: float, inline: bool = False) -> None:
            worker._record_alone(key, time.monotonic(), 100.0 - seconds, inline=inline)

        record(1.0)  # the first run pays one-time costs: not counted
        assert not worker.may_inline(task, key)
        record(0.000_2)  # 200 µs in the worker: over the limit
        assert not worker.may_inline(task, key)
        record(0.005)  # a GIL-slowed worker run leaves the lowest where it was
        assert worker._cpu_ms[key] == pytest.approx(0.2, rel=0.05)
        record(0.000_1)  # a faster one lowers it under the limit: tiny
        assert worker._cpu_ms[key] == pytest.approx(0.1, rel=0.05)
        assert worker.may_inline(task, key)
        # Inline, the median of the last runs decides: a cold first run and one slow run
        # (a garbage collection) do not send it back ...
        for seconds in [0.000_32] + [0.000_12] * 6 + [1.0] + [0.000_12] * 6:
            record(seconds, inline=True)
            assert worker.may_inline(task, key)
        # ... runs between the limit and twice it keep it inline (no back and forth) ...
        for _ in range(15):
            record(0.000_25, inline=True)
            assert worker.may_inline(task, key)
        # ... runs typically over twice the limit send it to the worker ...
        for _ in range(8):
            record(0.000_4, inline=True)
        assert not worker.may_inline(task, key)
        record(0.000_2)  # ... where a run over the limit keeps it ...
        assert not worker.may_inline(task, key)
        record(0.000_1)  # ... and one under the limit brings it back.
        assert worker.may_inline(task, key)
    finally:
        engine.stop()
