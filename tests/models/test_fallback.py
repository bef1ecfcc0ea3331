"""Operators without a forward-AD formula: decomposition, double-vjp, 501 (API and engine).

Every JVP is checked against float64 central differences of the original module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from torch import nn
from torch.export import Dim

from app.engine.fallback import _embedding_bag, jvp_double_vjp
from app.engine.target import Materialized
from tests.models.conftest import INFERENCE, Loader, central_difference, save_model
from tests.wire import from_wire, to_wire


class Retrieval(nn.Module):
    """Query encoder, distances to an item bank (cdist) and within the batch (pdist)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, 4)
        self.items = nn.Parameter(torch.randn(6, 4))

    def forward(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(q)
        return torch.cdist(z, self.items), F.pdist(z)


class Recommender(nn.Module):
    """EmbeddingBag over item ids (sent as floats in [0, 1): id = floor(20 x)), weighted."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(20, 6, mode="sum")
        self.head = nn.Linear(6, 1)

    def forward(self, items: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ids = (items * 20).long().clamp(0, 19)
        return self.head(self.bag(ids, per_sample_weights=weights))


class SpatialTransformer(nn.Module):
    """Predicts an affine warp of a 6x6 image and resamples it (grid_sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.loc = nn.Linear(36, 6)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        theta = self.loc(img.flatten(1)).view(-1, 2, 3)
        grid = F.affine_grid(theta, list(img.shape), align_corners=False)
        return F.grid_sample(img, grid, align_corners=False)


class VolumeWarp(nn.Module):
    """3-D spatial transformer (volume registration): grid_sampler_3d has no decomposition."""

    def __init__(self) -> None:
        super().__init__()
        self.loc = nn.Linear(64, 12)

    def forward(self, vol: torch.Tensor) -> torch.Tensor:
        theta = self.loc(vol.flatten(1)).view(-1, 3, 4)
        grid = F.affine_grid(theta, list(vol.shape), align_corners=False)
        return F.grid_sample(vol, grid, align_corners=False)


class SegmentSum(nn.Module):
    """Sums of ragged segments: segment_reduce has no formula, decomposition or double backward."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6))
        self.register_buffer("lengths", torch.tensor([2, 1, 3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.segment_reduce(x * self.scale, "sum", lengths=self.lengths)


def _post(client: TestClient, model: str, primals: dict, tangents: dict, **options: object):
    return client.post(
        "/jvp",
        headers=INFERENCE,
        json={
            "model": model,
            "primals": {k: to_wire(v, "b64") for k, v in primals.items()},
            "tangents": {k: to_wire(v, "b64") for k, v in tangents.items()},
            "options": {"dtype": "float64", "encoding": "b64", **options},
        },
    )


def _check(body: dict, want: tuple[torch.Tensor, ...]) -> None:
    got = body["jvp"] if isinstance(body["jvp"], list) else [body["jvp"]]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(from_wire(g), w, rtol=1e-6, atol=1e-7)


CASES = {
    # name: (module maker, example args, least batch size (None: static shapes), method)
    # (pdist's output size is quadratic in the batch: export keeps that one static.)
    "retrieval": (Retrieval, lambda g: (torch.randn(4, 8, generator=g),), None, "decomposed"),
    "recommender": (
        Recommender,
        lambda g: (torch.rand(3, 4, generator=g), torch.rand(3, 4, generator=g)),
        1,
        "decomposed",
    ),
    "stn": (SpatialTransformer, lambda g: (torch.rand(2, 1, 6, 6, generator=g),), 1, "decomposed"),
    "volume": (VolumeWarp, lambda g: (torch.rand(2, 1, 4, 4, 4, generator=g),), 1, "double_vjp"),
}


@pytest.mark.parametrize("engine", ["dual", "functional"])
@pytest.mark.parametrize("name", list(CASES))
def test_create_jvp_falls_back_and_matches_finite_differences(
    repo: Path, keyed_client: TestClient, load: Loader, name: str, engine: str
) -> None:
    make, example, min_batch, method = CASES[name]
    torch.manual_seed(11)
    module = make().eval()
    g = torch.Generator().manual_seed(12)
    args = example(g)
    names = list(module.forward.__code__.co_varnames[1 : 1 + len(args)])
    dynamic = None
    if min_batch is not None:
        dynamic = {n: {0: Dim("batch", min=min_batch, max=64)} for n in names}
    save_model(repo, name, module, args, dynamic_shapes=dynamic)
    load(name)
    xs = tuple(a.double() for a in args)
    vs = tuple(torch.randn(x.shape, generator=g, dtype=torch.float64) for x in xs)

    r = _post(
        keyed_client,
        name,
        dict(zip(names, xs, strict=True)),
        dict(zip(names, vs, strict=True)),
        engine=engine,
    )

    assert r.status_code == 200, r.text
    assert r.json()["method"] == method
    _check(r.json(), central_difference(module, xs, vs))
    r = _post(
        keyed_client,
        name,
        dict(zip(names, xs, strict=True)),
        dict(zip(names, vs, strict=True)),
        fallback="none",
    )
    assert r.status_code == 501


def test_create_jvp_parameter_tangents_through_embedding_bag(
    repo: Path, keyed_client: TestClient, load: Loader
) -> None:
    torch.manual_seed(13)
    module = Recommender().eval()
    args = (torch.rand(3, 4), torch.rand(3, 4))
    save_model(
        repo, "rec", module, args, dynamic_shapes={"items": {0: Dim("b")}, "weights": {0: Dim("b")}}
    )
    load("rec")
    xs = tuple(a.double() for a in args)
    vw = torch.randn(20, 6, dtype=torch.float64)
    r = keyed_client.post(
        "/jvp",
        headers=INFERENCE,
        json={
            "model": "rec",
            "primals": {"items": to_wire(xs[0], "b64"), "weights": to_wire(xs[1], "b64")},
            "parameter_tangents": {"bag.weight": to_wire(vw, "b64")},
            "options": {"dtype": "float64"},
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["method"] == "decomposed"
    _check(r.json(), central_difference(module, xs, [None, None], {"bag.weight": vw}))


def test_create_jvp_without_any_fallback_is_501_naming_operator(
    repo: Path, keyed_client: TestClient, load: Loader
) -> None:
    module = SegmentSum().eval()
    save_model(repo, "segments", module, (torch.rand(6),))
    load("segments")
    x = torch.rand(6, dtype=torch.float64)

    r = _post(keyed_client, "segments", {"x": x}, {"x": torch.ones(6, dtype=torch.float64)})

    assert r.status_code == 501, r.text
    error = r.json()["error"]
    assert error["type"] == "forward_ad_unsupported"
    assert "Operator segment_reduce has no forward-AD formula" in error["message"]
    assert "_segment_reduce_backward" in error["message"]  # why reverse-over-reverse failed
    r = _post(keyed_client, "segments", {"x": x}, {"x": x}, fallback="none")
    assert r.status_code == 501
    assert "segment_reduce" in r.json()["error"]["message"]
    assert "options.fallback is 'none'" in r.json()["error"]["message"]


def test_create_jvp_forward_method_when_no_fallback_needed(client: TestClient) -> None:
    r = client.post("/jvp", json={"model": "linear", "primals": {"x": [[1, 2, 3, 4, 5]]}})
    assert r.status_code == 200
    assert r.json()["method"] == "forward"


def test_double_vjp_matches_finite_differences_through_grid_sample() -> None:
    # grid_sampler_2d's backward is differentiable: the second fallback alone is exact too.
    torch.manual_seed(14)
    module = SpatialTransformer().double().eval()
    state = {k: v.detach() for k, v in module.state_dict().items()}
    target = Materialized(
        fn=lambda args, st: (torch.func.functional_call(module, st, args),),
        parameters=state,
        buffers={},
    )
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    v = torch.randn_like(x)
    vw = {"loc.weight": torch.randn(6, 36, dtype=torch.float64)}

    outputs, jvps = jvp_double_vjp(target, (x,), (v,), vw)

    torch.testing.assert_close(outputs[0], module(x))
    want = central_difference(module, [x], [v], vw)
    torch.testing.assert_close(jvps[0], want[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_embedding_bag_decomposition_equals_kernel(mode: str, padding_idx: int | None) -> None:
    weight = torch.randn(10, 4, dtype=torch.float64)
    indices = torch.tensor([1, 3, 3, 7, 2, 9, 0, 3])
    offsets = torch.tensor([0, 3, 3, 5])  # an empty bag, and a last bag of 3
    want = F.embedding_bag(indices, weight, offsets, mode=mode, padding_idx=padding_idx)
    code = {"sum": 0, "mean": 1, "max": 2}[mode]
    got = _embedding_bag(weight, indices, offsets, mode=code, padding_idx=padding_idx or -1)[0]
    torch.testing.assert_close(got, want)
