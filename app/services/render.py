"""How an answer's fields are written, for every operation: tensors in their wire form,
one tensor or a list (a single-output target answers the tensor itself, API.md), and where
the answer was computed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from app.engine.devices import DTYPE_NAMES
from app.engine.task import JVPTask
from app.wire.codec import encode_tensor


def encoded(tensors: Sequence[torch.Tensor], encoding: str) -> list[dict[str, Any]]:
    """Each tensor in its wire form (``encoding``: "json" or "b64")."""
    return [encode_tensor(t, encoding=encoding) for t in tensors]


def one_or_list(task: JVPTask, items: list[Any]) -> Any:
    """The one item of a single-output target's answer, else the list, one per output."""
    return items[0] if task.target.single_output and len(items) == 1 else items


def placement(task: JVPTask) -> dict[str, str]:
    """The ``dtype`` and ``device`` fields of an answer: where it was computed."""
    return {"dtype": DTYPE_NAMES[task.dtype], "device": str(task.device)}
