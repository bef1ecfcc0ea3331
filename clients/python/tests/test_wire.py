"""Tensors to and from the wire: forms 1-3 of API.md, every dtype, NaN/inf, 0-d, torch."""

from __future__ import annotations

import base64
import json
import math

import httpx
import numpy as np
import pytest
import torch
from jvp_fakes import fake_service, wire_to_numpy

from jvp_client import decode_tensor, encode_tensor
from jvp_client._tensors import decode_tensors, infer_dtype, normalize_dtype

NUMPY_DTYPES = [np.float16, np.float32, np.float64]
SHAPES = [(), (3,), (2, 3), (4, 5, 6)]  # 0-d, JSON-sized and b64-sized (120 elements)
SPECIALS = [math.nan, math.inf, -math.inf]


def _sample(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    rng = np.random.default_rng(0)
    a: np.ndarray = np.asarray(rng.standard_normal(shape)).astype(dtype)
    flat = a.reshape(-1)
    for i, v in enumerate(SPECIALS[: flat.size]):
        flat[i] = v
    return a


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: d.__name__)
def test_encode_tensor_round_trips_numpy(dtype: type, shape: tuple[int, ...]) -> None:
    a = _sample(shape, dtype)
    wire, used_b64 = encode_tensor(a)
    json.dumps(wire, allow_nan=False)  # valid JSON: NaN and inf are strings
    assert used_b64 == (a.size >= 64)
    assert ("b64" in wire) == used_b64
    back = decode_tensor(wire)
    assert isinstance(back, np.ndarray) and _same(back, a)
    # The wire itself, read by the tests' own decoder (base64 + numpy, or the JSON numbers).
    np.testing.assert_array_equal(wire_to_numpy(wire), a.astype(np.float64))


@pytest.mark.parametrize("b64_min_elements", [0, 10**6], ids=["b64", "json"])
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str
)
def test_encode_tensor_round_trips_torch(dtype: torch.dtype, b64_min_elements: int) -> None:
    t = torch.tensor([[1.5, -2.25, 3e3], [math.nan, math.inf, -math.inf]], dtype=dtype)
    wire, used_b64 = encode_tensor(t, b64_min_elements=b64_min_elements)
    assert used_b64 == (b64_min_elements == 0)
    assert wire["dtype"] == str(dtype).removeprefix("torch.")
    back = decode_tensor(wire, as_torch=True)
    assert isinstance(back, torch.Tensor)
    assert back.dtype == dtype
    assert torch.equal(back.isnan(), t.isnan())
    # The wire itself, read by the tests' own decoder (base64 + numpy, or the JSON numbers).
    np.testing.assert_array_equal(wire_to_numpy(wire), t.double().numpy())
    assert torch.equal(back.nan_to_num(), t.nan_to_num())


def test_encode_tensor_writes_nan_and_infinity_as_strings() -> None:
    wire, used = encode_tensor(np.array([math.nan, math.inf, -math.inf, 1.0], dtype=np.float32))
    assert not used
    assert wire == {"shape": [4], "dtype": "float32", "data": ["NaN", "Infinity", "-Infinity", 1.0]}


def test_encode_tensor_sends_zero_dim_array_as_form_2() -> None:
    wire, _ = encode_tensor(np.float64(2.5))
    assert wire == {"shape": [], "dtype": "float64", "data": [2.5]}
    back = decode_tensor(wire)
    assert back.shape == () and back.dtype == np.float64 and float(back) == 2.5


def test_encode_tensor_sends_python_values_as_form_1() -> None:
    assert encode_tensor(3)[0] == 3.0
    assert encode_tensor([[1, 2], [3, float("nan")]])[0] == [[1.0, 2.0], [3.0, "NaN"]]


def test_encode_tensor_sends_large_python_list_as_b64_in_computation_dtype() -> None:
    wire, used = encode_tensor(list(range(100)), dtype="float64")
    assert used and wire["dtype"] == "float64" and wire["shape"] == [100]
    np.testing.assert_array_equal(wire_to_numpy(wire), np.arange(100.0))


def test_encode_tensor_casts_integer_arrays_to_computation_dtype() -> None:
    wire, _ = encode_tensor(np.arange(4), dtype="float16")
    assert wire["dtype"] == "float16"
    wire32, _ = encode_tensor(np.arange(4))
    assert wire32["dtype"] == "float32"


def test_encode_tensor_writes_little_endian_row_major_bytes() -> None:
    a = np.arange(80, dtype=">f4").reshape(8, 10).T  # big-endian and not C-contiguous
    wire, used = encode_tensor(a)
    assert used
    raw = base64.b64decode(wire["b64"])
    assert raw == np.ascontiguousarray(a, dtype="<f4").tobytes()
    assert wire["shape"] == [10, 8]


def test_encode_tensor_rejects_complex_and_strings() -> None:
    with pytest.raises(TypeError, match="complex"):
        encode_tensor(np.ones(2, dtype=np.complex64))
    with pytest.raises(TypeError, match="numeric"):
        encode_tensor(np.array(["a"]))


def test_decode_tensor_reads_bfloat16_as_float32_without_torch() -> None:
    bits = np.array([0x3FC0, 0xC000, 0x7F80, 0x7FC0], dtype="<u2")  # 1.5, -2, inf, nan
    wire = {"shape": [2, 2], "dtype": "bfloat16", "b64": base64.b64encode(bits.tobytes()).decode()}
    out = decode_tensor(wire)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([[1.5, -2.0], [np.inf, np.nan]], np.float32))
    json_wire = {"shape": [2], "dtype": "BF16", "data": [1.5, "-Infinity"]}
    np.testing.assert_array_equal(decode_tensor(json_wire), np.array([1.5, -np.inf], np.float32))


def test_decode_tensor_accepts_oip_dtype_names_and_nested_data() -> None:
    out = decode_tensor({"shape": [2, 2], "dtype": "FP64", "data": [[1, 2], [3, "NaN"]]})
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [[1, 2], [3, np.nan]])


def test_decode_tensor_reads_form_1() -> None:
    np.testing.assert_array_equal(decode_tensor([[1, "Infinity"]]), [[1.0, np.inf]])
    assert decode_tensor(2).shape == ()


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (
            {"shape": [3], "dtype": "float32", "b64": base64.b64encode(b"\0" * 8).decode()},
            "needs 12 bytes, got 8",
        ),
        ({"shape": [2, 2], "dtype": "float32", "data": [1, 2, 3]}, "with 3 values"),
        ({"shape": [1], "dtype": "float32", "b64": "!!notbase64"}, "invalid base64"),
        ({"shape": [1], "dtype": "int8", "data": [1]}, "dtype"),
        ({"shape": [1], "dtype": "float32"}, "neither 'data' nor 'b64'"),
        ({"shape": [1], "dtype": "float32", "data": ["nope"]}, "'NaN'"),
    ],
)
def test_decode_tensor_rejects_malformed(wire: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_tensor(wire)


def test_decode_tensors_returns_list_for_several_outputs() -> None:
    a = {"shape": [1], "dtype": "float32", "data": [1]}
    out = decode_tensors([a, a])
    assert isinstance(out, list) and len(out) == 2


def test_decode_tensor_returns_writable_arrays() -> None:
    wire, _ = encode_tensor(np.ones(100, dtype=np.float32))
    out = decode_tensor(wire)
    out[0] = 5.0  # frombuffer arrays are read-only; the client hands out copies
    assert out[0] == 5.0


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("FP32", "float32"),
        ("bf16", "bfloat16"),
        (np.float64, "float64"),
        (np.dtype("float16"), "float16"),
        (torch.bfloat16, "bfloat16"),
        (None, None),
    ],
)
def test_normalize_dtype_accepts_names_numpy_and_torch(given: object, expected: str) -> None:
    assert normalize_dtype(given) == expected


def test_normalize_dtype_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="expected one of float16, bfloat16, float32, float64"):
        normalize_dtype("int32")


def test_infer_dtype_uses_shared_floating_dtype() -> None:
    assert infer_dtype([np.ones(2), np.zeros(3)]) == "float64"
    assert infer_dtype([torch.ones(2, dtype=torch.bfloat16), 3.0]) == "bfloat16"
    assert infer_dtype([np.ones(2, np.float32), np.ones(2)]) is None
    assert infer_dtype([1.0, [2.0], np.arange(3)]) is None


def _recording_client(make_client, seen: list[dict]):
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return fake_service(request)

    return make_client(handler)


def test_jvp_sends_small_tensors_as_json_and_reads_json(make_client) -> None:
    seen: list[dict] = []
    client = _recording_client(make_client, seen)
    x = np.array([1.0, 2.0, np.nan], dtype=np.float32)
    result = client.jvp(
        expression="x * 2", primals={"x": x}, tangents={"x": np.ones(3, np.float32)}
    )
    body = seen[0]
    assert body["primals"]["x"] == {"shape": [3], "dtype": "float32", "data": [1.0, 2.0, "NaN"]}
    assert body["options"] == {"dtype": "float32"}  # no encoding: JSON answers
    assert isinstance(result.output, np.ndarray) and result.output.dtype == np.float32
    np.testing.assert_array_equal(result.output, x * 2)
    np.testing.assert_array_equal(result.jvp, [2.0, 2.0, 2.0])


def test_jvp_sends_large_tensors_as_b64_and_asks_for_b64(make_client) -> None:
    seen: list[dict] = []
    client = _recording_client(make_client, seen)
    x = np.linspace(-1, 1, 200)
    result = client.jvp(expression="x * 2", primals={"x": x}, tangents={"x": np.ones(200)})
    body = seen[0]
    assert set(body["primals"]["x"]) == {"shape", "dtype", "b64"}
    assert body["options"] == {"dtype": "float64", "encoding": "b64"}
    assert result.output.dtype == np.float64
    np.testing.assert_array_equal(result.output, x * 2)


def test_jvp_returns_torch_for_torch_inputs(make_client) -> None:
    client = make_client(fake_service)
    x = torch.arange(100, dtype=torch.float32)
    result = client.jvp(expression="x * 2", primals={"x": x}, tangents={"x": torch.ones(100)})
    assert isinstance(result.output, torch.Tensor) and isinstance(result.jvp, torch.Tensor)
    assert result.output.dtype == torch.float32
    torch.testing.assert_close(result.output, x * 2)
    torch.testing.assert_close(result.jvp, torch.full((100,), 2.0))


def test_jvp_returns_torch_bfloat16_for_bfloat16_inputs(make_client) -> None:
    client = make_client(fake_service)
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    result = client.jvp(
        expression="x * 2", primals={"x": x}, tangents={"x": torch.ones_like(x)}, encoding="b64"
    )
    assert result.output.dtype == torch.bfloat16
    torch.testing.assert_close(result.output, x * 2)


def test_jvp_widens_bfloat16_to_float32_for_numpy_inputs(make_client) -> None:
    client = make_client(fake_service)
    result = client.jvp(
        expression="x * 2",
        primals={"x": np.array([1.0, 3.0])},
        tangents={"x": np.ones(2)},
        dtype="bfloat16",
    )
    assert result.output.dtype == np.float32
    np.testing.assert_array_equal(result.output, [2.0, 6.0])


def test_jvp_returns_lists_for_several_outputs(make_client) -> None:
    client = make_client(fake_service)
    x = np.array([0.0, 1.0])
    result = client.jvp(expression="(sin(x), cos(x))", primals={"x": x}, tangents={"x": np.ones(2)})
    assert isinstance(result.output, list) and len(result.output) == 2
    np.testing.assert_allclose(result.output[1], np.cos(x))
    np.testing.assert_allclose(result.jvp[1], -np.sin(x))
    assert result.method == "forward" and result.timing_ms["total"] == 0.5


def test_jvp_passes_extra_options_and_explicit_encoding(make_client) -> None:
    seen: list[dict] = []
    client = _recording_client(make_client, seen)
    client.jvp(
        expression="x * 2",
        primals={"x": np.ones(200)},
        encoding="json",
        options={"tangent_batch": False, "check": True},
        device="cpu",
        fallback="none",
    )
    assert seen[0]["options"] == {
        "tangent_batch": False,
        "check": True,
        "dtype": "float64",
        "device": "cpu",
        "fallback": "none",
        "encoding": "json",
    }


def test_jvp_explicit_dtype_wins_over_inferred(make_client) -> None:
    seen: list[dict] = []
    client = _recording_client(make_client, seen)
    result = client.jvp(expression="x * 2", primals={"x": np.ones(2)}, dtype=torch.float16)
    assert seen[0]["options"]["dtype"] == "float16"
    assert seen[0]["primals"]["x"]["dtype"] == "float64"  # the array keeps its own dtype
    assert result.output.dtype == np.float16


def test_encode_tensor_round_trips_zero_dim_torch() -> None:
    t = torch.tensor(-0.5, dtype=torch.bfloat16)
    for threshold in (0, 64):
        wire, _ = encode_tensor(t, b64_min_elements=threshold)
        back = decode_tensor(wire, as_torch=True)
        assert isinstance(back, torch.Tensor) and back.shape == () and back.dtype == t.dtype
        assert back.item() == -0.5


def test_encode_tensor_rounds_python_values_to_bfloat16_bits() -> None:
    values = [1.0, 1.00390625, 1.01171875, -3.0] * 20  # ties round to even; 80 elements: b64
    wire, used = encode_tensor(values, dtype="bfloat16")
    assert used and wire["dtype"] == "bfloat16"
    expected = torch.tensor(values, dtype=torch.float32).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(wire_to_numpy(wire), expected)
