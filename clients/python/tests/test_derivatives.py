"""/jacobian, /hvp, /linearize and the /jvp options tangent_batch and check, over a
MockTransport: the request bodies the client sends and how it reads the answers.

The fake answers are computed here with numpy from analytic derivatives and
written with the fakes' own encoder (jvp_fakes.numpy_to_wire), so the client's
decoding is checked against API.md rather than against itself.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from jvp_fakes import Recorder, error_response, numpy_to_wire, wire_to_numpy

from jvp_client import (
    AsyncLinearization,
    GradientCheck,
    Linearization,
    NotFoundError,
    OverloadedError,
)
from jvp_client.cli import main as cli_main

SESSION_ID = "0123abcd"
TIMING = {"queue": 0.01, "compute": 0.2, "total": 0.5}


def _options(body: dict[str, Any]) -> tuple[str, str]:
    options = body.get("options") or {}
    return options.get("dtype", "float32"), options.get("encoding", "json")


class FakeDerivatives:
    """A fake of the derivative routes for f(x, y) = sin(x) * y (elementwise) and, as
    several outputs, (sin(x) * y, x * y); /hvp for sum(x**3) (H·v = 6 x v)."""

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, np.ndarray]] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path, method = request.url.path, request.method
        body = json.loads(request.content) if request.content else {}
        if path == "/jacobian" and method == "POST":
            return self.jacobian(body)
        if path == "/hvp" and method == "POST":
            return self.hvp(body)
        if path == "/linearize" and method == "POST":
            return self.linearize(body)
        if path.startswith("/linearize/"):
            session_id = path.split("/")[2]
            if session_id not in self.sessions:
                return error_response(
                    404, "not_found", f"Unknown or expired linearize session {session_id!r}", "id"
                )
            if method == "DELETE":
                del self.sessions[session_id]
                return httpx.Response(204)
            return self.linearized_jvp(self.sessions[session_id], body)
        return error_response(404, "not_found", f"No route {path}")

    @staticmethod
    def _blocks(p: dict[str, np.ndarray], wrt: list[str]) -> list[dict[str, np.ndarray]]:
        x, y = p["x"], p["y"]
        first = {"x": np.diag(np.cos(x) * y), "y": np.diag(np.sin(x))}
        second = {"x": np.diag(y), "y": np.diag(x)}
        return [{n: first[n] for n in wrt}, {n: second[n] for n in wrt}]

    def jacobian(self, body: dict[str, Any]) -> httpx.Response:
        dtype, encoding = _options(body)
        p = {k: wire_to_numpy(v) for k, v in body["primals"].items()}
        wrt = body.get("wrt") or ["x", "y"]
        blocks = self._blocks(p, wrt)
        wire_blocks = [{n: numpy_to_wire(a, dtype, encoding) for n, a in b.items()} for b in blocks]
        outputs = [np.sin(p["x"]) * p["y"], p["x"] * p["y"]]
        wire_outputs = [numpy_to_wire(o, dtype, encoding) for o in outputs]
        several = body["expression"] == "(sin(x) * y, x * y)"
        return httpx.Response(
            200,
            json={
                "output": wire_outputs if several else wire_outputs[0],
                "jacobian": wire_blocks if several else wire_blocks[0],
                "dtype": dtype,
                "device": "cpu",
                "timing_ms": TIMING,
            },
        )

    def hvp(self, body: dict[str, Any]) -> httpx.Response:
        dtype, encoding = _options(body)
        x = wire_to_numpy(body["primals"]["x"])
        v = wire_to_numpy(body["tangents"]["x"])
        return httpx.Response(
            200,
            json={
                "output": numpy_to_wire(np.sum(x**3), dtype, encoding),
                "hvp": {"x": numpy_to_wire(6 * x * v, dtype, encoding)},
                "dtype": dtype,
                "device": "cpu",
                "timing_ms": TIMING,
            },
        )

    def linearize(self, body: dict[str, Any]) -> httpx.Response:
        dtype, encoding = _options(body)
        p = {k: wire_to_numpy(v) for k, v in body["primals"].items()}
        self.sessions[SESSION_ID] = p
        return httpx.Response(
            200,
            json={
                "id": SESSION_ID,
                "output": numpy_to_wire(np.sin(p["x"]) * p["y"], dtype, encoding),
                "expires_at": "2030-01-01T00:05:00Z",
                "wrt": body.get("wrt") or ["x", "y"],
                "bytes": 4096,
                "dtype": dtype,
                "device": "cpu",
                "timing_ms": TIMING,
            },
        )

    def linearized_jvp(self, p: dict[str, np.ndarray], body: dict[str, Any]) -> httpx.Response:
        options = body.get("options") or {}
        encoding = options.get("encoding", "json")
        tangents = {k: wire_to_numpy(v) for k, v in (body.get("tangents") or {}).items()}
        x, y = p["x"], p["y"]
        jvp = np.cos(x) * y * tangents.get("x", 0.0) + np.sin(x) * tangents.get("y", 0.0)
        return httpx.Response(200, json={"jvp": numpy_to_wire(jvp, "float64", encoding)})


@pytest.fixture
def fake() -> Recorder:
    return Recorder(FakeDerivatives())


X = np.array([0.0, 0.5, 1.0])
Y = np.array([2.0, -1.0, 3.0])


# -- /jvp options ---------------------------------------------------------------------------


def test_jvp_sends_tangent_batch_and_check_options(make_client) -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        v = wire_to_numpy(body["tangents"]["x"])  # (K, n)
        return httpx.Response(
            200,
            json={
                "output": numpy_to_wire(X * 2, "float64", "json"),
                "jvp": numpy_to_wire(v * 2, "float64", "json"),
                "dtype": "float64",
                "device": "cpu",
                "engine": "functional",
                "method": "forward",
                "timing_ms": TIMING,
                "check": {
                    "max_abs_error": "NaN",
                    "max_rel_error": "Infinity",
                    "passed": False,
                    "eps": 6e-06,
                    "rtol": 1e-06,
                    "atol": 1e-08,
                },
            },
        )

    client = make_client(handler)
    directions = np.stack([np.ones(3), np.arange(3.0)])
    result = client.jvp(
        expression="x * 2",
        primals={"x": X},
        tangents={"x": directions},
        tangent_batch=True,
        check=True,
    )
    assert seen[0]["options"] == {"dtype": "float64", "tangent_batch": True, "check": True}
    assert seen[0]["tangents"]["x"]["shape"] == [2, 3]
    np.testing.assert_array_equal(result.jvp, directions * 2)
    assert isinstance(result.check, GradientCheck)
    assert math.isnan(result.check.max_abs_error) and result.check.max_rel_error == math.inf
    assert result.check.passed is False and (result.check.rtol, result.check.atol) == (1e-6, 1e-8)
    assert result.check.summary().startswith("check FAILED: max abs error nan")


def test_jvp_omits_false_flags_and_rejects_non_bool(make_client, fake) -> None:
    client = make_client(fake)
    with pytest.raises(TypeError, match="expected check to be True or False, got 'yes'"):
        client.jvp(expression="x * 2", primals={"x": X}, check="yes")
    assert fake.requests == []


# -- /jacobian ------------------------------------------------------------------------------


def test_jacobian_sends_body_and_reads_blocks(make_client, fake) -> None:
    client = make_client(fake)
    result = client.jacobian(expression="sin(x) * y", primals={"x": X, "y": Y}, wrt="x")
    body = fake.bodies()[0]
    assert fake.requests[0].url.path == "/jacobian"
    assert set(body) == {"expression", "primals", "wrt", "options"}
    assert body["wrt"] == ["x"] and body["options"] == {"dtype": "float64"}
    assert isinstance(result.jacobian, dict) and list(result.jacobian) == ["x"]
    np.testing.assert_allclose(result.jacobian["x"], np.diag(np.cos(X) * Y))
    np.testing.assert_allclose(result.output, np.sin(X) * Y)
    assert result.dtype == "float64" and result.timing_ms["total"] == 0.5


def test_jacobian_returns_list_of_maps_for_several_outputs_torch(make_client, fake) -> None:
    client = make_client(fake)
    x, y = torch.tensor(X), torch.tensor(Y)
    result = client.jacobian(expression="(sin(x) * y, x * y)", primals={"x": x, "y": y})
    assert "wrt" not in fake.bodies()[0]
    assert isinstance(result.output, list) and isinstance(result.jacobian, list)
    assert all(isinstance(t, torch.Tensor) for block in result.jacobian for t in block.values())
    torch.testing.assert_close(result.jacobian[1]["y"], torch.diag(x))
    torch.testing.assert_close(result.jacobian[0]["y"], torch.diag(torch.sin(x)))


def test_jacobian_asks_b64_answers_for_b64_primals(make_client, fake) -> None:
    client = make_client(fake)
    x = np.linspace(0, 1, 80, dtype=np.float32)
    result = client.jacobian(
        expression="sin(x) * y", primals={"x": x, "y": np.ones(80, np.float32)}, wrt=["x", "y"]
    )
    body = fake.bodies()[0]
    assert "b64" in body["primals"]["x"]
    assert body["options"] == {"dtype": "float32", "encoding": "b64"}
    assert result.jacobian["x"].dtype == np.float32
    np.testing.assert_allclose(result.jacobian["x"], np.diag(np.cos(x)), rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"wrt": []}, ValueError, r"jacobian\(\): expected wrt to be input or parameter names"),
        ({"wrt": ["x", 3]}, ValueError, "expected wrt"),
        ({"model": "linear"}, TypeError, "pass exactly one of expression= or model="),
        ({"encoding": "xml"}, ValueError, "expected encoding 'auto', 'json' or 'b64'"),
    ],
)
def test_jacobian_rejects_bad_arguments(make_client, fake, kwargs, error, match) -> None:
    client = make_client(fake)
    with pytest.raises(error, match=match):
        client.jacobian(expression="sin(x) * y", primals={"x": X, "y": Y}, **kwargs)
    assert fake.requests == []


# -- /hvp -----------------------------------------------------------------------------------


def test_hvp_sends_body_and_reads_map(make_client, fake) -> None:
    client = make_client(fake)
    v = np.array([1.0, 0.0, -1.0])
    result = client.hvp(
        expression="x**3",
        primals={"x": X},
        tangents={"x": v},
        reduction="sum",
        device="cpu",
    )
    body = fake.bodies()[0]
    assert fake.requests[0].url.path == "/hvp"
    assert body["reduction"] == "sum" and "output_index" not in body
    assert body["options"] == {"dtype": "float64", "device": "cpu"}
    np.testing.assert_allclose(result.hvp["x"], 6 * X * v)
    assert float(result.output) == pytest.approx(np.sum(X**3))


def test_hvp_sends_output_index_and_tangent_batch(make_client, fake) -> None:
    client = make_client(fake)
    client.hvp(
        model="mlp",
        primals={"x": X},
        tangents={"x": np.ones((2, 3))},
        output_index=1,
        tangent_batch=True,
    )
    body = fake.bodies()[0]
    assert body["model"] == "mlp" and body["output_index"] == 1
    assert "reduction" not in body  # "none" is the service default
    assert body["options"] == {"dtype": "float64", "tangent_batch": True}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, r"hvp\(\): pass tangents="),
        ({"tangents": {"x": X}, "reduction": "max"}, "expected reduction 'sum', 'mean' or 'none'"),
        ({"tangents": {"x": X}, "output_index": -1}, "expected output_index to be an int >= 0"),
    ],
)
def test_hvp_rejects_bad_arguments(make_client, fake, kwargs, match) -> None:
    client = make_client(fake)
    with pytest.raises(ValueError, match=match):
        client.hvp(expression="x**3", primals={"x": X}, **kwargs)
    assert fake.requests == []


# -- /linearize -----------------------------------------------------------------------------


def test_linearize_applies_and_closes(make_client, fake) -> None:
    client = make_client(fake)
    with client.linearize(expression="sin(x) * y", primals={"x": X, "y": Y}, wrt=["x"]) as lin:
        assert isinstance(lin, Linearization)
        assert (lin.id, lin.expires_at, lin.wrt, lin.dtype) == (
            SESSION_ID,
            "2030-01-01T00:05:00Z",
            ["x"],
            "float64",
        )
        np.testing.assert_allclose(lin.output, np.sin(X) * Y)
        v = np.array([1.0, 2.0, 3.0])
        np.testing.assert_allclose(lin.jvp(tangents={"x": v}), np.cos(X) * Y * v)
        lin.jvp(tangents={"x": np.ones((2, 3))}, tangent_batch=True)
    assert lin.closed
    methods = [(r.method, r.url.path) for r in fake.requests]
    assert methods == [
        ("POST", "/linearize"),
        ("POST", f"/linearize/{SESSION_ID}/jvp"),
        ("POST", f"/linearize/{SESSION_ID}/jvp"),
        ("DELETE", f"/linearize/{SESSION_ID}"),
    ]
    bodies = fake.bodies()
    assert bodies[0] == {
        "expression": "sin(x) * y",
        "primals": bodies[0]["primals"],
        "wrt": ["x"],
        "options": {"dtype": "float64"},
    }
    assert set(bodies[1]) == {"tangents"}  # no options: json answers, one direction
    assert bodies[2]["options"] == {"tangent_batch": True}
    lin.close()  # a second close sends nothing
    assert len(fake.requests) == 4
    with pytest.raises(NotFoundError, match="Unknown or expired linearize session"):
        lin.jvp(tangents={"x": X})


def test_linearize_sends_python_tangents_in_session_dtype(make_client, fake) -> None:
    client = make_client(fake)
    lin = client.linearize(expression="sin(x) * y", primals={"x": X, "y": Y})
    tangent = [0.5] * 3
    big = [1.0] * 70
    lin.jvp(tangents={"x": tangent})
    fake.handler.sessions[SESSION_ID] = {"x": np.zeros(70), "y": np.ones(70)}
    out = lin.jvp(tangents={"x": big})
    bodies = fake.bodies()
    assert bodies[1]["tangents"]["x"] == tangent  # form 1: takes the session's dtype
    assert bodies[2]["tangents"]["x"]["dtype"] == "float64"
    assert bodies[2]["options"] == {"encoding": "b64"}
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, np.ones(70))


def test_linearize_returns_torch_for_torch_tangents(make_client, fake) -> None:
    client = make_client(fake)
    lin = client.linearize(expression="sin(x) * y", primals={"x": X, "y": Y})
    out = lin.jvp(tangents={"y": torch.ones(3, dtype=torch.float64)})
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, torch.sin(torch.tensor(X)))
    assert isinstance(lin.output, np.ndarray)


def test_linearize_close_tolerates_expired_session(make_client, fake) -> None:
    client = make_client(fake)
    lin = client.linearize(expression="sin(x) * y", primals={"x": X, "y": Y})
    fake.handler.sessions.clear()  # expired on the service
    lin.close()
    assert lin.closed and fake.requests[-1].method == "DELETE"


def test_linearize_retries_over_budget_after_retry_after(make_client, delays) -> None:
    backend = FakeDerivatives()
    answers = [
        error_response(
            503,
            "overloaded",
            "linearize sessions use 1 GiB of their 1 GiB budget",
            headers={"Retry-After": "2"},
        )
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop() if answers else backend(request)

    client = make_client(handler)
    lin = client.linearize(expression="sin(x) * y", primals={"x": X, "y": Y})
    assert lin.id == SESSION_ID and delays == [2.0]
    answers.append(error_response(503, "overloaded", "over budget", headers={"Retry-After": "1"}))
    client_no_retry = make_client(handler, max_retries=0)
    with pytest.raises(OverloadedError, match="over budget"):
        client_no_retry.linearize(expression="sin(x) * y", primals={"x": X, "y": Y})


@pytest.mark.asyncio
async def test_derivatives_async_bodies_and_results(make_async_client, fake) -> None:
    client = make_async_client(fake)
    jac = await client.jacobian(expression="sin(x) * y", primals={"x": X, "y": Y})
    np.testing.assert_allclose(jac.jacobian["y"], np.diag(np.sin(X)))
    hvp = await client.hvp(expression="sum(x**3)", primals={"x": X}, tangents={"x": np.ones(3)})
    np.testing.assert_allclose(hvp.hvp["x"], 6 * X)
    async with await client.linearize(expression="sin(x) * y", primals={"x": X, "y": Y}) as lin:
        assert isinstance(lin, AsyncLinearization)
        out = await lin.jvp(tangents={"x": np.ones(3)})
        np.testing.assert_allclose(out, np.cos(X) * Y)
    assert lin.closed
    with pytest.raises(NotFoundError):
        await lin.jvp(tangents={"x": np.ones(3)})
    paths = [r.url.path for r in fake.requests]
    assert paths == [
        "/jacobian",
        "/hvp",
        "/linearize",
        f"/linearize/{SESSION_ID}/jvp",
        f"/linearize/{SESSION_ID}",
        f"/linearize/{SESSION_ID}/jvp",
    ]


# -- CLI ------------------------------------------------------------------------------------


def _run(handler: Any, argv: list[str], capsys: Any, monkeypatch: Any) -> tuple[int, str, str]:
    monkeypatch.delenv("JVP_BASE_URL", raising=False)
    monkeypatch.delenv("JVP_API_KEY", raising=False)
    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        code = cli_main(argv, http_client=http)
    out, err = capsys.readouterr()
    return code, out, err


def test_jacobian_cli_writes_one_array_per_output_and_name(
    fake, tmp_path, capsys, monkeypatch
) -> None:
    np.save(tmp_path / "x.npy", X)
    out_file = tmp_path / "jac.npz"
    argv = [
        "jacobian",
        "-e",
        "(sin(x) * y, x * y)",
        "-p",
        f"x={tmp_path / 'x.npy'}",
        "-p",
        f"y={json.dumps(Y.tolist())}",
        "--wrt",
        "x",
        "--out",
        str(out_file),
    ]
    code, out, err = _run(fake, argv, capsys, monkeypatch)
    assert code == 0, err
    assert fake.bodies()[0]["wrt"] == ["x"]
    assert "d output[1] / d x" in out
    with np.load(out_file) as data:
        assert sorted(data.files) == ["jacobian_0_x", "jacobian_1_x", "output_0", "output_1"]
        np.testing.assert_allclose(data["jacobian_0_x"], np.diag(np.cos(X) * Y))
        np.testing.assert_allclose(data["jacobian_1_x"], np.diag(Y))


def test_hvp_cli_requires_a_tangent(fake, capsys, monkeypatch) -> None:
    code, _, err = _run(fake, ["hvp", "-e", "sum(x**3)", "-p", "x=[1, 2]"], capsys, monkeypatch)
    assert code == 2 and "hvp: give at least one --tangent" in err
    assert fake.requests == []


def test_call_cli_check_failure_exits_1(capsys, monkeypatch) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "output": [0.0],
                "jvp": [0.0],
                "dtype": "float32",
                "device": "cpu",
                "engine": "dual",
                "method": "forward",
                "timing_ms": TIMING,
                "check": {
                    "max_abs_error": 0.5,
                    "max_rel_error": 1.0,
                    "passed": False,
                    "eps": 6e-6,
                    "rtol": 1e-3,
                    "atol": 1e-5,
                },
            },
        )

    recorder = Recorder(handler)
    argv = ["call", "-e", "relu(x)", "-p", "x=[0]", "-t", "x=[1]", "--check"]
    code, out, _ = _run(recorder, argv, capsys, monkeypatch)
    assert code == 1
    assert recorder.bodies()[0]["options"] == {"check": True}
    assert "check FAILED: max abs error 0.5, max rel error 1 (eps 6e-06" in out
