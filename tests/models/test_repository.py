"""A saved torch.export program served from a temporary JVP_MODEL_DIR."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn
from torch.func import functional_call, jvp

from tests.conftest import make_client
from tests.wire import from_wire, to_wire


class TwoInTwoOut(nn.Module):
    """Two inputs, two outputs, a parameter-free buffer: the shapes users bring."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.register_buffer("scale", torch.tensor([1.0, 2.0, 0.5, -1.0]))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.proj(x) * self.scale
        return torch.tanh(h) * y, (h * y).sum(-1)


@pytest.fixture(scope="module")
def module() -> nn.Module:
    torch.manual_seed(7)
    return TwoInTwoOut().eval()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, module: nn.Module) -> Path:
    root = tmp_path_factory.mktemp("models")
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(
        module,
        (torch.randn(2, 3), torch.randn(2, 4)),
        dynamic_shapes={"x": {0: batch}, "y": {0: batch}},
    )
    (root / "twoout").mkdir()
    torch.export.save(ep, root / "twoout" / "model.pt2")
    (root / "twoout" / "config.json").write_text(json.dumps({"description": "two in, two out"}))
    (root / "broken").mkdir()
    (root / "broken" / "model.pt2").write_bytes(b"not a program")
    return root


@pytest.fixture(scope="module")
def repo_client(repo: Path) -> Iterator[TestClient]:
    with make_client(model_dir=repo) as c:
        yield c


def test_read_model_shows_exported_signature(repo_client: TestClient) -> None:
    info = repo_client.get("/models/twoout").json()
    assert info["source"] == "repository"
    assert info["description"] == "two in, two out"
    assert info["inputs"] == [
        {"name": "x", "shape": [-1, 3], "dtype": "float32"},
        {"name": "y", "shape": [-1, 4], "dtype": "float32"},
    ]
    assert info["outputs"] == 2
    assert info["parameters"] == [
        {"name": "proj.weight", "shape": [4, 3], "dtype": "float32"},
        {"name": "proj.bias", "shape": [4], "dtype": "float32"},
    ]
    assert info["buffers"] == [{"name": "scale", "shape": [4]}]


def test_broken_repository_entry_does_not_stop_the_others(repo_client: TestClient) -> None:
    names = {m["name"] for m in repo_client.get("/models").json()["models"]}
    assert "twoout" in names and "broken" not in names and "linear" in names


@pytest.mark.parametrize("engine", ["dual", "functional"])
def test_create_jvp_exported_model_matches_reference(
    repo_client: TestClient, module: nn.Module, engine: str
) -> None:
    g = torch.Generator().manual_seed(8)
    x, vx = (
        torch.randn(5, 3, generator=g, dtype=torch.float64),
        torch.randn(5, 3, generator=g, dtype=torch.float64),
    )
    y, vy = (
        torch.randn(5, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 4, generator=g, dtype=torch.float64),
    )
    vw = torch.randn(4, 3, generator=g, dtype=torch.float64)
    r = repo_client.post(
        "/jvp",
        json={
            "model": "twoout",
            "primals": {"x": to_wire(x, "b64"), "y": to_wire(y, "b64")},
            "tangents": {"x": to_wire(vx, "b64"), "y": to_wire(vy, "b64")},
            "parameter_tangents": {"proj.weight": to_wire(vw, "b64")},
            "options": {"dtype": "float64", "engine": engine, "encoding": "b64"},
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["output"], list) and len(body["output"]) == 2
    ref_module = TwoInTwoOut().double()
    state = {k: v.detach().double() for k, v in module.state_dict().items()}

    def f(a, b, w):
        return functional_call(ref_module, {**state, "proj.weight": w}, (a, b))

    ref_out, ref_jvp = jvp(f, (x, y, state["proj.weight"]), (vx, vy, vw))
    for got, want in zip(body["output"], ref_out, strict=True):
        torch.testing.assert_close(from_wire(got), want, rtol=1e-13, atol=1e-13)
    for got, want in zip(body["jvp"], ref_jvp, strict=True):
        torch.testing.assert_close(from_wire(got), want, rtol=1e-13, atol=1e-13)


def test_create_jvp_exported_model_output_without_tangent_is_zero(repo_client: TestClient) -> None:
    r = repo_client.post(
        "/jvp", json={"model": "twoout", "primals": {"x": [[1.0, 2.0, 3.0]], "y": [[1.0] * 4]}}
    )
    assert r.status_code == 200
    for jv in r.json()["jvp"]:
        assert all(v == 0.0 for v in jv["data"])


def test_create_jvp_exported_model_guard_failure_is_422(repo_client: TestClient) -> None:
    # Batch sizes of x and y must agree: the exported program's guards raise; that is a 422.
    r = repo_client.post(
        "/jvp",
        json={"model": "twoout", "primals": {"x": [[1.0, 2.0, 3.0]] * 2, "y": [[1.0] * 4] * 3}},
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "invalid_request"
    # A static dimension of the wrong size is caught before queueing, naming the input.
    r = repo_client.post(
        "/jvp", json={"model": "twoout", "primals": {"x": [[1.0, 2.0]], "y": [[1.0] * 4]}}
    )
    assert r.status_code == 422
    assert "Expected input 'x' of shape [-1, 3]" in r.json()["error"]["message"]
    assert repo_client.get("/readyz").status_code == 200
