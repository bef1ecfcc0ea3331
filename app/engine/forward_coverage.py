"""Forward mode never passes a dropped tangent for a number.

# NOTE [forward mode: exact or refused]
Forward AD raises for most operators without a forward-AD formula ("Trying to use forward
AD with X that does not support it", a custom autograd.Function without ``jvp``), and those
errors become a 501 naming the operator or a fallback (NOTE [forward-AD fallback] in
app/engine/fallback.py). It does not raise everywhere. A custom operator without an
autograd kernel (`torch.library.custom_op` with only ``register_fake``) runs below autograd
and returns a result with no tangent, in ``fwAD.make_dual`` and in `torch.func.jvp` alike,
so ``sin(op(x))`` had a JVP of zeros with ``"method": "forward"``; an argument PyTorch marks
``non_differentiable`` and a float output listed as not differentiable drop the tangent just
as quietly. Looking at the result cannot tell that from an output that legitimately depends
on no tangent (``zeros_like(x)``, ``x.detach()``, whose zero JVP API.md promises): both are
an output without a tangent.

So before the first forward-mode answer of a (target, dtype, device, shapes, arguments with
a tangent) the function runs once under `CoverageMode`, which follows the tangent's path
from those arguments through every operator and checks each against PyTorch's
derivatives.yaml (NOTE [derivative coverage check] in app/engine/derivatives.py), exactly
as reverse mode does before its first VJP (NOTE [reverse mode: exact or refused] in
app/engine/vjp.py). The table lists backward formulas; forward AD's formulas are those or
derived from them (an operator with a backward formula but no forward one raises, it does
not drop). The verdict is cached (`CoverageCache`), so a small request that was seen before
pays one dictionary look-up (2-3 µs; bench/forward_coverage.py, bench/README.md).
Operators that only take the value-independent path (``zeros_like``, ``detach``) are
accepted, so constant outputs keep their exact zero JVP. The check is conservative: an
operator that receives a tangent must carry a formula for it even when its result never
reaches an output, and operators outside ``aten`` are refused (a custom operator's
derivative is unknown here). Forward mode adds three things the table alone does not
say (`derivatives.forward_drop`, `derivatives.output_flags`, `derivatives.escapes`,
the last for both modes): ``scatter_reduce`` with "prod" (its forward formula gives no
tangent), outputs with no forward formula of their own (``native_layer_norm``'s mean),
and values leaving as Python numbers (``.item()``). A write in place with a tangent
makes every alias of the written tensor carry it (`CoverageMode._mark_storage`).
What the check cannot see: Python code reading a tensor's data without a dispatched
operator (``.numpy()``, ``.tolist()`` in an eager function); no repository model has
such code (``torch.export`` refuses ``.numpy()`` and turns ``.tolist()`` into ``item``
nodes, refused), and the built-in models and expressions do not.

Where it runs: `app.engine.compute` (every single task and every operation: tangent
batches, checks, Jacobians, HVPs, linearize), `app.engine.batching.compute_batch` (a
dynamic batch, on one item's shapes) and ``models check``. Each operation says which
arguments carry a tangent (`Operation.forward_wrt`); reverse mode checks itself.
"""

from __future__ import annotations

import torch

from app.engine.derivatives import NotCovered
from app.engine.errors import EngineError, ForwardADUnsupported
from app.engine.protocol import Arguments, Operation
from app.engine.reverse_coverage import CoverageCache
from app.engine.target import Target


def forward_refusal(gap: NotCovered) -> EngineError:
    """The 501 of forward mode for an operator that would drop the tangent."""
    return ForwardADUnsupported(
        f"Operator {gap.operator} has no forward-AD formula for what the tangent carries "
        f"into it ({gap.reason}) in PyTorch {torch.__version__}; the JVP would silently "
        "drop it, so it is refused. Send no tangent for the inputs that reach it"
    )


FORWARD_COVERAGE = CoverageCache(refusal=forward_refusal, forward=True)


def check_forward(
    source: Target | None,
    operation: Operation | None,
    args: Arguments,
) -> None:
    """Raise `ForwardADUnsupported` (501) when a tangent of ``args`` would be dropped
    silently (NOTE [forward mode: exact or refused]); ``source`` keys the cache."""
    wrt = args.carrying() if operation is None else operation.forward_wrt(args)
    if wrt is None or not (wrt[0] or wrt[1]):
        return  # nothing carries a tangent: every JVP is an exact zero
    FORWARD_COVERAGE.check(source, args.target, args.inputs, wrt[0], wrt[1], None)
