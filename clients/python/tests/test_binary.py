"""Safetensors bodies of ``POST /jvp`` (NOTE [binary bodies] in ``_base.py``) over MockTransport.

The fake service here reads the client's requests and writes its answers with the
``safetensors`` library, not with the client's own encoder, so these tests check
the client against the format rather than against itself. Round trips against
the real service are in test_live.py.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from jvp_fakes import EXPRESSIONS, Recorder, error_response, fake_service

from jvp_client import (
    APIResponseValidationError,
    BadRequestError,
    JVPClient,
    NotFoundError,
)
from jvp_client._safetensors import decode_safetensors, encode_safetensors

SAFETENSORS = "application/x-safetensors"


def _metadata(body: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read from its header directly."""
    (size,) = struct.unpack("<Q", body[:8])
    metadata: dict[str, str] = json.loads(body[8 : 8 + size])["__metadata__"]
    return metadata


def _file(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _split(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for name, value in tensors.items():
        group, _, short = name.partition("/")
        groups.setdefault(group, {})[short] = value
    return groups


def binary_service(request: httpx.Request) -> httpx.Response:
    """A fake ``POST /jvp`` that takes and gives safetensors (the library writes and reads)."""
    if request.headers.get("content-type") != SAFETENSORS:
        return fake_service(request)
    groups = _split(safetensors.numpy.load(request.content))
    meta = json.loads(_metadata(request.content)["request"])
    options = meta.get("options") or {}
    f, df = EXPRESSIONS[meta["expression"]]
    primals = {k: v.astype(np.float64) for k, v in groups["primals"].items()}
    tangents = {k: np.zeros_like(v) for k, v in primals.items()}
    tangents.update({k: v.astype(np.float64) for k, v in groups.get("tangents", {}).items()})
    out, jvp = f(primals), df(primals, tangents)
    dtype = options.get("dtype", "float32")
    np_dtype = {"float32": np.float32, "float64": np.float64}[dtype]
    if isinstance(out, tuple):
        tensors = {f"output/{i}": o.astype(np_dtype) for i, o in enumerate(out)}
        tensors.update({f"jvp/{i}": j.astype(np_dtype) for i, j in enumerate(jvp)})
    else:
        tensors = {"output": out.astype(np_dtype), "jvp": jvp.astype(np_dtype)}
    fields: dict[str, Any] = {
        "dtype": dtype,
        "device": "cpu",
        "engine": options.get("engine", "dual"),
        "method": "forward",
        "timing_ms": {"queue": 0.25, "compute": 1.5, "total": 2.0},
    }
    if options.get("check"):
        fields["check"] = {
            "max_abs_error": 1e-9,
            "max_rel_error": 2e-9,
            "passed": True,
            "eps": 1e-6,
        }
    body = safetensors.numpy.save(tensors, metadata={"response": json.dumps(fields)})
    return httpx.Response(200, content=body, headers={"Content-Type": SAFETENSORS})


# -- the body sent -------------------------------------------------------------------------


def test_jvp_sends_safetensors_readable_by_library(make_client: Callable[..., JVPClient]) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 300)).astype(np.float32)  # 90,000 elements: over 65,536
    y = rng.integers(-3, 3, size=(300, 300))  # integers take the computation dtype
    tx = rng.standard_normal((300, 300)).astype(np.float32)
    recorder = Recorder(binary_service)
    client = make_client(recorder)
    result = client.jvp(
        expression="x**2 + y**2",
        primals={"x": x, "y": y},
        tangents={"x": tx},
        device="cpu",
        engine="functional",
        check=True,
        options={"fd_eps": 1e-3},
    )
    (sent,) = recorder.requests
    assert sent.url.path == "/jvp"
    assert sent.headers["content-type"] == SAFETENSORS
    assert SAFETENSORS in sent.headers["accept"].split(", ")
    tensors = safetensors.numpy.load(sent.content)
    assert set(tensors) == {"primals/x", "primals/y", "tangents/x"}
    assert tensors["primals/x"].dtype == np.float32 and np.array_equal(tensors["primals/x"], x)
    assert tensors["primals/y"].dtype == np.float32 and np.array_equal(tensors["primals/y"], y)
    assert np.array_equal(tensors["tangents/x"], tx)
    assert json.loads(_metadata(sent.content)["request"]) == {
        "expression": "x**2 + y**2",
        "options": {
            "fd_eps": 1e-3,
            "dtype": "float32",
            "device": "cpu",
            "engine": "functional",
            "check": True,
        },
    }
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    assert isinstance(result.jvp, np.ndarray) and result.jvp.dtype == np.float32
    np.testing.assert_allclose(result.output, x64**2 + y64**2, rtol=1e-6)
    np.testing.assert_allclose(result.jvp, 2 * x64 * tx, rtol=1e-6, atol=1e-6)
    assert (result.dtype, result.device, result.engine, result.method) == (
        "float32",
        "cpu",
        "functional",
        "forward",
    )
    assert result.timing_ms == {"queue": 0.25, "compute": 1.5, "total": 2.0}
    assert result.check is not None and result.check.passed and result.check.eps == 1e-6
    assert result.raw["engine"] == "functional"


def test_jvp_sends_tangent_batch_and_parameter_tangents_in_safetensors(
    make_client: Callable[..., JVPClient],
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return error_response(404, "not_found", "Unknown model 'mlp2'", "model")

    recorder = Recorder(answer)
    client = make_client(recorder, binary_min_elements=0)
    x = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(NotFoundError):
        client.jvp(
            model="mlp2",
            primals={"x": x},
            tangents={"x": torch.randn(3, 4, 8, dtype=torch.float64)},
            parameter_tangents={"0.weight": np.ones((2, 8))},
            tangent_batch=True,
        )
    body = recorder.requests[0].content
    tensors = safetensors.torch.load(body)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == {
        "primals/x": (torch.float64, (4, 8)),
        "tangents/x": (torch.float64, (3, 4, 8)),
        "parameter_tangents/0.weight": (torch.float64, (2, 8)),
    }
    assert torch.equal(tensors["primals/x"], x)
    assert json.loads(_metadata(body)["request"]) == {
        "model": "mlp2",
        "options": {"dtype": "float64", "tangent_batch": True},
    }


def test_jvp_sends_and_reads_bfloat16_torch(make_client: Callable[..., JVPClient]) -> None:
    x = torch.linspace(-3, 3, 70_000).to(torch.bfloat16)

    def answer(request: httpx.Request) -> httpx.Response:
        sent = safetensors.torch.load(request.content)
        assert json.loads(_metadata(request.content)["request"])["options"] == {"dtype": "bfloat16"}
        fields = {"dtype": "bfloat16", "device": "cpu", "engine": "dual", "method": "forward"}
        body = safetensors.torch.save(
            {"output": sent["primals/x"] * 3, "jvp": sent["tangents/x"] * 3},
            metadata={"response": json.dumps(fields)},
        )
        return httpx.Response(200, content=body, headers={"Content-Type": SAFETENSORS})

    recorder = Recorder(answer)
    result = make_client(recorder).jvp(
        expression="x * 3", primals={"x": x}, tangents={"x": torch.ones_like(x)}
    )
    sent = safetensors.torch.load(recorder.requests[0].content)
    assert sent["primals/x"].dtype == torch.bfloat16 and torch.equal(sent["primals/x"], x)
    assert isinstance(result.output, torch.Tensor) and result.output.dtype == torch.bfloat16
    assert torch.equal(result.output, x * 3)
    assert torch.equal(result.jvp, torch.full_like(x, 3))


# -- the policy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("threshold", "n", "binary"),
    [(100, 49, False), (100, 50, True), (None, 100_000, False), (0, 1, True)],
    ids=["below", "at", "disabled", "always"],
)
def test_jvp_uses_safetensors_from_binary_min_elements(
    make_client: Callable[..., JVPClient], threshold: int | None, n: int, binary: bool
) -> None:
    recorder = Recorder(binary_service)
    client = make_client(recorder, binary_min_elements=threshold)
    x = np.linspace(-1, 1, n)
    # primals and tangents count together: 2n elements
    result = client.jvp(expression="x * 2", primals={"x": x}, tangents={"x": np.ones(n)})
    sent = recorder.requests[0]
    assert (sent.headers["content-type"] == SAFETENSORS) == binary
    np.testing.assert_array_equal(result.jvp, np.full(n, 2.0))
    np.testing.assert_array_equal(result.output, 2 * x)


def test_jacobian_stays_json_with_binary_min_elements_zero(
    make_client: Callable[..., JVPClient],
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        assert request.headers["content-type"] == "application/json"
        body = json.loads(request.content)
        return error_response(400, "invalid_expression", f"no {body['expression']!r}", "expression")

    client = make_client(answer, binary_min_elements=0)
    with pytest.raises(BadRequestError, match="no 'x'"):
        client.jacobian(expression="x", primals={"x": np.ones(10)})
    with pytest.raises(BadRequestError, match="no 'x'"):
        client.hvp(expression="x", primals={"x": np.ones(10)}, tangents={"x": np.ones(10)})


@pytest.mark.parametrize("value", [-1, 1.5, True, "10"])
def test_raise_value_error_for_bad_binary_min_elements(value: object) -> None:
    with pytest.raises(ValueError, match="binary_min_elements: expected an int >= 0 or None"):
        JVPClient(base_url="http://jvp.test", binary_min_elements=value)  # type: ignore[arg-type]


# -- answers ---------------------------------------------------------------------------------


def test_jvp_reads_several_outputs_from_safetensors(make_client: Callable[..., JVPClient]) -> None:
    x = np.linspace(-2, 2, 40_000)
    result = make_client(binary_service).jvp(
        expression="(sin(x), cos(x))", primals={"x": x}, tangents={"x": np.full_like(x, 0.5)}
    )
    assert isinstance(result.output, list) and isinstance(result.jvp, list)
    assert len(result.output) == len(result.jvp) == 2
    np.testing.assert_allclose(result.output[0], np.sin(x), rtol=1e-15)
    np.testing.assert_allclose(result.output[1], np.cos(x), rtol=1e-15)
    np.testing.assert_allclose(result.jvp[0], 0.5 * np.cos(x), rtol=1e-15)
    np.testing.assert_allclose(result.jvp[1], -0.5 * np.sin(x), rtol=1e-15)
    assert result.output[0].dtype == np.float64 and result.output[0].flags.writeable


@pytest.mark.asyncio
async def test_jvp_async_reads_several_outputs_from_safetensors(
    make_async_client: Callable[..., Any],
) -> None:
    recorder = Recorder(binary_service)
    client = make_async_client(recorder)
    x = torch.linspace(-2, 2, 40_000, dtype=torch.float64)
    result = await client.jvp(
        expression="(sin(x), cos(x))", primals={"x": x}, tangents={"x": torch.ones_like(x)}
    )
    assert recorder.requests[0].headers["content-type"] == SAFETENSORS
    assert isinstance(result.jvp, list) and isinstance(result.jvp[1], torch.Tensor)
    torch.testing.assert_close(result.jvp[0], torch.cos(x))
    torch.testing.assert_close(result.jvp[1], -torch.sin(x))
    await client.close()


def test_raise_not_found_from_json_envelope_on_binary_request(
    make_client: Callable[..., JVPClient],
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return error_response(404, "not_found", "Unknown model 'nope'; try GET /models", "model")

    with pytest.raises(NotFoundError) as info:
        make_client(answer, binary_min_elements=0).jvp(model="nope", primals={"x": np.ones(3)})
    err = info.value
    assert err.status_code == 404 and err.type == "not_found" and err.param == "model"
    assert err.message == "Unknown model 'nope'; try GET /models"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x01\x02", "fewer than the 8-byte header length"),
        (_file(b"{no}"), "the header is not JSON"),
        (safetensors.numpy.save({"output": np.ones(2)}), "no tensor 'jvp'"),
        (_file(b'{"jvp":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'), "data_offsets"),
        (safetensors.numpy.save({"jvp": np.ones(2, np.int32)}), "dtype 'I32'"),
    ],
    ids=["short", "header", "missing", "offsets", "dtype"],
)
def test_raise_response_validation_for_bad_safetensors_answer(
    make_client: Callable[..., JVPClient], body: bytes, message: str
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"Content-Type": SAFETENSORS})

    client = make_client(answer, binary_min_elements=0)
    with pytest.raises(APIResponseValidationError, match=message) as info:
        client.jvp(expression="x", primals={"x": np.ones(2)})
    assert info.value.status_code == 200 and "Unexpected /jvp response" in str(info.value)


# -- the format ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3, 4)], ids=str)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: d.__name__)
def test_encode_safetensors_round_trips_with_library(dtype: type, shape: tuple[int, ...]) -> None:
    a = np.asarray(np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape) - 1.5)
    b = np.array([np.nan, np.inf, -np.inf], dtype=dtype)
    body = encode_safetensors({"a": (a, a.dtype.name), "odd/b": (b, b.dtype.name)}, {"k": "v"})
    assert struct.unpack("<Q", body[:8])[0] % 8 == 0  # header padded: tensors aligned
    loaded = safetensors.numpy.load(body)
    assert loaded["a"].dtype == dtype and loaded["a"].shape == shape
    assert loaded["a"].tobytes() == a.tobytes() and loaded["odd/b"].tobytes() == b.tobytes()
    assert _metadata(body) == {"k": "v"}
    back, metadata = decode_safetensors(safetensors.numpy.save({"a": a}, metadata={"m": "1"}))
    assert metadata == {"m": "1"} and back["a"][1] == a.dtype.name
    assert back["a"][0].shape == shape and back["a"][0].tobytes() == a.tobytes()
