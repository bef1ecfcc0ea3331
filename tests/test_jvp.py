"""POST /jvp numbers against independent references (torch.func.jvp, functional_call)."""

from __future__ import annotations

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from torch.func import functional_call, jvp

from app.models.builtin import linear
from tests.wire import from_wire, to_wire


def post_jvp(client: TestClient, body: dict) -> dict:
    r = client.post("/jvp", json=body)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("engine", ["dual", "functional"])
def test_create_jvp_tutorial_expression_tangent_for_x_only(client: TestClient, engine: str) -> None:
    # The forward-AD tutorial's seed function: f(x, y) = x**2 + y**2 on 10x10, tangent for x only.
    g = torch.Generator().manual_seed(0)
    x, y, v = (torch.randn(10, 10, generator=g, dtype=torch.float64) for _ in range(3))
    body = post_jvp(
        client,
        {
            "expression": "x**2 + y**2",
            "primals": {"x": to_wire(x), "y": to_wire(y)},
            "tangents": {"x": to_wire(v)},
            "options": {"dtype": "float64", "engine": engine},
        },
    )
    ref_out, ref_jvp = jvp(lambda a: a**2 + y**2, (x,), (v,))
    torch.testing.assert_close(from_wire(body["output"]), ref_out, rtol=0, atol=0)
    torch.testing.assert_close(from_wire(body["jvp"]), ref_jvp, rtol=1e-15, atol=1e-15)
    assert body["engine"] == engine and body["method"] == "forward" and body["device"] == "cpu"
    assert set(body["timing_ms"]) == {"queue", "compute", "total"}


def _linear_reference(x, v, param_tangents):
    model = linear().target  # the served weights, read through the public builder
    state = model.materialize(torch.float64, torch.device("cpu"))
    params = dict(state.parameters)
    names = list(param_tangents)
    module = torch.nn.Linear(5, 5).double()

    def f(inp, *ps):
        return functional_call(module, {**params, **dict(zip(names, ps, strict=True))}, (inp,))

    return jvp(f, (x, *[params[n] for n in names]), (v, *[param_tangents[n] for n in names]))


@pytest.mark.parametrize("engine", ["dual", "functional"])
@pytest.mark.parametrize("case", ["inputs", "parameters", "both"])
def test_create_jvp_linear_model_matches_functional_call(
    client: TestClient, engine: str, case: str
) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    v = (
        torch.randn(16, 5, generator=g, dtype=torch.float64)
        if case != "parameters"
        else torch.zeros(16, 5, dtype=torch.float64)
    )
    pt = {}
    if case != "inputs":
        pt = {
            "weight": torch.randn(5, 5, generator=g, dtype=torch.float64),
            "bias": torch.randn(5, generator=g, dtype=torch.float64),
        }
    request = {
        "model": "linear",
        "primals": {"x": to_wire(x, "b64")},
        "options": {"dtype": "float64", "engine": engine, "encoding": "b64"},
    }
    if case != "parameters":
        request["tangents"] = {"x": to_wire(v, "b64")}
    if pt:
        request["parameter_tangents"] = {k: to_wire(t) for k, t in pt.items()}
    body = post_jvp(client, request)
    ref_out, ref_jvp = _linear_reference(x, v, pt)
    torch.testing.assert_close(from_wire(body["output"]), ref_out, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(from_wire(body["jvp"]), ref_jvp, rtol=1e-13, atol=1e-13)


def test_linear_weights_are_independent_of_the_builtin_seed_code() -> None:
    # The reference above reads weights from the server's model; check them against
    # a fresh nn.Linear(5, 5) drawn with seed 0, so a wrong weight load cannot hide.
    torch.manual_seed(0)
    expected = torch.nn.Linear(5, 5)
    served = linear().target.materialize(torch.float32, torch.device("cpu")).parameters
    torch.testing.assert_close(served["weight"], expected.weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(served["bias"], expected.bias.detach(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "source",
    [
        "sin(x) * exp(y) + x @ y",
        "softmax(x, -1) * log1p(y ** 2)",
        "sum(tanh(x) * y, 0)",
    ],
)
def test_create_jvp_engines_agree_in_float64(client: TestClient, source: str) -> None:
    g = torch.Generator().manual_seed(2)
    x, y, vx, vy = (torch.randn(4, 4, generator=g, dtype=torch.float64) for _ in range(4))
    results = []
    for engine in ("dual", "functional"):
        body = post_jvp(
            client,
            {
                "expression": source,
                "primals": {"x": to_wire(x, "b64"), "y": to_wire(y, "b64")},
                "tangents": {"x": to_wire(vx, "b64"), "y": to_wire(vy, "b64")},
                "options": {"dtype": "float64", "engine": engine, "encoding": "b64"},
            },
        )
        results.append(from_wire(body["jvp"]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)
    # And each against torch.func.jvp of the same function written in torch.
    _, want = jvp(REFERENCES[source], (x, y), (vx, vy))
    for got in results:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


REFERENCES = {
    "sin(x) * exp(y) + x @ y": lambda x, y: torch.sin(x) * torch.exp(y) + x @ y,
    "softmax(x, -1) * log1p(y ** 2)": lambda x, y: torch.softmax(x, -1) * torch.log1p(y**2),
    "sum(tanh(x) * y, 0)": lambda x, y: torch.sum(torch.tanh(x) * y, 0),
}


# Above ZERO_DUAL_MAX_ELEMENTS (65,536) the engines leave operands without a tangent plain:
# that path gets its own references (closed forms), with every combination of tangents.
LARGE = (280, 250)  # 70,000 elements


@pytest.mark.parametrize("engine", ["dual", "functional"])
@pytest.mark.parametrize("given", [("x",), ("y",), ("x", "y")])
def test_create_jvp_large_inputs_match_the_closed_form(
    client: TestClient, engine: str, given: tuple[str, ...]
) -> None:
    g = torch.Generator().manual_seed(4)
    x, y, vx, vy = (torch.randn(*LARGE, generator=g, dtype=torch.float64) for _ in range(4))
    tangents = {"x": vx, "y": vy}
    body = post_jvp(
        client,
        {
            "expression": "sin(x) * exp(y) + x * y",
            "primals": {"x": to_wire(x, "b64"), "y": to_wire(y, "b64")},
            "tangents": {k: to_wire(tangents[k], "b64") for k in given},
            "options": {"dtype": "float64", "engine": engine, "encoding": "b64"},
        },
    )
    want = torch.zeros_like(x)
    if "x" in given:
        want += (torch.cos(x) * torch.exp(y) + y) * vx
    if "y" in given:
        want += (torch.sin(x) * torch.exp(y) + x) * vy
    torch.testing.assert_close(from_wire(body["output"]), torch.sin(x) * torch.exp(y) + x * y)
    torch.testing.assert_close(from_wire(body["jvp"]), want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("engine", ["dual", "functional"])
def test_create_jvp_mlp_large_input_matches_reference(client: TestClient, engine: str) -> None:
    g = torch.Generator().manual_seed(5)
    x, v = (torch.randn(1100, 64, generator=g, dtype=torch.float64) for _ in range(2))  # 70,400
    body = post_jvp(
        client,
        {
            "model": "mlp",
            "primals": {"x": to_wire(x, "b64")},
            "tangents": {"x": to_wire(v, "b64")},
            "options": {"dtype": "float64", "engine": engine, "encoding": "b64"},
        },
    )
    torch.manual_seed(1)
    ref = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64))
    ref_out, ref_jvp = jvp(ref.double(), (x,), (v,))
    torch.testing.assert_close(from_wire(body["output"]), ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_wire(body["jvp"]), ref_jvp, rtol=1e-12, atol=1e-12)


def test_create_jvp_mlp_matches_reference(client: TestClient) -> None:
    g = torch.Generator().manual_seed(3)
    x, v = (torch.randn(8, 64, generator=g) for _ in range(2))
    body = post_jvp(
        client,
        {
            "model": "mlp",
            "primals": {"x": to_wire(x, "b64")},
            "tangents": {"x": to_wire(v, "b64")},
            "options": {"encoding": "b64"},
        },
    )
    torch.manual_seed(1)
    ref = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64))
    ref_out, ref_jvp = jvp(ref, (x,), (v,))
    torch.testing.assert_close(from_wire(body["output"]), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(from_wire(body["jvp"]), ref_jvp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["list", "data", "b64"])
def test_create_jvp_accepts_every_wire_form(client: TestClient, form: str) -> None:
    x = torch.tensor([[1.5, -2.0], [0.25, 3.0]])
    v = torch.tensor([[1.0, 0.5], [-1.0, 2.0]])
    body = post_jvp(
        client,
        {
            "expression": "x * x",
            "primals": {"x": to_wire(x, form)},
            "tangents": {"x": to_wire(v, form)},
        },
    )
    torch.testing.assert_close(from_wire(body["output"]), x * x, rtol=0, atol=0)
    torch.testing.assert_close(from_wire(body["jvp"]), 2 * x * v, rtol=0, atol=0)


def test_create_jvp_bare_number_is_a_0d_tensor(client: TestClient) -> None:
    body = post_jvp(client, {"expression": "x ** 3", "primals": {"x": 2}, "tangents": {"x": 1}})
    assert body["output"] == {"shape": [], "dtype": "float32", "data": [8.0]}
    assert body["jvp"] == {"shape": [], "dtype": "float32", "data": [12.0]}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("encoding", ["json", "b64"])
def test_create_jvp_computes_in_each_dtype(
    client: TestClient, dtype: torch.dtype, encoding: str
) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 5, generator=g, dtype=torch.float64) + 0.5
    v = torch.randn(3, 5, generator=g, dtype=torch.float64)
    name = {
        torch.float16: "FP16",
        torch.bfloat16: "bfloat16",
        torch.float32: "FP32",
        torch.float64: "float64",
    }[dtype]
    body = post_jvp(
        client,
        {
            "expression": "x * sin(x)",
            "primals": {"x": to_wire(x)},
            "tangents": {"x": to_wire(v)},
            "options": {"dtype": name, "encoding": encoding},
        },
    )
    out, jv = from_wire(body["output"]), from_wire(body["jvp"])
    assert (
        out.dtype == dtype
        and jv.dtype == dtype
        and body["dtype"]
        == {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(
            dtype, name if dtype != torch.float32 else "float32"
        )
    )
    xd, vd = x.to(dtype), v.to(dtype)
    ref_out, ref_jvp = jvp(lambda a: a * torch.sin(a), (xd,), (vd,))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(jv, ref_jvp)


def test_create_jvp_missing_tangent_gives_zero_jvp(client: TestClient) -> None:
    x = torch.randn(3, 3)
    body = post_jvp(client, {"expression": "x * 2 + 1", "primals": {"x": to_wire(x)}})
    torch.testing.assert_close(from_wire(body["jvp"]), torch.zeros(3, 3), rtol=0, atol=0)
    body = post_jvp(
        client,
        {
            "expression": "x + y",
            "primals": {"x": to_wire(x), "y": to_wire(x)},
            "tangents": {"y": to_wire(torch.ones(3, 3))},
            "options": {"engine": "functional"},
        },
    )
    torch.testing.assert_close(from_wire(body["jvp"]), torch.ones(3, 3), rtol=0, atol=0)


def test_create_jvp_constant_expression_has_zero_jvp(client: TestClient) -> None:
    body = post_jvp(client, {"expression": "2 * pi", "primals": {}})
    assert from_wire(body["output"]).item() == pytest.approx(2 * torch.pi)
    assert from_wire(body["jvp"]).item() == 0.0


def test_create_jvp_nonfinite_results_are_json_strings(client: TestClient) -> None:
    body = post_jvp(
        client,
        {
            "expression": "log(x)",
            "primals": {"x": [0.0, -1.0, 1.0]},
            "tangents": {"x": [1.0, 1.0, 1.0]},
        },
    )
    assert body["output"]["data"] == ["-Infinity", "NaN", 0.0]
    assert body["jvp"]["data"] == ["Infinity", -1.0, 1.0]


def test_create_jvp_nonfinite_inputs_are_read_from_strings(client: TestClient) -> None:
    body = post_jvp(
        client, {"expression": "x + 0", "primals": {"x": ["NaN", "Infinity", "-Infinity", 1]}}
    )
    assert body["output"]["data"] == ["NaN", "Infinity", "-Infinity", 1.0]
    body = post_jvp(
        client,
        {
            "expression": "x + 0",
            "primals": {"x": {"shape": [2], "dtype": "float64", "data": ["Infinity", 2]}},
        },
    )
    assert body["output"]["data"] == ["Infinity", 2.0]


@pytest.mark.parametrize("source", ["9**9**9", "x ** 9**9**9", "10**400 * x"])
def test_create_jvp_huge_powers_answer_at_once(live_server, source: str) -> None:
    # Over a real socket with a client timeout: a Python big-integer power would hang here.
    r = httpx.post(
        f"{live_server.url}/jvp",
        timeout=10,
        json={"expression": source, "primals": {"x": [2.0]} if "x" in source else {}},
    )
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200:
        assert "Infinity" in r.json()["output"]["data"]


def test_read_models_lists_builtins(client: TestClient) -> None:
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert {"linear", "mlp"} <= set(models)
    assert models["linear"]["inputs"] == [{"name": "x", "shape": [-1, 5], "dtype": "float32"}]
    assert models["linear"]["parameters"] == [
        {"name": "weight", "shape": [5, 5], "dtype": "float32"},
        {"name": "bias", "shape": [5], "dtype": "float32"},
    ]
    assert models["linear"]["source"] == "builtin" and models["linear"]["outputs"] == 1
    assert client.get("/models/mlp").json() == models["mlp"]


def test_read_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
