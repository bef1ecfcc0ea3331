"""Forward mode never passes a dropped tangent for a number (NOTE [forward mode: exact or
refused] in app/engine/forward_coverage.py): a repository model whose tangent reaches an
operator without a forward-AD formula that does not raise (a `torch.library.custom_op`
with only `register_fake`) is a 501 `forward_ad_unsupported` naming the operator, on every
forward-mode route; a legitimately constant output keeps its exact zero JVP, and the
derivatives that are there stay exact (against `torch.func.jvp` and float64 central
differences)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from tests.conftest import make_client
from tests.models.conftest import save_model
from tests.wire import from_wire, to_wire

F64 = torch.float64
OP = "jvptestfc.scale_no_ad"


@torch.library.custom_op("jvptestfc::scale_no_ad", mutates_args=())
def scale_no_ad(x: torch.Tensor) -> torch.Tensor:
    """A custom operator with neither an autograd nor a forward-AD formula."""
    return x * 2.0


@scale_no_ad.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class NoForward(nn.Module):
    """sin(scale_no_ad(x)) * y: the tangent of x is dropped, that of y is not."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.sin(scale_no_ad(x)) * y


class NoForwardSum(nn.Module):
    """A scalar through the operator (for /hvp)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(scale_no_ad(x)).sum()


class Constant(nn.Module):
    """An output that depends on no input (zeros_like) beside one that does: zero JVP."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(x) + 3.0, torch.sin(x)


class Detached(nn.Module):
    """A stop-gradient on purpose: sin(x.detach()) * x, whose JVP is sin(x) * t."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x.detach()) * x


class ViewInPlace(nn.Module):
    """In-place on a view of a copy: exact in forward AD (torch tracks the base)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y[:2].mul_(3.0)
        return torch.sin(y)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("forward_coverage")
    save_model(root, "noforward", NoForward(), (torch.randn(3), torch.randn(3)))
    save_model(root, "noforwardsum", NoForwardSum(), (torch.randn(3),))
    save_model(root, "constant", Constant(), (torch.randn(3),))
    save_model(root, "detached", Detached(), (torch.randn(3),))
    save_model(root, "viewinplace", ViewInPlace(), (torch.randn(4),))
    with make_client(model_dir=Path(root)) as c:
        yield c


X = [0.5, -1.0, 2.0]
Y = [1.5, 2.0, -0.5]
T = [1.0, -2.0, 0.5]


def _assert_refused(r: Any) -> None:
    assert r.status_code == 501, r.text
    error = r.json()["error"]
    assert error["type"] == "forward_ad_unsupported", error
    assert OP in error["message"], error


@pytest.mark.parametrize("engine", ["dual", "functional"])
@pytest.mark.parametrize("fallback", ["auto", "none"])
def test_jvp_through_custom_op_without_forward_ad_is_501(
    client: TestClient, engine: str, fallback: str
) -> None:
    body = {
        "model": "noforward",
        "primals": {"x": X, "y": Y},
        "tangents": {"x": T},
        "options": {"engine": engine, "fallback": fallback, "dtype": "float64"},
    }
    _assert_refused(client.post("/jvp", json=body))


@pytest.mark.parametrize(
    "route", ["tangent_batch", "check", "jacobian", "linearize", "solve", "solve_linear"]
)
def test_every_forward_route_refuses_the_dropped_tangent(client: TestClient, route: str) -> None:
    base: dict[str, Any] = {"model": "noforward", "primals": {"x": X, "y": Y}}
    if route == "tangent_batch":
        body = {**base, "tangents": {"x": [T, T]}, "options": {"tangent_batch": True}}
        r = client.post("/jvp", json=body)
    elif route == "check":
        r = client.post("/jvp", json={**base, "tangents": {"x": T}, "options": {"check": True}})
    elif route == "jacobian":
        r = client.post("/jacobian", json={**base, "wrt": ["x"]})
    elif route.startswith("solve"):  # every J·v of the solve: not a singular J of zeros
        method = "linear" if route == "solve_linear" else "newton_krylov"
        extra = {"rhs": T} if method == "linear" else {}
        r = client.post("/solve", json={**base, "unknowns": ["x"], "method": method, **extra})
    else:
        r = client.post("/linearize", json=base)
    _assert_refused(r)


def test_hvp_through_custom_op_without_forward_ad_is_501(client: TestClient) -> None:
    body = {"model": "noforwardsum", "primals": {"x": X}, "tangents": {"x": T}}
    r = client.post("/hvp", json=body)
    assert r.status_code == 501, r.text
    assert OP in r.json()["error"]["message"]


def test_job_task_through_custom_op_without_forward_ad_is_refused(client: TestClient) -> None:
    task = {"primals": {"x": X, "y": Y}, "tangents": {"x": T}}
    r = client.post("/jobs", json={"model": "noforward", "tasks": [task]})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 120
    while (job := client.get(f"/jobs/{job_id}").json())["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    (result,) = client.get(f"/jobs/{job_id}/results").json()["results"]
    assert "jvp" not in result, result
    assert result["error"]["type"] == "forward_ad_unsupported", result
    assert OP in result["error"]["message"]


def test_a_tangent_that_does_not_reach_the_operator_is_exact(client: TestClient) -> None:
    """A tangent on y only never meets the operator: J t = sin(2 x) * t, exactly."""
    x, y, t = (torch.tensor(v, dtype=F64) for v in (X, Y, T))
    body = {
        "model": "noforward",
        "primals": {"x": X, "y": Y},
        "tangents": {"y": T},
        "options": {"dtype": "float64"},
    }
    r = client.post("/jvp", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["method"] == "forward"
    torch.testing.assert_close(from_wire(r.json()["jvp"]), torch.sin(2 * x) * t)
    del y


def _reference(module: nn.Module, x: torch.Tensor, t: torch.Tensor) -> tuple[Any, Any]:
    """torch.func.jvp and float64 central differences of ``module`` at x along t."""
    _, ref = torch.func.jvp(module, (x,), (t,))
    eps = 1e-6
    hi, lo = module(x + eps * t), module(x - eps * t)
    if isinstance(hi, tuple):
        fd = tuple((a - b) / (2 * eps) for a, b in zip(hi, lo, strict=True))
    else:
        fd = (hi - lo) / (2 * eps)
    return ref, fd


@pytest.mark.parametrize(
    "name,module,n", [("detached", Detached(), 3), ("viewinplace", ViewInPlace(), 4)]
)
def test_stop_gradient_and_in_place_views_stay_exact(
    client: TestClient, name: str, module: nn.Module, n: int
) -> None:
    x = torch.linspace(-1.0, 2.0, n, dtype=F64)
    t = torch.linspace(0.5, -1.5, n, dtype=F64)
    body = {
        "model": name,
        "primals": {"x": to_wire(x)},
        "tangents": {"x": to_wire(t)},
        "options": {"dtype": "float64"},
    }
    r = client.post("/jvp", json=body)
    assert r.status_code == 200, r.text
    got = from_wire(r.json()["jvp"])
    ref, fd = _reference(module, x, t)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    if name == "detached":
        # The stop-gradient is the program's own: sin(x) * t, as torch.func.jvp says (finite
        # differences perturb the detached x too, so they are not its reference).
        torch.testing.assert_close(got, torch.sin(x) * t, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(got, fd, rtol=1e-6, atol=1e-6)


def test_constant_output_keeps_its_zero_jvp(client: TestClient) -> None:
    """API.md: an output that does not depend on any tangent has a zero JVP (never null)."""
    x = torch.tensor(X, dtype=F64)
    t = torch.tensor(T, dtype=F64)
    body = {
        "model": "constant",
        "primals": {"x": X},
        "tangents": {"x": T},
        "options": {"dtype": "float64"},
    }
    r = client.post("/jvp", json=body)
    assert r.status_code == 200, r.text
    zero, sin = (from_wire(j) for j in r.json()["jvp"])
    assert torch.equal(zero, torch.zeros(3, dtype=F64))
    torch.testing.assert_close(sin, torch.cos(x) * t, rtol=1e-12, atol=1e-12)
