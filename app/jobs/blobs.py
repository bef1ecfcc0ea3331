"""Task inputs and results as safetensors bytes (no pickle, no JSON lists of numbers).

Inputs: one tensor per key ``primals.<name>``, ``tangents.<name>`` and
``parameter_tangents.<name>`` (a name may hold dots: the group is before the first one).
Results: ``output.<i>`` and ``jvp.<i>``, with metadata ``single`` ("1" when the function
returns one tensor, as /jvp's `output` is then a tensor, not a list) and ``method``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load, save

GROUPS = ("primals", "tangents", "parameter_tangents")


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous tensors that share no memory.
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its header is 8 bytes of length, then JSON)."""
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    meta: dict[str, str] = header.get("__metadata__") or {}
    return meta


def header(blob: bytes) -> bytes:
    """The safetensors header: names, dtypes, shapes and offsets (no numbers). Two blobs
    with equal headers hold tensors of the same names, dtypes and shapes."""
    (length,) = struct.unpack("<Q", blob[:8])
    return blob[8 : 8 + length]


def dump_inputs(groups: Mapping[str, Mapping[str, torch.Tensor]]) -> bytes:
    flat = {f"{group}.{name}": t for group, named in groups.items() for name, t in named.items()}
    return save(_contiguous(flat), metadata={"kind": "jvp-task-inputs"})


def load_inputs(blob: bytes) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {g: {} for g in GROUPS}
    for key, tensor in load(blob).items():
        group, _, name = key.partition(".")
        groups.setdefault(group, {})[name] = tensor  # "cotangents" of a vjp task too
    return groups


@dataclass
class StoredResult:
    outputs: list[torch.Tensor]
    jvps: list[torch.Tensor]
    single: bool
    method: str
    names: list[str] | None = None  # a vjp task's result: the names of its "vjp" entries
    solve: dict[str, Any] | None = None  # a solve task's report (converged, history, ...)


def dump_result(
    outputs: tuple[torch.Tensor, ...],
    jvps: tuple[torch.Tensor, ...],
    *,
    single: bool,
    method: str,
    names: Sequence[str] | None = None,
    solve: dict[str, Any] | None = None,
) -> bytes:
    flat = {f"output.{i}": t for i, t in enumerate(outputs)}
    flat.update({f"jvp.{i}": t for i, t in enumerate(jvps)})
    meta = {"kind": "jvp-task-result", "single": "1" if single else "0", "method": method}
    if names is not None:
        meta["names"] = json.dumps(list(names))
    if solve is not None:
        meta["solve"] = json.dumps(solve)
    return save(_contiguous(flat), metadata=meta)


def load_result(blob: bytes) -> StoredResult:
    tensors = load(blob)
    meta = metadata(blob)

    def series(prefix: str) -> list[torch.Tensor]:
        keys = sorted(
            (k for k in tensors if k.startswith(prefix)), key=lambda k: int(k[len(prefix) :])
        )
        return [tensors[k] for k in keys]

    return StoredResult(
        outputs=series("output."),
        jvps=series("jvp."),
        single=meta.get("single") == "1",
        method=meta.get("method", "forward"),
        names=json.loads(meta["names"]) if "names" in meta else None,
        solve=json.loads(meta["solve"]) if "solve" in meta else None,
    )
