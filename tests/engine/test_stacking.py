"""Tiny requests of one event-loop turn computed together (NOTE [stacking tiny expressions]
in app/engine/stacking.py): each request gets its own numbers and its own error."""

from __future__ import annotations

import asyncio

import pytest
import torch

from app.engine.compute import compute
from app.engine.engine import Engine
from app.engine.errors import InvalidRequest
from app.engine.stacking import split, stack_tasks
from app.engine.task import JVPResult, JVPTask
from app.services.jvp import expression_target

CPU = torch.device("cpu")


def expr_task(
    source: str,
    inputs: tuple[torch.Tensor, ...],
    tangents: tuple[torch.Tensor | None, ...],
    dtype: torch.dtype = torch.float64,
) -> JVPTask:
    target = expression_target(source, 2000, 500, 50)
    return JVPTask(target, inputs, tangents, {}, dtype, CPU)


def random_tasks(source: str, shapes: list[tuple[int, ...]], n: int, seed: int) -> list[JVPTask]:
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n):
        inputs = tuple(torch.rand(s, generator=g, dtype=torch.float64) + 0.5 for s in shapes)
        tangents = tuple(
            torch.randn(s, generator=g, dtype=torch.float64) if i != 1 else None
            for i, s in enumerate(shapes)
        )
        tasks.append(expr_task(source, inputs, tangents))
    return tasks


@pytest.mark.parametrize(
    ("source", "shapes"),
    [
        ("x**2 + y**2", [(10, 10), (10, 10)]),
        ("sin(x) * y - exp(-x) / 3", [(3, 4), (4,)]),  # broadcasting across inputs
        ("atan2(x, y) + clamp(x, y, 2) + x % 0.3", [(), (5,)]),  # a 0-d input
        ("softplus(x) * maximum(x, y) + pow(x, y)", [(2, 3, 4), (3, 1)]),
    ],
)
def test_stacked_tasks_give_each_request_its_own_numbers(
    source: str, shapes: list[tuple[int, ...]]
) -> None:
    tasks = random_tasks(source, shapes, n=5, seed=len(source))
    stacked = stack_tasks(tasks)
    assert stacked is not None
    outputs, jvps, _ = compute(stacked)
    parts = split(outputs, jvps, len(tasks))
    assert parts is not None
    for task, (out, jvp) in zip(tasks, parts, strict=True):
        ref_out, ref_jvp, _ = compute(task)
        assert out[0].shape == ref_out[0].shape
        torch.testing.assert_close(out[0], ref_out[0], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(jvp[0], ref_jvp[0], rtol=1e-13, atol=1e-13)
        # And against torch.func.jvp of the function written in torch, input 1 held fixed.
        fn = REFERENCES[source]
        xs, ts = task.inputs, task.tangents
        free = [i for i, t in enumerate(ts) if t is not None]

        def closed(*args: torch.Tensor, xs=xs, free=free, fn=fn) -> torch.Tensor:
            full = list(xs)
            for i, a in zip(free, args, strict=True):
                full[i] = a
            return fn(*full)

        want_out, want_jvp = torch.func.jvp(
            closed, tuple(xs[i] for i in free), tuple(ts[i] for i in free)
        )
        torch.testing.assert_close(out[0], want_out, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(jvp[0], want_jvp, rtol=1e-13, atol=1e-13)


REFERENCES = {
    "x**2 + y**2": lambda x, y: x**2 + y**2,
    "sin(x) * y - exp(-x) / 3": lambda x, y: torch.sin(x) * y - torch.exp(-x) / 3,
    "atan2(x, y) + clamp(x, y, 2) + x % 0.3": lambda x, y: (
        torch.atan2(x, y) + torch.clamp(x, y, torch.tensor(2.0, dtype=x.dtype)) + x % 0.3
    ),
    "softplus(x) * maximum(x, y) + pow(x, y)": lambda x, y: (
        torch.logaddexp(x, torch.zeros_like(x)) * torch.maximum(x, y) + torch.pow(x, y)
    ),
}


def test_float32_stacked_and_alone_agree_to_1e6() -> None:
    g = torch.Generator().manual_seed(3)
    tasks = [
        expr_task(
            "tanh(x) * y + log1p(x * x)",
            (torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)),
            (torch.randn(16, 16, generator=g), None),
            torch.float32,
        )
        for _ in range(8)
    ]
    stacked = stack_tasks(tasks)
    assert stacked is not None
    parts = split(*compute(stacked)[:2], len(tasks))
    assert parts is not None
    for task, (out, jvp) in zip(tasks, parts, strict=True):
        ref_out, ref_jvp, _ = compute(task)
        torch.testing.assert_close(out[0], ref_out[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(jvp[0], ref_jvp[0], rtol=1e-6, atol=1e-6)
        # The closed form in float64: d/dx = (1 - tanh(x)**2) y + 2 x / (1 + x**2).
        x, y = (a.double() for a in task.inputs)
        t = task.tangents[0]
        assert t is not None
        want = ((1 - torch.tanh(x) ** 2) * y + 2 * x / (1 + x * x)) * t.double()
        torch.testing.assert_close(out[0].double(), torch.tanh(x) * y + torch.log1p(x * x),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        torch.testing.assert_close(jvp[0].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("source", ["sum(x) * y", "x @ y", "softmax(x, 0) + y", "reshape(x, 4)"])
def test_expressions_that_mix_elements_never_stack(source: str) -> None:
    tasks = [expr_task(source, (torch.ones(2, 2), torch.ones(2, 2)), (None, None))] * 2
    assert stack_tasks(tasks) is None


def test_expression_without_inputs_never_stacks() -> None:
    tasks = [expr_task("2 + 3", (), ())] * 3
    assert stack_tasks(tasks) is None


def _run_together(engine: Engine, tasks: list[JVPTask]) -> list[JVPResult | BaseException]:
    async def go() -> list[JVPResult | BaseException]:
        return await asyncio.gather(
            *(engine.run(t, timeout_s=10) for t in tasks), return_exceptions=True
        )

    return asyncio.run(go())


@pytest.fixture
def engine():
    e = Engine([CPU], max_queue=64)
    e.configure_batching(max_batch_size=8, batch_wait_us=0, inline_max_us=20_000)
    e.start()
    yield e
    e.stop()


def test_requests_of_one_turn_compute_as_one_stacked_step(engine: Engine) -> None:
    tasks = random_tasks("x**2 + y**2", [(10, 10), (10, 10)], n=6, seed=1)
    results = _run_together(engine, tasks)
    for task, result in zip(tasks, results, strict=True):
        assert isinstance(result, JVPResult)
        assert result.batch_size == 6
        x, y = task.inputs
        torch.testing.assert_close(result.outputs[0], x**2 + y**2, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(result.jvps[0], 2 * x * task.tangents[0], rtol=1e-13, atol=0)


def test_reductions_in_one_turn_each_sum_their_own_elements(engine: Engine) -> None:
    tasks = [
        expr_task("sum(x) + x", (torch.full((3,), float(k)),), (torch.ones(3),)) for k in range(5)
    ]
    results = _run_together(engine, tasks)
    for k, result in enumerate(results):
        assert isinstance(result, JVPResult)
        assert result.batch_size == 1  # not stacked: sum mixes elements
        expected = torch.full((3,), 4.0 * k, dtype=torch.float64)
        torch.testing.assert_close(result.outputs[0], expected)
        torch.testing.assert_close(result.jvps[0], torch.full((3,), 4.0, dtype=torch.float64))


def test_one_bad_request_in_a_turn_gets_its_error_and_the_others_their_results(
    engine: Engine,
) -> None:
    good = random_tasks("x * y", [(4,), (4,)], n=3, seed=2)
    bad = expr_task("x * y", (torch.ones(4), torch.ones(5)), (torch.ones(4), None))
    # Its shapes differ, so it is a group of its own: it fails alone, with its own message.
    results = _run_together(engine, [*good, bad])
    for task, result in zip(good, results[:3], strict=True):
        assert isinstance(result, JVPResult)
        torch.testing.assert_close(result.outputs[0], task.inputs[0] * task.inputs[1])
    assert isinstance(results[3], InvalidRequest)
    assert "computation failed" in str(results[3])


def test_a_stacked_step_that_fails_runs_each_alone(engine: Engine) -> None:
    # Each request alone is fine; the stacked call (inputs of rank 2) is made to fail.
    import app.engine.worker as worker_module

    tasks = random_tasks("x + y", [(3,), (3,)], n=4, seed=4)
    real = worker_module.compute
    calls: list[int] = []

    def compute_failing_when_stacked(task: JVPTask) -> tuple:  # type: ignore[type-arg]
        calls.append(task.inputs[0].dim())
        if task.inputs[0].dim() == 2:  # the stacked task: [4, 3]
            raise InvalidRequest("stacked failure")
        return real(task)

    worker_module.compute = compute_failing_when_stacked  # type: ignore[assignment]
    try:
        results = _run_together(engine, tasks)
    finally:
        worker_module.compute = real
    assert 2 in calls and calls.count(1) == 4
    for task, result in zip(tasks, results, strict=True):
        assert isinstance(result, JVPResult)
        assert result.batch_size == 1
        torch.testing.assert_close(result.outputs[0], task.inputs[0] + task.inputs[1])


def test_a_chunk_of_tiny_tasks_runs_together_each_with_its_own_numbers(engine: Engine) -> None:
    """`Engine.run_together`: a batch job's chunk of one tiny elementwise work."""
    source = "sin(x) * y - exp(-x) / 3"
    tasks = random_tasks(source, [(3, 4), (4,)], n=7, seed=11)
    results = engine.run_together(tasks)
    assert results is not None and len(results) == len(tasks)
    for task, result in zip(tasks, results, strict=True):
        assert result.batch_size == len(tasks)
        x, y = task.inputs
        want_out, want_jvp = torch.func.jvp(
            lambda a, y=y: REFERENCES[source](a, y), (x,), (task.tangents[0],)
        )
        torch.testing.assert_close(result.outputs[0], want_out, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(result.jvps[0], want_jvp, rtol=1e-13, atol=1e-13)


def test_a_chunk_that_cannot_stack_is_left_to_the_queue(engine: Engine) -> None:
    mixed = [expr_task("sum(x) * y", (torch.ones(3), torch.ones(3)), (torch.ones(3), None))] * 3
    assert engine.run_together(mixed) is None  # not elementwise
    shapes = random_tasks("x**2 + y**2", [(2,), (2,)], 2, 1)
    shapes += random_tasks("x**2 + y**2", [(3,), (3,)], 2, 2)
    assert engine.run_together(shapes) is None  # two works, not one
    assert engine.run_together(random_tasks("x**2 + y**2", [(2,), (2,)], 1, 3)) is None
    big = random_tasks("x**2 + y**2", [(400, 400), (400, 400)], 2, 4)
    assert engine.run_together(big) is None  # never timed and not small: not tiny
