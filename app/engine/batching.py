"""Dynamic batching: compatible JVP work items stacked and computed as one `torch.func.vmap`.

# NOTE [dynamic batching]
In the manner of Triton's dynamic batcher and Ray Serve's ``@serve.batch``, a
device worker that takes a work item off its queue also takes the items waiting
beside it that compute the same thing on different numbers: the same target
object (`Target`, by identity, so a reloaded model never mixes with its old
copy), dtype, device, engine, fallback, tangent and parameter-tangent names and
the same shapes throughout (`batch_key`). Their tensors are stacked on a new
leading dimension, moved to the device once, and the JVP runs once as
``vmap(jvp_functional)``; the results are split back, one per item.

Why vmap and not concatenation along dim 0: vmap gives every item its own slice,
so each item's numbers are those of a call alone, whatever the function does
across its own leading dimension (a sum over rows, a batch norm, attention
across a sequence). Models from the repository batch only when their
``config.json`` declares ``max_batch_size`` > 0 (a program may hold operators
without a batching rule, or branch on values); built-ins (plain eval-mode
modules) and expressions batch under the engine's ``JVP_MAX_BATCH_SIZE``.

What never batches: items with an ``operation`` (tangent_batch, check, jacobian,
hvp, linearize) and items whose target says ``max_batch_size`` 0; an item that
needs a forward-AD fallback fails its batch, and so runs alone (below), where the
fallback applies. The dual engine (``fwAD.make_dual``) has no
batching rule, so a batch always computes with ``torch.func.jvp``: both take
every derivative through the same forward-AD formulas, and the response keeps
reporting the requested engine (tests/engine/test_batching.py holds the two to
1e-6 in float32).

If the vmapped call fails for any reason (an operator without a batching rule, a
value-dependent branch, one item whose numbers raise, out of memory), every item
of the batch runs again alone, so each gets its own result or its own error.
When they then all succeed, the failure belonged to vmap, not to an item, and
the worker stops batching that key (see `DeviceWorker` in app/engine/worker.py).

How long the worker waits for company: only while it is busy (other items were
already queued when it took the first one, or its previous step was a batch),
and at most ``JVP_BATCH_WAIT_US``; a request that reaches an idle worker runs at
once. Only items of the first item's priority join its batch, and the wait ends
early when an item of a more urgent priority arrives.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch.func import vmap

from app.engine.forward_coverage import check_forward
from app.engine.jvp import functional, gives_zero_tangents, no_tangents, verified
from app.engine.protocol import Arguments, Operation
from app.engine.task import JVPTask

Tensors = tuple[torch.Tensor, ...]


class _Queued(Protocol):
    priority: int
    seq: int

    def __lt__(self, other: Any) -> bool: ...


Q = TypeVar("Q", bound=_Queued)


class BatchQueue(Generic[Q]):
    """A priority queue (lowest ``(priority, seq)`` first) that can also hand out every
    waiting item matching a test, and wait for the next ``put``."""

    def __init__(self) -> None:
        self._heap: list[Q] = []
        self._cond = threading.Condition()
        self._puts = 0

    def put(self, item: Q) -> None:
        with self._cond:
            heapq.heappush(self._heap, item)
            self._puts += 1
            self._cond.notify_all()

    def get(self) -> Q:
        """The first item, waiting for one if there is none."""
        with self._cond:
            while not self._heap:
                self._cond.wait()
            return heapq.heappop(self._heap)

    def qsize(self) -> int:
        return len(self._heap)

    @property
    def puts(self) -> int:
        """How many items were ever put (to wait for the next one with `wait_put`)."""
        return self._puts

    def wait_put(self, seen: int, timeout_s: float) -> int:
        """Wait until more than ``seen`` items were put, at most ``timeout_s``; the count now."""
        with self._cond:
            self._cond.wait_for(lambda: self._puts > seen, timeout_s)
            return self._puts

    def first_priority(self) -> int | None:
        with self._cond:
            return self._heap[0].priority if self._heap else None

    def take(self, match: Callable[[Q], bool], limit: int) -> list[Q]:
        """Remove and return up to ``limit`` items for which ``match`` holds, first first."""
        if limit <= 0:
            return []
        with self._cond:
            found = sorted(item for item in self._heap if match(item))[:limit]
            if found:
                chosen = {id(item) for item in found}
                self._heap = [item for item in self._heap if id(item) not in chosen]
                heapq.heapify(self._heap)
            return found


def batch_key(task: JVPTask, work: Hashable | None = None) -> Hashable | None:
    """What items must share to be stacked together; None: this item never batches.
    ``work``: the task's `work_key`, when the caller has it already."""
    if task.max_batch_size is not None and task.max_batch_size <= 1:
        return None
    return work if work is not None else work_key(task)


def work_key(task: JVPTask) -> Hashable | None:
    """What plain JVPs computing the same thing on different numbers share (target, dtype,
    device, engine, fallback, shapes); None for an operation (its cost depends on more)."""
    if task.operation is not None:
        return None
    return (
        task.target,  # by identity (Target is eq=False)
        task.dtype,
        task.device,
        task.engine,
        task.fallback,
        tuple(tuple(x.shape) for x in task.inputs),
        tuple(None if t is None else tuple(t.shape) for t in task.tangents),
        tuple(sorted((k, tuple(t.shape)) for k, t in task.parameter_tangents.items())),
    )


def to_device(x: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Cast and move a host tensor once; on CUDA through pinned memory, without blocking.

    The caching host allocator keeps a pinned buffer until the copies that read it
    are done, so dropping ``x`` right after is safe.
    """
    if device.type == "cuda":
        if x.device.type == "cpu" and not x.is_pinned():
            x = x.pin_memory()
        return x.to(device=device, dtype=dtype, non_blocking=True)
    if x.dtype == dtype and x.device == device:
        return x  # already there: skip the call (a few µs, per tensor, per request)
    return x.to(device=device, dtype=dtype)


def _stack(xs: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``xs`` stacked on a new leading dimension, on ``device`` in ``dtype``.

    On CUDA the stack is written straight into pinned memory (one host copy).
    """
    if any(x.dtype != xs[0].dtype for x in xs):
        xs = [x.to(dtype) for x in xs]
    if device.type == "cuda":
        out = torch.empty((len(xs), *xs[0].shape), dtype=xs[0].dtype, pin_memory=True)
        torch.stack(list(xs), out=out)
        return out.to(device=device, dtype=dtype, non_blocking=True)
    return torch.stack(list(xs)).to(dtype=dtype)


def vmap_jvp(a: Arguments) -> tuple[Tensors, Tensors]:
    """`jvp_functional` over a leading batch dimension of every tensor given: first with
    zero tangents for small plain operands, kept only if provably exact (NOTE [mixed dual
    and plain operands] in app/engine/jvp.py; the check runs outside vmap)."""
    target, inputs, tangents, parameter_tangents = a

    which = [i for i, t in enumerate(tangents) if t is not None]
    if not which and not parameter_tangents:
        outputs, jvps = vmap(lambda xs: no_tangents(target, xs))(inputs)
        return tuple(outputs), tuple(jvps)

    def batched(zeros: bool) -> tuple[Tensors, Tensors]:
        def one(xs: Tensors, ts: Tensors, ps: dict[str, torch.Tensor]) -> tuple[Tensors, Tensors]:
            full: list[torch.Tensor | None] = [None] * len(xs)
            for i, t in zip(which, ts, strict=True):
                full[i] = t
            return functional(Arguments(target, xs, tuple(full), ps), zeros)

        # vmap maps tensors only: the inputs without a tangent are rebuilt inside.
        present = tuple(t for t in tangents if t is not None)
        outputs, jvps = vmap(one)(inputs, present, dict(parameter_tangents))
        return tuple(outputs), tuple(jvps)

    # Per item, an operand is as small as in a call alone: its first dimension is the batch.
    items = tuple(x[0] for x in inputs)
    return verified(batched, gives_zero_tangents(target, items, tangents, parameter_tangents))


def compute_batch(tasks: Sequence[JVPTask]) -> list[tuple[Tensors, Tensors]]:
    """Run compatible tasks (same `batch_key`) as one vmapped JVP; per task, its outputs and
    JVPs on the host. Raises whatever the batched call raises (the caller then runs each
    task alone)."""
    first = tasks[0]
    dtype, device = first.dtype, first.device
    target = first.target.materialize(dtype, device)
    inputs = tuple(
        _stack([t.inputs[i] for t in tasks], dtype, device) for i in range(len(first.inputs))
    )
    tangents = tuple(
        None if tangent is None else _stack([t.tangents[i] for t in tasks], dtype, device)  # type: ignore[misc]
        for i, tangent in enumerate(first.tangents)
    )
    parameter_tangents = {
        name: _stack([t.parameter_tangents[name] for t in tasks], dtype, device)
        for name in first.parameter_tangents
    }
    # NOTE [forward mode: exact or refused], on one item's shapes (its verdict is a task's).
    check_forward(
        first.target,
        None,
        Arguments(target, tuple(x[0] for x in inputs), first.tangents, first.parameter_tangents),
    )
    outputs, jvps = vmap_jvp(Arguments(target, inputs, tangents, parameter_tangents))
    # One device-to-host copy per batched tensor; each item gets views of its own slice.
    host_outputs = [o.cpu().unbind(0) for o in outputs]
    host_jvps = [j.cpu().unbind(0) for j in jvps]
    return [
        (tuple(o[b] for o in host_outputs), tuple(j[b] for j in host_jvps))
        for b in range(len(tasks))
    ]


class VmapWarmUp(Operation):
    """An operation that runs `vmap_jvp` on two copies of a task's tensors, so the first
    batched request after start-up finds vmap's machinery warm (`Engine.start`)."""

    kind = "warm-up"

    def run(self, a: Arguments) -> tuple[Tensors, Tensors]:
        def two(x: torch.Tensor) -> torch.Tensor:
            return torch.stack([x, x])

        outputs, jvps = vmap_jvp(
            Arguments(
                a.target,
                tuple(two(x) for x in a.inputs),
                tuple(None if t is None else two(t) for t in a.tangents),
                {k: two(t) for k, t in a.parameter_tangents.items()},
            )
        )
        return tuple(o[0] for o in outputs), tuple(j[0] for j in jvps)
