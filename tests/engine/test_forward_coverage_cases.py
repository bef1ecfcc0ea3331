"""The ways an operator can drop a tangent in forward mode, each through `compute` (the
worker's own path) on both engines: a silent drop is a 501 `ForwardADUnsupported` naming
the operator; what forward AD computes is exact (against `torch.func.jvp` where it runs and
float64 central differences); what the program itself makes constant (``detach``,
``.data``, ``zeros_like``) keeps its zero JVP, as API.md promises (NOTE [forward mode: exact
or refused] in app/engine/forward_coverage.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from app.engine.batching import compute_batch
from app.engine.compute import compute
from app.engine.errors import ForwardADUnsupported
from app.engine.target import Materialized, Target
from app.engine.task import JVPTask
from app.models.check import check_repository
from tests.models.conftest import save_model

F64 = torch.float64
CPU = torch.device("cpu")
ENGINES = ["dual", "functional"]
Fn = Callable[[torch.Tensor], torch.Tensor]


@torch.library.custom_op("jvptestfcc::no_autograd", mutates_args=())
def no_autograd(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0


@no_autograd.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("jvptestfcc::backward_only", mutates_args=())
def backward_only(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0


@backward_only.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


backward_only.register_autograd(lambda ctx, g: g * 2.0)


class WithJvp(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x)

    @staticmethod
    def setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_forward(inputs[0])  # type: ignore[attr-defined]
        ctx.save_for_backward(inputs[0])  # type: ignore[attr-defined]

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
        return g * torch.cos(ctx.saved_tensors[0])  # type: ignore[attr-defined]

    @staticmethod
    def jvp(ctx: object, t: torch.Tensor) -> torch.Tensor:
        return torch.cos(ctx.saved_tensors[0]) * t  # type: ignore[attr-defined]


class WithoutJvp(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * 3.0

    @staticmethod
    def setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
        return g * 3.0


def _written_alias(x: torch.Tensor, then: Fn) -> torch.Tensor:
    """A constant written in place through a view with x: every alias now depends on x."""
    y = torch.zeros_like(x)
    head = y[:2]
    head.copy_(x[:2])
    return then(y[1:])  # another view of y, made after the write


_compiled = torch.compile(lambda a: torch.sin(a) * a, backend="eager")
_index = torch.tensor([0, 0, 1, 1])

REFUSED: dict[str, tuple[Fn, str]] = {
    "custom op without autograd": (lambda x: torch.sin(no_autograd(x)), "no_autograd"),
    "custom op with a backward only": (lambda x: torch.sin(backward_only(x)), "backward_only"),
    "a value leaving as a Python number": (lambda x: x * x[0].item(), "_local_scalar_dense"),
    "scatter_reduce prod": (
        lambda x: torch.ones(2, dtype=x.dtype).scatter_reduce(0, _index, x, "prod"),
        "scatter_reduce",
    ),
    "an alias written with the tangent, then a custom op": (
        lambda x: _written_alias(x, no_autograd),
        "no_autograd",
    ),
    "histc (PyTorch: not implemented)": (lambda x: torch.histc(x, bins=3, min=0, max=2), "histc"),
    "native_layer_norm's mean (no forward formula of its own)": (
        lambda x: torch.native_layer_norm(x.view(2, 2), (2,), None, None, 1e-5)[1] * 1.0,
        "native_layer_norm",
    ),
    "a special function PyTorch does not differentiate": (
        lambda x: torch.special.bessel_j0(x),
        "special_bessel_j0",
    ),
}

EXACT: dict[str, Fn] = {
    "autograd.Function with jvp": lambda x: WithJvp.apply(x) * x,
    "torch.compile'd piece": lambda x: _compiled(x),
    "in-place on a view of a copy": lambda x: torch.sin(x.clone()[:3].mul_(3.0)),
    "an alias written with the tangent": lambda x: _written_alias(x, torch.sin),
    "scatter_reduce sum": lambda x: torch.ones(2, dtype=x.dtype).scatter_reduce(
        0, _index, x, "sum"
    ),
    "copysign in its sign (zero almost everywhere)": lambda x: torch.copysign(
        torch.ones_like(x), x - 0.6
    ),
    "layer_norm's output": lambda x: torch.native_layer_norm(x.view(2, 2), (2,), None, None, 1e-5)[
        0
    ],
}

CONSTANT: dict[str, Fn] = {
    "detach": lambda x: torch.sin(x.detach()) + 1.0,
    ".data": lambda x: torch.sin(x.data) + 1.0,
    "zeros_like": lambda x: torch.zeros_like(x) + 1.0,
    "detach, then a custom op (a constant by the program's word)": lambda x: no_autograd(
        x.detach()
    ),
}


def _target(name: str, fn: Fn) -> Target:
    def build(dtype: torch.dtype, device: torch.device) -> Materialized:
        return Materialized(fn=lambda a, s: (fn(a[0]),), parameters={}, buffers={})

    return Target(f"test:{name}", ("x",), True, build)


X = torch.tensor([0.3, 0.7, 1.1, 1.6], dtype=F64)
T = torch.tensor([1.0, -0.5, 2.0, 0.25], dtype=F64)


def _central(fn: Fn) -> torch.Tensor:
    eps = 1e-6
    return (fn(X + eps * T) - fn(X - eps * T)) / (2 * eps)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fallback", ["auto", "none"])
@pytest.mark.parametrize("name", list(REFUSED))
def test_a_silently_dropped_tangent_is_refused_naming_the_operator(
    name: str, engine: str, fallback: str
) -> None:
    fn, operator = REFUSED[name]
    task = JVPTask(_target(name, fn), (X,), (T,), {}, F64, CPU, engine=engine, fallback=fallback)
    with pytest.raises(ForwardADUnsupported, match=operator):
        compute(task)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(EXACT))
def test_what_forward_ad_carries_is_exact(name: str, engine: str) -> None:
    fn = EXACT[name]
    _, (jvp,), method = compute(JVPTask(_target(name, fn), (X,), (T,), {}, F64, CPU, engine))
    assert method == "forward"
    torch.testing.assert_close(jvp, _central(fn), rtol=1e-6, atol=1e-6)
    if name != "torch.compile'd piece":  # dynamo does not run under torch.func transforms
        torch.testing.assert_close(jvp, torch.func.jvp(fn, (X,), (T,))[1], rtol=1e-12, atol=0)


def test_autograd_function_without_jvp_falls_back_exactly_or_is_refused() -> None:
    """PyTorch raises for it; the double VJP answers through its backward, or a 501."""
    target = _target("without jvp", lambda x: torch.sin(WithoutJvp.apply(x)))
    _, (jvp,), method = compute(JVPTask(target, (X,), (T,), {}, F64, CPU))
    assert method == "double_vjp"
    torch.testing.assert_close(jvp, 3.0 * torch.cos(3.0 * X) * T, rtol=1e-12, atol=1e-12)
    with pytest.raises(ForwardADUnsupported, match="autograd.Function without jvp"):
        compute(JVPTask(target, (X,), (T,), {}, F64, CPU, fallback="none"))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(CONSTANT))
def test_a_constant_by_the_programs_word_keeps_its_zero_jvp(name: str, engine: str) -> None:
    fn = CONSTANT[name]
    _, (jvp,), method = compute(JVPTask(_target(name, fn), (X,), (T,), {}, F64, CPU, engine))
    assert method == "forward"
    assert torch.equal(jvp, torch.zeros_like(X))


def test_a_refusal_is_remembered_and_a_tangent_elsewhere_still_answers() -> None:
    """The verdict is per arguments with a tangent: y alone never meets the operator."""

    def build(dtype: torch.dtype, device: torch.device) -> Materialized:
        return Materialized(
            fn=lambda a, s: (torch.sin(no_autograd(a[0])) * a[1],), parameters={}, buffers={}
        )

    target = Target("test:two", ("x", "y"), True, build)
    for _ in range(2):  # the second from the cache
        with pytest.raises(ForwardADUnsupported, match="no_autograd"):
            compute(JVPTask(target, (X, X), (T, None), {}, F64, CPU))
    _, (jvp,), _ = compute(JVPTask(target, (X, X), (None, T), {}, F64, CPU))
    torch.testing.assert_close(jvp, torch.sin(2 * X) * T, rtol=1e-15, atol=0)


def test_a_dynamic_batch_refuses_too() -> None:
    """`compute_batch` checks on one item's shapes (the worker then runs each alone)."""
    target = _target("batch", REFUSED["custom op without autograd"][0])
    tasks = [JVPTask(target, (X + i,), (T,), {}, F64, CPU, engine="functional") for i in range(3)]
    with pytest.raises(ForwardADUnsupported, match="no_autograd"):
        compute_batch(tasks)


class _Items(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(x.tolist(), dtype=x.dtype).sin()  # exported as aten.item


class _NoAutograd(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(no_autograd(x))


def test_models_check_fails_a_model_that_drops_the_tangent(tmp_path: Path) -> None:
    save_model(tmp_path, "dropping", _NoAutograd(), (torch.rand(3),))
    save_model(tmp_path, "items", _Items(), (torch.rand(3),))
    results = {r.name: r for r in check_repository(tmp_path)}
    assert not results["dropping"].ok and "jvptestfcc.no_autograd" in results["dropping"].detail
    assert not results["items"].ok and "item" in results["items"].detail
