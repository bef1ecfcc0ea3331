"""Device workers: one thread per device owns every forward-AD computation on it.

# NOTE [one dual level per process]
PyTorch keeps the forward-AD level per process, not per thread
(``torch/autograd/forward_ad.py`` keeps ``_current_level`` as a module global,
and ``torch.func.jvp`` enters the same level). Two threads inside
``fwAD.dual_level()`` at once fail with "Nested forward mode AD is not
supported" or "no level exists". So all forward-AD work on a device runs in
its worker thread, one item at a time, each inside a level of its own; the
HTTP layer only enqueues and awaits. No dual tensor leaves the worker.

The one exception, on the CPU: a request whose computation is known to be tiny
runs on the calling thread while the worker is idle, under the same lock the
worker holds for each step, so still one level at a time (NOTE [tiny work runs
inline]).

# NOTE [tiny work runs inline]
Handing a 10x10 expression to the worker thread and back costs more than
computing it, and far more under load: every torch call drops the GIL, and
taking it back from a busy event loop waits for the loop to let go (up to
``sys.getswitchinterval()``, 5 ms), so the same JVP that takes tens of µs alone
takes milliseconds of wall time beside a busy loop (bench/README.md, "Tiny work
inline", has the measurements). So a CPU work item known to be tiny (at most
``JVP_INLINE_MAX_US`` of CPU time alone) runs on the calling thread, the event
loop's (`DeviceWorker.try_inline`), when the worker is between steps; when the
worker is itself computing one tiny item the caller waits for it (no longer than
the limit) rather than queue behind it, since a queue that the worker keeps
finding non-empty would keep every later request on the slow path. Steps of tiny
work never wait to batch.

Before computing inline, the request yields to the event loop once: it is
computed in the loop's next turn, together with the tiny requests of the same
turn (NOTE [stacking tiny expressions] in app/engine/stacking.py). Without a
yield, a saturated loop runs every waiting request from start to end in one turn
and polls for I/O once per turn, so a new connection's first request waits one
turn per connection ahead of it.

Known to be tiny: its `work_key` was timed alone at most at the limit, in thread
CPU time, the lowest seen (a run slowed by the GIL changing hands costs more
CPU; that is the overhead inlining removes, not the work). Once it runs inline
it stays there while the median of its last 15 inline runs (once there are 5)
is at most twice the limit; past that it goes back to the worker, and returns
only after a run under the limit. A median, not one estimate: a single slow run
(a garbage collection, a cold first run, the slow tail) must not send work that
costs about the limit to the worker, whose GIL-slowed runs would never bring it
back. Batching might compute such work in less time per item, but never in less
than the hand-off costs, so tiny work is not sent to the worker to batch. A key
never timed goes to the worker, except a small expression (a few operator calls
on a few thousand elements), which is tiny for sure and is timed inline. CUDA
work always goes to the worker: it waits for the device.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from app.engine.batching import (
    BatchQueue,
    batch_key,
    compute_batch,
    work_key,
)
from app.engine.compute import compute
from app.engine.cpu_budget import StepThreads
from app.engine.errors import DeadlineExceeded, Overloaded, first_line
from app.engine.policy import BatchPayoff, Bounded
from app.engine.task import INTERACTIVE, JVPResult, JVPTask

log = logging.getLogger(__name__)

# An expression never timed runs inline (NOTE [tiny work runs inline]) only within these:
# a few elementwise operator calls on a few thousand elements take well under 1 ms.
FIRST_INLINE_MAX_OPERATIONS = 32
FIRST_INLINE_MAX_ELEMENTS = 4096


@dataclass(order=True)
class _Item:
    priority: int
    seq: int
    task: JVPTask | None = field(compare=False)  # None asks the worker to stop
    future: Future[JVPResult] = field(compare=False)
    enqueued_at: float = field(compare=False)
    deadline: float | None = field(compare=False)
    key: Hashable | None = field(default=None, compare=False)  # batch_key(task)
    work: Hashable | None = field(default=None, compare=False)  # work_key(task)

    def resolve(
        self,
        outputs: tuple[torch.Tensor, ...],
        jvps: tuple[torch.Tensor, ...],
        started: float,
        finished: float,
        method: str = "forward",
        batch_size: int = 1,
    ) -> None:
        """Give the caller its result, computed from ``started`` to ``finished``."""
        self.future.set_result(
            JVPResult(
                outputs=outputs,
                jvps=jvps,
                queue_ms=(started - self.enqueued_at) * 1e3,
                compute_ms=(finished - started) * 1e3,
                method=method,
                batch_size=batch_size,
            )
        )


class DeviceWorker:
    """A thread that takes work items for one device off a priority queue and runs them, one
    at a time or, for compatible plain JVPs, stacked into one batch (NOTE [dynamic batching]
    in app/engine/batching.py)."""

    def __init__(
        self,
        device: torch.device,
        *,
        max_queue: int,
        max_batch_size: int = 1,
        batch_wait_us: int = 0,
        observe_batch: Callable[[torch.device, int], None] | None = None,
        inline_max_us: int = 0,
    ) -> None:
        self.device = device
        self.max_queue = max_queue
        self.max_batch_size = max_batch_size
        self.batch_wait_us = batch_wait_us
        self.observe_batch = observe_batch
        self._queue: BatchQueue[_Item] = BatchQueue()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._run, name=f"jvp-worker-{device}", daemon=True)
        self._last_batch = 1
        self._payoff = BatchPayoff()  # NOTE [batching must pay] in app/engine/policy.py
        # NOTE [tiny work runs inline]: held for each step, by the worker or a caller.
        self.inline_max_us = inline_max_us
        self._step = threading.Lock()
        self._cpu_ms: dict[Hashable, float] = {}  # work key -> CPU ms of one item alone
        # work key -> CPU ms of its last inline runs, for work that runs inline
        self._inline_runs: dict[Hashable, collections.deque[float]] = {}
        self._timed_once: set[Hashable] = set()
        self._tiny_step = False  # whether the worker's current step is one tiny item
        # Keys whose batch failed while every item then succeeded alone: vmap cannot run them.
        self._unbatchable: Bounded[Hashable, None] = Bounded(1024)
        # NOTE [CPU threads] in app/engine/cpu_budget.py: one thread for small work, set by
        # the app when this process has a pool of several.
        self.step_threads: StepThreads | None = None

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
        self,
        task: JVPTask,
        *,
        priority: int = INTERACTIVE,
        deadline: float | None = None,
        work: Hashable | None = None,
    ) -> Future[JVPResult]:
        """Queue ``task`` (``work``: its `work_key`, when the caller has it already)."""
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded(
                f"The {self.device} queue is full ({self.max_queue} waiting); retry shortly",
                retry_after_s=1,
            )
        future: Future[JVPResult] = Future()
        item = _Item(priority, next(self._seq), task, future, time.monotonic(), deadline)
        item.work = work if work is not None else work_key(task)
        item.key = batch_key(task, item.work)
        self._queue.put(item)
        return future

    def try_inline(self, task: JVPTask, key: Hashable | None) -> JVPResult | None:
        """Compute ``task`` (``key``: its `work_key`) on this thread if it is tiny and the
        worker idle (NOTE [tiny work runs inline]); None: submit it instead. Raises what the
        computation raises."""
        if not self.may_inline(task, key):
            return None
        return self.run_inline(task, key=key)

    def run_inline(
        self, task: JVPTask, *, key: Hashable | None = None, items: int = 1
    ) -> JVPResult | None:
        """Compute ``task`` on this thread unless the worker is in a step that is not tiny
        (None then). ``items``: how many requests it holds (app/engine/stacking.py); a task
        of one is timed under ``key`` for `may_inline`."""
        # The worker in a tiny step of its own is waited for (about as long as the hand-off
        # would take): queueing behind it would keep it busy with each next arrival, and
        # every later request would queue too. Behind a longer step, the queue it is.
        if self._tiny_step:
            acquired = self._step.acquire(timeout=self.inline_max_us / 1e6)
        else:
            acquired = self._step.acquire(blocking=False)
        if not acquired:
            return None
        try:
            self._observe(items)
            started, cpu = time.monotonic(), time.thread_time()
            outputs, jvps, method = compute(task)
            if items == 1:
                self._record_alone(key, started, cpu, inline=True)
            return JVPResult(
                outputs=outputs,
                jvps=jvps,
                queue_ms=0.0,
                compute_ms=(time.monotonic() - started) * 1e3,
                method=method,
                batch_size=items,
            )
        finally:
            self._step.release()

    def may_inline(self, task: JVPTask, key: Hashable | None) -> bool:
        """Whether ``task`` (``key``: its `work_key`) is tiny enough to run inline: CPU, and
        its work measured to take at most ``inline_max_us`` of CPU time alone."""
        if self.inline_max_us <= 0 or self.device.type != "cpu":
            return False
        if key is None:
            return False
        if key in self._inline_runs:
            return True  # it runs inline until its inline runs say otherwise (_record_alone)
        cost = self._cpu_ms.get(key)
        if cost is None:  # never timed: only a small expression, which is tiny for sure
            ops = task.target.operations
            return (
                ops is not None
                and ops <= FIRST_INLINE_MAX_OPERATIONS
                and (sum(x.numel() for x in task.inputs) <= FIRST_INLINE_MAX_ELEMENTS)
            )
        # Batching may compute such work in less time per item, but not in less than the
        # hand-off to the worker costs, so tiny work is never sent there to batch.
        return cost * 1e3 <= self.inline_max_us

    def _record_alone(
        self, key: Hashable | None, started: float, cpu: float, *, inline: bool = False
    ) -> None:
        """Timings of an item computed alone (``key``: its `work_key`; ``inline``: on the
        event loop's thread): for batching (wall time) and for inlining (CPU time)."""
        if key is None:
            return
        ms = (time.thread_time() - cpu) * 1e3  # first: the bookkeeping is not the work's
        self._payoff.record(key, 1, (time.monotonic() - started) * 1e3)
        if key not in self._timed_once:
            # The first run pays one-time costs (binding, casting weights): not counted.
            if len(self._timed_once) >= 1024:
                self._timed_once.clear()
                self._cpu_ms.clear()
                self._inline_runs.clear()
            self._timed_once.add(key)
            return
        # Worker runs: the lowest seen. A run in the worker thread while the event loop is
        # busy costs several times the CPU of the same run alone (the GIL changing hands at
        # every torch call), which is the cost inlining avoids, not the work's.
        old = self._cpu_ms.get(key)
        if old is None or ms < old:
            self._cpu_ms[key] = ms
        if self.step_threads is not None and not inline:
            self.step_threads.record(key, ms)
        if inline:
            # Inline runs: once five are in, the median of the last 15, which one slow run
            # (a garbage collection, a cold first run) does not move. Over twice the limit
            # (a band, so work costing about the limit does not go back and forth), the work
            # leaves for the worker and comes back only after a run under the limit.
            runs = self._inline_runs.setdefault(key, collections.deque(maxlen=15))
            runs.append(ms)
            median = sorted(runs)[len(runs) // 2]
            if len(runs) >= 5 and median * 1e3 > 2 * self.inline_max_us:
                del self._inline_runs[key]
                self._cpu_ms[key] = median

    def _observe(self, size: int) -> None:
        if self.observe_batch is not None:
            try:
                self.observe_batch(self.device, size)
            except Exception:  # noqa: BLE001 - metrics never stop the worker
                log.exception("observe_batch failed")

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item.task is None:
                return
            with self._step:
                self._step_from(item)
                self._tiny_step = False
            del item  # a finished request's tensors must not wait here for the next

    def _step_from(self, item: _Item) -> None:
        """One step: ``item`` alone or with the items that batch with it."""
        busy = self._queue.qsize() > 0 or self._last_batch > 1
        items = self._admit([item])
        if not items:
            return
        assert item.task is not None
        # Tiny work is not worth stacking or waiting for (NOTE [tiny work runs inline]).
        self._tiny_step = self.may_inline(item.task, item.work)
        limit = 1 if self._tiny_step else self._limit(item)
        waited_ms = None  # NOTE [batching must pay]: a wait for company is part of the cost
        if limit > 1:
            wait = busy and self._payoff.worth_waiting(item.key)
            gathering = time.monotonic()
            items += self._gather(item, limit - 1, wait)
            waited_ms = (time.monotonic() - gathering) * 1e3 if wait else None
        self._last_batch = len(items)
        self._observe(len(items))
        if self.step_threads is not None:
            self.step_threads.before(item.work, len(items))
        if len(items) == 1:
            self._run_one(items[0])
            if waited_ms is not None:
                self._payoff.record_lonely_wait(item.key, waited_ms)
        else:
            self._run_batch(items, waited_ms)

    def _admit(self, items: list[_Item]) -> list[_Item]:
        """The items still wanted, marked running; the expired ones get their 504."""
        now = time.monotonic()
        admitted = []
        for item in items:
            if not item.future.set_running_or_notify_cancel():
                continue  # the caller gave up (deadline or disconnect) before it ran
            if item.deadline is not None and now > item.deadline:
                item.future.set_exception(
                    DeadlineExceeded("The request passed its deadline in the queue")
                )
                continue
            seconds = item.task.seconds if item.task is not None else 0.0
            if item.deadline is not None and seconds > item.deadline - now:
                item.future.set_exception(
                    DeadlineExceeded(
                        f"The computation would take at least {seconds:.3g} s on this device; "
                        f"{item.deadline - now:.3g} s of the request's deadline were left when "
                        "it left the queue (JVP_REQUEST_TIMEOUT_S)"
                    )
                )
                continue
            admitted.append(item)
        return admitted

    def _limit(self, item: _Item) -> int:
        if item.key is None or item.key in self._unbatchable:
            return 1
        if not self._payoff.worth_batching(item.key):
            return 1
        assert item.task is not None
        cap = item.task.max_batch_size
        return min(self.max_batch_size, self.max_batch_size if cap is None else cap)

    def _gather(self, first: _Item, want: int, busy: bool) -> list[_Item]:
        """Up to ``want`` more items that stack with ``first``: those waiting now and, while
        busy, those arriving within the batch wait (NOTE [dynamic batching])."""

        def match(other: _Item) -> bool:
            return other.key == first.key and other.priority == first.priority

        got = self._admit(self._queue.take(match, want))
        if not busy or self.batch_wait_us <= 0:
            return got
        until = time.monotonic() + self.batch_wait_us / 1e6
        seen = self._queue.puts
        while len(got) < want:
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            seen = self._queue.wait_put(seen, remaining)
            urgent = self._queue.first_priority()
            if urgent is not None and urgent < first.priority:
                break  # a more urgent item waits: run what there is
            got += self._admit(self._queue.take(match, want - len(got)))
        return got

    def _run_one(self, item: _Item) -> bool:
        """Compute one item and resolve its future; whether it succeeded."""
        task = item.task
        assert task is not None
        started, cpu = time.monotonic(), time.thread_time()
        try:
            outputs, jvps, method = compute(task)
        except BaseException as e:  # noqa: BLE001 - every error goes to the caller
            item.future.set_exception(e)
            return False
        finished = time.monotonic()
        self._record_alone(item.work, started, cpu)
        item.resolve(outputs, jvps, started, finished, method)
        return True

    def _run_batch(self, items: list[_Item], waited_ms: float | None = None) -> None:
        """Compute compatible items as one vmapped JVP; if that fails, each alone."""
        tasks = [item.task for item in items if item.task is not None]
        started = time.monotonic()
        out_of_memory = False
        try:
            results = compute_batch(tasks)
        except torch.OutOfMemoryError:
            out_of_memory = True  # NOTE [free on out-of-memory]: handled past the block
        except Exception as e:  # noqa: BLE001 - each item then runs alone
            log.debug("batch of %d failed (%s); running each alone", len(items), first_line(e))
        else:
            finished = time.monotonic()
            self._payoff.record(items[0].key, len(items), (finished - started) * 1e3, waited_ms)
            for item, (outputs, jvps) in zip(items, results, strict=True):
                item.resolve(outputs, jvps, started, finished, batch_size=len(items))
            return
        if out_of_memory and torch.cuda.is_available():
            torch.cuda.empty_cache()
        succeeded = [self._run_one(item) for item in items]
        if all(succeeded) and not out_of_memory:
            self._unbatchable[items[0].key] = None
