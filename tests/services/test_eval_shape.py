"""POST /eval_shape agrees with what the operations compute: every built-in model and
operation, 200 random expressions; its FLOPs are within 2x of torch.utils.flop_counter's
count of the real run; and its 4xx are those its operation gets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import hypothesis.strategies as st
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from app.engine.abstract import Bounds, Plan, estimate, plan_of
from app.engine.jvp import ENGINES
from app.engine.operations import HVPOperation, JacobianOperation, JVPOperation
from app.runtime import build_registry
from app.settings import Settings
from tests.conftest import make_client


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with make_client(job_runner="off") as c:
        yield c


def shape_of(tensor: dict[str, Any]) -> dict[str, Any]:
    return {"shape": tensor["shape"], "dtype": tensor["dtype"]}


def shapes(value: Any) -> Any:
    """The {shape, dtype} of every tensor in an answer (tensors, lists and maps of them)."""
    if isinstance(value, dict) and "shape" in value:
        return shape_of(value)
    if isinstance(value, dict):
        return {k: shapes(v) for k, v in value.items()}
    return [shapes(v) for v in value]


def model_inputs(client: TestClient, name: str) -> dict[str, list[int]]:
    info = client.get(f"/models/{name}").json()
    example = {"x": [1, 1, 28, 28]} if name == "convnet" else {}
    return {
        i["name"]: example.get(i["name"], [d if d >= 0 else 3 for d in i["shape"]])
        for i in info["inputs"]
    }


def ones(shape: list[int]) -> dict[str, Any]:
    n = 1
    for d in shape:
        n *= d
    return {"shape": shape, "dtype": "float32", "data": [0.5] * n}


BUILTINS = ["linear", "mlp", "convnet", "transformer"]


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize(
    ("operation", "route", "extra", "result"),
    [
        ("jvp", "/jvp", {}, "jvp"),
        ("jvp", "/jvp", {"options": {"check": True}}, "jvp"),
        ("jvp", "/jvp", {"options": {"tangent_batch": True}}, "jvp"),
        ("jacobian", "/jacobian", {}, "jacobian"),
        ("hvp", "/hvp", {"reduction": "sum"}, "hvp"),
        ("linearize", "/linearize", {}, None),
    ],
)
def test_eval_shape_agrees_with_every_builtin_model_and_operation(
    client: TestClient,
    name: str,
    operation: str,
    route: str,
    extra: dict[str, Any],
    result: str | None,
) -> None:
    if name == "transformer" and operation == "linearize":
        pytest.xfail("/linearize of the transformer is a 422 on main too (invalid python storage)")
    inputs = model_inputs(client, name)
    batched = extra.get("options", {}).get("tangent_batch", False)
    k = [3] if batched else []
    body: dict[str, Any] = {"model": name, "primals": {n: ones(s) for n, s in inputs.items()}}
    if operation in ("jvp", "hvp"):
        body["tangents"] = {n: ones(k + s) for n, s in inputs.items()}
    body.update(extra)
    real = client.post(route, json=body)
    assert real.status_code == 200, real.text
    shaped_body = {
        **body,
        "operation": operation,
        "primals": {n: {"shape": s, "dtype": "float32"} for n, s in inputs.items()},
    }
    shaped = client.post("/eval_shape", json=shaped_body)
    assert shaped.status_code == 200, shaped.text
    got = shaped.json()
    assert got["output"] == shapes(real.json()["output"])
    if result is not None:
        assert got[result] == shapes(real.json()[result])
    else:  # linearize: a later J·t of the session is shaped like the output
        tangents = {n: ones(s) for n, s in inputs.items()}
        applied = client.post(f"/linearize/{real.json()['id']}/jvp", json={"tangents": tangents})
        assert applied.status_code == 200
        assert got["jvp"] == shapes(applied.json()["jvp"])
    assert got["cost"]["flops"] > 0
    assert got["cost"]["peak_bytes"] > 0


# Random expressions of the language, on random small shapes.

UNARY = ["sin", "exp", "tanh", "abs", "sigmoid", "relu", "log1p", "-"]
BINARY = ["+", "-", "*", "/", "@", "maximum", "atan2"]
REDUCE = ["sum", "mean", "norm", "prod"]
WITH_DIM = ["softmax", "logsumexp"]


def expressions() -> st.SearchStrategy[str]:
    leaf = st.sampled_from(["x", "y", "x", "y", "2", "0.5"])

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        unary = st.tuples(st.sampled_from(UNARY), inner).map(
            lambda p: f"(-{p[1]})" if p[0] == "-" else f"{p[0]}({p[1]})"
        )
        binary = st.tuples(st.sampled_from(BINARY), inner, inner).map(
            lambda p: f"{p[0]}({p[1]}, {p[2]})" if p[0].isalpha() else f"({p[1]} {p[0]} {p[2]})"
        )
        reduce = st.tuples(st.sampled_from(REDUCE), inner, st.sampled_from(["", ", 0", ", -1"]))
        dim = st.tuples(st.sampled_from(WITH_DIM), inner, st.sampled_from([", 0", ", -1"]))
        shape_ops = st.tuples(
            st.sampled_from(["transpose({}, 0, -1)", "reshape({}, -1)", "reshape({}, 2, -1)"]),
            inner,
        ).map(lambda p: p[0].format(p[1]))
        return st.one_of(
            unary,
            binary,
            reduce.map(lambda p: f"{p[0]}({p[1]}{p[2]})"),
            dim.map(lambda p: f"{p[0]}({p[1]}{p[2]})"),
            shape_ops,
        )

    return st.recursive(leaf, extend, max_leaves=6)


small_shapes = st.lists(st.integers(min_value=1, max_value=4), min_size=0, max_size=3)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(source=expressions(), x_shape=small_shapes, y_shape=small_shapes)
def test_eval_shape_agrees_with_jvp_on_random_expressions(
    client: TestClient, source: str, x_shape: list[int], y_shape: list[int]
) -> None:
    variables = {"x": x_shape, "y": y_shape}
    used = [v for v in ("x", "y") if v in source]
    if not used:
        source = f"{source} + x"
        used = ["x"]
    body = {
        "expression": source,
        "primals": {v: ones(variables[v]) for v in used},
        "tangents": {v: ones(variables[v]) for v in used},
    }
    real = client.post("/jvp", json=body)
    shaped = client.post(
        "/eval_shape",
        json={
            **body,
            "primals": {v: {"shape": variables[v], "dtype": "float32"} for v in used},
        },
    )
    assert shaped.status_code == real.status_code, (source, shaped.text, real.text)
    if real.status_code == 200:
        assert shaped.json()["output"] == shapes(real.json()["output"])
        assert shaped.json()["jvp"] == shapes(real.json()["jvp"])
    else:
        assert shaped.json()["error"]["type"] == real.json()["error"]["type"]


# FLOPs against torch.utils.flop_counter on the real run.


class RegistryCount(TorchDispatchMode):
    """flop_counter's formulas without FlopCounterMode's module hooks, which break
    torch.func.grad (so the HVP can be counted too)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        formula = flop_registry.get(func.overloadpacket)
        if formula is not None:
            self.total += formula(*args, **(kwargs or {}), out_val=out)
        return out


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("operation", ["jvp", "tangent_batch", "jacobian", "hvp"])
def test_eval_shape_flops_within_2x_of_flop_counter_on_the_real_run(
    name: str, operation: str
) -> None:
    model = next(m for m in build_registry(Settings()).all() if m.name == name)
    example = model.config.get("example_inputs") or {}
    sizes = {
        s.name: example.get(s.name, [d if d >= 0 else 3 for d in s.shape]) for s in model.inputs
    }
    target = model.target
    materialized = target.materialize(torch.float32, torch.device("cpu"))
    xs = tuple(torch.randn(sizes[n]) for n in target.input_names)
    op: Any = None
    tangents = tuple(torch.randn_like(x) for x in xs)
    if operation == "tangent_batch":
        op = JVPOperation(engine="functional", tangent_batch=True)
        tangents = tuple(torch.randn(8, *x.shape) for x in xs)
    elif operation == "jacobian":
        op = JacobianOperation(tuple(range(len(xs))), (), 10**12)
    elif operation == "hvp":
        op = HVPOperation(reduction="sum")
    if operation == "hvp":
        counter: Any = RegistryCount()
    else:
        counter = FlopCounterMode(display=False)
    with counter:
        if op is None:
            ENGINES["dual"](materialized, xs, tangents, {})
        else:
            op(materialized, xs, tangents, {})
    real = counter.total if operation == "hvp" else counter.get_total_flops()
    plan = plan_of(target, xs, tangents, {}, op)
    assert isinstance(plan, Plan)
    shapes_ = tuple(x.shape for x in xs)
    est = estimate(target, shapes_, torch.float32, plan, Bounds(10**12, 2**62, 2**62))
    assert real / 2 <= est.flops <= 2 * real, (est.flops, real)


def test_eval_shape_flops_of_a_matmul_expression_match_flop_counter(client: TestClient) -> None:
    body = {
        "expression": "tanh(x @ y) @ y",
        "primals": {"x": {"shape": [64, 128]}, "y": {"shape": [128, 128]}},
        "tangents": {"x": {"shape": [64, 128]}},
    }
    got = client.post("/eval_shape", json=body).json()["cost"]["flops"]
    x, y = torch.randn(64, 128), torch.randn(128, 128)
    with FlopCounterMode(display=False) as counter:
        torch.func.jvp(lambda a: torch.tanh(a @ y) @ y, (x,), (torch.randn_like(x),))
    real = counter.get_total_flops()
    assert real / 2 <= got <= 2 * real


# The 4xx of /eval_shape.


def test_eval_shape_of_an_unknown_operation_is_422(client: TestClient) -> None:
    r = client.post("/eval_shape", json={"operation": "grad", "expression": "x", "primals": {}})
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "operation"


@pytest.mark.parametrize(
    ("tensor", "param"),
    [
        ({"shape": [-1]}, "primals.x.shape"),
        ({"shape": "2"}, "primals.x.shape"),
        ({"shape": [2], "dtype": "int7"}, "primals.x.dtype"),
        ({"shape": [2], "colour": "red"}, "primals.x"),
    ],
)
def test_eval_shape_malformed_shape_only_tensor_is_422(
    client: TestClient, tensor: dict[str, Any], param: str
) -> None:
    r = client.post("/eval_shape", json={"expression": "x", "primals": {"x": tensor}})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("shape", [[0, 2**62], [0, 2**63], [2**33, 2**33, 0]])
def test_eval_shape_declared_dimension_past_limit_is_413(
    client: TestClient, shape: list[int]
) -> None:
    r = client.post("/eval_shape", json={"expression": "x", "primals": {"x": {"shape": shape}}})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["type"] == "too_large"
    assert r.json()["error"]["param"] == "primals.x"


def test_eval_shape_jacobian_past_its_column_limit_is_the_jacobians_413(
    client: TestClient,
) -> None:
    body = {"expression": "sin(x)", "primals": {"x": {"shape": [5000]}}}
    shaped = client.post("/eval_shape", json={**body, "operation": "jacobian"})
    real = client.post("/jacobian", json={"expression": "sin(x)", "primals": {"x": [0.0] * 5000}})
    assert shaped.status_code == real.status_code == 413
    assert shaped.json() == real.json()


def test_eval_shape_hvp_of_a_vector_output_is_the_hvps_422(client: TestClient) -> None:
    body = {"expression": "x * 2", "primals": {"x": [1.0, 2.0]}, "tangents": {"x": [1.0, 0.0]}}
    shaped = client.post("/eval_shape", json={**body, "operation": "hvp"})
    real = client.post("/hvp", json=body)
    assert shaped.status_code == real.status_code == 422
    assert shaped.json() == real.json()


def test_eval_shape_is_in_the_openapi_schema(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/eval_shape"]["post"]
    assert "200" in post["responses"] and "413" in post["responses"]


# The bytes and FLOPs limits, and their defaults.


@pytest.mark.parametrize(
    ("setting", "value", "named"),
    [
        ("max_request_bytes", 1_000_000, "JVP_MAX_REQUEST_BYTES"),
        ("max_request_flops", 1_000_000, "JVP_MAX_REQUEST_FLOPS"),
    ],
)
def test_request_past_bytes_or_flops_limit_is_413_on_every_route(
    setting: str, value: int, named: str
) -> None:
    # 256x256 @ 256x256: 33M FLOPs, ~1 MB of live tensors with their tangents.
    n = 256
    with make_client(job_runner="off", **{setting: value}) as c:
        body = {
            "expression": "tanh(x @ x)",
            "primals": {"x": {"shape": [n, n], "dtype": "float32", "data": [0.1] * (n * n)}},
            "tangents": {"x": {"shape": [n, n], "dtype": "float32", "data": [1.0] * (n * n)}},
        }
        for route, extra in (("/jvp", {}), ("/hvp", {"reduction": "sum"})):
            r = c.post(route, json={**body, **extra})
            assert r.status_code == 413, r.text
            assert r.json()["error"]["type"] == "too_large"
            assert named in r.json()["error"]["message"]
        shaped = c.post("/eval_shape", json={**body, "primals": {"x": {"shape": [n, n]}}})
        assert shaped.status_code == 413
        assert named in shaped.json()["error"]["message"]
        small = c.post("/jvp", json={"expression": "x * 3", "primals": {"x": [1.0]}})
        assert small.status_code == 200
        assert small.json()["jvp"]["data"] == [0.0]


def test_request_bytes_default_is_a_quarter_of_the_machines_memory(client: TestClient) -> None:
    import os

    service = client.app.state.runtime.services.jvp  # type: ignore[attr-defined]
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu = service.bounds[torch.device("cpu")]
    assert 0 < cpu.max_bytes <= total // 4
    assert cpu.max_flops == Settings().max_request_flops


class WorkCount(TorchDispatchMode):
    """The work of a real run as NOTE [abstract evaluation] defines it: torch.utils.
    flop_counter's formulas (matmul, convolution, attention) plus one per element written
    by any other operator (views and in-place results write nothing new)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func.overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
            return out
        given = {id(a) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        if not getattr(func, "is_view", False):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and id(t) not in given:
                    self.total += t.numel()
        return out


def _vjp_flops(
    target: Any,
    xs: tuple[torch.Tensor, ...],
    dtype: torch.dtype,
    batch: int,
    *,
    parameters: bool = False,
    check: bool = False,
) -> tuple[int, int]:
    """(estimated, counted) FLOPs of a VJP with respect to every input (every parameter
    with ``parameters``; ``check``: with options.check's float64 checks): the estimate of
    /eval_shape's "vjp" and torch.utils.flop_counter's formulas on the real run (the
    reverse pass included, and one per element other operators write, as the estimate
    counts them; the coverage check's verdict cached first, as a warm service has it)."""
    from app.engine.vjp import VJPOperation

    materialized = target.materialize(dtype, torch.device("cpu"))
    with torch.no_grad():
        outs = materialized.fn(xs, {**materialized.parameters, **materialized.buffers})
    lead = (batch,) if batch else ()
    cotangents = tuple(torch.randn((*lead, *o.shape), dtype=dtype) for o in outs)
    wrt = ((), tuple(target.parameter_shapes)) if parameters else (tuple(range(len(xs))), ())
    op = VJPOperation(
        *wrt, cotangents, cotangent_batch=bool(batch), source=target,
        single_output=len(outs) == 1, check_target=target if check else None,
    )  # fmt: skip
    op(materialized, xs, (None,) * len(xs), {})  # the coverage verdict, cached
    counter = WorkCount()
    with counter:
        op(materialized, xs, (None,) * len(xs), {})
    plan = plan_of(target, xs, (None,) * len(xs), {}, op)
    assert isinstance(plan, Plan) and plan.kind == "vjp"
    shapes_ = tuple(x.shape for x in xs)
    est = estimate(target, shapes_, dtype, plan, Bounds(10**12, 2**62, 2**62))
    return est.flops, counter.total


# With respect to inputs: 1.5x, not the 2x the other operations hold: a backward pass is
# counted one product per operand the gradient reaches (NOTE [reverse-mode FLOPs] in
# app/engine/abstract.py); two per product, as before, put a VJP of a model over its
# inputs at 1.5-1.9x. Over parameters (the first layer's input gradient is counted but not
# made) and with options.check (the tiny `linear`, where elementwise work dominates): 2x.
VJP_TOLERANCE = 1.5


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    ("batch", "parameters", "check"),
    [(0, False, False), (8, False, False), (0, True, False), (8, True, False), (0, False, True)],
    ids=["inputs", "inputs-cotangent_batch", "parameters", "parameters-cotangent_batch", "check"],
)
def test_eval_shape_vjp_flops_within_2x_of_flop_counter_on_the_real_run(
    name: str, dtype: torch.dtype, batch: int, parameters: bool, check: bool
) -> None:
    model = next(m for m in build_registry(Settings()).all() if m.name == name)
    example = model.config.get("example_inputs") or {}
    sizes = {
        s.name: example.get(s.name, [d if d >= 0 else 3 for d in s.shape]) for s in model.inputs
    }
    xs = tuple(torch.randn(sizes[n], dtype=dtype) for n in model.target.input_names)
    est, real = _vjp_flops(model.target, xs, dtype, batch, parameters=parameters, check=check)
    tolerance = 2.0 if parameters or check else VJP_TOLERANCE
    assert real / tolerance <= est <= tolerance * real, (est, real)


@pytest.mark.parametrize(
    ("expression", "sizes"),
    [
        ("tanh(A @ x) * y", {"A": [64, 32], "x": [32, 16], "y": [64, 16]}),
        ("sum(sin(x @ y) @ y)", {"x": [32, 64], "y": [64, 64]}),
        ("exp(-x**2) * cos(x) + log1p(x * x)", {"x": [4096]}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("batch", [0, 8], ids=["one", "cotangent_batch"])
def test_eval_shape_vjp_flops_of_expressions_within_2x_of_the_real_run(
    expression: str, sizes: dict[str, list[int]], dtype: torch.dtype, batch: int
) -> None:
    from app.services.jvp import expression_target

    target = expression_target(expression, 2000, 500, 50)
    xs = tuple(torch.randn(sizes[n], dtype=dtype) for n in target.input_names)
    est, real = _vjp_flops(target, xs, dtype, batch)
    assert real / VJP_TOLERANCE <= est <= VJP_TOLERANCE * real, (est, real)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_eval_shape_route_vjp_flops_within_tolerance_of_the_real_run(
    client: TestClient, dtype: str
) -> None:
    """What POST /eval_shape answers for "vjp" (a model over its inputs, K = 4 cotangents)
    is the estimate held above: within 1.5x of the real run's count."""
    sizes = model_inputs(client, "mlp")
    primals = {n: {"shape": s, "dtype": dtype} for n, s in sizes.items()}
    body = {"model": "mlp", "primals": primals, "operation": "vjp", "options": {"dtype": dtype}}
    forward = client.post("/eval_shape", json=body | {"operation": "jvp"})
    assert forward.status_code == 200, forward.text
    out_shape = forward.json()["output"]["shape"]
    body |= {"cotangents": {"shape": [4, *out_shape], "dtype": dtype}}
    body["options"] = {"dtype": dtype, "cotangent_batch": True}
    got = client.post("/eval_shape", json=body)
    assert got.status_code == 200, got.text
    model = next(m for m in build_registry(Settings()).all() if m.name == "mlp")
    torch_dtype = getattr(torch, dtype)
    xs = tuple(torch.randn(sizes[n], dtype=torch_dtype) for n in model.target.input_names)
    est, real = _vjp_flops(model.target, xs, torch_dtype, 4)
    assert got.json()["cost"]["flops"] == est
    assert real / VJP_TOLERANCE <= est <= VJP_TOLERANCE * real, (est, real)
