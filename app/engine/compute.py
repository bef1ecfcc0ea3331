"""One work item computed on its device, and the engine's errors made of torch's: an
unsupported operator (501), an out-of-memory (507, after freeing), a computation that fails
for these inputs (422)."""

from __future__ import annotations

import re

import torch

from app.engine.abstract import DeadlineWatch
from app.engine.batching import to_device
from app.engine.errors import (
    DeviceOutOfMemory,
    EngineError,
    ForwardADUnsupported,
    InvalidRequest,
    first_line,
)
from app.engine.fallback import jvp_with_fallback, unsupported_operator
from app.engine.forward_coverage import check_forward
from app.engine.jvp import ENGINES
from app.engine.protocol import Arguments
from app.engine.task import JVPTask

# What a failed CPU allocation raises (c10's DefaultCPUAllocator), a RuntimeError.
_CPU_OUT_OF_MEMORY = re.compile(r"DefaultCPUAllocator: (can't allocate memory|not enough memory)")

Computed = tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], str]


def compute(task: JVPTask) -> Computed:
    """Run one task on its device (worker thread only) and bring the results to the host:
    ``(outputs, jvps, method)``, the method being how the JVP was computed."""
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


def _compute(task: JVPTask) -> Computed:
    try:
        target = task.target.materialize(task.dtype, task.device)

        def move(x: torch.Tensor) -> torch.Tensor:
            # Cast and move once; on CUDA through pinned memory, non-blocking.
            return to_device(x, task.dtype, task.device)

        inputs = tuple(move(x) for x in task.inputs)
        tangents = tuple(None if t is None else move(t) for t in task.tangents)
        param_tangents = {k: move(t) for k, t in task.parameter_tangents.items()}
        # NOTE [forward mode: exact or refused]: a tangent no operator drops silently.
        check_forward(
            task.target, task.operation, Arguments(target, inputs, tangents, param_tangents)
        )
        watch = DeadlineWatch(task.deadline) if task.watch and task.deadline else None
        if watch is not None:
            watch.__enter__()
        try:
            if task.operation is not None:
                outputs, jvps = task.operation(target, inputs, tangents, param_tangents)
                # options.check runs the fallbacks, and says which method ran
                method = getattr(task.operation, "method", "forward")
            else:
                outputs, jvps, method = jvp_with_fallback(
                    ENGINES[task.engine],
                    target,
                    inputs,
                    tangents,
                    param_tangents,
                    fallback=task.fallback,
                )
        finally:
            if watch is not None:
                watch.__exit__(None, None, None)
        return _host(outputs), _host(jvps), method
    except (EngineError, torch.OutOfMemoryError):
        raise
    except (RuntimeError, NotImplementedError) as e:
        if _CPU_OUT_OF_MEMORY.search(str(e)):
            # Handled as CUDA's: dropped past compute's except block (NOTE [free on
            # out-of-memory]), which frees this one's frames and tensors with it.
            raise torch.OutOfMemoryError(first_line(e)) from None
        operator = unsupported_operator(e)
        if operator:
            raise ForwardADUnsupported(
                f"Operator {operator} has no forward-AD formula in PyTorch {torch.__version__}",
            ) from None
        if isinstance(e, NotImplementedError):
            raise ForwardADUnsupported(f"Not supported under forward AD: {e}") from None
        raise InvalidRequest(f"The computation failed for these inputs: {first_line(e)}") from None
    except (ValueError, IndexError, AssertionError) as e:
        # torch.export guards raise AssertionError ("Guard failed: x.size()[1] == 3").
        raise InvalidRequest(f"The computation failed for these inputs: {first_line(e)}") from None


def _host(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(t if t.device.type == "cpu" else t.cpu() for t in tensors)
