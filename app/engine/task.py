"""The work items of the engine and their results: a leaf module, imported by the worker,
the batcher, the stacker and the services alike (it imports no other engine module at run
time, so none of them imports another to learn what a task is)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from app.engine.abstract import Estimate
    from app.engine.protocol import Operation
    from app.engine.target import Target

INTERACTIVE = 0  # priority of POST /jvp; lower runs first
BATCH = 1  # priority of batch-job tasks


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
    # options.fallback ("auto" | "none") (NOTE [forward-AD fallback] in app/engine/fallback.py).
    fallback: str = "auto"
    # Dynamic batching (NOTE [dynamic batching] in app/engine/batching.py): the largest
    # batch this task's target may join; None: the engine's limit; 0 or 1: never batches.
    max_batch_size: int | None = None
    # When the request gives up (time.monotonic()); work past it never starts, and with
    # ``watch`` (long work, by its estimate) stops at the next operator past it.
    deadline: float | None = None
    watch: bool = False
    seconds: float = 0.0  # the least time its work takes on this device (its estimate)
    # What it will make and cost (app/engine/abstract.py), once the service bounded it.
    estimate: Estimate | None = None


@dataclass
class JVPResult:
    outputs: tuple[torch.Tensor, ...]  # on the CPU
    jvps: tuple[torch.Tensor, ...]  # on the CPU
    queue_ms: float
    compute_ms: float  # of the whole batch when batch_size > 1
    method: str = "forward"
    batch_size: int = 1  # work items computed together with this one (itself included)
