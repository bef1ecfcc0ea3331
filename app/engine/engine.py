"""The engine: the device workers of this process, one per device, warmed up at start, and
the one way in for a task (`Engine.run`: inline when tiny, else queued, with its deadline)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch

from app.engine.abstract import Rate, measure_rate
from app.engine.batching import VmapWarmUp, work_key
from app.engine.errors import DeadlineExceeded, Overloaded
from app.engine.jvp import ENGINES
from app.engine.stacking import Stacker, compute_together
from app.engine.target import Materialized, Target
from app.engine.task import INTERACTIVE, JVPResult, JVPTask
from app.engine.worker import DeviceWorker


def _build_warm_up(dtype: torch.dtype, device: torch.device) -> Materialized:
    # A tensor power's first forward-AD call imports torch._dynamo (about 2 s): pay it here.
    two = torch.tensor(2.0, dtype=dtype, device=device)

    def fn(args: tuple[torch.Tensor, ...], state: dict[str, torch.Tensor]) -> tuple[torch.Tensor]:
        x = args[0]
        return (torch.sin(x) ** two + torch.tanh(x) @ x,)

    return Materialized(fn=fn, parameters={}, buffers={})


_WARM_UP = Target("warm-up", ("x",), True, _build_warm_up)


class Engine:
    """The device workers of this process, one per device."""

    def __init__(
        self,
        devices: list[torch.device],
        *,
        max_queue: int,
        max_batch_size: int = 1,
        batch_wait_us: int = 0,
        observe_batch: Callable[[torch.device, int], None] | None = None,
    ) -> None:
        self.devices = devices
        self.workers = {d: DeviceWorker(d, max_queue=max_queue) for d in devices}
        self._stacker = Stacker()
        # Each device's measured speed (NOTE [abstract evaluation] in app/engine/abstract.py).
        self.rates: dict[torch.device, Rate] = {}
        self.configure_batching(
            max_batch_size=max_batch_size, batch_wait_us=batch_wait_us, observe_batch=observe_batch
        )
        self.ready = False

    def configure_batching(
        self,
        *,
        max_batch_size: int,
        batch_wait_us: int,
        observe_batch: Callable[[torch.device, int], None] | None = None,
        inline_max_us: int = 0,
    ) -> None:
        """Dynamic batching on every worker (NOTE [dynamic batching]); 1 turns it off.
        Tiny CPU work up to ``inline_max_us`` runs on the caller's thread when the worker is
        idle (NOTE [tiny work runs inline]); 0 never.

        ``observe_batch(device, size)`` is called once per worker step (metrics)."""
        if max_batch_size < 1 or batch_wait_us < 0:
            raise ValueError(
                f"Expected max_batch_size >= 1 and batch_wait_us >= 0, got {max_batch_size} "
                f"and {batch_wait_us}"
            )
        for worker in self.workers.values():
            worker.max_batch_size = max_batch_size
            worker.batch_wait_us = batch_wait_us
            worker.observe_batch = observe_batch
            worker.inline_max_us = inline_max_us

    def start(self) -> None:
        """Start the workers, run one small JVP on each (so no client waits for first-call
        set-up), then take work."""
        for worker in self.workers.values():
            worker.start()
        for device, worker in self.workers.items():
            x = torch.ones(4)
            task = JVPTask(_WARM_UP, (x,), (x,), {}, torch.float32, device)
            for engine in ENGINES:
                task.engine = engine
                worker.submit(task).result()
            # And vmap over torch.func.jvp, what a batch runs (NOTE [dynamic batching]).
            task = JVPTask(_WARM_UP, (x,), (x,), {}, torch.float32, device, "functional")
            task.operation = VmapWarmUp()
            worker.submit(task).result()
            self.rates[device] = measure_rate(device)
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        for worker in self.workers.values():
            worker.stop()

    def worker_for(self, task: JVPTask) -> DeviceWorker:
        """The worker of the task's device (503 until the engine is ready)."""
        if not self.ready:
            raise Overloaded("The engine is not ready yet; retry shortly", retry_after_s=1)
        return self.workers[task.device]

    def submit(self, task: JVPTask, *, priority: int = INTERACTIVE) -> Future[JVPResult]:
        """Queue ``task`` on its device's worker, no deadline (`run` sets one)."""
        return self.worker_for(task).submit(task, priority=priority)

    def run_together(self, tasks: Sequence[JVPTask]) -> list[JVPResult] | None:
        """Tasks known together (a batch job's chunk) that compute the same tiny work on
        other numbers, as one stacked JVP on this thread (NOTE [stacking tiny expressions]),
        each its own result; None when they are not such tasks: submit each then."""
        if len(tasks) < 2:
            return None
        key = work_key(tasks[0])
        if key is None or any(work_key(t) != key for t in tasks[1:]):
            return None
        worker = self.worker_for(tasks[0])
        if not worker.may_inline(tasks[0], key):
            return None
        return compute_together(worker, tasks)

    async def run(
        self, task: JVPTask, *, timeout_s: float, priority: int = INTERACTIVE
    ) -> JVPResult:
        """Queue a task and await its result, giving up at the deadline (504): ``timeout_s``
        from now, or ``task.deadline`` when set; tiny CPU work may run here at once instead
        (NOTE [tiny work runs inline])."""
        if task.deadline is None:
            task.deadline = time.monotonic() + timeout_s
        remaining = task.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(
                f"The request passed its deadline of {timeout_s:g} s before it was queued"
            )
        key = work_key(task)
        if self.ready:
            worker = self.workers[task.device]
            if worker.may_inline(task, key):
                # Computed in the next turn of the event loop, with the tiny requests of this
                # turn (NOTE [stacking tiny expressions] in app/engine/stacking.py).
                result = await self._stacker.run(worker, task, key)
                if result is not None:
                    return result
        worker = self.worker_for(task)
        future = worker.submit(task, priority=priority, deadline=task.deadline, work=key)
        try:
            # asyncio.timeout, not wait_for: wait_for wraps the future in one more task.
            async with asyncio.timeout(remaining):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            future.cancel()  # a task still queued never runs
            raise DeadlineExceeded(
                f"The request did not finish within its deadline of {timeout_s:g} s"
            ) from None
