"""A program's literal operands take their Scalar overloads when it is loaded (NOTE
[literal operands in programs] in app/models/repository.py): the served numbers, outputs
and JVPs, are bit for bit those of the program as exported, in every dtype, and the
derivatives agree with float64 central differences."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from app.models.repository import _serve_in_eval
from tests.conftest import make_client
from tests.models.conftest import save_model
from tests.wire import from_wire, to_wire

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


class Literals(nn.Module):
    """Every operator the rewrite touches, with float and int literals, beside tensor-tensor
    forms it must leave alone."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = (x * 4.0 - 1.5) / 3.0 + 2
        b = torch.add(y, 0.25, alpha=3) * x - y / 7
        return a * b + x * y - torch.exp(x * 0.5)


def _program() -> torch.export.ExportedProgram:
    return torch.export.export(Literals(), (torch.randn(5), torch.randn(5)))


def _jvp(module: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x, y, tx, ty = (torch.randn(5, generator=g, dtype=torch.float64).to(dtype) for _ in range(4))
    out, jv = torch.func.jvp(module, (x, y), (tx, ty))
    return out, jv


def test_the_literals_take_their_scalar_overloads() -> None:
    module = _program().module()
    assert _serve_in_eval(module) == 7  # every literal above
    targets = {n.target for n in module.graph.nodes if n.op == "call_function"}
    aten = torch.ops.aten
    assert {aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar} <= targets
    assert aten.mul.Tensor in targets  # a * b, x * y: two tensors, left as they were


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rewritten_program_gives_the_same_bits(dtype: torch.dtype) -> None:
    original = _program().module()
    rewritten = _program().module()
    assert _serve_in_eval(rewritten) > 0
    want_out, want_jvp = _jvp(original, dtype)
    got_out, got_jvp = _jvp(rewritten, dtype)
    assert got_out.dtype == dtype and got_jvp.dtype == dtype
    assert torch.equal(got_out, want_out)
    assert torch.equal(got_jvp, want_jvp)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("literals")
    save_model(root, "literals", Literals(), (torch.randn(5), torch.randn(5)))
    with make_client(model_dir=Path(root)) as c:
        yield c


def test_served_jvp_is_the_programs_and_agrees_with_central_differences(
    client: TestClient,
) -> None:
    g = torch.Generator().manual_seed(5)
    x, y, tx, ty = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(4))
    body = {
        "model": "literals",
        "primals": {"x": to_wire(x), "y": to_wire(y)},
        "tangents": {"x": to_wire(tx), "y": to_wire(ty)},
        "options": {"dtype": "float64"},
    }
    r = client.post("/jvp", json=body)
    assert r.status_code == 200, r.text
    want_out, want_jvp = torch.func.jvp(_program().module(), (x, y), (tx, ty))
    assert torch.equal(from_wire(r.json()["output"]), want_out)
    assert torch.equal(from_wire(r.json()["jvp"]), want_jvp)
    f = Literals()
    h = 1e-6
    central = (f(x + h * tx, y + h * ty) - f(x - h * tx, y - h * ty)) / (2 * h)
    torch.testing.assert_close(from_wire(r.json()["jvp"]), central, rtol=1e-7, atol=1e-8)
