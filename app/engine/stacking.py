"""Tiny elementwise expressions of requests that arrive together, computed as one.

# NOTE [stacking tiny expressions]
A tiny JVP runs on the event loop's thread (NOTE [tiny work runs inline] in
app/engine/worker.py), where its cost is mostly PyTorch's per-call overhead: the
ops of ``x**2 + y**2`` on 10x10 take 42 µs in a bare loop and about 120 µs
between the rest of a request's handling. So a request that may run inline does
not compute at once: it joins the requests of the same `work_key` that reached
this point in the same turn of the event loop, and one callback scheduled for the
next turn computes them together. No request waits for company: the group is
whatever arrived in the turn, and a group of one computes alone as before.

A group of expressions whose every operator is elementwise
(`CompiledExpression.elementwise`) computes as one JVP on its tensors stacked
on a new leading dimension, each input first given leading singleton dimensions
up to the largest input rank, so broadcasting pairs the same elements as in each
request alone. Elementwise operators compute every element from the elements at
the same index only, so each request's slice holds exactly its own numbers
(tests/engine/test_stacking.py compares them with the requests computed alone).
Anything else, or a stacked call that fails, computes each request alone, so
each gets its own result or its own error. Unlike the worker's batches
(NOTE [dynamic batching]), no ``vmap``: its fixed cost is what stacking saves.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import torch

from app.engine.task import JVPResult, JVPTask

if TYPE_CHECKING:
    from app.engine.worker import DeviceWorker

Pending = list[tuple["JVPTask", "asyncio.Future[JVPResult | None]"]]


def stack_tasks(tasks: Sequence[JVPTask]) -> JVPTask | None:
    """One task over the tasks' tensors stacked on a new leading dimension (aligned for
    broadcasting), or None when they cannot stack (not elementwise, no inputs)."""
    first = tasks[0]
    if not first.target.elementwise or not first.inputs or first.parameter_tangents:
        return None
    rank = max(x.dim() for x in first.inputs)

    def stacked(xs: list[torch.Tensor]) -> torch.Tensor:
        xs = [x if x.dtype == first.dtype else x.to(first.dtype) for x in xs]
        pad = [1] * (rank - xs[0].dim())
        return torch.stack(xs).reshape(len(xs), *pad, *xs[0].shape)

    inputs = tuple(stacked([t.inputs[i] for t in tasks]) for i in range(len(first.inputs)))
    tangents = tuple(
        None if tangent is None else stacked([t.tangents[i] for t in tasks])  # type: ignore[misc]
        for i, tangent in enumerate(first.tangents)
    )
    return dataclasses.replace(first, inputs=inputs, tangents=tangents)


def split(
    outputs: tuple[torch.Tensor, ...], jvps: tuple[torch.Tensor, ...], n: int
) -> list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] | None:
    """Each request's slices of a stacked result; None if a result lacks the stacked
    dimension (then each request computes alone)."""
    if any(r.dim() == 0 or r.shape[0] != n for r in (*outputs, *jvps)):
        return None
    return [(tuple(o[k] for o in outputs), tuple(j[k] for j in jvps)) for k in range(n)]


class Stacker:
    """Groups the tiny requests of one event-loop turn by `work_key` (NOTE [stacking tiny
    expressions])."""

    def __init__(self) -> None:
        # (event loop, worker, work key) -> the requests of this turn. The loop is part of
        # the key: each loop flushes only its own futures (an engine may serve two loops,
        # the app's and a test's or a job runner's).
        self._groups: dict[tuple[int, int, Hashable], Pending] = {}

    async def run(self, worker: DeviceWorker, task: JVPTask, work: Hashable) -> JVPResult | None:
        """The task's result (``work``: its `work_key`), computed inline with the others of
        this turn; None when the worker was busy (the caller queues the task instead)."""
        loop = asyncio.get_running_loop()
        key = (id(loop), id(worker), work)
        future: asyncio.Future[JVPResult | None] = loop.create_future()
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = []
            loop.call_soon(self._flush, worker, key)
        group.append((task, future))
        return await future

    def _flush(self, worker: DeviceWorker, key: tuple[int, int, Hashable]) -> None:
        # Waiters that gave up (deadline, disconnect) are skipped.
        group = [(t, f) for t, f in self._groups.pop(key, []) if not f.done()]
        if len(group) > 1 and self._together(worker, group):
            return
        for task, future in group:
            try:
                future.set_result(worker.try_inline(task, key[2]))
            except Exception as e:  # noqa: BLE001 - each request gets its own error
                future.set_exception(e)

    @staticmethod
    def _together(worker: DeviceWorker, group: Pending) -> bool:
        """Compute the group as one stacked JVP; whether every request got its result."""
        results = compute_together(worker, [task for task, _ in group])
        if results is None:
            return False
        for (_, future), result in zip(group, results, strict=True):
            future.set_result(result)
        return True


def compute_together(worker: DeviceWorker, tasks: Sequence[JVPTask]) -> list[JVPResult] | None:
    """Tasks of one `work_key` computed as one stacked JVP on this thread, each its own
    result; None when they do not stack, the worker is in a step that is not tiny, or the
    stacked call fails (then each computes alone, for its own result or its own error)."""
    try:
        stacked = stack_tasks(tasks)
        if stacked is None:
            return None
        result = worker.run_inline(stacked, items=len(tasks))
        if result is None:
            return None
        parts = split(result.outputs, result.jvps, len(tasks))
    except Exception:  # noqa: BLE001 - each task then runs alone, for its own error
        return None
    if parts is None:
        return None
    return [
        JVPResult(
            outputs=outputs,
            jvps=jvps,
            queue_ms=0.0,
            compute_ms=result.compute_ms,
            method=result.method,
            batch_size=len(tasks),
        )
        for outputs, jvps in parts
    ]
