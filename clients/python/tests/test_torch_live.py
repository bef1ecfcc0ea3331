"""jvp_client.torch.remote against the real server (in-process): a local function composed
with the remote one gives, in reverse and forward mode, the derivatives of the whole
program run locally (float64)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import test_live
import torch
import torch.autograd.forward_ad as fwAD
from test_live import linear_module

from jvp_client import JVPClient
from jvp_client.torch import expression_variables, remote

asgi = test_live.asgi
live_url = test_live.live_url
F64 = torch.float64


# Forward mode runs against the server in its own process (uvicorn): an in-process server
# would share this process's one forward-AD level with the test's dual_level (NOTE [one
# dual level per process] in app/engine/worker.py) and fail "Nested forward mode AD".
@pytest.fixture
def live_client(live_url: str) -> Iterator[JVPClient]:
    with JVPClient(base_url=live_url, max_retries=0) as c:
        yield c


def test_expression_variables_in_order_of_first_appearance() -> None:
    assert expression_variables("sin(y) * x + pi * y ** e") == ["y", "x"]


def _local(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z = torch.sin(x) * y  # the remote part, locally
    return (torch.tanh(z) ** 2).sum()


def test_remote_backward_matches_the_local_program(asgi: JVPClient) -> None:
    f = remote(asgi, expression="sin(x) * y")
    g = torch.Generator().manual_seed(0)
    x0, y0 = torch.randn(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    a = torch.tensor(0.7, dtype=F64, requires_grad=True)  # a local parameter before it
    x = (x0 * a).detach().requires_grad_()
    y = y0.clone().requires_grad_()
    loss = (torch.tanh(f(x * a, y=y)) ** 2).sum()  # positional x, keyword y
    loss.backward()
    ra = torch.tensor(0.7, dtype=F64, requires_grad=True)
    rx, ry = (x0 * 0.7).detach().requires_grad_(), y0.clone().requires_grad_()
    _local(rx * ra, ry).backward()
    for got, ref in ((a.grad, ra.grad), (x.grad, rx.grad), (y.grad, ry.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    # torch.autograd.grad for one input only (the /vjp is asked for y alone).
    y2 = y0.clone().requires_grad_()
    (gy,) = torch.autograd.grad((f(x0, y2) ** 2).sum(), y2)
    torch.testing.assert_close(gy, 2 * torch.sin(x0) ** 2 * y0, rtol=1e-12, atol=1e-14)


def test_remote_forward_ad_matches_the_local_program(live_client: JVPClient) -> None:
    f = remote(live_client, expression="sin(x) * y")
    g = torch.Generator().manual_seed(1)
    x0, y0, v = (torch.randn(4, generator=g, dtype=F64) for _ in range(3))
    with fwAD.dual_level():
        x = fwAD.make_dual(x0, v)
        out = torch.tanh(f(x=x * 2.0, y=y0))
        got = fwAD.unpack_dual(out).tangent
    _, ref = torch.func.jvp(lambda a: torch.tanh(torch.sin(a * 2.0) * y0), (x0,), (v,))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_remote_model_parameter_tangents_and_gradients(live_client: JVPClient) -> None:
    f = remote(live_client, model="linear")
    assert f.names == ["x"]
    module = linear_module().double()
    weights = {k: v.detach() for k, v in module.named_parameters()}
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    delta = torch.zeros(5, 5, dtype=F64, requires_grad=True)
    loss = (f(x, parameter_deltas={"weight": delta}) ** 2).sum()
    loss.backward()

    def local(w: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(module, {**weights, "weight": w}, (x,))
        return (out**2).sum()

    ref = torch.func.grad(local)(weights["weight"])
    torch.testing.assert_close(delta.grad, ref, rtol=1e-10, atol=1e-12)
    v = torch.randn(5, 5, generator=torch.Generator().manual_seed(3), dtype=F64)
    with fwAD.dual_level():
        d = fwAD.make_dual(torch.zeros(5, 5, dtype=F64), v)
        got = fwAD.unpack_dual(f(x, parameter_deltas={"weight": d})).tangent
    torch.testing.assert_close(got, x @ v.T, rtol=1e-10, atol=1e-12)
