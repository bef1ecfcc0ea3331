"""Repository models: options.check verifies whatever method ran (fallbacks included), and a
parameter without a tangent contributes nothing (NOTE [mixed dual and plain operands]).

References: float64 central differences of the original module (tests.models.conftest) and
closed forms.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from torch import nn

from tests.models.conftest import INFERENCE, Loader, central_difference, save_model
from tests.wire import from_wire, to_wire


class Distances(nn.Module):
    """cdist to a bank of items: ``_cdist_forward`` has no forward-AD formula (decomposed)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, 4)
        self.items = nn.Parameter(torch.randn(6, 4))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return torch.cdist(self.encoder(q), self.items)


class VolumeWarp(nn.Module):
    """grid_sampler_3d has no decomposition: reverse-over-reverse (double_vjp)."""

    def __init__(self) -> None:
        super().__init__()
        self.loc = nn.Linear(64, 12)

    def forward(self, vol: torch.Tensor) -> torch.Tensor:
        theta = self.loc(vol.flatten(1)).view(-1, 3, 4)
        grid = F.affine_grid(theta, list(vol.shape), align_corners=False)
        return F.grid_sample(vol, grid, align_corners=False)


CASES = {
    "distances": (Distances, (4, 8), "decomposed"),
    "volume": (VolumeWarp, (2, 1, 4, 4, 4), "double_vjp"),
}


def _post(client: TestClient, model: str, x: torch.Tensor, v: torch.Tensor, **options: object):
    return client.post(
        "/jvp",
        headers=INFERENCE,
        json={
            "model": model,
            "primals": {"x": to_wire(x, "b64")},
            "tangents": {"x": to_wire(v, "b64")},
            "options": {"dtype": "float64", "encoding": "b64", **options},
        },
    )


def _saved(repo: Path, load: Loader, name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    make, shape, _ = CASES[name]
    torch.manual_seed(21)
    module = make().eval()
    g = torch.Generator().manual_seed(22)
    example = torch.rand(shape, generator=g)

    class Wrapped(nn.Module):  # one input named x, whatever the module calls it
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.inner(x)
            return out

    save_model(repo, name, Wrapped().eval(), (example,))
    load(name)
    x = example.double()
    v = torch.randn(shape, generator=g, dtype=torch.float64)
    return module, x, v


@pytest.mark.parametrize("engine", ["dual", "functional"])
@pytest.mark.parametrize("name", list(CASES))
def test_create_jvp_check_verifies_the_fallback_that_ran(
    repo: Path, keyed_client: TestClient, load: Loader, name: str, engine: str
) -> None:
    module, x, v = _saved(repo, load, name)
    r = _post(keyed_client, name, x, v, engine=engine, check=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["method"] == CASES[name][2]
    assert body["check"]["passed"] is True and body["check"]["nonfinite"] is None
    assert body["check"]["max_abs_error"] < 1e-7
    (want,) = central_difference(module, (x,), (v,))
    torch.testing.assert_close(from_wire(body["jvp"]), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(CASES))
def test_create_jvp_check_with_tangent_batch_verifies_the_fallback(
    repo: Path, keyed_client: TestClient, load: Loader, name: str
) -> None:
    module, x, v = _saved(repo, load, name)
    vs = torch.stack([v, -0.5 * v, torch.ones_like(v)])
    r = _post(keyed_client, name, x, vs, check=True, tangent_batch=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["method"] == CASES[name][2]
    assert body["check"]["passed"] is True
    got = from_wire(body["jvp"])
    for k in range(3):
        (want,) = central_difference(module, (x,), (vs[k],))
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-7)


def test_create_jvp_check_with_fallback_none_is_501(
    repo: Path, keyed_client: TestClient, load: Loader
) -> None:
    _, x, v = _saved(repo, load, "distances")
    r = _post(keyed_client, "distances", x, v, check=True, fallback="none")
    assert r.status_code == 501, r.text
    assert "_cdist_forward" in r.json()["error"]["message"]


class Gate(nn.Module):
    """sqrt(scale) * x + asin(shift): d/d scale is inf where scale = 0, d/d shift where shift
    = 1. Neither carries a tangent, so J t = sqrt(scale) * t."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([0.0, 4.0]).repeat(n // 2))
        self.shift = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.scale) * x + torch.asin(self.shift)


@pytest.mark.parametrize("n", [2, 70_000])
@pytest.mark.parametrize("engine", ["dual", "functional"])
def test_create_jvp_model_parameters_without_a_tangent_contribute_nothing(
    repo: Path, keyed_client: TestClient, load: Loader, engine: str, n: int
) -> None:
    save_model(repo, "gate", Gate(n).eval(), (torch.ones(n),))
    load("gate")
    x = torch.linspace(-2.0, 2.0, n, dtype=torch.float64)
    t = torch.full((n,), -1.25, dtype=torch.float64)
    r = _post(keyed_client, "gate", x, t, engine=engine)
    assert r.status_code == 200, r.text
    want = torch.tensor([0.0, 2.0], dtype=torch.float64).repeat(n // 2) * t
    torch.testing.assert_close(from_wire(r.json()["jvp"]), want, rtol=1e-15, atol=0.0)
