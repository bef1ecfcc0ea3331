"""POST /jvp with safetensors bodies (README "Binary bodies"), and batching over HTTP."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import safetensors.torch
import torch
from fastapi.testclient import TestClient
from torch import nn
from torch.func import jvp as func_jvp

from app.models.registry import ServedModel, TensorSpec, module_target
from tests.conftest import make_client
from tests.wire import from_wire, to_wire

SAFETENSORS = "application/x-safetensors"
BINARY = {"content-type": SAFETENSORS, "accept": SAFETENSORS}


class TwoOutputs(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sin(x) * y, (x * y).sum(-1)


@pytest.fixture(scope="module")
def binary_client() -> Iterator[TestClient]:
    with make_client() as c:
        inputs = [TensorSpec("x", (-1, 3), "float32"), TensorSpec("y", (-1, 3), "float32")]
        c.app.state.runtime.registry.add(  # type: ignore[attr-defined]
            ServedModel(
                name="two-outputs",
                description="",
                source="repository",
                target=module_target("test:two-outputs", TwoOutputs().eval(), inputs, outputs=2),
                inputs=inputs,
                outputs=2,
                parameters=[],
                buffers=[],
                config={"max_batch_size": 8},
            )
        )
        yield c


def body(tensors: dict[str, torch.Tensor], request: dict[str, object]) -> bytes:
    return safetensors.torch.save(tensors, metadata={"request": json.dumps(request)})


def read(content: bytes) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    (size,) = struct.unpack("<Q", content[:8])
    metadata = json.loads(content[8 : 8 + size])["__metadata__"]
    return safetensors.torch.load(content), json.loads(metadata["response"])


def test_post_jvp_safetensors_round_trip_matches_torch_func_jvp(binary_client: TestClient) -> None:
    g = torch.Generator().manual_seed(0)
    x, y, tx = (torch.randn(4, 3, generator=g) for _ in range(3))
    r = binary_client.post(
        "/jvp",
        content=body(
            {"primals/x": x, "primals/y": y, "tangents/x": tx}, {"expression": "sin(x) * y"}
        ),
        headers=BINARY,
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == SAFETENSORS
    tensors, fields = read(r.content)
    out, jvp = func_jvp(lambda a: torch.sin(a) * y, (x,), (tx,))
    assert set(tensors) == {"output", "jvp"}
    torch.testing.assert_close(tensors["output"], out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tensors["jvp"], jvp, rtol=1e-6, atol=1e-6)
    assert fields["dtype"] == "float32" and fields["engine"] == "dual"
    assert fields["method"] == "forward" and fields["device"] == "cpu"
    assert set(fields["timing_ms"]) == {"queue", "compute", "total"}  # type: ignore[arg-type]


def test_post_jvp_safetensors_several_outputs_are_numbered(binary_client: TestClient) -> None:
    g = torch.Generator().manual_seed(1)
    x, y, tx, ty = (torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(4))
    r = binary_client.post(
        "/jvp",
        content=body(
            {"primals/x": x, "primals/y": y, "tangents/x": tx, "tangents/y": ty},
            {"model": "two-outputs", "options": {"dtype": "float64"}},
        ),
        headers=BINARY,
    )
    assert r.status_code == 200, r.text
    tensors, fields = read(r.content)
    outs, jvps = func_jvp(TwoOutputs(), (x, y), (tx, ty))
    assert set(tensors) == {"output/0", "output/1", "jvp/0", "jvp/1"}
    for i in range(2):
        torch.testing.assert_close(tensors[f"output/{i}"], outs[i], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(tensors[f"jvp/{i}"], jvps[i], rtol=1e-12, atol=1e-12)
    assert fields["dtype"] == "float64"


def test_post_jvp_safetensors_parameter_tangents_answer_in_json(client: TestClient) -> None:
    g = torch.Generator().manual_seed(2)
    x, tx, tw = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g), torch.randn(5, 5)
    r = client.post(
        "/jvp",
        content=body(
            {"primals/x": x, "tangents/x": tx, "parameter_tangents/weight": tw},
            {"model": "linear", "options": {"encoding": "b64"}},
        ),
        headers={"content-type": SAFETENSORS},  # no Accept: the response is JSON
    )
    assert r.status_code == 200, r.text
    linear = client.app.state.runtime.registry.get("linear")  # type: ignore[attr-defined]
    m = linear.target.materialize(torch.float32, torch.device("cpu"))
    w, b = m.parameters["weight"], m.parameters["bias"]
    out, jvp = func_jvp(lambda a, wt: a @ wt.T + b, (x, w), (tx, tw))
    torch.testing.assert_close(from_wire(r.json()["output"]), out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(from_wire(r.json()["jvp"]), jvp, rtol=1e-6, atol=1e-6)


def test_post_jvp_json_with_accept_safetensors_answers_binary(client: TestClient) -> None:
    x = torch.tensor([0.5, 1.0, 2.0])
    r = client.post(
        "/jvp",
        json={
            "expression": "exp(x)",
            "primals": {"x": to_wire(x, "b64")},
            "tangents": {"x": [1] * 3},
        },
        headers={"accept": f"{SAFETENSORS}, application/json;q=0.5"},
    )
    assert r.status_code == 200, r.text
    tensors, _ = read(r.content)
    torch.testing.assert_close(tensors["jvp"], torch.exp(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x02", "fewer than the 8-byte header length"),
        (struct.pack("<Q", 10**6) + b"{}", "header claims 1000000 bytes"),
        (struct.pack("<Q", 3) + b"{x}", "header is not JSON"),
        (safetensors.torch.save({"primals/x": torch.ones(2)}), "metadata needs 'request'"),
        (
            safetensors.torch.save({"primals/x": torch.ones(2)}, metadata={"request": "[1]"}),
            "must be a JSON object, got list",
        ),
        (
            body({"x": torch.ones(2)}, {"expression": "x"}),
            "Unexpected tensor 'x'; expected names primals/<input>",
        ),
        (
            body({"primals/x": torch.ones(2, dtype=torch.int64)}, {"expression": "x"}),
            "has dtype 'I64'; expected one of F16, BF16, F32, F64",
        ),
        (
            body({"primals/x": torch.ones(2)}, {"expression": "x", "tangents": {"x": [1, 1]}}),
            "tensors are tensors named 'tangents/<name>'",
        ),
        (
            body({"primals/x": torch.ones(2)}, {"expression": "x", "options": {"colour": 1}}),
            "Unknown field 'options.colour'",
        ),
        (
            body({"primals/y": torch.ones(2)}, {"expression": "x"}),
            "Missing primal for input 'x'",
        ),
    ],
)
def test_post_jvp_bad_safetensors_body_is_422(
    client: TestClient, content: bytes, message: str
) -> None:
    r = client.post("/jvp", content=content, headers=BINARY)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == "invalid_request"
    assert message in r.json()["error"]["message"]


def test_post_jvp_truncated_tensor_data_is_422(client: TestClient) -> None:
    content = body({"primals/x": torch.ones(100)}, {"expression": "x"})
    r = client.post("/jvp", content=content[:-8], headers=BINARY)
    assert r.status_code == 422
    assert "not a valid safetensors file" in r.json()["error"]["message"]


def hand_made(
    entries: dict[str, tuple[str, list[int], list[int]]],
    data: bytes,
    pad: bool = True,
    request: dict[str, object] | None = None,
) -> bytes:
    """A safetensors body written by hand: name -> (dtype, shape, data_offsets)."""
    text = json.dumps(request or {"expression": "x"})
    header: dict[str, object] = {"__metadata__": {"request": text}}
    header.update(
        {n: {"dtype": d, "shape": s, "data_offsets": o} for n, (d, s, o) in entries.items()}
    )
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    ("entries", "data", "message"),
    [
        (
            {"primals/x": ("F32", [2], [0, 8]), "tangents/x": ("F32", [2], [4, 12])},
            bytes(12),
            "tensor 'tangents/x' starts at data byte 4, expected 8",
        ),
        (
            {"primals/x": ("F32", [2], [0, 8]), "tangents/x": ("F32", [2], [12, 20])},
            bytes(20),
            "tensor 'tangents/x' starts at data byte 12, expected 8",
        ),
        (
            {"primals/x": ("F32", [2], [0, 8])},
            bytes(16),
            "its tensors end at data byte 8, the body holds 16",
        ),
        (
            {"primals/x": ("F32", [3], [0, 8])},
            bytes(8),
            "tensor 'primals/x' holds 8 bytes; its dtype and shape [3] need 12",
        ),
        (
            {"primals/x": ("F32", [2], [0, 8])},
            bytes(4),
            "tensor 'primals/x' has data_offsets [0, 8]; expected [begin, end] within the 4",
        ),
        (
            {"primals/x": ("F32", [2], [8, 0])},
            bytes(8),
            "has data_offsets [8, 0]",
        ),
        ({"primals/x": ("F32", [2], [0])}, bytes(8), "has data_offsets [0]"),
    ],
)
def test_post_jvp_safetensors_bad_offsets_are_422_naming_the_tensor(
    client: TestClient,
    entries: dict[str, tuple[str, list[int], list[int]]],
    data: bytes,
    message: str,
) -> None:
    r = client.post("/jvp", content=hand_made(entries, data), headers=BINARY)
    assert r.status_code == 422, r.text
    assert "not a valid safetensors file" in r.json()["error"]["message"]
    assert message in r.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200


def test_post_jvp_safetensors_unaligned_tensor_is_read_correctly(client: TestClient) -> None:
    # An unpadded header leaves the float64 data off 8-byte alignment: read by copy.
    x = torch.tensor([0.25, -1.5, 3.0], dtype=torch.float64)
    tx = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    entries = {"primals/x": ("F64", [3], [0, 24]), "tangents/x": ("F64", [3], [24, 48])}
    for pad in (True, False):
        request = {"expression": "x", "options": {"dtype": "float64"}}
        data = x.numpy().tobytes() + tx.numpy().tobytes()
        content = hand_made(entries, data, pad=pad, request=request)
        header_end = 8 + struct.unpack("<Q", content[:8])[0]
        assert (header_end % 8 == 0) is pad
        r = client.post("/jvp", content=content, headers=BINARY)
        assert r.status_code == 200, r.text
        tensors, _ = read(r.content)
        torch.testing.assert_close(tensors["output"], x, rtol=0, atol=0)
        torch.testing.assert_close(tensors["jvp"], tx, rtol=0, atol=0)


def test_post_jvp_safetensors_large_body_round_trip_is_exact(client: TestClient) -> None:
    # Over 64 KiB in and several MiB out: read into one buffer, tensors viewing it, the
    # answer streamed in 1 MiB pieces. Checked against torch.func.jvp and the analytic
    # derivative, and every byte of the answer parsed by the safetensors library.
    g = torch.Generator().manual_seed(5)
    x, y, tx, ty = (torch.randn(600, 1000, generator=g, dtype=torch.float64) for _ in range(4))
    content = body(
        {"primals/x": x, "primals/y": y, "tangents/x": tx, "tangents/y": ty},
        {"expression": "x * y + sin(x)", "options": {"dtype": "float64"}},
    )
    r = client.post("/jvp", content=content, headers=BINARY)
    assert r.status_code == 200, r.text
    assert int(r.headers["content-length"]) == len(r.content)
    tensors, fields = read(r.content)
    out, jvp = func_jvp(lambda a, b: a * b + torch.sin(a), (x, y), (tx, ty))
    torch.testing.assert_close(tensors["output"], out, rtol=0, atol=0)
    torch.testing.assert_close(tensors["jvp"], jvp, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(tensors["jvp"], tx * y + x * ty + torch.cos(x) * tx)
    assert fields["dtype"] == "float64"
    # The same body as JSON-b64 (also read into one buffer) gives the same numbers.
    r2 = client.post(
        "/jvp",
        json={
            "expression": "x * y + sin(x)",
            "primals": {"x": to_wire(x, "b64"), "y": to_wire(y, "b64")},
            "tangents": {"x": to_wire(tx, "b64"), "y": to_wire(ty, "b64")},
            "options": {"dtype": "float64", "encoding": "b64"},
        },
    )
    assert r2.status_code == 200, r2.text
    torch.testing.assert_close(from_wire(r2.json()["jvp"]), tensors["jvp"], rtol=0, atol=0)


def test_post_jvp_large_safetensors_body_without_content_length_is_read(
    client: TestClient,
) -> None:
    # Chunked transfer (no Content-Length): the body is read whole, then decoded as any.
    g = torch.Generator().manual_seed(6)
    x, tx = torch.randn(200, 300, generator=g), torch.randn(200, 300, generator=g)
    content = body({"primals/x": x, "tangents/x": tx}, {"expression": "x * x"})
    pieces = [content[i : i + 50_000] for i in range(0, len(content), 50_000)]
    r = client.post("/jvp", content=iter(pieces), headers=BINARY)
    assert r.status_code == 200, r.text
    tensors, _ = read(r.content)
    torch.testing.assert_close(tensors["jvp"], 2 * x * tx, rtol=0, atol=0)


def test_concurrent_large_safetensors_requests_get_their_own_numbers(client: TestClient) -> None:
    # Each request's tensors view its own body buffer: none may read another's bytes.
    # The reference is analytic: forward AD in the test's threads would share the
    # service's process-wide dual level (DESIGN.md).
    def one(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        x, tx = torch.randn(300, 200, generator=g), torch.randn(300, 200, generator=g)
        content = body({"primals/x": x, "tangents/x": tx}, {"expression": "exp(x) * x"})
        r = client.post("/jvp", content=content, headers=BINARY)
        assert r.status_code == 200, r.text
        tensors, _ = read(r.content)
        torch.testing.assert_close(tensors["output"], torch.exp(x) * x)
        torch.testing.assert_close(tensors["jvp"], torch.exp(x) * (1 + x) * tx)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(one, range(12)))


def test_post_jvp_safetensors_over_the_dims_limit_is_413() -> None:
    with make_client(max_dims=2) as c:
        r = c.post(
            "/jvp",
            content=body({"primals/x": torch.ones(1, 1, 1)}, {"expression": "x"}),
            headers=BINARY,
        )
    assert r.status_code == 413
    assert r.json()["error"]["message"] == "Tensor 'primals.x' has 3 dimensions; the limit is 2"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_post_jvp_unsupported_content_type_is_415(client: TestClient, content_type: str) -> None:
    r = client.post("/jvp", content=b"x=1", headers={"content-type": content_type})
    assert r.status_code == 415
    assert r.json()["error"] == {
        "type": "unsupported_media_type",
        "message": f"Unsupported Content-Type '{content_type}' for POST /jvp; expected "
        "application/json or application/x-safetensors",
        "param": "Content-Type",
    }


def test_openapi_declares_json_and_safetensors_bodies(client: TestClient) -> None:
    post = client.get("/openapi.json").json()["paths"]["/jvp"]["post"]
    content = post["requestBody"]["content"]
    assert content["application/json"]["schema"]["title"] == "JVPRequest"
    assert set(content["application/json"]["schema"]["required"]) == {"primals"}
    assert content[SAFETENSORS]["schema"] == {"type": "string", "format": "binary"}
    assert SAFETENSORS in post["responses"]["200"]["content"]
    assert "415" in post["responses"]


def test_concurrent_requests_each_get_their_own_numbers(binary_client: TestClient) -> None:
    """16 requests at once, distinct inputs: whether or not they batch, none reads another's."""
    g = torch.Generator().manual_seed(3)
    cases = [(torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)) for _ in range(16)]

    def one(case: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = case
        r = binary_client.post(
            "/jvp",
            content=body(
                {"primals/x": x, "primals/y": y, "tangents/x": torch.ones(2, 3)},
                {"model": "two-outputs"},
            ),
            headers=BINARY,
        )
        assert r.status_code == 200, r.text
        return read(r.content)[0]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, cases))
    for (x, y), tensors in zip(cases, results, strict=True):
        outs, jvps = func_jvp(TwoOutputs(), (x, y), (torch.ones(2, 3), torch.zeros(2, 3)))
        for i in range(2):
            torch.testing.assert_close(tensors[f"output/{i}"], outs[i], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(tensors[f"jvp/{i}"], jvps[i], rtol=1e-6, atol=1e-6)
