"""The ``jvp`` command line.

    jvp call --expression "x**2 + y**2" --primal x=x.npy --primal y=y.npy \\
             --tangent x=v.npy --out result.npz
    jvp call --model linear --primal x=x.npy --parameter-tangent weight=dw.npy
    jvp call -e "sin(x)" -p x=x.npy -t x=V.npy --tangent-batch --check
    jvp jacobian --expression "sin(x) * y" --primal x=x.npy --primal y=y.npy \\
                 [--wrt x] --out jac.npz
    jvp hvp --expression "sum(x**3)" --primal x=x.npy --tangent x=v.npy --out hvp.npz
    jvp eval-shape [--operation jacobian] -e "sin(x) * y" --shape x=3,4 --shape y=4
    jvp models [NAME]
    jvp health
    jvp jobs submit tasks.jsonl [--expression ... | --model ...] [--wait]
    jvp jobs status ID
    jvp jobs wait ID
    jvp jobs results ID --out results.npz
    jvp jobs cancel ID

``--base-url`` and ``--api-key`` default to ``$JVP_BASE_URL`` and ``$JVP_API_KEY``.
A tensor argument is ``NAME=FILE.npy`` or ``NAME=JSON`` (a number or a nested list,
which takes the computation dtype). In a tasks file (JSON Lines, one task a line:
``{"primals": {...}, "tangents": {...}}``), a tensor is a JSON tensor of API.md or
a string naming a ``.npy`` file (relative to the tasks file).

Exit status: 0 on success, 1 when the service answered an error (its message is
printed), could not be reached, a job task failed or ``call --check`` did not
pass; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ._base import NOT_GIVEN
from ._client import JVPClient
from ._exceptions import APIStatusError, JVPError
from ._tensors import Array
from ._types import EvalShapeResult, HVPResult, JacobianResult, JobInfo, JVPResult, ShapeInfo
from ._version import __version__

__all__ = ["main"]


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


def _parse_assignments(items: Sequence[str] | None, flag: str) -> dict[str, Any] | None:
    if not items:
        return None
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UsageError(f"{flag}: expected NAME=FILE.npy, got {item!r}")
        if name in out:
            raise UsageError(f"{flag}: {name!r} given twice")
        out[name] = _load_value(value)
    return out


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


def _print_job(info: JobInfo) -> None:
    print(f"job {info.id}: {info.status}, {info.done}/{info.total} done, {info.failed} failed")


# -- commands -----------------------------------------------------------------------------


def _cmd_call(client: JVPClient, args: argparse.Namespace) -> int:
    primals = _parse_assignments(args.primal, "--primal")
    if primals is None:
        raise UsageError("call: give at least one --primal NAME=FILE.npy")
    result = client.jvp(
        expression=args.expression,
        model=args.model,
        primals=primals,
        tangents=_parse_assignments(args.tangent, "--tangent"),
        parameter_tangents=_parse_assignments(args.parameter_tangent, "--parameter-tangent"),
        dtype=args.dtype,
        device=args.device,
        engine=args.engine,
        fallback=args.fallback,
        tangent_batch=args.tangent_batch,
        check=args.check,
    )
    _print_result(result)
    if args.out:
        _write_npz(args.out, {**_arrays("output", result.output), **_arrays("jvp", result.jvp)})
    if args.check:
        if result.check is None:
            print("jvp: error: the service answered without a check", file=sys.stderr)
            return 1
        print(result.check.summary())
        return 0 if result.check.passed else 1
    return 0


def _cmd_jacobian(client: JVPClient, args: argparse.Namespace) -> int:
    primals = _parse_assignments(args.primal, "--primal")
    if primals is None:
        raise UsageError("jacobian: give at least one --primal NAME=FILE.npy")
    result = client.jacobian(
        expression=args.expression,
        model=args.model,
        primals=primals,
        wrt=args.wrt,
        dtype=args.dtype,
        device=args.device,
    )
    _print_jacobian(result)
    if args.out:
        _write_npz(args.out, _jacobian_arrays(result))
    return 0


def _cmd_vjp(client: JVPClient, args: argparse.Namespace) -> int:
    primals = _parse_assignments(args.primal, "--primal")
    if primals is None:
        raise UsageError("vjp: give at least one --primal NAME=FILE.npy")
    if not args.cotangent:
        raise UsageError("vjp: give --cotangent FILE.npy (one per output, in order; 'null': none)")
    given = [None if c == "null" else _load_value(c) for c in args.cotangent]
    cotangents: Any = given[0] if len(given) == 1 else tuple(given)
    result = client.vjp(
        expression=args.expression,
        model=args.model,
        primals=primals,
        cotangents=cotangents,
        wrt=args.wrt,
        cotangent_batch=args.cotangent_batch,
        check=args.check,
        dtype=args.dtype,
        device=args.device,
    )
    print(f"output: {_describe(result.output)}")
    for name, value in result.vjp.items():
        print(f"vjp {name}: {_describe(value)}")
    _print_facts(result.dtype, result.device, result.timing_ms)
    if args.out:
        _write_npz(
            args.out, {**_arrays("output", result.output), **_named_arrays("vjp", result.vjp)}
        )
    if args.check:
        check = result.check or {}
        print(
            f"check: {'passed' if check.get('passed') else 'FAILED'} "
            f"(max_rel_error {check.get('max_rel_error')}, identity {check.get('identity')})"
        )
        return 0 if check.get("passed") else 1
    return 0


def _cmd_hvp(client: JVPClient, args: argparse.Namespace) -> int:
    primals = _parse_assignments(args.primal, "--primal")
    if primals is None:
        raise UsageError("hvp: give at least one --primal NAME=FILE.npy")
    tangents = _parse_assignments(args.tangent, "--tangent")
    parameter_tangents = _parse_assignments(args.parameter_tangent, "--parameter-tangent")
    if tangents is None and parameter_tangents is None:
        raise UsageError("hvp: give at least one --tangent NAME=FILE.npy (the direction v)")
    result = client.hvp(
        expression=args.expression,
        model=args.model,
        primals=primals,
        tangents=tangents,
        parameter_tangents=parameter_tangents,
        output_index=args.output_index,
        reduction=args.reduction,
        tangent_batch=args.tangent_batch,
        dtype=args.dtype,
        device=args.device,
    )
    _print_hvp(result)
    if args.out:
        _write_npz(
            args.out, {**_arrays("output", result.output), **_named_arrays("hvp", result.hvp)}
        )
    return 0


def _parse_shapes(items: Sequence[str] | None, flag: str) -> dict[str, ShapeInfo] | None:
    """``NAME=3,4`` (``NAME=`` for a scalar) as shapes without data, in --dtype."""
    if not items:
        return None
    out: dict[str, ShapeInfo] = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            shape = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError:
            shape = None
        if not sep or not name or shape is None:
            raise UsageError(f"{flag}: expected NAME=D0,D1,... (integers), got {item!r}")
        out[name] = ShapeInfo(shape)
    return out


def _print_eval_shape(result: EvalShapeResult, operation: str) -> None:
    def text(spec: ShapeInfo) -> str:
        return f"{list(spec.shape)} {spec.dtype}"

    outputs = result.output if isinstance(result.output, list) else [result.output]
    for i, spec in enumerate(outputs):
        print(f"output{'' if len(outputs) == 1 else f' {i}'}: {text(spec)}")
    label = {"linearize": "jvp"}.get(operation, operation)
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


def _cmd_eval_shape(client: JVPClient, args: argparse.Namespace) -> int:
    primals: dict[str, Any] = {}
    for given in (
        _parse_assignments(args.primal, "--primal"),
        _parse_shapes(args.shape, "--shape"),
    ):
        for name, value in (given or {}).items():
            if name in primals:
                raise UsageError(f"eval-shape: {name!r} given twice")
            primals[name] = value
    if not primals:
        raise UsageError("eval-shape: give at least one --shape NAME=D0,D1 or --primal")
    tangents = _parse_assignments(args.tangent, "--tangent") or {}
    tangents.update(_parse_shapes(args.tangent_shape, "--tangent-shape") or {})
    result = client.eval_shape(
        args.operation,
        expression=args.expression,
        model=args.model,
        primals=primals,
        tangents=tangents or None,
        parameter_tangents=_parse_assignments(args.parameter_tangent, "--parameter-tangent"),
        wrt=args.wrt,
        reduction=args.reduction,
        tangent_batch=args.tangent_batch,
        dtype=args.dtype,
        device=args.device,
    )
    _print_eval_shape(result, args.operation)
    return 0


def _cmd_models(client: JVPClient, args: argparse.Namespace) -> int:
    if args.name:
        info = client.model(args.name)
        print(f"{info.name} ({info.source}): {info.description}")
        print(f"  outputs: {info.outputs}")
        for title, specs in (("inputs", info.inputs), ("parameters", info.parameters)):
            print(f"  {title}:")
            for spec in specs:
                dtype = f" {spec.dtype}" if spec.dtype else ""
                print(f"    {spec.name} {spec.shape}{dtype}")
        if info.buffers:
            print("  buffers:")
            for buf in info.buffers:
                print(f"    {buf.name} {buf.shape}")
        return 0
    models = client.models()
    if not models:
        print("no models")
    for info in models:
        inputs = ", ".join(f"{s.name}{s.shape}" for s in info.inputs)
        print(
            f"{info.name}\t{info.source}\tinputs: {inputs}\toutputs: {info.outputs}"
            f"\t{info.description}"
        )
    return 0


def _cmd_health(client: JVPClient, args: argparse.Namespace) -> int:
    status = client.health()
    print(f"live: {'yes' if status.live else 'no'}, ready: {'yes' if status.ready else 'no'}")
    return 0 if status.ready else 1


def _cmd_jobs_submit(client: JVPClient, args: argparse.Namespace) -> int:
    tasks = _read_tasks(args.tasks)
    job = client.submit_job(
        tasks,
        expression=args.expression,
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        engine=args.engine,
        fallback=args.fallback,
        idempotency_key=args.idempotency_key,
    )
    print(job.id)
    if args.wait:
        info = job.wait(progress=not args.no_progress, poll_interval_s=args.poll_interval)
        _print_job(info)
    return 0


def _cmd_jobs_status(client: JVPClient, args: argparse.Namespace) -> int:
    _print_job(client.get_job(args.id).info)
    return 0


def _cmd_jobs_wait(client: JVPClient, args: argparse.Namespace) -> int:
    job = client.get_job(args.id)
    info = job.wait(
        progress=not args.no_progress, poll_interval_s=args.poll_interval, timeout_s=args.timeout_s
    )
    _print_job(info)
    return 0


def _cmd_jobs_results(client: JVPClient, args: argparse.Namespace) -> int:
    job = client.get_job(args.id)
    arrays: dict[str, np.ndarray] = {}
    count = failed = 0
    for result in job.results(page_size=args.page_size):
        count += 1
        if result.error is not None:
            failed += 1
            err = result.error
            print(f"task {result.index}: {err.type or 'error'}: {err.message}", file=sys.stderr)
            continue
        arrays.update(_arrays(f"task{result.index}_output", result.output))
        arrays.update(_arrays(f"task{result.index}_jvp", result.jvp))
        if not args.out and result.output is not None and result.jvp is not None:
            print(f"task {result.index}: output {_describe(result.output)}")
            print(f"{' ' * len(f'task {result.index}: ')}jvp    {_describe(result.jvp)}")
    print(f"{count} results, {failed} failed (job {job.id}: {job.info.status})")
    if args.out:
        np.savez(args.out, **arrays)  # type: ignore[arg-type]
        print(f"wrote {args.out} ({len(arrays)} arrays)")
    return 1 if failed else 0


def _cmd_jobs_cancel(client: JVPClient, args: argparse.Namespace) -> int:
    job = client.get_job(args.id)
    _print_job(job.cancel())
    return 0


# -- parser -------------------------------------------------------------------------------


def _add_connection_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # On subcommands the default is SUPPRESS so `jvp --base-url U call` is not overwritten.
    default = argparse.SUPPRESS if suppress else None
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--base-url",
        default=default,
        help="service URL (default: $JVP_BASE_URL or http://127.0.0.1:8000)",
    )
    group.add_argument("--api-key", default=default, help="API key (default: $JVP_API_KEY)")
    group.add_argument(
        "--timeout",
        type=float,
        default=default,
        metavar="S",
        help="seconds per request attempt (default: 60)",
    )
    group.add_argument(
        "--max-retries",
        type=int,
        default=default,
        metavar="N",
        help="retries after connection errors, 408, 429 and 5xx (default: 2)",
    )


def _add_target_options(
    parser: argparse.ArgumentParser, *, required: bool, jvp_options: bool = True
) -> None:
    target = parser.add_mutually_exclusive_group(required=required)
    target.add_argument("--expression", "-e", help='an expression, e.g. "x**2 + y**2"')
    target.add_argument("--model", "-m", help="a registered model's name (see `jvp models`)")
    parser.add_argument("--dtype", help="float16 | bfloat16 | float32 | float64")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    if jvp_options:
        parser.add_argument("--engine", choices=["dual", "functional"])
        parser.add_argument("--fallback", choices=["auto", "none"])


def _add_tensor_options(parser: argparse.ArgumentParser, *, tangents: bool) -> None:
    parser.add_argument(
        "--primal",
        "-p",
        action="append",
        metavar="NAME=FILE",
        help="an input's value (.npy file or JSON); repeat per input",
    )
    if not tangents:
        return
    parser.add_argument(
        "--tangent",
        "-t",
        action="append",
        metavar="NAME=FILE",
        help="an input's tangent; inputs left out get zero",
    )
    parser.add_argument(
        "--parameter-tangent",
        action="append",
        metavar="NAME=FILE",
        help="a model parameter's tangent",
    )
    parser.add_argument(
        "--tangent-batch",
        action="store_true",
        help="every tangent has a leading dimension K (K directions in one call)",
    )


def _add_poll_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between status polls (default: 1)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jvp", description="Client of the JVP (Jacobian-vector product) service."
    )
    parser.add_argument("--version", action="version", version=f"jvp-client {__version__}")
    _add_connection_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
        command: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
        _add_connection_options(command, suppress=True)
        return command

    call = add(commands, "call", "compute one JVP (POST /jvp)")
    _add_target_options(call, required=True)
    _add_tensor_options(call, tangents=True)
    call.add_argument(
        "--check",
        action="store_true",
        help="compare with float64 central finite differences; exit 1 when it does not pass",
    )
    call.add_argument(
        "--out",
        "-o",
        metavar="FILE.npz",
        help="write output and jvp (output_0, jvp_0, ... for several outputs)",
    )
    call.set_defaults(handler=_cmd_call)

    jacobian = add(commands, "jacobian", "compute a full Jacobian (POST /jacobian)")
    _add_target_options(jacobian, required=True, jvp_options=False)
    _add_tensor_options(jacobian, tangents=False)
    jacobian.add_argument(
        "--wrt",
        action="append",
        metavar="NAME",
        help="an input or parameter to differentiate by; repeat (default: all inputs)",
    )
    jacobian.add_argument(
        "--out",
        "-o",
        metavar="FILE.npz",
        help="write output and jacobian_NAME (output_I, jacobian_I_NAME for several outputs)",
    )
    jacobian.set_defaults(handler=_cmd_jacobian)

    vjp = add(commands, "vjp", "compute a vector-Jacobian product Jᵀ·u (POST /vjp)")
    _add_target_options(vjp, required=True, jvp_options=False)
    _add_tensor_options(vjp, tangents=False)
    vjp.add_argument(
        "--cotangent",
        "-u",
        action="append",
        metavar="FILE",
        help="u, shaped like the output (.npy or JSON); repeat per output, 'null' for none",
    )
    vjp.add_argument(
        "--wrt", action="append", metavar="NAME", help="differentiate by; repeat (default: all)"
    )
    vjp.add_argument("--cotangent-batch", action="store_true", help="cotangents have a leading K")
    vjp.add_argument(
        "--check", action="store_true", help="check it; exit 1 when the check does not pass"
    )
    vjp.add_argument("--out", "-o", metavar="FILE.npz", help="write output and vjp_NAME")
    vjp.set_defaults(handler=_cmd_vjp)

    hvp = add(commands, "hvp", "compute Hessian-vector products of a scalar (POST /hvp)")
    _add_target_options(hvp, required=True, jvp_options=False)
    _add_tensor_options(hvp, tangents=True)
    hvp.add_argument(
        "--reduction",
        choices=["sum", "mean", "none"],
        default="none",
        help="how the output becomes a scalar (default: none, it is one)",
    )
    hvp.add_argument(
        "--output-index", type=int, default=0, metavar="I", help="which output (models)"
    )
    hvp.add_argument("--out", "-o", metavar="FILE.npz", help="write output and hvp_NAME")
    hvp.set_defaults(handler=_cmd_hvp)

    shapes = add(
        commands,
        "eval-shape",
        "the shapes and estimated cost of an operation, computing nothing (POST /eval_shape)",
    )
    shapes.add_argument(
        "--operation",
        choices=["jvp", "jacobian", "hvp", "linearize"],
        default="jvp",
        help="whose shapes (default: jvp)",
    )
    _add_target_options(shapes, required=True, jvp_options=False)
    _add_tensor_options(shapes, tangents=True)
    shapes.add_argument(
        "--shape",
        "-s",
        action="append",
        metavar="NAME=D0,D1",
        help="an input by its shape alone (no data); repeat per input",
    )
    shapes.add_argument(
        "--tangent-shape", action="append", metavar="NAME=D0,D1", help="a tangent's shape"
    )
    shapes.add_argument("--wrt", action="append", metavar="NAME", help="jacobian, linearize")
    shapes.add_argument("--reduction", choices=["sum", "mean", "none"], help="hvp")
    shapes.set_defaults(handler=_cmd_eval_shape)

    models = add(commands, "models", "list models, or describe one")
    models.add_argument("name", nargs="?", help="a model's name")
    models.set_defaults(handler=_cmd_models)

    health = add(commands, "health", "check /healthz and /readyz (exit 1 when not ready)")
    health.set_defaults(handler=_cmd_health)

    jobs_parser = commands.add_parser("jobs", help="batch jobs", description="batch jobs")
    jobs = jobs_parser.add_subparsers(dest="jobs_command", required=True, metavar="JOBS_COMMAND")

    submit = add(jobs, "submit", "submit a JSON Lines file of tasks (POST /jobs); prints the id")
    submit.add_argument("tasks", help="tasks file, one JSON task a line ('-' for stdin)")
    _add_target_options(submit, required=False)
    submit.add_argument("--idempotency-key", help="default: a new random key")
    submit.add_argument("--wait", action="store_true", help="wait for the job to finish")
    _add_poll_options(submit)
    submit.set_defaults(handler=_cmd_jobs_submit)

    status = add(jobs, "status", "show a job's state")
    status.add_argument("id")
    status.set_defaults(handler=_cmd_jobs_status)

    wait = add(jobs, "wait", "wait for a job, with a progress bar")
    wait.add_argument("id")
    _add_poll_options(wait)
    wait.add_argument("--timeout-s", type=float, metavar="S", help="give up after S seconds")
    wait.set_defaults(handler=_cmd_jobs_wait)

    results = add(jobs, "results", "fetch a job's results (exit 1 if any task failed)")
    results.add_argument("id")
    results.add_argument(
        "--out", "-o", metavar="FILE.npz", help="write task<i>_output and task<i>_jvp arrays"
    )
    results.add_argument("--page-size", type=int, default=100, metavar="N")
    results.set_defaults(handler=_cmd_jobs_results)

    cancel = add(jobs, "cancel", "cancel a job (tasks not yet started never run)")
    cancel.add_argument("id")
    cancel.set_defaults(handler=_cmd_jobs_cancel)
    return parser


def _error_text(exc: JVPError) -> str:
    if isinstance(exc, APIStatusError):
        return str(exc)
    cause = exc.__cause__
    return f"{exc.message}" + (f" ({cause})" if cause and str(cause) not in exc.message else "")


def main(argv: Sequence[str] | None = None, *, http_client: httpx.Client | None = None) -> int:
    """Run the command line; returns the exit status. ``http_client`` is for tests."""
    parser = build_parser()
    args = parser.parse_args(argv)
    options: Mapping[str, Any] = {
        "base_url": args.base_url,
        "api_key": args.api_key,
        "timeout": NOT_GIVEN if args.timeout is None else args.timeout,
        "http_client": http_client,
    }
    try:
        with JVPClient(
            **options, **({} if args.max_retries is None else {"max_retries": args.max_retries})
        ) as client:
            code: int = args.handler(client, args)
            return code
    except JVPError as exc:
        print(f"jvp: error: {_error_text(exc)}", file=sys.stderr)
        return 1
    except (UsageError, TypeError, ValueError) as exc:
        print(f"jvp: error: {exc}", file=sys.stderr)
        return 2
    except TimeoutError as exc:
        print(f"jvp: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
