"""Device and dtype names as the API spells them."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from app.engine.errors import InvalidRequest

# API name (and its Open Inference Protocol alias) -> torch dtype.
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_ALIASES = {"FP16": "float16", "BF16": "bfloat16", "FP32": "float32", "FP64": "float64"}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def parse_dtype(name: object, *, param: str = "options.dtype") -> torch.dtype:
    """Return the torch dtype for an API dtype name, or raise a 422 that lists the names."""
    if isinstance(name, str):
        canonical = _ALIASES.get(name, name)
        if canonical in DTYPES:
            return DTYPES[canonical]
    accepted = ", ".join([*DTYPES, *_ALIASES])
    raise InvalidRequest(f"Unknown dtype {name!r}; expected one of: {accepted}", param=param)


def available_devices() -> list[torch.device]:
    """Every device this process can compute on: the CPU, then each CUDA device."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def parse_device(name: object, available: Sequence[torch.device]) -> torch.device:
    """Resolve an API device name (auto | cpu | cuda | cuda:N) against the devices present."""
    if not isinstance(name, str):
        raise InvalidRequest(
            f"Expected device as a string (auto, cpu, cuda, cuda:N), got {name!r}",
            param="options.device",
        )
    return _resolve(name, tuple(available))


@functools.lru_cache(maxsize=256)
def _resolve(name: str, available: tuple[torch.device, ...]) -> torch.device:
    # Cached: every task of a batch job names its device (a quarter of a worker's time
    # preparing tiny tasks went to building torch.device objects and their names).
    if name == "auto":
        gpus = [d for d in available if d.type == "cuda"]
        return gpus[0] if gpus else torch.device("cpu")
    names = ", ".join(str(d) for d in available)
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InvalidRequest(
            f"Unknown device {name!r}; expected auto, cpu, cuda or cuda:N "
            f"(this machine has: {names})",
            param="options.device",
        ) from None
    if device.type == "cpu":
        device = torch.device("cpu")
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    if device not in available:
        raise InvalidRequest(
            f"Device {name!r} is not available on this machine (available: {names})",
            param="options.device",
        )
    return device


def api_float(value: float) -> float | str:
    """A float as the API writes it in JSON: NaN and infinities as "NaN", "Infinity",
    "-Infinity" (JSON has no such numbers)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def device_memory(device: torch.device) -> int:
    """Bytes of memory ``device`` has: a GPU's total memory; for the CPU the machine's,
    or its cgroup's limit when that is lower (a container)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return int(total)
