"""An input or parameter without a tangent contributes exactly nothing, as a plain tensor does
(NOTE [mixed dual and plain operands] in app/engine/jvp.py), on every path and at every size.

Each case is a point where a partial derivative of an operand *without* a tangent is infinite
or undefined, so a zero tangent there (0 * inf = NaN) would spoil the JVP. Every JVP is
compared with its closed form, for both engines, at one element and at 70,000 (above
ZERO_DUAL_MAX_ELEMENTS), plain, stacked, in a dynamic batch, with tangent_batch, through a
job and through /linearize, and over HTTP.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app.engine.batching import compute_batch
from app.engine.compute import compute
from app.engine.jvp import ZERO_DUAL_MAX_ELEMENTS
from app.engine.stacking import split, stack_tasks
from app.engine.target import Materialized, Target
from app.engine.task import JVPTask
from app.models.builtin import linear
from app.services.jvp import expression_target
from tests.wire import from_wire, to_wire

F64 = torch.float64
CPU = torch.device("cpu")
INF = math.inf
SIZES = [1, 70_000]
ENGINES = ["dual", "functional"]
assert SIZES[-1] > ZERO_DUAL_MAX_ELEMENTS


@dataclass(frozen=True)
class Case:
    expression: str
    primals: dict[str, float]
    tangents: dict[str, float]
    jvp: float  # the closed form at the point, for these tangents
    why: str

    def inputs(self, n: int) -> dict[str, torch.Tensor]:
        return {k: torch.full((n,), v, dtype=F64) for k, v in self.primals.items()}

    def given(self, n: int) -> dict[str, torch.Tensor]:
        return {k: torch.full((n,), v, dtype=F64) for k, v in self.tangents.items()}


CASES = {
    # d(x**y)/dx = y x**(y-1) = -2 at (-1, 2); d/dy = x**y log x is NaN there (log -1).
    "pow at x=-1, tangent on x": Case("x ** y", {"x": -1.0, "y": 2.0}, {"x": 3.0}, -6.0, "log(-1)"),
    # d/dy = 1; d sqrt(x)/dx is inf at 0.
    "sqrt(x) + y at x=0, tangent on y": Case(
        "sqrt(x) + y", {"x": 0.0, "y": 1.0}, {"y": 3.0}, 3.0, "1/(2 sqrt 0)"
    ),
    # d(x**y)/dy = x**y log x -> 0 at x = 0 (y > 0); d/dx = y x**(y-1) is inf there.
    "pow at x=0, tangent on y": Case("x ** y", {"x": 0.0, "y": 0.5}, {"y": 3.0}, 0.0, "0**-0.5"),
    # d asin(x)/dx is inf at 1.
    "asin(x) + y at x=1, tangent on y": Case(
        "asin(x) + y", {"x": 1.0, "y": 1.0}, {"y": 3.0}, 3.0, "1/sqrt(1 - 1)"
    ),
    # d(x*y)/dx = y = 2; d/dy = x = inf.
    "x * y at x=inf, tangent on x": Case("x * y", {"x": INF, "y": 2.0}, {"x": 3.0}, 6.0, "x = inf"),
    # No tangent at all: the JVP is 0, though d sqrt(x)/dx is inf at 0.
    "sqrt(x) at 0, no tangent": Case("sqrt(x)", {"x": 0.0}, {}, 0.0, "1/(2 sqrt 0)"),
}
IDS = list(CASES)


def _expected(case: Case, n: int) -> torch.Tensor:
    return torch.full((n,), case.jvp, dtype=F64)


def _task(case: Case, n: int, engine: str) -> JVPTask:
    target = expression_target(case.expression, 2000, 500, 50)
    inputs = case.inputs(n)
    given = case.given(n)
    return JVPTask(
        target=target,
        inputs=tuple(inputs[k] for k in target.input_names),
        tangents=tuple(given.get(k) for k in target.input_names),
        parameter_tangents={},
        dtype=F64,
        device=CPU,
        engine=engine,
    )


def _body(case: Case, n: int, **options: Any) -> dict[str, Any]:
    return {
        "expression": case.expression,
        "primals": {k: to_wire(v, "b64") for k, v in case.inputs(n).items()},
        "tangents": {k: to_wire(v, "b64") for k, v in case.given(n).items()},
        "options": {"dtype": "float64", "encoding": "b64", **options},
    }


def _assert_jvp(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0.0)


# --- the engine, alone, stacked and batched -------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", IDS)
def test_engine_jvp_without_a_tangent_is_exact(name: str, engine: str, n: int) -> None:
    case = CASES[name]
    _, jvps, method = compute(_task(case, n, engine))
    assert method == "forward"
    _assert_jvp(jvps[0], _expected(case, n))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", IDS[:-1])  # a task without inputs' tangents stacks alike
def test_stacked_requests_without_a_tangent_are_exact(name: str, engine: str) -> None:
    case = CASES[name]
    tasks = [_task(case, n, engine) for n in (4, 4, 4)]
    stacked = stack_tasks(tasks)
    assert stacked is not None
    outputs, jvps, _ = compute(stacked)
    parts = split(outputs, jvps, len(tasks))
    assert parts is not None
    for _, jvp in parts:
        _assert_jvp(jvp[0], _expected(case, 4))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", IDS)
def test_batched_requests_without_a_tangent_are_exact(name: str, n: int) -> None:
    case = CASES[name]
    for _, jvps in compute_batch([_task(case, n, "dual") for _ in range(3)]):
        _assert_jvp(jvps[0], _expected(case, n))


def test_one_item_without_a_tangent_in_a_batch_keeps_the_others_exact() -> None:
    """One item at the singular point, two at ordinary points: each gets its own closed form."""
    target = expression_target("sqrt(x) + y", 2000, 500, 50)
    xs = [0.0, 4.0, 9.0]
    tasks = [
        JVPTask(target, (torch.full((5,), x, dtype=F64), torch.ones(5, dtype=F64)),
                (None, torch.full((5,), 3.0, dtype=F64)), {}, F64, CPU)
        for x in xs
    ]  # fmt: skip
    for _, jvps in compute_batch(tasks):
        _assert_jvp(jvps[0], torch.full((5,), 3.0, dtype=F64))


# --- over HTTP: plain, tangent_batch, jobs, linearize ---------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", IDS)
def test_create_jvp_without_a_tangent_is_exact(
    client: TestClient, name: str, engine: str, n: int
) -> None:
    case = CASES[name]
    r = client.post("/jvp", json=_body(case, n, engine=engine))
    assert r.status_code == 200, r.text
    _assert_jvp(from_wire(r.json()["jvp"]), _expected(case, n))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", IDS[:-1])  # tangent_batch needs at least one tangent
def test_create_jvp_tangent_batch_without_a_tangent_is_exact(
    client: TestClient, name: str, n: int
) -> None:
    case = CASES[name]
    body = _body(case, n, tangent_batch=True)
    body["tangents"] = {
        k: to_wire(torch.stack([v, -2 * v]), "b64") for k, v in case.given(n).items()
    }
    r = client.post("/jvp", json=body)
    assert r.status_code == 200, r.text
    want = _expected(case, n)
    _assert_jvp(from_wire(r.json()["jvp"]), torch.stack([want, -2 * want]))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", IDS)
def test_linearized_jvp_without_a_tangent_is_exact(client: TestClient, name: str, n: int) -> None:
    """Linearized in every input, applied with the case's tangents only."""
    case = CASES[name]
    body = _body(case, n)
    del body["tangents"]
    r = client.post("/linearize", json=body)
    assert r.status_code == 200, r.text
    session = r.json()["id"]
    given = {k: to_wire(v, "b64") for k, v in case.given(n).items()}
    r = client.post(f"/linearize/{session}/jvp", json={"tangents": given})
    assert r.status_code == 200, r.text
    _assert_jvp(from_wire(r.json()["jvp"]), _expected(case, n))
    client.delete(f"/linearize/{session}")


@pytest.mark.parametrize("name", IDS[:-1])
def test_linearized_jvp_tangent_batch_without_a_tangent_is_exact(
    client: TestClient, name: str
) -> None:
    case = CASES[name]
    body = _body(case, 3)
    del body["tangents"]
    session = client.post("/linearize", json=body).json()["id"]
    given = {k: to_wire(torch.stack([v, 2 * v]), "b64") for k, v in case.given(3).items()}
    r = client.post(
        f"/linearize/{session}/jvp",
        json={"tangents": given, "options": {"tangent_batch": True, "encoding": "b64"}},
    )
    assert r.status_code == 200, r.text
    want = _expected(case, 3)
    _assert_jvp(from_wire(r.json()["jvp"]), torch.stack([want, 2 * want]))
    client.delete(f"/linearize/{session}")


def test_job_tasks_without_a_tangent_are_exact(client: TestClient) -> None:
    tasks = []
    for case in CASES.values():
        for n in SIZES:
            task = _body(case, n)
            del task["options"]
            tasks.append(task)
    r = client.post("/jobs", json={"options": {"dtype": "float64"}, "tasks": tasks})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 120
    while (job := client.get(f"/jobs/{job_id}").json())["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["status"] == "completed" and job["failed"] == 0, job
    results = client.get(f"/jobs/{job_id}/results", params={"limit": 100}).json()["results"]
    expected = [(case, n) for case in CASES.values() for n in SIZES]
    assert len(results) == len(expected)
    for result, (case, n) in zip(sorted(results, key=lambda r: r["index"]), expected, strict=True):
        _assert_jvp(from_wire(result["jvp"]), _expected(case, n))


# --- a model's parameters without a tangent ---------------------------------------------------


def _scaled_target(n: int) -> Target:
    """f(x) = sqrt(p) * x + asin(q) with parameters p, q: at q = 1 d f / d q is inf, at p = 0
    d f / d p is inf; neither carries a tangent, so J t = sqrt(p) * t."""

    def build(dtype: torch.dtype, device: torch.device) -> Materialized:
        def fn(args: tuple[torch.Tensor, ...], state: dict[str, torch.Tensor]) -> tuple:
            return (torch.sqrt(state["p"]) * args[0] + torch.asin(state["q"]),)

        p = torch.tensor([0.0, 4.0], dtype=dtype, device=device).repeat(n // 2)
        q = torch.ones(n, dtype=dtype, device=device)
        return Materialized(fn=fn, parameters={"p": p, "q": q}, buffers={})

    return Target("test:scaled", ("x",), True, build)


@pytest.mark.parametrize("n", [2, 70_000])
@pytest.mark.parametrize("engine", ENGINES)
def test_parameters_without_a_tangent_contribute_nothing(engine: str, n: int) -> None:
    target = _scaled_target(n)
    x = torch.linspace(-3.0, 3.0, n, dtype=F64)
    t = torch.full((n,), 1.5, dtype=F64)
    want = torch.tensor([0.0, 2.0], dtype=F64).repeat(n // 2) * t
    task = JVPTask(target, (x,), (t,), {}, F64, CPU, engine=engine)
    _, jvps, _ = compute(task)
    _assert_jvp(jvps[0], want)
    for _, batched in compute_batch([task, task]):
        _assert_jvp(batched[0], want)


def test_linear_at_an_infinite_input_answers_as_a_plain_tensor(client: TestClient) -> None:
    """PyTorch's own matmul formula multiplies the input by the weight's absent tangent, so at
    an infinite input a plain tensor gives NaN too (README "Which derivative"): the service
    answers as torch.func.jvp with the weights closed over, on both engines."""
    params = linear().target.materialize(F64, CPU).parameters
    x = torch.tensor([[INF, 1.0, -2.0, 0.5, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0]], dtype=F64)
    t = torch.tensor([[1.0, -1.0, 2.0, 0.25, 4.0], [1.0, 0.0, 0.0, 0.0, 0.0]], dtype=F64)
    _, want = torch.func.jvp(
        lambda a: torch.nn.functional.linear(a, params["weight"], params["bias"]), (x,), (t,)
    )
    assert torch.isnan(want[0]).all() and torch.isfinite(want[1]).all()
    for engine in ENGINES:
        r = client.post(
            "/jvp",
            json={
                "model": "linear",
                "primals": {"x": to_wire(x, "b64")},
                "tangents": {"x": to_wire(t, "b64")},
                "options": {"dtype": "float64", "encoding": "b64", "engine": engine},
            },
        )
        assert r.status_code == 200, r.text
        torch.testing.assert_close(from_wire(r.json()["jvp"]), want, equal_nan=True)
        # The finite row is exactly W t (a closed form).
        _assert_jvp(from_wire(r.json()["jvp"])[1], params["weight"][:, 0])
