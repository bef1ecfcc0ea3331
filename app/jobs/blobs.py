"""Task inputs and results as safetensors bytes (no pickle, no JSON lists of numbers).

Inputs: one tensor per key ``primals.<name>``, ``tangents.<name>`` and
``parameter_tangents.<name>`` (a name may hold dots: the group is before the first one).
Results: ``output.<i>`` and ``jvp.<i>``, with metadata ``single`` ("1" when the function
returns one tensor, as /jvp's `output` is then a tensor, not a list) and ``method``.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import TensorSpec, serialize
from safetensors.torch import load

from app.wire.codec import RawTensor

GROUPS = ("primals", "tangents", "parameter_tangents")


def _save(tensors: Mapping[str, torch.Tensor | RawTensor], metadata: dict[str, str]) -> bytes:
    """The safetensors bytes of ``tensors`` (the same bytes as `safetensors.torch.save`);
    a `RawTensor` is written from its bytes as they came (NOTE [tensors kept as they came]),
    and tensors that are all `RawTensor` in a layout seen before are laid out as it was
    (NOTE [safetensors layouts])."""
    raw = [t for t in tensors.values() if isinstance(t, RawTensor)]
    if len(raw) != len(tensors):
        return _serialized(tensors, metadata)
    key = (
        tuple((n, t.dtype, t.shape) for n, t in zip(tensors, raw, strict=True)),
        *metadata.items(),
    )
    layout = _LAYOUTS.get(key)
    if layout is not None:
        prefix, order = layout
        return prefix + b"".join([raw[i].data for i in order])
    blob = _serialized(tensors, metadata)
    _remember(key, blob, list(tensors))
    return blob


# NOTE [safetensors layouts]: a safetensors file's header (names, dtypes, shapes, offsets,
# metadata) and the order of its data depend on the names, dtypes and shapes alone: the
# tensors lie end to end, sorted by dtype and name, after the header. A job's tasks mostly
# share one layout, and serializing each anew took 40 us of a task's POST /jobs (80 ms of
# 2,000 tasks on this machine). So the first blob of a layout is made by safetensors, its
# header and order are kept (for the last _LAYOUTS_KEPT layouts), and the next blobs of
# that layout are the header, then the tensors' bytes in that order: 1 us a task, the same
# bytes (tests/jobs/test_blobs.py).
_LAYOUTS: dict[tuple[object, ...], tuple[bytes, list[int]]] = {}
_LAYOUTS_KEPT = 1024
_LAYOUTS_LOCK = threading.Lock()


def _remember(key: tuple[object, ...], blob: bytes, names: list[str]) -> None:
    """Keep the header and data order of `blob`, the safetensors bytes of tensors `names`
    (in the order given); not kept where the data does not lie end to end."""
    head = header(blob)
    entries = json.loads(head)
    spans = sorted((entries[name]["data_offsets"], i) for i, name in enumerate(names))
    end = 0
    for (begin, stop), _ in spans:
        if begin != end:
            return
        end = stop
    prefix = 8 + len(head)
    if prefix + end != len(blob):
        return
    with _LAYOUTS_LOCK:  # POSTs decode in threads of their own
        if len(_LAYOUTS) >= _LAYOUTS_KEPT:
            _LAYOUTS.pop(next(iter(_LAYOUTS)), None)  # the oldest
        _LAYOUTS[key] = (blob[:prefix], [i for _, i in spans])


def _serialized(tensors: Mapping[str, torch.Tensor | RawTensor], metadata: dict[str, str]) -> bytes:
    """`_save` through safetensors' own `serialize`.

    NOTE [raw tensor specs]: `safetensors.torch.save` checks every tensor for shared
    memory, goes through numpy and sums shapes with `numpy.prod`: 80 us for a task's four
    small tensors, 0.17 ms a task with the clones it needs, most of a 2,000-task POST /jobs
    (bench/README.md, "Job throughput"). Its own `serialize` on specs of each tensor's
    memory takes 9 us; the specs point into `keep`, alive until `serialize` returns."""
    keep = [_memory(t) for t in tensors.values()]
    specs = {
        name: TensorSpec(
            dtype=str(t.dtype).removeprefix("torch."),
            shape=list(t.shape),
            data_ptr=ptr,
            data_len=size,
        )
        for name, t, (_, ptr, size) in zip(tensors, tensors.values(), keep, strict=True)
    }
    return bytes(serialize(specs, metadata=metadata))


def _memory(t: torch.Tensor | RawTensor) -> tuple[object, int, int]:
    """What holds a tensor's bytes (to keep alive), their address and their length."""
    if isinstance(t, RawTensor):
        array = np.frombuffer(t.data, dtype=np.uint8)
        return array, array.ctypes.data, len(t.data)
    t = t.detach().cpu().contiguous()
    return t, t.data_ptr(), t.numel() * t.element_size()


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


def dump_inputs(groups: Mapping[str, Mapping[str, torch.Tensor | RawTensor]]) -> bytes:
    flat = {f"{group}.{name}": t for group, named in groups.items() for name, t in named.items()}
    return _save(flat, {"kind": "jvp-task-inputs"})


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
    return _save(flat, meta)


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
