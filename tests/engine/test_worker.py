"""The device worker: one dual level per item, deadlines, a bounded queue, priorities, faults."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import torch

from app.engine.compute import compute
from app.engine.engine import Engine
from app.engine.errors import (
    DeadlineExceeded,
    DeviceOutOfMemory,
    ForwardADUnsupported,
    InvalidRequest,
    Overloaded,
)
from app.engine.target import Materialized, Target
from app.engine.task import BATCH, INTERACTIVE, JVPTask
from tests.engine.evaluations import jvp_evaluation

CPU = torch.device("cpu")


def target_of(fn: Callable[[torch.Tensor], torch.Tensor], key: str = "t") -> Target:
    def build(dtype: torch.dtype, device: torch.device) -> Materialized:
        return Materialized(fn=lambda args, state: (fn(args[0]),), parameters={}, buffers={})

    return Target(key, ("x",), True, build)


def task(target: Target, x: torch.Tensor | None = None, engine: str = "dual") -> JVPTask:
    x = torch.ones(3) if x is None else x
    return JVPTask(target, (x,), (torch.ones_like(x),), {}, torch.float64, CPU, engine)


@pytest.fixture
def engine():
    e = Engine([CPU], max_queue=2)
    e.start()
    yield e
    e.stop()


@pytest.mark.parametrize("name", ["dual", "functional"])
def test_run_task_computes_jvp_in_float64(engine: Engine, name: str) -> None:
    x = torch.tensor([0.5, 1.0, 2.0])
    result = engine.submit(task(target_of(torch.sin), x, name)).result(timeout=10)
    assert result.outputs[0].dtype == torch.float64
    torch.testing.assert_close(result.outputs[0], torch.sin(x.double()), rtol=0, atol=0)
    torch.testing.assert_close(result.jvps[0], torch.cos(x.double()), rtol=1e-15, atol=0)
    assert result.queue_ms >= 0 and result.compute_ms > 0


def test_results_are_plain_tensors_after_the_level_closes(engine: Engine) -> None:
    import torch.autograd.forward_ad as fwAD

    result = engine.submit(task(target_of(torch.exp))).result(timeout=10)
    with fwAD.dual_level():  # a new level on this thread: nothing from the worker is dual in it
        assert fwAD.unpack_dual(result.outputs[0]).tangent is None
        assert fwAD.unpack_dual(result.jvps[0]).tangent is None


def test_failing_task_leaves_the_worker_serving(engine: Engine) -> None:
    def boom(x: torch.Tensor) -> torch.Tensor:
        return x @ torch.ones(5, 5, dtype=x.dtype)  # shape error inside the dual level

    with pytest.raises(InvalidRequest, match="computation failed"):
        engine.submit(task(target_of(boom))).result(timeout=10)
    # The level was exited: the next item enters its own without "nested" errors.
    assert engine.submit(task(target_of(torch.sin))).result(timeout=10).jvps[0].shape == (3,)


def test_out_of_memory_is_507_and_the_next_request_succeeds(engine: Engine) -> None:
    def oom(x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(DeviceOutOfMemory, match="ran out of memory"):
        engine.submit(task(target_of(oom))).result(timeout=10)
    assert engine.submit(task(target_of(torch.cos))).result(timeout=10).outputs[0].shape == (3,)


def test_operator_without_forward_ad_is_named(engine: Engine) -> None:
    def cdist(x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x.reshape(1, 3, 1), x.reshape(1, 3, 1))

    no_fallback = task(target_of(cdist))
    no_fallback.fallback = "none"  # "auto" (the default) decomposes cdist: tests/models
    with pytest.raises(ForwardADUnsupported, match="_cdist_forward"):
        engine.submit(no_fallback).result(timeout=10)
    assert engine.submit(task(target_of(cdist))).result(timeout=10).method == "decomposed"


def _blocker() -> tuple[Target, threading.Event, threading.Event]:
    started, release = threading.Event(), threading.Event()

    def wait(x: torch.Tensor) -> torch.Tensor:
        started.set()
        release.wait(10)
        return x * 2

    return target_of(wait, "blocker"), started, release


def test_full_queue_is_overloaded_with_retry_after(engine: Engine) -> None:
    blocker, started, release = _blocker()
    running = engine.submit(task(blocker))
    started.wait(10)
    queued = [engine.submit(task(target_of(torch.sin))) for _ in range(2)]  # max_queue=2
    with pytest.raises(Overloaded, match="queue is full") as info:
        engine.submit(task(target_of(torch.sin)))
    assert info.value.retry_after_s >= 1
    release.set()
    for f in [running, *queued]:
        f.result(timeout=10)


def test_interactive_items_run_before_batch_items() -> None:
    engine = Engine([CPU], max_queue=10)
    engine.start()
    try:
        blocker, started, release = _blocker()
        order: list[str] = []

        def record(name: str) -> Target:
            return target_of(lambda x: (jvp_evaluation() and order.append(name), x)[1], name)

        first = engine.submit(task(blocker))
        started.wait(10)
        futures = [
            engine.submit(task(record("batch-1")), priority=BATCH),
            engine.submit(task(record("batch-2")), priority=BATCH),
            engine.submit(task(record("interactive")), priority=INTERACTIVE),
        ]
        release.set()
        for f in [first, *futures]:
            f.result(timeout=10)
        assert order == ["interactive", "batch-1", "batch-2"]
    finally:
        engine.stop()


@pytest.mark.asyncio
async def test_deadline_passed_is_timeout_and_the_queued_item_never_runs(engine: Engine) -> None:
    blocker, started, release = _blocker()
    running = engine.submit(task(blocker))
    started.wait(10)
    ran = threading.Event()
    late = target_of(lambda x: (ran.set(), x)[1], "late")
    with pytest.raises(DeadlineExceeded, match="deadline of 0.1 s"):
        await engine.run(task(late), timeout_s=0.1)
    release.set()
    running.result(timeout=10)
    assert engine.submit(task(target_of(torch.sin))).result(timeout=10)  # still serving
    time.sleep(0.05)
    assert not ran.is_set()


def test_engine_not_started_is_overloaded() -> None:
    with pytest.raises(Overloaded, match="not ready"):
        Engine([CPU], max_queue=1).submit(task(target_of(torch.sin)))


def test_watched_work_past_its_deadline_stops_between_operators() -> None:
    # 400 sines of a 1M-element tensor take seconds; watched, the worker is free within
    # a fraction of one once the deadline passed.
    def build(dtype: torch.dtype, device: torch.device) -> Materialized:
        def fn(args: tuple[torch.Tensor, ...], state: dict[str, torch.Tensor]) -> tuple:
            x = args[0]
            for _ in range(400):
                x = torch.sin(x)
            return (x,)

        return Materialized(fn=fn, parameters={}, buffers={})

    x = torch.ones(1 << 20)
    target = Target("long", ("x",), True, build)
    task = JVPTask(target, (x,), (x,), {}, torch.float32, torch.device("cpu"))
    task.deadline = time.monotonic() + 0.2
    task.watch = True
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="passed its deadline while computing"):
        compute(task)
    assert time.monotonic() - started < 1.0
