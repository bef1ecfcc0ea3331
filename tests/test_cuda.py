"""GPU paths: they run where CUDA is present and skip, saying so, where it is not.

The numbers on the GPU are checked against the same computation on the CPU in
float64, so a wrong device copy, a missed synchronisation after a non-blocking
copy, or a batch slice read from another request shows up as a mismatch; and
against an independent reference (torch.func.jvp on the plain function or on
PyTorch's own modules with the served weights), so a wrong number that both
devices share shows up too.
"""

from __future__ import annotations

import threading

import pytest
import torch
from fastapi.testclient import TestClient
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from app.models.builtin import _seeded, reference_encoder
from tests.wire import from_wire, to_wire

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none"
)


def _mlp() -> torch.nn.Module:
    """The built-in mlp's architecture and weights (seed 1), made here with PyTorch."""
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64))


def _reference(target: str, x: torch.Tensor, y: torch.Tensor | None, v: torch.Tensor) -> tuple:
    """(output, J·v) on the CPU in float64 from PyTorch directly (tangent on x only)."""
    if target == "expression":
        assert y is not None
        return jvp(lambda a: torch.softmax(a @ y, -1) * torch.tanh(y), (x,), (v,))
    if target == "mlp":
        return jvp(_mlp().double(), (x,), (v,))
    # PyTorch's own encoder with the same weights; train mode with dropout 0 keeps it off
    # the fused fast path, and the math kernel has forward AD (tests/models/test_builtin.py).
    encoder = _seeded(3, reference_encoder).double().train()
    state = {k: t.detach() for k, t in encoder.state_dict().items()}
    with sdpa_kernel(SDPBackend.MATH):
        return jvp(lambda a: functional_call(encoder, state, (a,)), (x,), (v,))


def _post(client: TestClient, body: dict) -> dict:
    r = client.post("/jvp", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_auto_device_picks_cuda(client: TestClient) -> None:
    body = _post(client, {"expression": "x * 2", "primals": {"x": [1.0]}, "tangents": {"x": [1.0]}})
    assert body["device"] == "cuda:0"


@pytest.mark.parametrize("engine", ["dual", "functional"])
@pytest.mark.parametrize("target", ["expression", "mlp", "transformer"])
def test_create_jvp_on_cuda_equals_cpu_in_float64(
    client: TestClient, engine: str, target: str
) -> None:
    g = torch.Generator().manual_seed(11)
    y = None
    if target == "expression":
        x, y, v = (torch.randn(64, 64, generator=g, dtype=torch.float64) for _ in range(3))
        request = {
            "expression": "softmax(x @ y, -1) * tanh(y)",
            "primals": {"x": to_wire(x, "b64"), "y": to_wire(y, "b64")},
            "tangents": {"x": to_wire(v, "b64")},
        }
    else:
        shape = (8, 64) if target == "mlp" else (2, 7, 32)
        x, v = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(2))
        request = {
            "model": target,
            "primals": {"x": to_wire(x, "b64")},
            "tangents": {"x": to_wire(v, "b64")},
        }
    answers = {}
    for device in ("cpu", "cuda"):
        options = {"dtype": "float64", "engine": engine, "encoding": "b64", "device": device}
        answers[device] = _post(client, {**request, "options": options})
    assert answers["cuda"]["device"] == "cuda:0"
    for key in ("output", "jvp"):
        torch.testing.assert_close(
            from_wire(answers["cuda"][key]), from_wire(answers["cpu"][key]), rtol=1e-10, atol=1e-10
        )
    want = _reference(target, x, y, v)
    for key, reference in zip(("output", "jvp"), want, strict=True):
        torch.testing.assert_close(
            from_wire(answers["cuda"][key]), reference, rtol=1e-10, atol=1e-10
        )


def test_transformer_jvp_works_with_fused_attention_available(client: TestClient) -> None:
    # PyTorch's fused attention kernels have no forward-AD formula on CUDA; the built-in
    # transformer's attention is a custom Function with its own jvp(), so this is a 200.
    x, v = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    body = _post(
        client,
        {
            "model": "transformer",
            "primals": {"x": to_wire(x, "b64")},
            "tangents": {"x": to_wire(v, "b64")},
            "options": {"device": "cuda"},
        },
    )
    assert body["method"] == "forward"
    # The numbers: PyTorch's own encoder in float64 on the CPU (float32 on the GPU here).
    out, tangent = _reference("transformer", x.double(), None, v.double())
    torch.testing.assert_close(from_wire(body["output"]).double(), out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_wire(body["jvp"]).double(), tangent, rtol=1e-4, atol=1e-5)


def test_concurrent_cuda_requests_each_get_their_own_slice(client: TestClient) -> None:
    # Many requests at once, so the worker stacks them into batches on the GPU
    # (pinned memory, non-blocking copies); each must get its own numbers.
    g = torch.Generator().manual_seed(12)
    cases = [tuple(torch.randn(4, 64, generator=g) for _ in range(2)) for _ in range(48)]
    model = {"model": "mlp", "options": {"device": "cuda", "encoding": "b64"}}
    refs = [
        _post(
            client,
            {
                **model,
                "primals": {"x": to_wire(x, "b64")},
                "tangents": {"x": to_wire(v, "b64")},
                "options": {"device": "cpu", "encoding": "b64"},
            },
        )
        for x, v in cases
    ]
    answers: list[dict | None] = [None] * len(cases)

    def send(i: int) -> None:
        x, v = cases[i]
        answers[i] = _post(
            client,
            {**model, "primals": {"x": to_wire(x, "b64")}, "tangents": {"x": to_wire(v, "b64")}},
        )

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    mlp = _mlp()
    for got, want, (x, v) in zip(answers, refs, cases, strict=True):
        assert got is not None
        torch.testing.assert_close(
            from_wire(got["jvp"]), from_wire(want["jvp"]), rtol=1e-4, atol=1e-5
        )
        _, tangent = jvp(mlp, (x,), (v,))  # and PyTorch's own module, in float32 on the CPU
        torch.testing.assert_close(from_wire(got["jvp"]), tangent.detach(), rtol=1e-4, atol=1e-5)


def test_cuda_out_of_memory_is_507_and_the_next_request_succeeds(client: TestClient) -> None:
    # A real device OOM: x @ x.T for x of 2**17 x 1 float64 asks for 128 GiB.
    n = 1 << 17
    _, total = torch.cuda.mem_get_info()
    assert n * n * 8 > total, "the GPU is too large for this test's request"
    before = torch.cuda.memory_allocated()
    x = torch.ones(n, 1, dtype=torch.float64)
    r = client.post(
        "/jvp",
        json={
            "expression": "x @ transpose(x, 0, 1)",
            "primals": {"x": to_wire(x, "b64")},
            "tangents": {"x": to_wire(x, "b64")},
            "options": {"device": "cuda", "dtype": "float64"},
        },
    )
    assert r.status_code == 507, r.text
    assert r.json()["error"]["type"] == "out_of_memory"
    # What the failed request held is released: at most a few MiB of cached blocks remain.
    assert torch.cuda.memory_allocated() - before < 8 << 20
    ok = client.post(
        "/jvp",
        json={
            "expression": "x * 2",
            "primals": {"x": [1.0]},
            "tangents": {"x": [1.0]},
            "options": {"device": "cuda"},
        },
    )
    assert ok.status_code == 200 and ok.json()["jvp"]["data"] == [2.0]
