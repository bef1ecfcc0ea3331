"""Test-side wire helpers, written independently of app.wire.codec."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import torch

NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}
TORCH_OF = {v: k for k, v in NAMES.items()}
SPECIAL = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def to_wire(t: torch.Tensor, form: str = "data") -> Any:
    """form: 'list' (form 1), 'data' (form 2) or 'b64' (form 3)."""
    if form == "list":
        return t.tolist()
    if form == "data":
        return {
            "shape": list(t.shape),
            "dtype": NAMES[t.dtype],
            "data": t.float().reshape(-1).tolist()
            if t.dtype == torch.bfloat16
            else t.reshape(-1).tolist(),
        }
    raw = (
        t.contiguous().view(torch.int16).numpy().tobytes()
        if t.dtype == torch.bfloat16
        else t.contiguous().numpy().tobytes()
    )
    return {"shape": list(t.shape), "dtype": NAMES[t.dtype], "b64": base64.b64encode(raw).decode()}


def from_wire(obj: Any) -> torch.Tensor:
    """A response tensor (form 2 or 3) back to torch."""
    dtype = TORCH_OF[obj["dtype"]]
    if "b64" in obj:
        raw = base64.b64decode(obj["b64"])
        if dtype == torch.bfloat16:
            return (
                torch.from_numpy(np.frombuffer(raw, dtype=np.int16).copy())
                .view(torch.bfloat16)
                .reshape(obj["shape"])
            )
        np_dtype = {
            torch.float16: np.float16,
            torch.float32: np.float32,
            torch.float64: np.float64,
        }[dtype]
        return torch.from_numpy(np.frombuffer(raw, dtype=np_dtype).copy()).reshape(obj["shape"])
    values = [SPECIAL[v] if isinstance(v, str) else v for v in obj["data"]]
    return torch.tensor(values, dtype=torch.float64).to(dtype).reshape(obj["shape"])
