"""Device workers: one thread per device owns every forward-AD computation on it.

# NOTE [one dual level per process]
PyTorch keeps the forward-AD level per process, not per thread
(``torch/autograd/forward_ad.py`` keeps ``_current_level`` as a module global,
and ``torch.func.jvp`` enters the same level). Two threads inside
``fwAD.dual_level()`` at once fail with "Nested forward mode AD is not
supported" or "no level exists". So all forward-AD work on a device runs in
its worker thread, one item at a time, each inside a level of its own; the
HTTP layer only enqueues and awaits. No dual tensor leaves the worker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import re
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from app.engine.errors import (
    DeadlineExceeded,
    DeviceOutOfMemory,
    EngineError,
    ForwardADUnsupported,
    InvalidRequest,
    Overloaded,
)
from app.engine.fallback import jvp_with_fallback
from app.engine.jvp import ENGINES
from app.engine.target import Materialized, Target

if TYPE_CHECKING:
    from app.engine.operations import Operation

log = logging.getLogger(__name__)

INTERACTIVE = 0  # priority of POST /jvp; lower runs first
BATCH = 1  # priority of batch-job tasks

_NO_FORWARD_AD = re.compile(r"Trying to use forward AD with (\S+) that does not support it")


@dataclass
class JVPTask:
    """One JVP to compute: host tensors in, the worker casts and moves them."""

    target: Target
    inputs: tuple[torch.Tensor, ...]
    tangents: tuple[torch.Tensor | None, ...]
    parameter_tangents: Mapping[str, torch.Tensor]
    dtype: torch.dtype
    device: torch.device
    engine: str = "dual"
    # Beyond one JVP (batched tangents, checks, Jacobians, HVPs, linearize): runs in place
    # of ENGINES[engine], with the same error mapping (app/engine/operations.py).
    operation: Operation | None = None
    # options.fallback ("auto" | "none"), and the method that ran, written by `compute`
    # (NOTE [forward-AD fallback] in app/engine/fallback.py).
    fallback: str = "auto"
    method: str = "forward"


@dataclass
class JVPResult:
    outputs: tuple[torch.Tensor, ...]  # on the CPU
    jvps: tuple[torch.Tensor, ...]  # on the CPU
    queue_ms: float
    compute_ms: float
    method: str = "forward"


@dataclass(order=True)
class _Item:
    priority: int
    seq: int
    task: JVPTask | None = field(compare=False)  # None asks the worker to stop
    future: Future[JVPResult] = field(compare=False)
    enqueued_at: float = field(compare=False)
    deadline: float | None = field(compare=False)


def compute(task: JVPTask) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Run one task on its device (worker thread only) and bring the results to the host."""
    try:
        return _compute(task)
    except EngineError:
        raise
    except torch.OutOfMemoryError:
        pass  # NOTE [free on out-of-memory]
    # NOTE [free on out-of-memory]
    # Only an out-of-memory gets here. Its error was dropped when the except block
    # ended, and with it the traceback whose frames held every device tensor of the
    # failed computation (the moved inputs, the intermediates), so they are freed now,
    # before the cache is emptied and the client told. Raising inside the except block
    # would chain the error (__context__) and keep all of them alive.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise DeviceOutOfMemory(
        "The device ran out of memory computing this request; its memory was released. "
        "Send smaller tensors or retry later."
    )


def _compute(task: JVPTask) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    try:
        target = task.target.materialize(task.dtype, task.device)

        def move(x: torch.Tensor) -> torch.Tensor:
            return x.to(device=task.device, dtype=task.dtype)

        inputs = tuple(move(x) for x in task.inputs)
        tangents = tuple(None if t is None else move(t) for t in task.tangents)
        param_tangents = {k: move(t) for k, t in task.parameter_tangents.items()}
        if task.operation is not None:
            outputs, jvps = task.operation(target, inputs, tangents, param_tangents)
        else:
            outputs, jvps, task.method = jvp_with_fallback(
                ENGINES[task.engine],
                target,
                inputs,
                tangents,
                param_tangents,
                fallback=task.fallback,
            )
        return tuple(o.cpu() for o in outputs), tuple(j.cpu() for j in jvps)
    except (EngineError, torch.OutOfMemoryError):
        raise
    except (RuntimeError, NotImplementedError) as e:
        match = _NO_FORWARD_AD.search(str(e))
        if match:
            raise ForwardADUnsupported(
                f"Operator {match.group(1)} has no forward-AD formula "
                f"in PyTorch {torch.__version__}",
            ) from None
        if isinstance(e, NotImplementedError):
            raise ForwardADUnsupported(f"Not supported under forward AD: {e}") from None
        raise InvalidRequest(f"The computation failed for these inputs: {_first_line(e)}") from None
    except (ValueError, IndexError, AssertionError) as e:
        # torch.export guards raise AssertionError ("Guard failed: x.size()[1] == 3").
        raise InvalidRequest(f"The computation failed for these inputs: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:500]


def _build_warm_up(dtype: torch.dtype, device: torch.device) -> Materialized:
    # A tensor power's first forward-AD call imports torch._dynamo (about 2 s): pay it here.
    two = torch.tensor(2.0, dtype=dtype, device=device)

    def fn(args: tuple[torch.Tensor, ...], state: dict[str, torch.Tensor]) -> tuple[torch.Tensor]:
        x = args[0]
        return (torch.sin(x) ** two + torch.tanh(x) @ x,)

    return Materialized(fn=fn, parameters={}, buffers={})


_WARM_UP = Target("warm-up", ("x",), True, _build_warm_up)


class DeviceWorker:
    """A thread that takes work items for one device off a priority queue, one at a time."""

    def __init__(self, device: torch.device, *, max_queue: int) -> None:
        self.device = device
        self.max_queue = max_queue
        self._queue: queue.PriorityQueue[_Item] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._run, name=f"jvp-worker-{device}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Let queued items finish, then end the thread."""
        self._queue.put(_Item(2, next(self._seq), None, Future(), time.monotonic(), None))
        self._thread.join()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(
        self, task: JVPTask, *, priority: int = INTERACTIVE, deadline: float | None = None
    ) -> Future[JVPResult]:
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded(
                f"The {self.device} queue is full ({self.max_queue} waiting); retry shortly",
                retry_after_s=1,
            )
        future: Future[JVPResult] = Future()
        self._queue.put(_Item(priority, next(self._seq), task, future, time.monotonic(), deadline))
        return future

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item.task is None:
                return
            if not item.future.set_running_or_notify_cancel():
                continue  # the caller gave up (deadline or disconnect) before it ran
            started = time.monotonic()
            if item.deadline is not None and started > item.deadline:
                item.future.set_exception(
                    DeadlineExceeded("The request passed its deadline in the queue")
                )
                continue
            try:
                outputs, jvps = compute(item.task)
            except BaseException as e:  # noqa: BLE001 - every error goes to the caller
                item.future.set_exception(e)
                del item  # a failed request's tensors must not wait here for the next item
                continue
            finished = time.monotonic()
            item.future.set_result(
                JVPResult(
                    outputs=outputs,
                    jvps=jvps,
                    queue_ms=(started - item.enqueued_at) * 1e3,
                    compute_ms=(finished - started) * 1e3,
                    method=getattr(item.task, "method", "forward"),
                )
            )
            del item


class Engine:
    """The device workers of this process, one per device."""

    def __init__(self, devices: list[torch.device], *, max_queue: int) -> None:
        self.devices = devices
        self.workers = {d: DeviceWorker(d, max_queue=max_queue) for d in devices}
        self.ready = False

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
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        for worker in self.workers.values():
            worker.stop()

    def submit(
        self, task: JVPTask, *, priority: int = INTERACTIVE, deadline: float | None = None
    ) -> Future[JVPResult]:
        if not self.ready:
            raise Overloaded("The engine is not ready yet; retry shortly", retry_after_s=1)
        return self.workers[task.device].submit(task, priority=priority, deadline=deadline)

    async def run(
        self, task: JVPTask, *, timeout_s: float, priority: int = INTERACTIVE
    ) -> JVPResult:
        """Queue a task and await its result, giving up at the deadline (504)."""
        future = self.submit(task, priority=priority, deadline=time.monotonic() + timeout_s)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except TimeoutError:
            future.cancel()  # a task still queued never runs
            raise DeadlineExceeded(
                f"The request did not finish within its deadline of {timeout_s:g} s"
            ) from None
