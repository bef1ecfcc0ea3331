"""Task blobs: the bytes `safetensors.torch.save` writes, read back bit for bit."""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from app.engine.errors import EngineError
from app.jobs import blobs
from app.wire.codec import Limits, RawTensor, decode_stored, decode_tensor

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.bool]


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(len(shape))
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    return (torch.randn(shape, generator=g) * 100).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4), (2, 0, 3)], ids=str)
def test_inputs_are_the_bytes_safetensors_writes(dtype: torch.dtype, shape: tuple[int, ...]):
    groups = {"primals": {"x": sample(dtype, shape), "w.b": sample(dtype, shape)}}
    groups["tangents"] = {"x": sample(dtype, shape)}
    blob = blobs.dump_inputs(groups)
    flat = {f"{g}.{n}": t.clone() for g, named in groups.items() for n, t in named.items()}
    assert blob == save(flat, metadata={"kind": "jvp-task-inputs"})
    back = blobs.load_inputs(blob)
    for group, named in groups.items():
        for name, t in named.items():
            assert back[group][name].dtype == t.dtype
            assert torch.equal(back[group][name], t)


def test_views_and_shared_memory_are_written_as_their_values():
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    view = base.t()  # not contiguous
    blob = blobs.dump_result(
        (base, view), (base[1], base[1]), single=False, method="forward", names=["a", "b"]
    )
    tensors = load(blob)
    assert torch.equal(tensors["output.0"], base)
    assert torch.equal(tensors["output.1"], view.contiguous())
    assert torch.equal(tensors["jvp.0"], base[1]) and torch.equal(tensors["jvp.1"], base[1])
    stored = blobs.load_result(blob)
    assert stored.names == ["a", "b"] and stored.single is False
    assert [t.shape for t in stored.outputs] == [(4, 6), (6, 4)]


def test_a_tensor_that_needs_grad_is_written_detached():
    x = torch.randn(5, requires_grad=True)
    blob = blobs.dump_result((x * 2,), (x,), single=True, method="forward")
    assert torch.equal(blobs.load_result(blob).outputs[0], (x * 2).detach())


# NOTE [tensors kept as they came]: a b64 tensor of a job is stored from its bytes.
WIRE_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
LIMITS = Limits(max_tensor_elements=10**6, max_dims=8)


def b64_form(array: np.ndarray, dtype: str) -> dict[str, Any]:
    with np.errstate(over="ignore"):  # 1e300 is inf in float16, as the client's cast makes it
        wire = array.astype(np.dtype(WIRE_DTYPES.get(dtype, np.int16)).newbyteorder("<"))
    return {"shape": list(array.shape), "dtype": dtype, "b64": base64.b64encode(wire).decode()}


def edge_values(shape: tuple[int, ...]) -> np.ndarray:
    """0, -0, infinities, NaN, the smallest subnormal, huge and tiny magnitudes, then noise."""
    edges = [0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324, 1e300, -1e-300, 65504.0, 6e-8]
    flat = np.random.default_rng(0).standard_normal(math.prod(shape))
    k = min(flat.size, len(edges))
    flat[:k] = edges[:k]
    return flat.reshape(shape)


def bytes_of(t: torch.Tensor) -> torch.Tensor:
    if t.numel() == 0:  # an empty tensor has no bytes (and a stride view() refuses)
        return torch.empty(0, dtype=torch.uint8)
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16"])
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4), (2, 0, 3)], ids=str)
def test_a_b64_tensor_kept_as_bytes_is_stored_as_its_decoded_tensor_would_be(
    dtype: str, shape: tuple[int, ...]
):
    values = edge_values(shape)
    if dtype == "bfloat16":  # the bits of torch's bfloat16 rounding, sent as int16
        bits = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
        form = b64_form(bits, "bfloat16")
    else:
        form = b64_form(values, dtype)
    kept = decode_stored(form, param="primals.x", default_dtype=torch.float32, limits=LIMITS)
    decoded = decode_tensor(form, param="primals.x", default_dtype=torch.float32, limits=LIMITS)
    assert isinstance(kept, RawTensor)
    assert (kept.dtype, kept.shape) == (decoded.dtype, tuple(decoded.shape))
    as_kept = blobs.dump_inputs({"primals": {"x": kept}, "tangents": {"x": kept}})
    as_decoded = blobs.dump_inputs({"primals": {"x": decoded}, "tangents": {"x": decoded}})
    assert as_kept == as_decoded
    back = blobs.load_inputs(as_kept)["primals"]["x"]
    assert back.dtype == decoded.dtype
    assert torch.equal(bytes_of(back), bytes_of(decoded))  # NaN's bits too


def test_the_other_forms_are_decoded_to_torch_as_before():
    for form in (1.5, [[1, 2], [3, 4]], {"shape": [2], "dtype": "float64", "data": [1, 2]}):
        kept = decode_stored(form, param="t", default_dtype=torch.float64, limits=LIMITS)
        decoded = decode_tensor(form, param="t", default_dtype=torch.float64, limits=LIMITS)
        assert isinstance(kept, torch.Tensor) and torch.equal(kept, decoded)


@pytest.mark.parametrize(
    "form",
    [
        {"shape": [2], "dtype": "float32", "b64": "AAAA"},  # 3 bytes for 8
        {"shape": [2], "dtype": "float32", "b64": "not base64!"},
        {"shape": [2], "dtype": "float32", "b64": 12},
        {"shape": [2], "dtype": "complex64", "b64": "AAAAAAAAAAA="},
        {"shape": [-1], "dtype": "float32", "b64": ""},
        {"shape": [2], "b64": "AAAAAAAAAAA="},
        {"shape": [2], "dtype": "float32", "b64": "AAAAAAAAAAA=", "data": [1, 2]},
        {"shape": [2], "dtype": "float32", "b64": "AAAAAAAAAAA=", "extra": 1},
        {"shape": [10**7], "dtype": "float32", "b64": ""},  # over the element limit: 413
        {"shape": [1] * 9, "dtype": "float32", "b64": "AAAAAA=="},  # over the dims limit
    ],
    ids=lambda f: str(f)[:60],
)
def test_a_malformed_b64_tensor_is_refused_with_the_same_error_either_way(form: dict[str, Any]):
    errors = []
    for decode in (decode_stored, decode_tensor):
        with pytest.raises(EngineError) as caught:
            decode(form, param="primals.x", default_dtype=torch.float32, limits=LIMITS)
        errors.append((type(caught.value), str(caught.value), caught.value.param))
    assert errors[0] == errors[1]
    assert str(errors[0][2]).startswith("primals.x")


def raw(t: torch.Tensor) -> RawTensor:
    return RawTensor(t.dtype, tuple(t.shape), bytes_of(t).numpy().tobytes())


@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3)], ids=str)
def test_tasks_of_one_layout_are_the_bytes_safetensors_writes_for_each(shape: tuple[int, ...]):
    """NOTE [safetensors layouts]: the header and data order of the first task of a layout
    serve the next ones; every task's blob is still what safetensors writes of its own
    tensors (names given out of order, dtypes of every width, edge values)."""
    names = ["primals.z", "primals.a", "tangents.z", "tangents.a", "parameter_tangents.m.w"]
    for task in range(4):
        values = np.asarray(edge_values(shape) * (task + 1))
        wide = torch.from_numpy(values)
        tensors = {
            names[0]: wide.to(torch.float16),
            names[1]: wide.clone(),
            names[2]: wide.to(torch.bfloat16),
            names[3]: torch.from_numpy(np.asarray(np.nan_to_num(values))).to(torch.int64),
            names[4]: wide.to(torch.float32),
        }
        groups: dict[str, dict[str, RawTensor]] = {}
        for key, t in tensors.items():
            group, _, name = key.partition(".")
            groups.setdefault(group, {})[name] = raw(t)
        blob = blobs.dump_inputs(groups)
        assert blob == save(
            {k: t.contiguous() for k, t in tensors.items()}, metadata={"kind": "jvp-task-inputs"}
        ), f"task {task}"
        back = blobs.load_inputs(blob)
        for key, t in tensors.items():
            group, _, name = key.partition(".")
            assert torch.equal(bytes_of(back[group][name]), bytes_of(t))


def test_layouts_kept_are_bounded():
    blobs._LAYOUTS.clear()
    for n in range(blobs._LAYOUTS_KEPT + 10):
        t = torch.zeros(n % 7 + 1)
        blobs.dump_inputs({"primals": {f"x{n}": raw(t)}})
    assert len(blobs._LAYOUTS) == blobs._LAYOUTS_KEPT
