"""A job's results stacked into arrays: row i of ``output`` and ``jvp`` is task ``index[i]``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ._tensors import Array, is_torch_tensor
from ._types import JobTaskError, JobTaskResult

__all__ = ["JobArrays", "OnError", "stack_results"]

OnError = Literal["raise", "skip"]


@dataclass(frozen=True)
class JobArrays:
    """A job's results as arrays with a leading task dimension.

    ``output`` and ``jvp`` stack the tasks' results (a list of stacked arrays, one per
    output, for a function with several outputs); row i is task ``index[i]``, so
    ``index`` is ``0, 1, ..., n-1`` when every task succeeded. ``errors`` holds the
    tasks left out because they failed (``on_error="skip"``).
    """

    output: Array | list[Array]
    jvp: Array | list[Array]
    index: np.ndarray
    errors: dict[int, JobTaskError]


def stack_results(results: Iterable[JobTaskResult], *, on_error: OnError = "raise") -> JobArrays:
    """Stack task results (in task order) into :class:`JobArrays`.

    Args:
        on_error: ``"raise"`` (default): a failed task is a ValueError naming it;
            ``"skip"``: failed tasks are left out (``errors``, and ``index`` says
            which task each row is).

    Raises:
        ValueError: a task failed (``on_error="raise"``), no task succeeded, or the
            tasks' results differ in shape or number of outputs (they cannot stack).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"results_array(): expected on_error 'raise' or 'skip', got {on_error!r}")
    ok: list[JobTaskResult] = []
    errors: dict[int, JobTaskError] = {}
    for result in sorted(results, key=lambda r: r.index):
        if result.error is None:
            ok.append(result)
        else:
            errors[result.index] = result.error
    if errors and on_error == "raise":
        first, err = next(iter(errors.items()))
        raise ValueError(
            f"{len(errors)} task(s) failed (task {first}: {err.type or 'error'}: {err.message}); "
            "pass on_error='skip' to stack the others"
        )
    if not ok:
        raise ValueError("no task succeeded: nothing to stack")
    return JobArrays(
        output=_stack_field(ok, "output"),
        jvp=_stack_field(ok, "jvp"),
        index=np.array([r.index for r in ok], dtype=np.int64),
        errors=errors,
    )


def _stack_field(results: Sequence[JobTaskResult], key: str) -> Array | list[Array]:
    values = [getattr(r, key) for r in results]
    if not isinstance(values[0], list):
        return _stack([(r.index, v) for r, v in zip(results, values, strict=True)], key)
    count = len(values[0])
    for r, v in zip(results, values, strict=True):
        if not isinstance(v, list) or len(v) != count:
            raise ValueError(
                f"cannot stack {key}: task {results[0].index} has {count} outputs, "
                f"task {r.index} has {len(v) if isinstance(v, list) else 1}"
            )
    return [
        _stack([(r.index, v[i]) for r, v in zip(results, values, strict=True)], key)
        for i in range(count)
    ]


def _stack(items: list[tuple[int, Any]], key: str) -> Array:
    first_index, first = items[0]
    shape = tuple(first.shape)
    for index, value in items:
        if tuple(value.shape) != shape:
            raise ValueError(
                f"cannot stack {key}: task {first_index} has shape {list(shape)}, "
                f"task {index} has shape {list(value.shape)}"
            )
    if is_torch_tensor(first):
        import torch

        return torch.stack([value for _, value in items])
    return np.stack([np.asarray(value) for _, value in items])
