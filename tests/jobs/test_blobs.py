"""Task blobs: the bytes `safetensors.torch.save` writes, read back bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from app.jobs import blobs

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
