"""The requests of every operation, built by one builder (:func:`request`); no I/O.

# NOTE [binary bodies]
``POST /jvp`` also takes and gives safetensors files (``application/x-safetensors``,
README "Binary bodies" of the service): raw little-endian bytes beside a JSON
header, so no number is written or parsed as text and nothing is base64'd. A
``jvp()`` whose primals, tangents and parameter tangents hold at least
``binary_min_elements`` elements in all (65,536 by default; None: never) is sent
that way: tensors ``primals/<name>``, ``tangents/<name>``,
``parameter_tangents/<name>``, the rest of the request (``expression`` or
``model``, ``options``) as JSON in the metadata under ``"request"``; with
``Accept: application/x-safetensors`` the answer holds tensors ``output`` and
``jvp`` (``output/0``, ``jvp/0``, ... for several outputs) and the other fields
as JSON in the metadata under ``"response"``. Each tensor keeps its dtype (Python
numbers and lists, and integer arrays, go as the computation dtype, else float64;
the service casts). The other routes are JSON only. Errors are JSON envelopes
either way. The file is written and read by ``_safetensors.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._base import NOT_GIVEN, Encoding, Limits, OutputKind, TimeoutTypes
from ._plans import Call
from ._safetensors import SAFETENSORS, encode_safetensors
from ._tensors import _to_wire_array as to_wire_array
from ._tensors import count_elements, encode_tensor, infer_dtype, normalize_dtype
from ._types import ShapeInfo

__all__ = ["job_request", "names", "plan_request", "request", "shapes"]

Tensors = Mapping[str, object]


#: The tensor groups of a request, in wire order.
GROUPS = ("primals", "tangents", "parameter_tangents")


def plan_request(
    client: Limits,
    where: str,
    path: str,
    args: Mapping[str, Any],
    *,
    groups: Sequence[str] = ("primals",),
    fields: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    form: str = "json",
) -> tuple[Call, OutputKind]:
    """:func:`request` from an operation plan's own arguments (its ``locals()``): the
    target, the tensor ``groups``, ``dtype``, ``device``, ``encoding`` (None where the plan
    has none), the caller's ``options`` and ``timeout``; plus the route's own ``fields``
    and named ``options``."""
    call, kind, _ = request(
        client,
        where,
        path,
        target=(args["expression"], args["model"]),
        tensors={group: args[group] for group in groups},
        dtype=args["dtype"],
        encoding=args.get("encoding"),
        fields=fields,
        options={"dtype": True, "device": args["device"], **(options or {})},
        extra_options=args["options"],
        form=form,
        timeout=args["timeout"],
    )
    return call, kind


def request(
    client: Limits,
    where: str,
    path: str,
    *,
    target: tuple[str | None, str | None] | None,
    tensors: Mapping[str, Tensors | None],
    dtype: object = None,
    encoding: Encoding | None = "auto",
    fields: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    extra_options: Mapping[str, Any] | None = None,
    form: str = "json",
    timeout: TimeoutTypes = NOT_GIVEN,
) -> tuple[Call, OutputKind, str | None]:
    """The request of one operation, validated, and how to return its tensors.

    Args:
        where: the method's name for messages (``"jvp()"``).
        target: ``(expression, model)``, exactly one set; None: the route has none.
        tensors: ``{"primals": {...}, "tangents": {...}, ...}`` (None groups left out).
        dtype: the computation dtype; default the one the floating primals share.
        encoding: the JSON tensor form asked of the answer (None: the route has none).
        fields: more body fields (``wrt``, ``reduction``, ...); None values left out.
        options: named ``options`` (None values and False flags left out; a flag must
            be a bool); ``"dtype": True`` sends the computation dtype.
        extra_options: the caller's ``options=``, sent as they are.
        form: ``"json"``; ``"shapes"`` (tensors may be `ShapeInfo`, /eval_shape);
            ``"binary"`` (``POST /jvp`` as safetensors past ``binary_min_elements``).

    Returns:
        ``(call, output kind, computation dtype)``.
    """
    body = {} if target is None else _target(*target, where=where)
    _check_tensors(tensors, target, where)
    if encoding is not None:
        _check_encoding(encoding, where)
    wire_dtype = normalize_dtype(dtype)
    if wire_dtype is None and form != "shapes":
        wire_dtype = infer_dtype((tensors.get("primals") or {}).values())
    if form == "binary" and _use_binary(client, tensors):
        form = "safetensors"
        encoding = None  # the answer is safetensors: no JSON tensor form to choose
    wire, any_b64 = _encode_groups(client, tensors, wire_dtype, form)
    body.update({k: v for k, v in (fields or {}).items() if v is not None})
    opts = _options(options, extra_options, where, wire_dtype=wire_dtype)
    if encoding is not None:
        answer = _response_encoding(encoding, any_b64)
        if answer is not None:
            opts["encoding"] = answer
    if opts:
        body["options"] = opts
    kind = OutputKind.of(*(tensors.get(g) for g in GROUPS))
    if form != "safetensors":
        body.update(wire)
        return Call("POST", path, json_body=body, timeout=timeout), kind, wire_dtype
    text = json.dumps(body, allow_nan=False, separators=(",", ":"))
    content = encode_safetensors(wire, {"request": text})
    headers = {"Content-Type": SAFETENSORS, "Accept": f"{SAFETENSORS}, application/json"}
    return Call("POST", path, content=content, headers=headers, timeout=timeout), kind, wire_dtype


def job_request(
    client: Limits,
    tasks: Iterable[Mapping[str, Any]],
    *,
    expression: str | None,
    model: str | None,
    dtype: object,
    encoding: Encoding,
    options: Mapping[str, Any],
    extra_options: Mapping[str, Any] | None,
    headers: Mapping[str, str],
    timeout: TimeoutTypes,
) -> tuple[Call, OutputKind]:
    """``POST /jobs``: job-wide defaults and tasks that may override them."""
    where = "submit_job()"
    if isinstance(tasks, (str, bytes, Mapping)) or not isinstance(tasks, Iterable):
        raise TypeError(
            f"{where}: expected tasks to be a list of task mappings, got {type(tasks).__name__}"
        )
    task_list = list(tasks)
    if not task_list:
        raise ValueError(f"{where}: expected at least one task, got none")
    if expression is not None and model is not None:
        raise TypeError(f"{where}: pass at most one of expression= or model=")
    _check_encoding(encoding, where)
    body: dict[str, Any] = {
        k: v for k, v in (("expression", expression), ("model", model)) if v is not None
    }
    wire_dtype = normalize_dtype(dtype) or infer_dtype(
        v
        for task in task_list
        if isinstance(task, Mapping)
        for v in (task.get("primals") or {}).values()
    )
    any_b64, kinds, wire_tasks = False, [], []
    for i, task in enumerate(task_list):
        at = f"{where}: tasks[{i}]"
        _check_task(task, at, has_default=bool(body))
        task_dtype = normalize_dtype((task.get("options") or {}).get("dtype")) or wire_dtype
        groups = {g: task.get(g) for g in GROUPS}
        wire, used = _encode_groups(client, groups, task_dtype, "json", where=f"{at}.")
        wire_tasks.append({**task, **wire})
        any_b64 = any_b64 or used
        kinds.append(OutputKind.of(*groups.values()))
    body["tasks"] = wire_tasks
    opts = _options(options, extra_options, where, wire_dtype=wire_dtype)
    answer = _response_encoding(encoding, any_b64)
    if answer is not None:
        opts["encoding"] = answer
    if opts:
        body["options"] = opts
    kind = next((k for k in kinds if k.as_torch), OutputKind())
    return Call("POST", "jobs", json_body=body, headers=headers, timeout=timeout), kind


def shapes(client: Limits, cotangents: Any) -> Any:
    """``cotangents`` of ``/eval_shape`` (``"vjp"``): each a `ShapeInfo` or a tensor; a
    tuple or list of them (None kept) for several outputs."""
    if cotangents is None:
        return None
    if isinstance(cotangents, (tuple, list)) and any(
        c is None or isinstance(c, ShapeInfo) or hasattr(c, "shape") for c in cotangents
    ):
        return [
            None if c is None else _encode_one(client, c, None, "shapes")[0] for c in cotangents
        ]
    return _encode_one(client, cotangents, None, "shapes")[0]


def names(wrt: str | Sequence[str] | None, where: str) -> list[str] | None:
    """``wrt=`` as a list of names (one name may be given as a str)."""
    if wrt is None:
        return None
    listed = [wrt] if isinstance(wrt, str) else list(wrt)
    if not listed or not all(isinstance(n, str) and n for n in listed):
        raise ValueError(f"{where}: expected wrt to be input or parameter names, got {wrt!r}")
    return listed


def _target(expression: str | None, model: str | None, *, where: str) -> dict[str, Any]:
    if (expression is None) == (model is None):
        raise TypeError(f"{where}: pass exactly one of expression= or model=")
    if expression is not None:
        if not isinstance(expression, str):
            raise TypeError(
                f"{where}: expected expression to be a str, got {type(expression).__name__}"
            )
        return {"expression": expression}
    if not isinstance(model, str):
        raise TypeError(f"{where}: expected model to be a str, got {type(model).__name__}")
    return {"model": model}


def _check_tensors(
    tensors: Mapping[str, Tensors | None],
    target: tuple[str | None, str | None] | None,
    where: str,
) -> None:
    if "primals" in tensors and not isinstance(tensors["primals"], Mapping):
        raise TypeError(
            f"{where}: expected primals to be a mapping of input names to tensors, "
            f"got {type(tensors['primals']).__name__}"
        )
    if target is not None and target[1] is None and tensors.get("parameter_tangents") is not None:
        raise ValueError(f"{where}: parameter_tangents= is for models only (pass model=)")


def _check_task(task: object, where: str, *, has_default: bool) -> None:
    if not isinstance(task, Mapping):
        raise TypeError(f"{where}: expected a mapping, got {type(task).__name__}")
    if "expression" in task and "model" in task:
        raise TypeError(f"{where}: pass at most one of 'expression' or 'model'")
    if "expression" not in task and "model" not in task and not has_default:
        raise ValueError(f"{where}: no expression or model (set one job-wide or per task)")
    if not isinstance(task.get("primals"), Mapping):
        raise TypeError(f"{where}: expected 'primals' to be a mapping of names to tensors")


def _check_encoding(encoding: object, where: str) -> None:
    if encoding not in ("auto", "json", "b64"):
        raise ValueError(f"{where}: expected encoding 'auto', 'json' or 'b64', got {encoding!r}")


def _use_binary(client: Limits, tensors: Mapping[str, Tensors | None]) -> bool:
    """Whether a ``POST /jvp`` goes as safetensors; see NOTE [binary bodies]."""
    threshold = client.binary_min_elements
    if threshold is None:
        return False
    total = 0
    for values in tensors.values():
        if values is None:
            continue
        if not isinstance(values, Mapping):
            return False  # the JSON path raises the usual TypeError
        total += sum(count_elements(v) for v in values.values())
    return total >= threshold


def _encode_groups(
    client: Limits,
    tensors: Mapping[str, Tensors | None],
    dtype: str | None,
    form: str,
    *,
    where: str = "",
) -> tuple[dict[str, Any], bool]:
    """The groups in the wire ``form``: ``({group: {name: wire}}, any b64)`` for JSON,
    ``({"group/name": (array, wire dtype)}, False)`` for safetensors."""
    out: dict[str, Any] = {}
    any_b64 = False
    for group, values in tensors.items():
        if values is None:
            continue
        what = f"{where}{group}"
        if not isinstance(values, Mapping):
            raise TypeError(
                f"{what}: expected a mapping of names to tensors, got {type(values).__name__}"
            )
        wire: dict[str, Any] = {}
        for name, value in values.items():
            if not isinstance(name, str):
                raise TypeError(f"{what}: expected string names, got {name!r}")
            try:
                encoded, used = _encode_one(client, value, dtype, form)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{what}[{name!r}]: {exc}") from exc
            wire[name] = encoded
            any_b64 = any_b64 or used
        if form == "safetensors":
            out.update({f"{group}/{name}": value for name, value in wire.items()})
        else:
            out[group] = wire
    return out, any_b64


def _encode_one(client: Limits, value: object, dtype: str | None, form: str) -> Any:
    if form == "safetensors":
        array, wire, _ = to_wire_array(value, dtype or "float64")
        return (array, wire), False
    if form == "shapes":
        if isinstance(value, ShapeInfo):
            return {"shape": [int(d) for d in value.shape], "dtype": value.dtype}, False
        if isinstance(value, Mapping) and "shape" in value:
            return dict(value), False
    return encode_tensor(value, dtype=dtype, b64_min_elements=client.b64_min_elements)


def _options(
    named: Mapping[str, Any] | None,
    extra: Mapping[str, Any] | None,
    where: str,
    *,
    wire_dtype: str | None,
) -> dict[str, Any]:
    opts: dict[str, Any] = dict(extra or {})
    for key, value in (named or {}).items():
        if key == "dtype":
            value = wire_dtype if value is True else None
        if key in ("tangent_batch", "cotangent_batch", "check"):
            if not isinstance(value, bool):
                raise TypeError(f"{where}: expected {key} to be True or False, got {value!r}")
            value = True if value else None  # a false flag is the service default
        if value is not None:
            opts[key] = value
    return opts


def _response_encoding(encoding: Encoding, any_b64: bool) -> str | None:
    """The ``options.encoding`` to ask for: b64 answers when b64 went out.

    See NOTE [wire form choice] in ``_tensors.py``.
    """
    if encoding == "auto":
        return "b64" if any_b64 else None
    return encoding
