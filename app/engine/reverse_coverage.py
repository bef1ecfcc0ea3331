"""What reverse mode refuses (NOTE [reverse mode: exact or refused] in app/engine/vjp.py;
forward mode uses the same check: NOTE [forward mode: exact or refused] in
app/engine/forward_coverage.py):
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


def _is_float(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and (t.dtype.is_floating_point or t.dtype.is_complex)


class CoverageMode(TorchDispatchMode):
    """Follows the gradient's path through a forward pass and records the first operator
    that would drop it (`NotCovered`), per PyTorch's derivatives.yaml."""

    def __init__(self, *, forward: bool = False) -> None:
        super().__init__()
        self.forward = forward  # also refuse forward AD's own drops (`forward_drop`)
        self._live: dict[int, weakref.ref[torch.Tensor]] = {}
        self._dead: dict[int, tuple[weakref.ref[torch.Tensor], NotCovered]] = {}
        # Storages written in place with a live value (`_mark_storage`): data_ptr -> writer.
        self._written: dict[int, weakref.ref[torch.Tensor]] = {}
        self.gap: NotCovered | None = None

    def mark(self, t: torch.Tensor) -> None:
        self._live[id(t)] = weakref.ref(t)

    def is_live(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        ref = self._live.get(id(t))
        return (ref is not None and ref() is t) or self._shares_written(t)

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
        if any(self.is_live(a) and _is_float(a) for a in given):
            self.gap = coverage_table.escapes(func)
            if self.gap is not None:
                return out
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        floats = [t for t in outputs if t.dtype.is_floating_point or t.dtype.is_complex]
        if not floats:
            return out  # integer or boolean results carry no gradient in any mode
        base = coverage_table._base_name(func)
        if base in coverage_table.NO_TANGENT_OUT:
            return out
        gap = self._check(func, args, kwargs)
        if gap is not None:
            self.gap = gap
            return out
        entry = coverage_table.coverage(func) if isinstance(func, torch._ops.OpOverload) else None
        flags = coverage_table.output_flags(func, entry, self.forward)
        name = coverage_table._name(func)
        for i, t in enumerate(outputs):
            if not (t.dtype.is_floating_point or t.dtype.is_complex):
                continue
            if flags is not None and i < len(flags) and not flags[i]:
                why = NotCovered(name, f"its output {i} has no derivative")
                self._dead[id(t)] = (weakref.ref(t), why)
            else:
                self.mark(t)
                if func._schema.is_mutable:
                    self._mark_storage(t)
        return out

    def _mark_storage(self, t: torch.Tensor) -> None:
        """``t`` was written to in place with a live value: every alias of it (its base,
        views made before or after) now carries the tangent too."""
        try:
            key = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return  # no storage of its own (sparse and other layouts): identity only
        self._written[key] = weakref.ref(t)

    def _shares_written(self, t: torch.Tensor) -> bool:
        if not self._written:
            return False
        try:
            key = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return False
        ref = self._written.get(key)
        held = None if ref is None else ref()  # alive: its storage is, so no reuse of it
        return held is not None and held.untyped_storage().data_ptr() == key

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
        bound = {}
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name, arg.default_value)
            bound[arg.name] = value
            leaves = tree_leaves(value)
            if any(self.is_live(v) for v in leaves) and not entry.arguments.get(arg.name, False):
                return NotCovered(name, f"no derivative for its argument {arg.name!r}")
        return coverage_table.forward_drop(func, bound) if self.forward else None


def find_gap(
    target: Materialized,
    inputs: Tensors,
    input_indices: Sequence[int],
    parameter_names: Sequence[str],
    selected: Sequence[int] | None,
    *,
    forward: bool = False,
) -> NotCovered | None:
    """One forward pass under `CoverageMode` with the ``wrt`` arguments live: the first
    operator on the gradient's path without a backward formula, or None. ``selected``: the
    outputs that count (None: every one). ``forward``: for forward mode, whose formulas
    drop a few tangents the table does not show (`derivatives.forward_drop`). Its pass
    runs under no_grad, so no autograd graph is kept (no more memory than a plain
    forward), on copies of the live arguments, which a function may write to as it may
    to dual ones (the caller's tensors stay as they were). They still require grad:
    PyTorch's composite operators choose their kernel by that as by a dual tensor's
    tangent (``embedding_bag`` takes ``_embedding_bag``, not ``_forward_only``), and
    by grad mode and requires_grad together as forward AD, where that is False."""
    f, primals = partial_function(target, inputs, input_indices, parameter_names)
    mode = CoverageMode(forward=forward)
    copy = (lambda p: p.detach().clone()) if forward else (lambda p: p.detach())
    args = tuple(copy(p).requires_grad_(p.is_floating_point()) for p in primals)
    with torch.set_grad_enabled(not forward), mode:
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
        forward: bool = False,
    ) -> None:
        self.refusal = refusal
        self.forward = forward  # `find_gap`'s
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
                target, inputs, input_indices, parameter_names, selected, forward=self.forward
            )
            if key is not None:
                with self._lock:
                    self._verdicts[key] = gap
                    if len(self._verdicts) > self.max_entries:
                        self._verdicts.popitem(last=False)
        if gap is not None:
            raise self.refusal(gap)


COVERAGE = CoverageCache()
