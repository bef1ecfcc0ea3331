"""Dynamic batching (NOTE [dynamic batching]): stacked items get their own numbers and errors.

Items queue up behind a gate item that holds the worker busy, so they are all
waiting when the worker takes the first of them and batch deterministically.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import pytest
import torch
from torch import nn
from torch.func import jvp as func_jvp

from app.engine.batching import batch_key
from app.engine.engine import Engine
from app.engine.errors import DeadlineExceeded, InvalidRequest
from app.engine.operations import jvp_operation
from app.engine.target import Materialized, Target
from app.engine.task import BATCH, INTERACTIVE, JVPResult, JVPTask
from app.models.builtin import mlp
from app.models.registry import ModelRegistry, ServedModel, TensorSpec, module_target
from app.schemas import JVPRequest
from app.services.jvp import JVPService, expression_target
from app.settings import Settings

CPU = torch.device("cpu")


class Gate:
    """A work item that holds the worker until `open` is called."""

    def __init__(self, engine: Engine) -> None:
        started, self._release = threading.Event(), threading.Event()
        release = self._release

        def wait(args: tuple[torch.Tensor, ...], state: dict[str, torch.Tensor]) -> tuple:
            started.set()
            release.wait(10)
            return (args[0],)

        target = Target("gate", ("x",), True, lambda d, dev: Materialized(wait, {}, {}))
        x = torch.zeros(1)
        self.future = engine.submit(JVPTask(target, (x,), (None,), {}, torch.float32, CPU))
        assert started.wait(10)

    def open(self) -> None:
        self._release.set()
        self.future.result(timeout=10)


@pytest.fixture
def sizes() -> list[int]:
    return []


@pytest.fixture
def engine(sizes: list[int]) -> Iterator[Engine]:
    e = Engine(
        [CPU],
        max_queue=100,
        max_batch_size=16,
        batch_wait_us=500,
        observe_batch=lambda device, n: sizes.append(n),
    )
    e.start()
    sizes.clear()  # the warm-up steps
    yield e
    e.stop()


def queued(engine: Engine, tasks: list[JVPTask], **submit: object) -> list[JVPResult]:
    """Submit ``tasks`` while the worker is held, release it, and wait for every result."""
    gate = Gate(engine)
    futures = [engine.submit(t, **submit) for t in tasks]  # type: ignore[arg-type]
    gate.open()
    return [f.result(timeout=30) for f in futures]


def reference(target: Target, task: JVPTask) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.func.jvp of the target alone, in float64 for the tolerance to mean something."""
    m = target.materialize(torch.float64, CPU)
    state = {**m.parameters, **m.buffers}
    primals = tuple(x.double() for x in task.inputs)
    tangents = tuple(
        torch.zeros_like(p) if t is None else t.double()
        for p, t in zip(primals, task.tangents, strict=True)
    )
    out, jvp = func_jvp(lambda *xs: m.fn(xs, state)[0], primals, tangents)
    return out.float(), jvp.float()


def mlp_tasks(target: Target, n: int, engine: str = "dual", seed: int = 0) -> list[JVPTask]:
    g = torch.Generator().manual_seed(seed)
    return [
        JVPTask(
            target,
            (torch.randn(8, 64, generator=g),),
            (torch.randn(8, 64, generator=g),),
            {},
            torch.float32,
            CPU,
            engine,
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("engine_name", ["dual", "functional"])
def test_batched_items_each_get_their_own_jvp(
    engine: Engine, sizes: list[int], engine_name: str
) -> None:
    target = mlp().target
    tasks = mlp_tasks(target, 16, engine_name)
    results = queued(engine, tasks)
    assert max(sizes) == 16  # one step ran all sixteen
    assert all(r.batch_size == 16 for r in results)
    for task, result in zip(tasks, results, strict=True):
        out, jvp = reference(target, task)
        torch.testing.assert_close(result.outputs[0], out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(result.jvps[0], jvp, rtol=1e-6, atol=1e-6)
        assert result.method == "forward"


def test_batched_and_unbatched_results_are_identical_to_1e6(engine: Engine) -> None:
    target = expression_target("sin(x) * y + exp(-x**2) @ y", 2000, 500, 50)
    g = torch.Generator().manual_seed(1)
    tasks = [
        JVPTask(
            target,
            (torch.randn(5, 5, generator=g), torch.randn(5, 5, generator=g)),
            (torch.randn(5, 5, generator=g), None),
            {},
            torch.float32,
            CPU,
            "dual",
        )
        for _ in range(12)
    ]
    batched = queued(engine, tasks)
    alone = Engine([CPU], max_queue=100)  # max_batch_size 1: no batching
    alone.start()
    try:
        single = [alone.submit(t).result(timeout=30) for t in tasks]
    finally:
        alone.stop()
    assert {r.batch_size for r in batched} == {12} and {r.batch_size for r in single} == {1}
    for b, s, task in zip(batched, single, tasks, strict=True):
        torch.testing.assert_close(b.outputs[0], s.outputs[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b.jvps[0], s.jvps[0], rtol=1e-6, atol=1e-6)
        # The closed form in float64 (tangent on x only): cos(x) y t - (2 x t exp(-x**2)) @ y.
        x, y = (a.double() for a in task.inputs)
        t = task.tangents[0]
        assert t is not None
        t = t.double()
        out = torch.sin(x) * y + torch.exp(-(x**2)) @ y
        jvp = torch.cos(x) * y * t - (2 * x * t * torch.exp(-(x**2))) @ y
        torch.testing.assert_close(b.outputs[0].double(), out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.jvps[0].double(), jvp, rtol=1e-5, atol=1e-5)


def test_parameter_tangents_batch_per_item(engine: Engine) -> None:
    target = mlp().target
    g = torch.Generator().manual_seed(2)
    shape = target.parameter_shapes["0.weight"]
    tasks = mlp_tasks(target, 6, seed=3)
    for t in tasks:
        t.parameter_tangents = {"0.weight": torch.randn(*shape, generator=g)}
    results = queued(engine, tasks)
    # The reference in float64: a float32 batch and a float32 item may sum a matmul's terms
    # in other orders (AVX-512 kernels block differently), 3e-5 apart near cancellation;
    # another item's weight tangent would be off by O(1).
    m = target.materialize(torch.float64, CPU)
    for task, result in zip(tasks, results, strict=True):
        assert result.batch_size == 6

        def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return m.fn((x,), {**m.parameters, "0.weight": w})[0]

        _, jvp = func_jvp(
            f,
            (task.inputs[0].double(), m.parameters["0.weight"]),
            (task.tangents[0].double(), task.parameter_tangents["0.weight"].double()),
        )
        torch.testing.assert_close(result.jvps[0].double(), jvp, rtol=1e-4, atol=1e-5)


def test_failing_item_in_a_batch_does_not_poison_the_others(engine: Engine) -> None:
    def checked(args: tuple[torch.Tensor, ...], state: dict[str, torch.Tensor]) -> tuple:
        x = args[0]
        if bool(torch.isnan(x).any()):  # a value-dependent branch: vmap cannot run it
            raise ValueError("x holds NaN")
        return (torch.sin(x),)

    target = Target("checked", ("x",), True, lambda d, dev: Materialized(checked, {}, {}))
    xs = [torch.full((3,), float(i)) for i in range(8)]
    xs[5] = torch.tensor([1.0, float("nan"), 2.0])
    tasks = [JVPTask(target, (x,), (torch.ones(3),), {}, torch.float32, CPU) for x in xs]
    gate = Gate(engine)
    futures = [engine.submit(t) for t in tasks]
    gate.open()
    for i, (x, future) in enumerate(zip(xs, futures, strict=True)):
        if i == 5:
            with pytest.raises(InvalidRequest, match="x holds NaN"):
                future.result(timeout=30)
            continue
        result = future.result(timeout=30)
        torch.testing.assert_close(result.outputs[0], torch.sin(x))
        torch.testing.assert_close(result.jvps[0], torch.cos(x))


def test_target_vmap_cannot_run_is_computed_alone_and_not_batched_again(
    engine: Engine, sizes: list[int]
) -> None:
    def scalar(args: tuple[torch.Tensor, ...], state: dict[str, torch.Tensor]) -> tuple:
        # A branch on a value has no batching rule (an .item() of the float sum would be
        # refused: NOTE [forward mode: exact or refused]).
        return (args[0] * 2.0 if bool(args[0].sum() >= 0) else args[0],)

    target = Target("item", ("x",), True, lambda d, dev: Materialized(scalar, {}, {}))
    tasks = [
        JVPTask(target, (torch.full((2,), float(i)),), (torch.ones(2),), {}, torch.float32, CPU)
        for i in range(4)
    ]
    first = queued(engine, tasks)
    for i, result in enumerate(first):
        torch.testing.assert_close(result.outputs[0], torch.full((2,), 2.0 * i))
        torch.testing.assert_close(result.jvps[0], torch.full((2,), 2.0))
    sizes.clear()
    again = queued(engine, tasks)
    assert [r.batch_size for r in again] == [1, 1, 1, 1]
    assert sizes == [1] * 5  # the gate, then each item alone


def test_model_with_max_batch_size_zero_never_batches(sizes: list[int]) -> None:
    engine = Engine([CPU], max_queue=100, observe_batch=lambda d, n: sizes.append(n))
    registry = ModelRegistry()
    module = nn.Linear(4, 4).eval()
    inputs = [TensorSpec("x", (-1, 4), "float32")]
    for name, declared in (("no-batch", 0), ("batch-8", 8)):
        registry.add(
            ServedModel(
                name=name,
                description="",
                source="repository",
                target=module_target(f"repository:{name}", module, inputs, outputs=1),
                inputs=inputs,
                outputs=1,
                parameters=[],
                buffers=[],
                config={"max_batch_size": declared},
            )
        )
    service = JVPService(Settings(max_batch_size=16), engine, registry)
    engine.start()
    try:
        for name, expected in (("no-batch", 1), ("batch-8", 8)):
            tasks = [
                service.prepare(
                    JVPRequest(
                        model=name, primals={"x": [[float(i)] * 4]}, tangents={"x": [[1.0] * 4]}
                    )
                )
                for i in range(10)
            ]
            results = queued(engine, tasks)
            assert max(r.batch_size for r in results) == expected
            for i, result in enumerate(results):
                torch.testing.assert_close(
                    result.outputs[0], module(torch.full((1, 4), float(i))).detach()
                )
    finally:
        engine.stop()


def test_expired_item_in_a_batch_gets_504_and_the_others_run(engine: Engine) -> None:
    target = mlp().target
    tasks = mlp_tasks(target, 4)
    gate = Gate(engine)
    futures: list[Future[JVPResult]] = [engine.submit(t) for t in tasks[:3]]
    expired = engine.worker_for(tasks[3]).submit(tasks[3], deadline=time.monotonic() - 1)
    gate.open()
    with pytest.raises(DeadlineExceeded, match="deadline in the queue"):
        expired.result(timeout=30)
    for task, future in zip(tasks, futures, strict=False):
        result = future.result(timeout=30)
        assert result.batch_size == 3
        torch.testing.assert_close(result.jvps[0], reference(target, task)[1])


def test_batch_takes_only_items_of_the_first_priority(engine: Engine) -> None:
    target = mlp().target
    tasks = mlp_tasks(target, 6)
    gate = Gate(engine)
    later = [engine.submit(t, priority=BATCH) for t in tasks[:3]]
    first = [engine.submit(t, priority=INTERACTIVE) for t in tasks[3:]]
    gate.open()
    results = [f.result(timeout=30) for f in first + later]
    assert [r.batch_size for r in results] == [3] * 6
    # The interactive batch ran first: it waited less.
    assert max(r.queue_ms for r in results[:3]) <= min(r.queue_ms for r in results[3:])


def test_items_of_different_shapes_or_targets_do_not_stack(engine: Engine) -> None:
    sin = expression_target("sin(x)", 2000, 500, 50)
    cos = expression_target("cos(x)", 2000, 500, 50)

    def item(target: Target, n: int) -> JVPTask:
        x = torch.linspace(0, 1, n)
        return JVPTask(target, (x,), (torch.ones(n),), {}, torch.float32, CPU)

    tasks = [item(sin, 3), item(sin, 3), item(sin, 4), item(cos, 3), item(sin, 3)]
    results = queued(engine, tasks)
    assert [r.batch_size for r in results] == [3, 3, 1, 1, 3]
    for task, result in zip(tasks, results, strict=True):
        fn: Callable[[torch.Tensor], torch.Tensor] = torch.sin if task.target is sin else torch.cos
        torch.testing.assert_close(result.outputs[0], fn(task.inputs[0]))


def test_lone_item_runs_alone(engine: Engine, sizes: list[int]) -> None:
    task = mlp_tasks(mlp().target, 1)[0]
    assert engine.submit(task).result(timeout=30).batch_size == 1
    assert sizes == [1]


def test_operations_and_unbatchable_models_never_batch() -> None:
    target = expression_target("sin(x)", 2000, 500, 50)
    task = JVPTask(target, (torch.ones(2),), (torch.ones(2),), {}, torch.float32, CPU)
    assert batch_key(task) is not None
    task.operation = jvp_operation(target, engine="dual", tangent_batch=False, check=True)
    assert batch_key(task) is None
    task.operation, task.max_batch_size = None, 0
    assert batch_key(task) is None


def test_batch_payoff_stops_batching_when_a_batch_costs_more_per_item() -> None:
    from app.engine.policy import BatchPayoff

    payoff = BatchPayoff(alpha=1.0, probe_every=4)
    assert payoff.worth_batching("k")  # nothing measured: try a batch
    payoff.record("k", 1, 50.0)  # the first run of each way pays one-time costs: ignored
    payoff.record("k", 1, 0.1)  # 0.1 ms alone
    assert payoff.worth_batching("k")  # no batch measured yet
    payoff.record("k", 8, 400.0)  # ignored, as above
    payoff.record("k", 8, 4.0)  # 0.5 ms per item in a batch: worse
    decisions = [payoff.worth_batching("k") for _ in range(8)]
    # Batching is off, except a probe every 4th chance (counting the two above).
    assert decisions == [False, True, False, False, False, True, False, False]


def test_batch_payoff_keeps_batching_when_a_batch_is_cheaper_per_item() -> None:
    from app.engine.policy import BatchPayoff

    payoff = BatchPayoff(alpha=1.0, probe_every=64)
    for _ in range(2):  # the first of each is not counted
        payoff.record("mlp", 1, 1.0)
        payoff.record("mlp", 16, 3.2)  # 0.2 ms per item
    decisions = [payoff.worth_batching("mlp") for _ in range(128)]
    # Batching, but one item alone every 64 chances keeps the alone time current.
    assert decisions.count(False) == 2 and decisions[63] is False and decisions[127] is False
    payoff.record("mlp", 16, 32.0)  # the machine changed: 2 ms per item now
    assert not payoff.worth_batching("mlp")


def test_batch_payoff_stops_waiting_when_the_wait_costs_more_than_it_saves() -> None:
    from app.engine.policy import BatchPayoff

    payoff = BatchPayoff(alpha=1.0, probe_every=4)
    assert payoff.worth_waiting("k")  # nothing measured: wait
    for _ in range(2):  # the first of each way is not counted
        payoff.record("k", 1, 0.22)  # 0.22 ms alone
        # Two items computed in 0.3 ms after a 2 ms wait: 0.15 ms per item computing,
        # 1.15 ms per item of the worker's time.
        payoff.record("k", 2, 0.3, waited_ms=2.0)
    assert payoff.worth_batching("k")  # stacking what waits is still cheaper
    decisions = [payoff.worth_waiting("k") for _ in range(7)]
    # No more waiting, except a probe every 4th chance (counting the one above).
    assert decisions == [False, False, True, False, False, False, True]


def test_batch_payoff_keeps_waiting_while_the_company_pays_for_it() -> None:
    from app.engine.policy import BatchPayoff

    payoff = BatchPayoff(alpha=1.0, probe_every=64)
    for _ in range(2):
        payoff.record("mlp", 1, 0.22)
        payoff.record("mlp", 16, 1.1, waited_ms=0.5)  # 0.1 ms per item, wait included
    assert all(payoff.worth_waiting("mlp") for _ in range(10))
    # Waits that find no company cost the whole wait per item: waiting stops.
    payoff.record_lonely_wait("mlp", 2.0)
    assert not payoff.worth_waiting("mlp")


def test_batch_payoff_without_a_wait_leaves_the_wait_unjudged() -> None:
    from app.engine.policy import BatchPayoff

    payoff = BatchPayoff(alpha=1.0, probe_every=64)
    for _ in range(2):
        payoff.record("k", 1, 0.1)
        payoff.record("k", 8, 4.0)  # a batch that did not wait: says nothing about waiting
    assert payoff.worth_waiting("k")
    assert not payoff.worth_batching("k")
