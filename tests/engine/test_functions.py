"""The custom autograd Functions: derivatives checked numerically, and what each one buys."""

from __future__ import annotations

import decimal

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

from app.engine.functions import LogSumExp, Softplus, logsumexp, softplus

# torch's forward AD loads its jvp decompositions through the deprecated torch.jit.script.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

F64 = torch.float64


def _softplus_exact(value: float) -> float:
    """log(1 + e**x) in 400-digit decimal arithmetic (enough for x >= -900), rounded once."""
    with decimal.localcontext() as context:
        context.prec = 400
        return float((decimal.Decimal(value).exp() + 1).ln())


def _random(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=F64, generator=generator) * 3


@pytest.mark.parametrize(
    "fn",
    [
        Softplus.apply,
        lambda x: LogSumExp.apply(x, 1),
        lambda x: LogSumExp.apply(x, -1),
        lambda x: LogSumExp.apply(x, 0),
    ],
    ids=["softplus", "logsumexp-dim1", "logsumexp-dim-1", "logsumexp-dim0"],
)
def test_gradcheck_custom_function(fn):
    x = _random(3, 4).requires_grad_()
    assert torch.autograd.gradcheck(
        fn,
        (x,),
        check_forward_ad=True,
        check_backward_ad=True,
        check_batched_grad=True,
        check_batched_forward_grad=True,
    )
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_softplus_matches_exact_value_past_torch_threshold():
    points = [-700.0, -40.0, -1.0, -1e-3, 0.0, 1e-8, 1.0, 19.9, 20.5, 25.0, 30.0, 36.0, 40.0, 1e3]
    x = torch.tensor(points, dtype=F64)
    exact = torch.tensor([_softplus_exact(p) for p in points], dtype=F64)
    torch.testing.assert_close(softplus(x), exact, rtol=4.5e-16, atol=0.0)  # within ~2 ulp


def test_softplus_matches_torch_below_threshold():
    x, t = _random(50, seed=6), _random(50, seed=7)
    ours, theirs = jvp(softplus, (x,), (t,)), jvp(F.softplus, (x,), (t,))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(
        grad(lambda v: softplus(v).sum())(x),
        grad(lambda v: F.softplus(v).sum())(x),
        rtol=1e-14,
        atol=1e-15,
    )


def test_softplus_differs_from_torch_threshold_at_30():
    x = torch.tensor(30.0, dtype=F64)
    exact = _softplus_exact(30.0)
    assert exact > 30.0  # log1p(e**-30) ~ 9.4e-14 is far above float64 resolution at 30
    assert F.softplus(x).item() == 30.0  # torch: identity above threshold=20
    assert softplus(x).item() == exact


def test_softplus_jvp_is_sigmoid_past_torch_threshold():
    x = torch.tensor(30.0, dtype=F64)
    one = torch.ones((), dtype=F64)
    _, ours = jvp(softplus, (x,), (one,))
    _, theirs = jvp(F.softplus, (x,), (one,))
    assert theirs.item() == 1.0
    assert ours.item() == torch.sigmoid(x).item() < 1.0


def test_softplus_stays_finite_for_huge_inputs():
    x = torch.tensor([-1e308, 1e308], dtype=F64)
    out, tangent = jvp(softplus, (x,), (torch.ones_like(x),))
    assert out.tolist() == [0.0, 1e308]
    assert tangent.tolist() == [0.0, 1.0]


def _masked_rows() -> torch.Tensor:
    x = _random(3, 4, seed=1)
    x[1] = float("-inf")  # a fully masked row
    x[2, :2] = float("-inf")  # a partly masked row
    return x


def test_logsumexp_gives_zero_derivatives_on_all_minus_inf_slice():
    x, t = _masked_rows(), _random(3, 4, seed=2)
    out, tangent = jvp(lambda v: logsumexp(v, 1), (x,), (t,))
    assert out[1].item() == float("-inf")
    assert tangent[1].item() == 0.0
    assert torch.isfinite(tangent).all()
    gradient = grad(lambda v: logsumexp(v, 1).exp().sum())(x)  # exp so the -inf row adds 0
    assert gradient[1].tolist() == [0.0] * 4
    assert torch.isfinite(gradient).all()


def test_logsumexp_torch_gives_nan_on_all_minus_inf_slice():
    # What LogSumExp buys: torch's own derivative is NaN on the masked row.
    x, t = _masked_rows(), _random(3, 4, seed=2)
    _, tangent = jvp(lambda v: torch.logsumexp(v, 1), (x,), (t,))
    assert torch.isnan(tangent[1])


def test_logsumexp_matches_torch_on_finite_and_partly_masked_rows():
    x, t = _masked_rows(), _random(3, 4, seed=2)
    keep = torch.tensor([0, 2])
    ours = jvp(lambda v: logsumexp(v, 1), (x,), (t,))
    theirs = jvp(lambda v: torch.logsumexp(v, 1), (x,), (t,))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a[keep], b[keep], rtol=1e-12, atol=1e-12)
    ours_grad = grad(lambda v: logsumexp(v, 1)[keep].sum())(x)
    theirs_grad = grad(lambda v: torch.logsumexp(v, 1)[keep].sum())(x)
    torch.testing.assert_close(ours_grad[keep], theirs_grad[keep], rtol=1e-12, atol=1e-12)


def _closed_form(name: str, x: torch.Tensor, t: torch.Tensor, dim: int) -> tuple:
    """(value, J·t) written out: softplus' = sigmoid; logsumexp' = softmax along ``dim``, 0 on
    an all -inf slice (the function's documented convention)."""
    if name == "softplus":
        return torch.logaddexp(x, torch.zeros_like(x)), torch.sigmoid(x) * t
    top = x.amax(dim, keepdim=True)
    finite_top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(x - finite_top)
    total = weights.sum(dim, keepdim=True)
    value = (torch.log(total) + finite_top).squeeze(dim)
    softmax = torch.where(total > 0, weights / total, torch.zeros_like(weights))
    return value, (softmax * torch.where(weights > 0, t, torch.zeros_like(t))).sum(dim)


@pytest.mark.parametrize(
    "fn,name", [(softplus, "softplus"), (lambda x: logsumexp(x, -1), "logsumexp")], ids=str
)
def test_vmap_jvp_custom_function_matches_loop(fn, name):
    xs, ts = _masked_rows(), _random(3, 4, seed=3)
    batched = vmap(lambda x, t: jvp(fn, (x,), (t,)))(xs, ts)
    looped = [jvp(fn, (x,), (t,)) for x, t in zip(xs, ts, strict=True)]
    for i, part in enumerate(batched):
        torch.testing.assert_close(part, torch.stack([r[i] for r in looped]), rtol=0, atol=0)
    for part, want in zip(batched, _closed_form(name, xs, ts, -1), strict=True):
        torch.testing.assert_close(part, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    "fn,name", [(softplus, "softplus"), (lambda x: logsumexp(x, 0), "logsumexp")], ids=str
)
def test_dual_tensor_jvp_custom_function_matches_func_jvp(fn, name):
    x, t = _random(4, 3, seed=4), _random(4, 3, seed=5)
    expected = jvp(fn, (x,), (t,))
    with fwAD.dual_level():
        out = fwAD.unpack_dual(fn(fwAD.make_dual(x, t)))
    torch.testing.assert_close(out.primal, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(out.tangent, expected[1], rtol=0, atol=0)
    value, tangent = _closed_form(name, x, t, 0)
    torch.testing.assert_close(out.primal, value, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out.tangent, tangent, rtol=1e-13, atol=1e-13)
