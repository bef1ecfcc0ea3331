"""The ``jvp`` command line's inputs (tensor arguments, tasks files) and outputs (text, npz)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ._tensors import Array
from ._types import EvalShapeResult, HVPResult, JacobianResult, JobInfo, JVPResult, ShapeInfo

T = TypeVar("T")


class UsageError(Exception):
    """A bad command-line argument or input file (exit status 2)."""


# -- inputs -------------------------------------------------------------------------------


def _load_value(text: str, *, base_dir: Path | None = None) -> Any:
    """A tensor from ``FILE.npy`` or a JSON number/list."""
    path = Path(text)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if text.endswith(".npy") or path.is_file():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {path}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise UsageError(f"{text!r} is neither a .npy file nor a JSON number or list") from None


def _parse_named(
    items: Sequence[str] | None,
    flag: str,
    read: Callable[[str, str], T],
    expected: str,
    *,
    empty: bool = False,
) -> dict[str, T] | None:
    """Repeated ``NAME=VALUE`` flags as ``{name: read(VALUE, item)}`` (None when none was
    given); ``empty``: ``NAME=`` is allowed."""
    if not items:
        return None
    out: dict[str, T] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not (value or empty):
            raise UsageError(f"{flag}: expected {expected}, got {item!r}")
        if name in out:
            raise UsageError(f"{flag}: {name!r} given twice")
        out[name] = read(value, item)
    return out


def _parse_assignments(items: Sequence[str] | None, flag: str) -> dict[str, Any] | None:
    return _parse_named(items, flag, lambda value, _: _load_value(value), "NAME=FILE.npy")


def _load_task_tensors(values: Any, base_dir: Path, where: str) -> Any:
    if values is None:
        return None
    if not isinstance(values, dict):
        raise UsageError(f"{where}: expected an object of names to tensors")
    return {
        name: _load_value(value, base_dir=base_dir) if isinstance(value, str) else value
        for name, value in values.items()
    }


def _read_tasks(path_text: str) -> list[dict[str, Any]]:
    if path_text == "-":
        lines, base_dir = sys.stdin.read().splitlines(), Path.cwd()
    else:
        path = Path(path_text)
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc}") from exc
        base_dir = path.parent
    tasks = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path_text}:{number}"
        try:
            task = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}: invalid JSON: {exc}") from exc
        if not isinstance(task, dict):
            raise UsageError(f"{where}: expected a JSON object per line")
        for key in ("primals", "tangents", "parameter_tangents"):
            if key in task:
                task[key] = _load_task_tensors(task[key], base_dir, f"{where}: {key}")
        tasks.append(task)
    if not tasks:
        raise UsageError(f"{path_text}: no tasks")
    return tasks


# -- outputs ------------------------------------------------------------------------------


def _as_numpy(value: Array) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    return np.asarray(value.detach().cpu().float().numpy())  # pragma: no cover - torch in CLI


def _describe(value: Array | list[Array]) -> str:
    if isinstance(value, list):
        return "; ".join(f"[{i}] {_describe(v)}" for i, v in enumerate(value))
    array = _as_numpy(value)
    text = np.array2string(array, threshold=8, edgeitems=3, precision=6, max_line_width=100)
    return f"{array.dtype} {list(array.shape)} {text}"


def _arrays(prefix: str, value: Array | list[Array] | None) -> dict[str, np.ndarray]:
    if value is None:
        return {}
    if isinstance(value, list):
        return {f"{prefix}_{i}": _as_numpy(v) for i, v in enumerate(value)}
    return {prefix: _as_numpy(value)}


def _print_result(result: JVPResult) -> None:
    print(f"output: {_describe(result.output)}")
    print(f"jvp:    {_describe(result.jvp)}")
    timing = ", ".join(f"{k} {v:.3g} ms" for k, v in result.timing_ms.items())
    facts = [f"dtype {result.dtype}", f"device {result.device}"]
    if result.engine:
        facts.append(f"engine {result.engine}")
    if result.method:
        facts.append(f"method {result.method}")
    print(", ".join(facts) + (f"; {timing}" if timing else ""))


def _print_facts(dtype: str, device: str, timing_ms: Mapping[str, float]) -> None:
    timing = ", ".join(f"{k} {v:.3g} ms" for k, v in timing_ms.items())
    print(f"dtype {dtype}, device {device}" + (f"; {timing}" if timing else ""))


def _named_arrays(prefix: str, values: Mapping[str, Array]) -> dict[str, np.ndarray]:
    return {f"{prefix}_{name}": _as_numpy(value) for name, value in values.items()}


def _jacobian_arrays(result: JacobianResult) -> dict[str, np.ndarray]:
    """npz keys: output and jacobian_<name>; output_<i> and jacobian_<i>_<name> for several."""
    arrays = _arrays("output", result.output)
    if isinstance(result.jacobian, list):
        for i, block in enumerate(result.jacobian):
            arrays.update(_named_arrays(f"jacobian_{i}", block))
    else:
        arrays.update(_named_arrays("jacobian", result.jacobian))
    return arrays


def _print_jacobian(result: JacobianResult) -> None:
    print(f"output: {_describe(result.output)}")
    blocks = result.jacobian if isinstance(result.jacobian, list) else [result.jacobian]
    several = isinstance(result.jacobian, list)
    for i, block in enumerate(blocks):
        for name, value in block.items():
            label = f"d output[{i}] / d {name}" if several else f"d output / d {name}"
            print(f"{label}: {_describe(value)}")
    _print_facts(result.dtype, result.device, result.timing_ms)


def _print_hvp(result: HVPResult) -> None:
    print(f"output: {_describe(result.output)}")
    for name, value in result.hvp.items():
        print(f"hvp {name}: {_describe(value)}")
    _print_facts(result.dtype, result.device, result.timing_ms)


def _write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    print(f"wrote {path} ({', '.join(arrays)})")


def _print_job(info: JobInfo, *, created: bool = False) -> None:
    text = f"job {info.id}: {info.status}, {info.done}/{info.total} done, {info.failed} failed"
    if info.cancelled:
        text += f", {info.cancelled} cancelled"
    if info.eta_s is not None and not info.finished:
        text += f", eta {info.eta_s:.3g} s"
    if created and info.created_at:
        text += f", created {info.created_at}"
    print(text)


def _parse_shapes(items: Sequence[str] | None, flag: str) -> dict[str, ShapeInfo] | None:
    """``NAME=3,4`` (``NAME=`` for a scalar) as shapes without data, in --dtype."""
    expected = "NAME=D0,D1,..."

    def read(dims: str, item: str) -> ShapeInfo:
        return _parse_shape(dims, flag, expected=expected, item=item)

    return _parse_named(items, flag, read, f"{expected} (integers)", empty=True)


def _parse_shape(dims: str, flag: str, *, expected: str = "D0,D1,...", item: str = "") -> ShapeInfo:
    """``3,4`` (empty for a scalar) as a shape without data, in --dtype."""
    try:
        return ShapeInfo(tuple(int(d) for d in dims.split(",") if d.strip()))
    except ValueError:
        raise UsageError(f"{flag}: expected {expected} (integers), got {item or dims!r}") from None


def _print_eval_shape(result: EvalShapeResult, operation: str) -> None:
    def text(spec: ShapeInfo) -> str:
        return f"{list(spec.shape)} {spec.dtype}"

    outputs = result.output if isinstance(result.output, list) else [result.output]
    for i, spec in enumerate(outputs):
        print(f"output{'' if len(outputs) == 1 else f' {i}'}: {text(spec)}")
    label = {"linearize": "jvp", "solve": "solution"}.get(operation, operation)
    blocks = result.result if isinstance(result.result, list) else [result.result]
    for i, block in enumerate(blocks):
        prefix = label if len(blocks) == 1 else f"{label} {i}"
        if isinstance(block, dict):
            for name, spec in block.items():
                print(f"{prefix} {name}: {text(spec)}")
        else:
            print(f"{prefix}: {text(block)}")
    print(f"flops: {result.flops}")
    print(f"peak_bytes: {result.peak_bytes}")
