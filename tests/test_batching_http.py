"""Dynamic batching through HTTP: concurrent POST /jvp of a model are stacked into batches
(NOTE [dynamic batching]), and each client still gets exactly its own numbers."""

from __future__ import annotations

import asyncio
import re

import httpx
import numpy as np
import torch

from app.models.builtin import BUILTINS
from tests.conftest import LiveServer

CLIENTS = 24


def _mlp_module() -> torch.nn.Module:
    served = next(make() for make in BUILTINS if make().name == "mlp")
    materialized = served.target.materialize(torch.float32, torch.device("cpu"))
    module = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64)
    ).eval()
    module.load_state_dict({k: v.clone() for k, v in materialized.parameters.items()})
    return module


def _batch_sizes(metrics: str) -> tuple[float, float]:
    total = float(re.search(r'^jvp_batch_size_sum\{device="cpu"\} (\S+)', metrics, re.M)[1])  # type: ignore[index]
    steps = float(re.search(r'^jvp_batch_size_count\{device="cpu"\} (\S+)', metrics, re.M)[1])  # type: ignore[index]
    return total, steps


def _array(data: dict[str, object]) -> np.ndarray:
    return np.asarray(data["data"], dtype=np.float32).reshape(data["shape"])  # type: ignore[arg-type]


async def _concurrent(
    url: str, bodies: list[dict[str, object]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """POST every body at once; each answer's output and JVP."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:

        async def one(body: dict[str, object]) -> tuple[np.ndarray, np.ndarray]:
            r = await c.post("/jvp", json=body)
            assert r.status_code == 200, r.text
            return _array(r.json()["output"]), _array(r.json()["jvp"])

        return await asyncio.gather(*(one(body) for body in bodies))


def test_concurrent_model_requests_batch_and_each_gets_its_own_jvp() -> None:
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((32, 64)).astype(np.float32) for _ in range(CLIENTS)]
    ts = [rng.standard_normal((32, 64)).astype(np.float32) for _ in range(CLIENTS)]
    module = _mlp_module()
    server = LiveServer({"JVP_MAX_BATCH_SIZE": "16", "JVP_BATCH_WAIT_US": "20000"})
    try:
        # x[32, 64]: above JVP_INLINE_MAX_US, so each request goes to the worker, which stacks
        # the ones waiting together.
        bodies = [
            {"model": "mlp", "primals": {"x": x.tolist()}, "tangents": {"x": t.tolist()}}
            for x, t in zip(xs, ts, strict=True)
        ]
        for _ in range(3):
            answers = asyncio.run(_concurrent(server.url, bodies))
            for x, t, (out, jvp) in zip(xs, ts, answers, strict=True):
                ref_out, ref = torch.func.jvp(
                    module, (torch.from_numpy(x),), (torch.from_numpy(t),)
                )
                # Batched (vmap) and alone agree to 1e-6 in float32; a slice of another
                # request would be off by order 1.
                np.testing.assert_allclose(out, ref_out.detach().numpy(), rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(jvp, ref.detach().numpy(), rtol=1e-5, atol=1e-6)
        total, steps = _batch_sizes(httpx.get(server.url + "/metrics").text)
        assert total >= 3 * CLIENTS
        assert steps < total  # some steps computed more than one request
    finally:
        server.stop()


def test_concurrent_small_expressions_stack_and_each_gets_its_own_jvp() -> None:
    """NOTE [stacking tiny expressions]: requests reaching the engine in one event-loop turn
    compute as one; each answer is still its own 2 * x * tx."""
    rng = np.random.default_rng(11)
    server = LiveServer()
    try:
        stacked = False
        for _ in range(10):
            xs = [rng.standard_normal((10, 10)).astype(np.float32) for _ in range(CLIENTS)]
            ts = [rng.standard_normal((10, 10)).astype(np.float32) for _ in range(CLIENTS)]
            bodies = [
                {
                    "expression": "x**2 + y**2",
                    "primals": {"x": x.tolist(), "y": (x + 1).tolist()},
                    "tangents": {"x": t.tolist()},
                }
                for x, t in zip(xs, ts, strict=True)
            ]
            answers = asyncio.run(_concurrent(server.url, bodies))
            for x, t, (out, jvp) in zip(xs, ts, answers, strict=True):
                np.testing.assert_allclose(out, x**2 + (x + 1) ** 2, rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(jvp, 2 * x * t, rtol=1e-6, atol=1e-6)
            total, steps = _batch_sizes(httpx.get(server.url + "/metrics").text)
            if steps < total:
                stacked = True
                break
        assert stacked, "no two concurrent requests ever computed together"
    finally:
        server.stop()
