"""What a JVP is taken of: a pure function of named inputs and named parameters.

Expressions and models both become a `Target`. The engine never sees where a
target came from; it asks for a `Materialized` copy on one dtype and device and
calls ``fn(inputs, state)``, where ``state`` maps parameter and buffer names to
tensors (so parameters can be swapped for dual tensors, as
`torch.func.functional_call` allows).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

Fn = Callable[[tuple[torch.Tensor, ...], dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Materialized:
    """A target on one dtype and device, ready to run."""

    fn: Fn
    parameters: Mapping[str, torch.Tensor]
    buffers: Mapping[str, torch.Tensor]


@dataclass(eq=False)
class Target:
    """A function of named inputs (and, for models, parameters and buffers).

    ``build(dtype, device)`` makes the `Materialized` form; it is called once per
    (dtype, device) and cached, so weights are cast and copied only once.
    """

    key: str
    input_names: tuple[str, ...]
    single_output: bool
    build: Callable[[torch.dtype, torch.device], Materialized]
    # Declared shapes per input (-1 = any size), when known; checked before queueing.
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    parameter_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # An expression's operator calls per evaluation (None for a model): with few of them
    # on small tensors the work is known to be tiny before it was ever timed (NOTE [tiny
    # work runs inline] in app/engine/worker.py).
    operations: int | None = None
    # Every operator elementwise (an expression without reductions, matmul or reshapes):
    # requests may then be stacked and computed as one (app/engine/stacking.py).
    elementwise: bool = False
    _cache: dict[tuple[torch.dtype, torch.device], Materialized] = field(
        default_factory=dict, repr=False
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def materialize(self, dtype: torch.dtype, device: torch.device) -> Materialized:
        with self._lock:
            found = self._cache.get((dtype, device))
            if found is None:
                found = self._cache[(dtype, device)] = self.build(dtype, device)
            return found
