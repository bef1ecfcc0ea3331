"""Request bodies for each server, reference answers, and the in-process torch timings.

Every body is built once, before anything is timed. The numbers are fixed by a
seed so runs compare; `check_*` decode one answer of each kind and compare it
with numpy, so a fast wrong answer never counts.
"""

from __future__ import annotations

import base64
import json
import statistics
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import safetensors.numpy

EXPRESSION = "x**2 + y**2"
SAFETENSORS = "application/x-safetensors"


def seed_inputs(shape: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """x, y and the tangent for x (float32, uniform in [-1, 1))."""
    rng = np.random.default_rng(seed)
    return {
        name: rng.uniform(-1.0, 1.0, size=shape).astype(np.float32) for name in ("x", "y", "tx")
    }


def expected_jvp(inputs: dict[str, np.ndarray]) -> np.ndarray:
    return 2 * inputs["x"] * inputs["tx"]


def _b64(array: np.ndarray) -> dict[str, Any]:
    data = np.ascontiguousarray(array, dtype="<f4")
    return {
        "shape": list(array.shape),
        "dtype": "float32",
        "b64": base64.b64encode(data.tobytes()).decode(),
    }


# ---- this service -------------------------------------------------------------------------


def jvp_json_body(inputs: dict[str, np.ndarray]) -> bytes:
    """Form 1 (nested JSON lists) in, form 2 out."""
    body = {
        "expression": EXPRESSION,
        "primals": {"x": inputs["x"], "y": inputs["y"]},
        "tangents": {"x": inputs["tx"]},
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def jvp_b64_body(inputs: dict[str, np.ndarray]) -> bytes:
    """Form 3 (base64) in and out."""
    body = {
        "expression": EXPRESSION,
        "primals": {"x": _b64(inputs["x"]), "y": _b64(inputs["y"])},
        "tangents": {"x": _b64(inputs["tx"])},
        "options": {"encoding": "b64"},
    }
    return orjson.dumps(body)


def jvp_binary_body(inputs: dict[str, np.ndarray]) -> bytes:
    """The safetensors body: tensors `primals/<name>`, `tangents/<name>`, the rest as metadata."""
    tensors = {
        "primals/x": inputs["x"],
        "primals/y": inputs["y"],
        "tangents/x": inputs["tx"],
    }
    return safetensors.numpy.save(
        tensors, metadata={"request": json.dumps({"expression": EXPRESSION})}
    )


def mlp_body(batch: int = 32, features: int = 64, seed: int = 1, model: str = "mlp") -> bytes:
    """`model` (the built-in `mlp`) on x of shape [batch, features], tangent for x, base64
    both ways."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, features)).astype(np.float32)
    tx = rng.standard_normal((batch, features)).astype(np.float32)
    body = {
        "model": model,
        "primals": {"x": _b64(x)},
        "tangents": {"x": _b64(tx)},
        "options": {"encoding": "b64"},
    }
    return orjson.dumps(body)


def _tensor_from_wire(value: Any) -> np.ndarray:
    if isinstance(value, list):
        return np.asarray(value, dtype=np.float32)
    dtype = np.dtype({"float32": "<f4", "float64": "<f8"}[value["dtype"]])
    if "b64" in value:
        flat = np.frombuffer(base64.b64decode(value["b64"]), dtype=dtype)
    else:
        flat = np.asarray(value["data"], dtype=dtype)
    return flat.reshape(value["shape"])


def read_jvp_json(body: bytes) -> np.ndarray:
    return _tensor_from_wire(orjson.loads(body)["jvp"])


def safetensors_metadata(body: bytes) -> dict[str, str]:
    (header_len,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8 : 8 + header_len])
    return dict(header.get("__metadata__") or {})


def read_jvp_binary(body: bytes) -> np.ndarray:
    tensors = safetensors.numpy.load(body)
    key = "jvp" if "jvp" in tensors else "jvp/0"
    return tensors[key]


# ---- the Tesseract runtime -----------------------------------------------------------------


def _tesseract_array(array: np.ndarray, encoding: str) -> dict[str, Any]:
    if encoding == "base64":
        buffer: Any = base64.b64encode(np.ascontiguousarray(array, "<f4").tobytes()).decode()
    else:
        buffer = array
    return {
        "object_type": "array",
        "shape": list(array.shape),
        "dtype": "float32",
        "data": {"buffer": buffer, "encoding": encoding},
    }


def tesseract_body(inputs: dict[str, np.ndarray], encoding: str = "json") -> bytes:
    """POST /jacobian_vector_product: JVP of `result` along x (encoding 'json' or 'base64')."""
    body = {
        "inputs": {
            "x": _tesseract_array(inputs["x"], encoding),
            "y": _tesseract_array(inputs["y"], encoding),
        },
        "jvp_inputs": ["x"],
        "jvp_outputs": ["result"],
        "tangent_vector": {"x": _tesseract_array(inputs["tx"], encoding)},
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def tesseract_accept(encoding: str) -> str:
    return "application/json+base64" if encoding == "base64" else "application/json"


def read_tesseract_jvp(body: bytes) -> np.ndarray:
    result = orjson.loads(body)["result"]
    data = result["data"]
    if data["encoding"] == "base64":
        flat = np.frombuffer(base64.b64decode(data["buffer"]), dtype=result["dtype"])
        return flat.reshape(result["shape"])
    return np.asarray(data["buffer"], dtype=result["dtype"]).reshape(result["shape"])


def read_echo(body: bytes) -> np.ndarray:
    """The JSON echo returns the JVP body: its tangent for x stands in for a JVP check."""
    return _tensor_from_wire(orjson.loads(body)["tangents"]["x"])


# ---- in-process references -----------------------------------------------------------------


def time_calls(fn: Callable[[], object], *, runs: int, inner: int = 1) -> list[float]:
    """Seconds per call of `fn`, `runs` samples of `inner` calls each (after one warm-up)."""
    fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return samples


def inprocess_small(shape: tuple[int, ...] = (10, 10)) -> dict[str, float]:
    """Median µs of one JVP of x**2 + y**2: `torch.func.jvp` and dual tensors, as written
    plainly and as the service computes it first (y dual with a zero tangent: in PyTorch
    2.13 an operator mixing dual and plain tensors takes a slow path; the service keeps
    that answer when it holds no NaN, NOTE [mixed dual and plain operands] in
    app/engine/jvp.py)."""
    import torch
    import torch.autograd.forward_ad as fwAD

    data = {k: torch.from_numpy(v) for k, v in seed_inputs(shape).items()}
    x, y, tx = data["x"], data["y"], data["tx"]

    def functional() -> object:
        return torch.func.jvp(lambda a: a**2 + y**2, (x,), (tx,))

    def dual() -> object:
        with fwAD.dual_level():
            out = fwAD.make_dual(x, tx) ** 2 + y**2
            return fwAD.unpack_dual(out).tangent

    def dual_zero() -> object:
        with fwAD.dual_level():
            yd = fwAD.make_dual(y, torch.zeros_like(y))
            out = fwAD.make_dual(x, tx) ** 2 + yd**2
            return fwAD.unpack_dual(out).tangent

    def median_us(fn: Callable[[], object]) -> float:
        return statistics.median(time_calls(fn, runs=20, inner=200)) * 1e6

    return {
        "torch.func.jvp": median_us(functional),
        "dual tensors": median_us(dual),
        "dual tensors, y with a zero tangent (as the service)": median_us(dual_zero),
    }


def inprocess_mlp(requests: int = 64, batch: int = 32) -> dict[str, float]:
    """Median ms of `requests` separate JVPs of the 64-256-64 MLP vs one vmap over them."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        module = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64)).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    xs = torch.randn(requests, batch, 64)
    ts = torch.randn(requests, batch, 64)

    def one(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        result = torch.func.jvp(module, (x,), (t,))
        return result[0], result[1]

    def separate() -> object:
        return [one(xs[i], ts[i]) for i in range(requests)]

    batched = torch.func.vmap(one)

    def vmapped() -> object:
        return batched(xs, ts)

    return {
        "separate": statistics.median(time_calls(separate, runs=5)) * 1e3,
        "vmap": statistics.median(time_calls(vmapped, runs=5)) * 1e3,
    }


def inprocess_big(inputs: dict[str, np.ndarray], runs: int) -> list[float]:
    """Seconds of `torch.func.jvp` of x**2 + y**2 on the big inputs, `runs` samples."""
    import torch

    x = torch.from_numpy(inputs["x"])
    y = torch.from_numpy(inputs["y"])
    tx = torch.from_numpy(inputs["tx"])
    return time_calls(lambda: torch.func.jvp(lambda a: a**2 + y**2, (x,), (tx,)), runs=runs)
