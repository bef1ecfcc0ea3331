"""Built-in models: the transformer against PyTorch's own encoder, its attention's gradcheck."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from app.engine.attention import Attention
from app.models.builtin import _seeded, reference_encoder
from tests.wire import from_wire, to_wire


def test_attention_passes_gradcheck_forward_and_backward() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    )
    k = k[:, :, :4].detach().requires_grad_()  # keys/values may be shorter than queries
    v = v[:, :, :4].detach().requires_grad_()

    def f(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return Attention.apply(a, b, c, 0.4)

    assert torch.autograd.gradcheck(f, (q, k, v), check_forward_ad=True, check_backward_ad=True)
    assert torch.autograd.gradgradcheck(f, (q, k, v))


@pytest.mark.parametrize("engine", ["dual", "functional"])
def test_create_jvp_transformer_matches_pytorch_encoder(client: TestClient, engine: str) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 32, generator=g, dtype=torch.float64)
    v = torch.randn(3, 7, 32, generator=g, dtype=torch.float64)
    info = client.get("/models/transformer").json()
    assert info["inputs"] == [{"name": "x", "shape": [-1, -1, 32], "dtype": "float32"}]
    name = "layers.0.self_attn.in_proj_weight"
    vw = torch.randn(96, 32, generator=g, dtype=torch.float64)
    r = client.post(
        "/jvp",
        json={
            "model": "transformer",
            "primals": {"x": to_wire(x, "b64")},
            "tangents": {"x": to_wire(v, "b64")},
            "parameter_tangents": {name: to_wire(vw, "b64")},
            "options": {"dtype": "float64", "engine": engine, "encoding": "b64"},
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["method"] == "forward"

    # PyTorch's own encoder with the same (seeded) weights; train mode with dropout 0
    # keeps it off the fused fast path, and the math SDPA kernel has forward AD on CPUs.
    reference = _seeded(3, reference_encoder).double().train()
    state = {k: t.detach() for k, t in reference.state_dict().items()}

    def f(inp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return functional_call(reference, {**state, name: w}, (inp,))

    with sdpa_kernel(SDPBackend.MATH):
        out, tangent = jvp(f, (x, state[name]), (v, vw))
    torch.testing.assert_close(from_wire(r.json()["output"]), out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(from_wire(r.json()["jvp"]), tangent, rtol=1e-10, atol=1e-10)


def test_create_jvp_convnet_matches_finite_differences(client: TestClient) -> None:
    from app.models.builtin import convnet

    module = convnet().target
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 28, 28, generator=g, dtype=torch.float64)
    v = torch.randn(2, 1, 28, 28, generator=g, dtype=torch.float64)
    r = client.post(
        "/jvp",
        json={
            "model": "convnet",
            "primals": {"x": to_wire(x, "b64")},
            "tangents": {"x": to_wire(v, "b64")},
            "options": {"dtype": "float64"},
        },
    )
    assert r.status_code == 200, r.text
    m = module.materialize(torch.float64, torch.device("cpu"))
    state = {**m.parameters, **m.buffers}
    eps = 1e-6  # float64 central differences (ReLU and max-pool kinks are not hit a.s.)
    with torch.no_grad():
        want = (m.fn((x + eps * v,), state)[0] - m.fn((x - eps * v,), state)[0]) / (2 * eps)
    torch.testing.assert_close(from_wire(r.json()["jvp"]), want, rtol=1e-6, atol=1e-7)
