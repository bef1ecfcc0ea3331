"""Fixtures for model tests: a repository folder, a service with keys, export helpers."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn
from torch.func import functional_call

from tests.conftest import make_client

ADMIN = {"Authorization": "Bearer admin-key"}
INFERENCE = {"Authorization": "Bearer inference-key"}


def save_model(
    root: Path,
    name: str,
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    *,
    dynamic_shapes: object = None,
    config: dict[str, object] | None = None,
) -> Path:
    """Export ``module`` on ``args`` and save it as ``<root>/<name>/model.pt2``."""
    ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, folder / "model.pt2")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def central_difference(
    module: nn.Module,
    inputs: Sequence[torch.Tensor],
    tangents: Sequence[torch.Tensor | None],
    parameter_tangents: dict[str, torch.Tensor] | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, ...]:
    """J·v by float64 central differences of ``module`` (a float64 copy of it)."""
    state = {k: v.detach().double() for k, v in module.state_dict().items()}
    module = module.double()
    parameter_tangents = parameter_tangents or {}

    def at(sign: float) -> tuple[torch.Tensor, ...]:
        xs = [
            x.double() if t is None else x.double() + sign * eps * t.double()
            for x, t in zip(inputs, tangents, strict=True)
        ]
        st = {
            k: v + sign * eps * parameter_tangents[k] if k in parameter_tangents else v
            for k, v in state.items()
        }
        with torch.no_grad():
            out = functional_call(module, st, tuple(xs))
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    plus, minus = at(1.0), at(-1.0)
    return tuple((p - m) / (2 * eps) for p, m in zip(plus, minus, strict=True))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    return root


@pytest.fixture
def keyed_client(repo: Path) -> Iterator[TestClient]:
    """The service over ``repo`` with an inference key and an admin key."""
    with make_client(
        model_dir=repo, api_keys=["inference-key"], admin_keys=["admin-key"]
    ) as client:
        yield client


Loader = Callable[[str], dict[str, object]]


@pytest.fixture
def load(keyed_client: TestClient) -> Loader:
    """POST /models/{name}/load with the admin key; asserts 200 and returns the ModelInfo."""

    def load(name: str) -> dict[str, object]:
        r = keyed_client.post(f"/models/{name}/load", headers=ADMIN)
        assert r.status_code == 200, r.text
        info: dict[str, object] = r.json()
        return info

    return load
