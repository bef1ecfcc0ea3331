"""POST /vjp and POST /linearize/{id}/vjp: numbers against torch.func.vjp computed locally
and the dot-product identity <u, J v> = <Jᵀu, v> (J v from the service's forward mode),
for expressions, every built-in model, several outputs, batches, sessions, both dtypes,
and every error path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn
from torch.func import vjp

from app.engine.errors import ReverseADUnsupported
from app.engine.target import Materialized
from app.engine.vjp import VJPOperation
from app.models.builtin import BUILTINS
from tests.conftest import make_client
from tests.derivatives.refs import model_function, post, randn
from tests.models.conftest import save_model
from tests.wire import from_wire, to_wire

F64 = torch.float64


def f_expr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * torch.exp(y) + x @ y.T @ x


EXPR = "sin(x) * exp(y) + x @ transpose(y, 0, 1) @ x"


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-4)])
def test_create_vjp_expression_matches_torch_func_vjp(
    client: TestClient, dtype: str, tol: float
) -> None:
    x, y, u = randn(3, 4, seed=1), randn(3, 4, seed=2), randn(3, 4, seed=3)
    got = post(
        client,
        "/vjp",
        {
            "expression": EXPR,
            "primals": {"x": to_wire(x), "y": to_wire(y)},
            "cotangents": to_wire(u),
            "options": {"dtype": dtype},
        },
    )
    out, fn = vjp(f_expr, x, y)
    gx, gy = fn(u)
    assert got["method"] == "reverse" and got["dtype"] == dtype
    assert set(got["vjp"]) == {"x", "y"}
    torch.testing.assert_close(from_wire(got["output"]).double(), out, rtol=tol, atol=tol)
    torch.testing.assert_close(from_wire(got["vjp"]["x"]).double(), gx, rtol=tol, atol=tol)
    torch.testing.assert_close(from_wire(got["vjp"]["y"]).double(), gy, rtol=tol, atol=tol)


def test_create_vjp_wrt_one_input(client: TestClient) -> None:
    x, y, u = randn(3, 4, seed=4), randn(3, 4, seed=5), randn(3, 4, seed=6)
    got = post(
        client,
        "/vjp",
        {
            "expression": EXPR,
            "primals": {"x": to_wire(x), "y": to_wire(y)},
            "cotangents": to_wire(u),
            "wrt": ["y"],
            "options": {"dtype": "float64"},
        },
    )
    assert list(got["vjp"]) == ["y"]
    _, fn = vjp(lambda b: f_expr(x, b), y)
    torch.testing.assert_close(from_wire(got["vjp"]["y"]), fn(u)[0], rtol=1e-12, atol=1e-12)


def _dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k].double() * b[k].double()).sum() for k in a))


def _example(info: dict[str, Any], seed: int) -> torch.Tensor:
    shape = [2 if d == -1 else d for d in info["inputs"][0]["shape"]]
    if info["name"] == "transformer":
        shape = [2, 8, 32]
    return randn(*shape, seed=seed)


@pytest.mark.parametrize("name", [make().name for make in BUILTINS])
def test_create_vjp_every_builtin_inputs_and_parameters(client: TestClient, name: str) -> None:
    """Against torch.func.vjp of the served model's own float64 function, and the identity
    <u, J v> = <Jᵀu, v> with J v from POST /jvp (forward mode: another path)."""
    info = client.get(f"/models/{name}").json()
    served = next(make() for make in BUILTINS if make().name == name)
    materialized = served.target.materialize(F64, torch.device("cpu"))
    params = [p["name"] for p in info["parameters"]][:2]
    x = _example(info, seed=10)
    fixed = dict(materialized.parameters)

    def f(x_: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        state = {**fixed, **dict(zip(params, ps, strict=True)), **materialized.buffers}
        return materialized.fn((x_,), state)[0]

    out, fn = vjp(f, x, *(fixed[p] for p in params))
    u = randn(*out.shape, seed=11)
    got = post(
        client,
        "/vjp",
        {
            "model": name,
            "primals": {"x": to_wire(x)},
            "cotangents": to_wire(u),
            "wrt": ["x", *params],
            "options": {"dtype": "float64"},
        },
    )
    refs = fn(u)
    assert list(got["vjp"]) == ["x", *params]
    for key, ref in zip(["x", *params], refs, strict=True):
        torch.testing.assert_close(from_wire(got["vjp"][key]), ref, rtol=1e-10, atol=1e-10)
    # The identity, with J v from the service's forward mode.
    v = {"x": randn(*x.shape, seed=12)}
    v |= {p: randn(*fixed[p].shape, seed=13 + i) for i, p in enumerate(params)}
    jv = post(
        client,
        "/jvp",
        {
            "model": name,
            "primals": {"x": to_wire(x)},
            "tangents": {"x": to_wire(v["x"])},
            "parameter_tangents": {p: to_wire(v[p]) for p in params},
            "options": {"dtype": "float64"},
        },
    )
    jtu = {k: from_wire(t) for k, t in got["vjp"].items()}
    u_jv = float((u * from_wire(jv["jvp"])).sum())
    assert _dot(jtu, v) == pytest.approx(u_jv, rel=1e-9, abs=1e-9)


def test_create_vjp_float32_mlp_with_check(client: TestClient) -> None:
    x, u = randn(2, 64, seed=20), randn(2, 64, seed=21)
    got = post(
        client,
        "/vjp",
        {
            "model": "mlp",
            "primals": {"x": to_wire(x)},
            "cotangents": to_wire(u),
            "wrt": ["x", "0.weight"],
            "options": {"check": True},
        },
    )
    assert got["dtype"] == "float32"
    f = model_function("mlp", ("0.weight",))
    weights = dict(
        next(m() for m in BUILTINS if m().name == "mlp")
        .target.materialize(F64, torch.device("cpu"))
        .parameters
    )
    _, fn = vjp(f, x, weights["0.weight"])
    gx, gw = fn(u)
    torch.testing.assert_close(from_wire(got["vjp"]["x"]).double(), gx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_wire(got["vjp"]["0.weight"]).double(), gw, rtol=1e-4, atol=1e-5)
    check = got["check"]
    assert check["passed"] is True and check["nonfinite"] is None
    assert check["identity"]["passed"] is True
    assert check["rtol"] == 1e-3 and check["max_rel_error"] < 1e-3


def test_create_vjp_cotangent_batch_matches_one_by_one(client: TestClient) -> None:
    x, y = randn(3, 4, seed=30), randn(3, 4, seed=31)
    us = randn(5, 3, 4, seed=32)
    got = post(
        client,
        "/vjp",
        {
            "expression": EXPR,
            "primals": {"x": to_wire(x), "y": to_wire(y)},
            "cotangents": to_wire(us),
            "options": {"dtype": "float64", "cotangent_batch": True, "check": True},
        },
    )
    _, fn = vjp(f_expr, x, y)
    gx = torch.stack([fn(us[k])[0] for k in range(5)])
    gy = torch.stack([fn(us[k])[1] for k in range(5)])
    torch.testing.assert_close(from_wire(got["vjp"]["x"]), gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_wire(got["vjp"]["y"]), gy, rtol=1e-12, atol=1e-12)
    assert got["check"]["passed"] is True


def test_create_vjp_null_cotangent_leaves_output_out_at_a_singular_point(
    client: TestClient,
) -> None:
    """sqrt'(0) is infinite: an output without a cotangent contributes nothing (never
    0 * inf = NaN); an explicit zero cotangent is used as given."""
    body = {
        "expression": "sqrt(x) + x",
        "primals": {"x": [0.0, 4.0]},
        "cotangents": None,
        "options": {"dtype": "float64"},
    }
    got = post(client, "/vjp", body)
    assert from_wire(got["vjp"]["x"]).tolist() == [0.0, 0.0]
    got = post(client, "/vjp", {**body, "cotangents": [0.0, 1.0]})
    values = from_wire(got["vjp"]["x"]).tolist()
    assert values[0] != values[0]  # 0 * inf: NaN, as J^T u is at that u
    assert values[1] == pytest.approx(1.0 + 0.25)


def test_create_vjp_edge_points_match_torch(client: TestClient) -> None:
    """At 0 and at the edges of the domains: the same numbers (inf, NaN) as torch."""
    x = torch.tensor([0.0, -1.0, 1.0, 1e-300, -0.0], dtype=F64)
    for expr, f in (
        ("sqrt(abs(x))", lambda a: torch.sqrt(torch.abs(a))),
        ("relu(x) * log1p(x)", lambda a: torch.relu(a) * torch.log1p(a)),
        ("atanh(x)", torch.atanh),
        ("abs(x)", torch.abs),
    ):
        got = post(
            client,
            "/vjp",
            {
                "expression": expr,
                "primals": {"x": to_wire(x)},
                "cotangents": to_wire(torch.ones(5, dtype=F64)),
                "options": {"dtype": "float64"},
            },
        )
        _, fn = vjp(f, x)
        torch.testing.assert_close(
            from_wire(got["vjp"]["x"]), fn(torch.ones(5, dtype=F64))[0], equal_nan=True
        )


class TwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.proj(x)
        return torch.tanh(h) * y, (h * y).sum(-1)


@torch.library.custom_op("jvptest17::scale_no_grad", mutates_args=())
def scale_no_grad(x: torch.Tensor) -> torch.Tensor:
    """A custom operator without an autograd formula."""
    return x * 2.0


@scale_no_grad.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class NoBackward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(scale_no_grad(x))


@pytest.fixture(scope="module")
def two_out() -> nn.Module:
    torch.manual_seed(17)
    return TwoOut().eval()


@pytest.fixture(scope="module")
def repo_client(
    tmp_path_factory: pytest.TempPathFactory, two_out: nn.Module
) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("models17")
    batch = torch.export.Dim("batch", min=1, max=64)
    save_model(
        root,
        "twoout",
        two_out,
        (torch.randn(2, 3), torch.randn(2, 4)),
        dynamic_shapes={"x": {0: batch}, "y": {0: batch}},
    )
    save_model(root, "nobackward", NoBackward(), (torch.randn(3),))
    with make_client(model_dir=Path(root)) as c:
        yield c


def _two_out_f(module: nn.Module, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> Any:
    state = {k: v.double() for k, v in module.state_dict().items()}
    state["proj.weight"] = w
    return torch.func.functional_call(module.double(), state, (x, y))


def test_create_vjp_several_outputs_with_a_null(
    repo_client: TestClient, two_out: nn.Module
) -> None:
    x, y = randn(2, 3, seed=40), randn(2, 4, seed=41)
    u0, u1 = randn(2, 4, seed=42), randn(2, seed=43)
    w = two_out.state_dict()["proj.weight"].double()
    out, fn = vjp(lambda a, b, c: _two_out_f(two_out, a, b, c), x, y, w)
    for cot, ref_u in (([to_wire(u0), to_wire(u1)], (u0, u1)), ([None, to_wire(u1)], (0, u1))):
        got = post(
            repo_client,
            "/vjp",
            {
                "model": "twoout",
                "primals": {"x": to_wire(x), "y": to_wire(y)},
                "cotangents": cot,
                "wrt": ["x", "y", "proj.weight"],
                "options": {"dtype": "float64"},
            },
        )
        assert isinstance(got["output"], list) and len(got["output"]) == 2
        u = tuple(torch.zeros_like(out[0]) if isinstance(r, int) else r for r in ref_u)
        refs = fn(u)
        for key, ref in zip(["x", "y", "proj.weight"], refs, strict=True):
            torch.testing.assert_close(from_wire(got["vjp"][key]), ref, rtol=1e-10, atol=1e-10)


def test_create_vjp_several_outputs_needs_a_list(repo_client: TestClient) -> None:
    body = {"model": "twoout", "primals": {"x": [[1.0, 2.0, 3.0]], "y": [[1.0] * 4]}}
    r = repo_client.post("/vjp", json={**body, "cotangents": [[1.0] * 4]})
    assert r.status_code == 422
    assert "Expected 2 cotangents" in r.json()["error"]["message"]
    r = repo_client.post("/vjp", json={**body, "cotangents": {"shape": [1, 4], "data": [1] * 4}})
    assert r.status_code == 422 and "is a list" in r.json()["error"]["message"]
    r = repo_client.post("/vjp", json={**body, "cotangents": [[1.0] * 3, None]})
    assert r.status_code == 422
    assert r.json()["error"] == {
        "type": "invalid_request",
        "message": "Expected cotangent 0 of shape [1, 4] (the output's shape), got [3]",
        "param": "cotangents.0",
    }


def test_create_vjp_operator_without_backward_is_501(repo_client: TestClient) -> None:
    r = repo_client.post(
        "/vjp",
        json={"model": "nobackward", "primals": {"x": [1.0, 2.0, 3.0]}, "cotangents": [1, 1, 1]},
    )
    assert r.status_code == 501, r.text
    error = r.json()["error"]
    assert error["type"] == "reverse_ad_unsupported"
    assert "jvptest17.scale_no_grad" in error["message"]
    # The service keeps serving, and the same model's forward pass still works.
    ok = repo_client.post("/jvp", json={"expression": "x", "primals": {"x": 1.0}})
    assert ok.status_code == 200


def test_vjp_operation_refuses_argument_without_formula() -> None:
    """igamma has no backward formula for its first argument (derivatives.yaml says
    not_implemented): refused naming it; its second argument is fine."""
    m = Materialized(fn=lambda a, s: (torch.igamma(a[0], a[1]),), parameters={}, buffers={})
    a, x = torch.tensor([1.5, 2.0], dtype=F64), torch.tensor([0.5, 1.0], dtype=F64)
    op = VJPOperation((0, 1), (), (torch.ones(2, dtype=F64),))
    with pytest.raises(ReverseADUnsupported, match="igamma"):
        op(m, (a, x), (None, None), {})
    op = VJPOperation((1,), (), (torch.ones(2, dtype=F64),))
    _, (gx,) = op(m, (a, x), (None, None), {})
    _, fn = vjp(lambda x_: torch.igamma(a, x_), x)
    torch.testing.assert_close(gx, fn(torch.ones(2, dtype=F64))[0])


@pytest.mark.parametrize(
    "body,status,message",
    [
        ({"cotangents": [1.0, 2.0], "wrt": ["z"]}, 422, "Unknown name 'z' in 'wrt'"),
        ({"cotangents": [1.0, 2.0], "wrt": []}, 422, "'wrt' is empty"),
        ({"cotangents": [1.0]}, 422, "Expected cotangent of shape [2]"),
        (
            {"cotangents": [[1.0, 2.0]], "options": {"cotangent_batch": True, "check": True}},
            200,
            None,
        ),
        ({"cotangents": [1.0, 2.0], "options": {"cotangent_batch": True}}, 422, "[K, 2]"),
        ({"cotangents": [1.0, 2.0], "options": {"engine": "dual"}}, 422, "Unknown field"),
        ({"cotangents": {"shape": [2], "dtype": "float32", "b64": "!!"}}, 422, "cotangents"),
        ({}, 422, "Missing required field 'cotangents'"),
    ],
)
def test_create_vjp_errors(
    client: TestClient, body: dict[str, Any], status: int, message: str | None
) -> None:
    full = {"expression": "x * y", "primals": {"x": [1.0, 2.0], "y": [3.0, 4.0]}, **body}
    r = client.post("/vjp", json=full)
    assert r.status_code == status, r.text
    if message is not None:
        assert message in r.json()["error"]["message"]


def test_create_vjp_bad_expression_and_unknown_model(client: TestClient) -> None:
    r = client.post("/vjp", json={"expression": "x +", "primals": {"x": 1.0}, "cotangents": 1.0})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_expression"
    r = client.post("/vjp", json={"model": "nope", "primals": {"x": 1.0}, "cotangents": 1.0})
    assert r.status_code == 404
    r = client.post("/vjp", json={"expression": "x", "primals": {}, "cotangents": 1.0})
    assert r.status_code == 422 and "Missing primal for input 'x'" in r.text


def test_create_vjp_over_the_flops_limit_is_413_before_computing() -> None:
    with make_client(max_request_flops=10_000) as c:
        x = torch.zeros(64, 64)
        body = {"expression": "x @ x", "primals": {"x": to_wire(x)}, "cotangents": to_wire(x)}
        jvp_ok = c.post(
            "/eval_shape",
            json={"operation": "jvp", **{k: v for k, v in body.items() if k != "cotangents"}},
        )
        assert jvp_ok.status_code == 413  # forward mode is over it too at this size
        r = c.post("/vjp", json=body)
        assert r.status_code == 413
        assert "JVP_MAX_REQUEST_FLOPS" in r.json()["error"]["message"]


def test_eval_shape_vjp_shapes_and_cost(client: TestClient) -> None:
    body = {"model": "mlp", "primals": {"x": {"shape": [3, 64]}}}
    vjp_shape = post(
        client,
        "/eval_shape",
        {
            "operation": "vjp",
            **body,
            "cotangents": {"shape": [5, 3, 64]},
            "wrt": ["x", "2.bias"],
            "options": {"cotangent_batch": True},
        },
    )
    assert vjp_shape["output"] == {"shape": [3, 64], "dtype": "float32"}
    assert vjp_shape["vjp"] == {
        "x": {"shape": [5, 3, 64], "dtype": "float32"},
        "2.bias": {"shape": [5, 64], "dtype": "float32"},
    }
    jvp_shape = post(client, "/eval_shape", {"operation": "jvp", **body})
    # Reverse mode keeps the activations and runs K backward passes: it costs more.
    assert vjp_shape["cost"]["flops"] > jvp_shape["cost"]["flops"]
    assert vjp_shape["cost"]["peak_bytes"] > jvp_shape["cost"]["peak_bytes"]
    r = client.post(
        "/eval_shape",
        json={"operation": "vjp", **body, "cotangents": {"shape": [3, 63]}},
    )
    assert r.status_code == 422 and "Expected cotangent of shape [3, 64]" in r.text


def test_linearized_vjp_transpose_session(client: TestClient) -> None:
    x, y = randn(3, 4, seed=60), randn(3, 4, seed=61)
    base = {"expression": EXPR, "primals": {"x": to_wire(x), "y": to_wire(y)}}
    plain = post(client, "/linearize", {**base, "options": {"dtype": "float64"}})
    made = post(client, "/linearize", {**base, "options": {"dtype": "float64", "transpose": True}})
    assert made["bytes"] > plain["bytes"]  # the reverse pass's saved tensors are counted
    _, fn = vjp(f_expr, x, y)
    for seed in (62, 63):
        u = randn(3, 4, seed=seed)
        got = post(client, f"/linearize/{made['id']}/vjp", {"cotangents": to_wire(u)})
        gx, gy = fn(u)
        torch.testing.assert_close(from_wire(got["vjp"]["x"]), gx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(from_wire(got["vjp"]["y"]), gy, rtol=1e-12, atol=1e-12)
    us = randn(4, 3, 4, seed=64)
    got = post(
        client,
        f"/linearize/{made['id']}/vjp",
        {"cotangents": to_wire(us), "options": {"cotangent_batch": True}},
    )
    ref = torch.stack([fn(us[k])[0] for k in range(4)])
    torch.testing.assert_close(from_wire(got["vjp"]["x"]), ref, rtol=1e-12, atol=1e-12)
    # The same session still answers J·t.
    t = randn(3, 4, seed=65)
    jv = post(client, f"/linearize/{made['id']}/jvp", {"tangents": {"x": to_wire(t)}})
    assert from_wire(jv["jvp"]).shape == (3, 4)
    # Errors: a session made without transpose, a bad shape, an unknown id.
    r = client.post(f"/linearize/{plain['id']}/vjp", json={"cotangents": to_wire(u)})
    assert r.status_code == 422 and '"transpose": true' in r.json()["error"]["message"]
    r = client.post(f"/linearize/{made['id']}/vjp", json={"cotangents": [1.0]})
    assert r.status_code == 422 and "Expected cotangent of shape [3, 4]" in r.text
    r = client.post("/linearize/nope/vjp", json={"cotangents": [1.0]})
    assert r.status_code == 404
    client.delete(f"/linearize/{made['id']}")
    r = client.post(f"/linearize/{made['id']}/vjp", json={"cotangents": to_wire(u)})
    assert r.status_code == 404


def test_linearized_vjp_model_parameters(client: TestClient) -> None:
    x = randn(2, 5, seed=70)
    made = post(
        client,
        "/linearize",
        {
            "model": "linear",
            "primals": {"x": to_wire(x)},
            "wrt": ["x", "weight"],
            "options": {"dtype": "float64", "transpose": True},
        },
    )
    f = model_function("linear", ("weight",))
    weights = dict(
        next(m() for m in BUILTINS if m().name == "linear")
        .target.materialize(F64, torch.device("cpu"))
        .parameters
    )
    _, fn = vjp(f, x, weights["weight"])
    u = randn(2, 5, seed=71)
    got = post(client, f"/linearize/{made['id']}/vjp", {"cotangents": to_wire(u)})
    gx, gw = fn(u)
    torch.testing.assert_close(from_wire(got["vjp"]["x"]), gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_wire(got["vjp"]["weight"]), gw, rtol=1e-12, atol=1e-12)


def test_openapi_lists_vjp(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "/vjp" in spec["paths"] and "/linearize/{session_id}/vjp" in spec["paths"]
    responses = spec["paths"]["/vjp"]["post"]["responses"]
    assert {"200", "413", "422", "501"} <= set(responses)


def test_linearized_jvp_and_vjp_of_0d_arguments(client: TestClient) -> None:
    """0-d arguments (scalar parameters of a fit): J·t without tangent_batch used to fail
    reading a K from a 0-d tangent (a 422 'tuple index out of range')."""
    t = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    a, b = torch.tensor(1.0, dtype=F64), torch.tensor(0.5, dtype=F64)
    made = post(
        client,
        "/linearize",
        {
            "expression": "a * exp(-b * t)",
            "primals": {"a": 1.0, "b": 0.5, "t": to_wire(t)},
            "wrt": ["a", "b"],
            "options": {"dtype": "float64", "transpose": True},
        },
    )

    def f(a_: torch.Tensor, b_: torch.Tensor) -> torch.Tensor:
        return a_ * torch.exp(-b_ * t)

    got = post(client, f"/linearize/{made['id']}/jvp", {"tangents": {"a": 1.0}})
    ref = torch.func.jvp(lambda a_: f(a_, b), (a,), (torch.tensor(1.0, dtype=F64),))[1]
    torch.testing.assert_close(from_wire(got["jvp"]), ref)
    u = torch.tensor([1.0, -1.0, 2.0], dtype=F64)
    got = post(client, f"/linearize/{made['id']}/vjp", {"cotangents": to_wire(u)})
    ga, gb = vjp(f, a, b)[1](u)
    torch.testing.assert_close(from_wire(got["vjp"]["a"]), ga)
    torch.testing.assert_close(from_wire(got["vjp"]["b"]), gb)
