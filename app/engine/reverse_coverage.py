"""What reverse mode refuses (NOTE [reverse mode: exact or refused] in app/engine/vjp.py):
the 501 of an autograd error that names an operator without a backward formula, and the
coverage check that finds, before the first VJP of a kind, an operator that would drop the
gradient without raising.

    >>> import torch
    >>> from app.engine.target import Materialized
    >>> m = Materialized(fn=lambda a, s: (torch.sin(a[0]),), parameters={}, buffers={})
    >>> find_gap(m, (torch.ones(2),), (0,), (), (0,)) is None  # sin has a backward formula
    True
"""

from __future__ import annotations

import collections
import re
import threading
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from app.engine import derivatives as coverage_table
from app.engine.derivatives import NotCovered
from app.engine.errors import EngineError, ReverseADUnsupported
from app.engine.protocol import Tensors, partial_function
from app.engine.target import Materialized, Target

# What eager autograd raises for an operator (or argument) without a backward formula.
_NO_BACKWARD = (
    re.compile(r"derivative for (?:aten::)?'?([\w.]+)'? is not implemented"),
    re.compile(r"The function '([\w.]+)' is not differentiable with respect to argument"),
    re.compile(r"autograd kernel was not registered to the Autograd key\(s\) but we are trying "
               r"to backprop through it.*?([\w:.]+)"),
)  # fmt: skip


@contextmanager
def named_refusals() -> Iterator[None]:
    """Turn an autograd error that names an operator without a backward formula into the
    501 naming it (`reverse_ad_error`); an engine error and any other error pass as they
    are."""
    try:
        yield
    except EngineError:
        raise
    except (RuntimeError, NotImplementedError) as e:
        refused = reverse_ad_error(e)
        if refused is not None:
            raise refused from None
        raise


def reverse_ad_error(error: BaseException) -> ReverseADUnsupported | None:
    """The 501 of an autograd error that names an operator without a backward formula."""
    text = str(error)
    for pattern in _NO_BACKWARD:
        match = pattern.search(text)
        if match:
            return ReverseADUnsupported(
                f"Operator {match.group(1)} has no backward (reverse-mode) formula in PyTorch "
                f"{torch.__version__}: {text.strip().splitlines()[0][:300]}"
            )
    return None


# The coverage check.


class CoverageMode(TorchDispatchMode):
    """Follows the gradient's path through a forward pass and records the first operator
    that would drop it (`NotCovered`), per PyTorch's derivatives.yaml."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, weakref.ref[torch.Tensor]] = {}
        self._dead: dict[int, tuple[weakref.ref[torch.Tensor], NotCovered]] = {}
        self.gap: NotCovered | None = None

    def mark(self, t: torch.Tensor) -> None:
        self._live[id(t)] = weakref.ref(t)

    def is_live(self, t: Any) -> bool:
        ref = self._live.get(id(t))
        return isinstance(t, torch.Tensor) and ref is not None and ref() is t

    def dead(self, t: Any) -> NotCovered | None:
        found = self._dead.get(id(t))
        return found[1] if found is not None and found[0]() is t else None

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.gap is not None:
            return out
        given = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        for a in given:
            gap = self.dead(a)
            if gap is not None:
                self.gap = gap
                return out
        if not any(self.is_live(a) for a in given):
            return out
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        floats = [t for t in outputs if t.dtype.is_floating_point or t.dtype.is_complex]
        if not floats:
            return out  # integer or boolean results carry no gradient in any mode
        base = coverage_table._base_name(func)
        if base in coverage_table._VALUE_INDEPENDENT:
            return out
        gap = self._check(func, args, kwargs)
        if gap is not None:
            self.gap = gap
            return out
        entry = coverage_table.coverage(func) if isinstance(func, torch._ops.OpOverload) else None
        flags = entry.differentiable_outputs if entry is not None else None
        name = coverage_table._name(func)
        for i, t in enumerate(outputs):
            if not (t.dtype.is_floating_point or t.dtype.is_complex):
                continue
            if flags is not None and i < len(flags) and not flags[i]:
                why = NotCovered(name, f"its output {i} has no derivative")
                self._dead[id(t)] = (weakref.ref(t), why)
            else:
                self.mark(t)
        return out

    def _check(
        self, func: Any, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> NotCovered | None:
        name = coverage_table._name(func)
        if not isinstance(func, torch._ops.OpOverload):
            return NotCovered(name, "not an aten operator, so its derivative is unknown")
        entry = coverage_table.coverage(func)
        if entry is None:
            namespace, _, base = func._schema.name.partition("::")
            if base in coverage_table._EXACT_WITHOUT_ENTRY:
                return None
            if namespace != "aten":
                return NotCovered(name, f"a {namespace} operator, with no derivative formula")
            return NotCovered(name, "PyTorch lists no derivative formula for it")
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            leaves = tree_leaves(value)
            if any(self.is_live(v) for v in leaves) and not entry.arguments.get(arg.name, False):
                return NotCovered(name, f"no derivative for its argument {arg.name!r}")
        return None


def find_gap(
    target: Materialized,
    inputs: Tensors,
    input_indices: Sequence[int],
    parameter_names: Sequence[str],
    selected: Sequence[int] | None,
    *,
    copies: bool = False,
) -> NotCovered | None:
    """One forward pass under `CoverageMode` with the ``wrt`` arguments live: the first
    operator on the gradient's path without a backward formula, or None. ``selected``: the
    outputs that count (None: every one). ``copies``: the live arguments are copies (not
    leaves), so a function that writes into an argument runs and leaves the caller's as
    they were (forward mode, whose dual inputs may be written to)."""
    f, primals = partial_function(target, inputs, input_indices, parameter_names)
    mode = CoverageMode()
    args = tuple(p.detach().requires_grad_(p.is_floating_point()) for p in primals)
    if copies:
        args = tuple(a.clone() for a in args)
    with torch.enable_grad(), mode:
        for a in args:
            mode.mark(a)
        outputs = f(*args)
        for i in range(len(outputs)) if selected is None else selected:
            gap = mode.dead(outputs[i])
            if gap is not None and mode.gap is None:
                mode.gap = gap
        del outputs
    return mode.gap


def reverse_refusal(gap: NotCovered) -> EngineError:
    """The 501 of reverse mode for an operator that would drop the gradient."""
    return ReverseADUnsupported(
        f"Operator {gap.operator} has no backward (reverse-mode) formula for what the "
        f"gradient carries into it ({gap.reason}) in PyTorch {torch.__version__}; "
        "the VJP would silently drop it, so it is refused. Leave the argument that "
        "reaches it out of 'wrt'"
    )


class CoverageCache:
    """`find_gap` once per (target, dtype, device, shapes, wrt, selected outputs);
    ``refusal`` makes the error of a gap (one cache per mode: reverse, forward)."""

    def __init__(
        self,
        refusal: Callable[[NotCovered], EngineError] = reverse_refusal,
        max_entries: int = 1024,
        *,
        copies: bool = False,
    ) -> None:
        self.refusal = refusal
        self.copies = copies  # `find_gap`'s
        self.max_entries = max_entries
        self._verdicts: collections.OrderedDict[Hashable, NotCovered | None]
        self._verdicts = collections.OrderedDict()
        self._lock = threading.Lock()

    def check(
        self,
        source: Target | None,
        target: Materialized,
        inputs: Tensors,
        input_indices: tuple[int, ...],
        parameter_names: tuple[str, ...],
        selected: tuple[int, ...] | None,
    ) -> None:
        """Raise ``refusal(gap)`` (a 501) naming the operator that would drop the
        gradient; cached when ``source`` is given (a Target is hashed by identity)."""
        key = None
        if source is not None and inputs:
            dtype, device = inputs[0].dtype, inputs[0].device
            shapes = tuple(tuple(x.shape) for x in inputs)
            key = (source, dtype, device, shapes, input_indices, parameter_names, selected)
        if key is not None and key in self._verdicts:
            gap = self._verdicts[key]
        else:
            gap = find_gap(
                target, inputs, input_indices, parameter_names, selected, copies=self.copies
            )
            if key is not None:
                with self._lock:
                    self._verdicts[key] = gap
                    if len(self._verdicts) > self.max_entries:
                        self._verdicts.popitem(last=False)
        if gap is not None:
            raise self.refusal(gap)


COVERAGE = CoverageCache()
