"""A reverse-mode 501 from the real server is a ReverseADUnsupportedError, a forward-mode
one a ForwardADUnsupportedError, and `except ADUnsupportedError` catches both.

The model is ``torch.igamma(a, x)``: PyTorch has no derivative for ``a`` in either mode
(derivatives.yaml says not_implemented), and one for ``x``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import test_live
import torch
from torch import nn

from jvp_client import (
    ADUnsupportedError,
    ForwardADUnsupportedError,
    JVPClient,
    ReverseADUnsupportedError,
)

A = np.array([1.5, 2.0, 2.5])
X = np.array([0.5, 1.0, 1.5])
PRIMALS = {"a": A, "x": X}


class IGamma(nn.Module):
    def forward(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.igamma(a, x)


@pytest.fixture(scope="module", params=["asgi", "uvicorn"])
def repo_client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[JVPClient]:
    root = tmp_path_factory.mktemp("client-models17")
    (root / "igamma").mkdir()
    example = (torch.rand(3) + 1.0, torch.rand(3) + 1.0)
    torch.export.save(torch.export.export(IGamma(), example), root / "igamma" / "model.pt2")
    env = {**test_live.SERVER_ENV, "JVP_MODEL_DIR": str(root)}
    if request.param == "asgi":
        with test_live.asgi_client(env) as client:
            yield client
        return
    with test_live.uvicorn_server(env) as url, JVPClient(base_url=url, max_retries=0) as client:
        yield client


def test_vjp_on_argument_without_backward_is_reverse_ad_unsupported(
    repo_client: JVPClient,
) -> None:
    with pytest.raises(ReverseADUnsupportedError) as info:
        repo_client.vjp(model="igamma", primals=PRIMALS, cotangents=np.ones(3))
    err = info.value
    assert err.status_code == 501 and err.type == "reverse_ad_unsupported"
    assert "igamma" in err.message and "backward" in err.message and "'wrt'" in err.message
    assert isinstance(err, ADUnsupportedError) and not isinstance(err, ForwardADUnsupportedError)
    # What the message suggests works: leave `a` out of wrt.
    u = np.array([1.0, -2.0, 0.5])
    got = repo_client.vjp(model="igamma", primals=PRIMALS, cotangents=u, wrt="x")
    a_t = torch.from_numpy(A)
    _, fn = torch.func.vjp(lambda x: torch.igamma(a_t, x), torch.from_numpy(X))
    np.testing.assert_allclose(got.vjp["x"], fn(torch.from_numpy(u))[0].numpy(), rtol=1e-12)


def test_jvp_on_argument_without_forward_formula_is_forward_ad_unsupported(
    repo_client: JVPClient,
) -> None:
    with pytest.raises(ForwardADUnsupportedError) as info:
        repo_client.jvp(model="igamma", primals=PRIMALS, tangents={"a": np.ones(3)})
    assert info.value.type == "forward_ad_unsupported" and "igamma" in info.value.message
    assert not isinstance(info.value, ReverseADUnsupportedError)


def test_one_except_catches_both_modes(repo_client: JVPClient) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: repo_client.vjp(model="igamma", primals=PRIMALS, cotangents=np.ones(3)),
        lambda: repo_client.jvp(model="igamma", primals=PRIMALS, tangents={"a": np.ones(3)}),
    ]
    caught = []
    for call in calls:
        try:
            call()
        except ADUnsupportedError as err:
            caught.append(type(err))
    assert caught == [ReverseADUnsupportedError, ForwardADUnsupportedError]


def test_linearization_over_argument_without_formula_is_forward(repo_client: JVPClient) -> None:
    """A session linearizes in forward mode first, so over `a` it is refused as forward
    mode at creation, transpose or not."""
    with pytest.raises(ForwardADUnsupportedError, match="igamma"):
        repo_client.linearize(model="igamma", primals=PRIMALS, wrt="a", options={"transpose": True})
