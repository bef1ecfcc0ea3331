"""Independent float64 references for the derivative routes: plain torch modules fed the
served weights, and torch.func / torch.autograd.functional transforms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from fastapi.testclient import TestClient
from torch import nn
from torch.func import functional_call

from app.models.builtin import linear, mlp

F64 = torch.float64
CPU = torch.device("cpu")


def post(client: TestClient, path: str, body: dict[str, Any], status: int = 200) -> Any:
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    return r.json()


def served_weights(name: str) -> dict[str, torch.Tensor]:
    """The served model's weights in float64 (read through the public model maker)."""
    made = {"linear": linear, "mlp": mlp}[name]().target
    return dict(made.materialize(F64, CPU).parameters)


def module(name: str) -> nn.Module:
    """A fresh module of the same architecture (its own weights are replaced by the served)."""
    if name == "linear":
        return nn.Linear(5, 5).double()
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64)).double()


def model_function(name: str, parameter_names: tuple[str, ...] = ()) -> Callable[..., torch.Tensor]:
    """f(x, *parameters) of the served model, parameters in ``parameter_names`` order."""
    weights = served_weights(name)
    m = module(name)

    def f(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        state = {**weights, **dict(zip(parameter_names, params, strict=True))}
        out: torch.Tensor = functional_call(m, state, (x,))
        return out

    return f


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
