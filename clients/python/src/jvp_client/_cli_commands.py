"""The ``jvp`` command line's commands: one function per command, ``(client, args) -> status``."""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Any

import numpy as np

from ._cli_io import (
    UsageError,
    _arrays,
    _describe,
    _jacobian_arrays,
    _load_value,
    _named_arrays,
    _parse_assignments,
    _parse_shape,
    _parse_shapes,
    _print_eval_shape,
    _print_facts,
    _print_hvp,
    _print_jacobian,
    _print_job,
    _print_result,
    _read_tasks,
    _write_npz,
)
from ._cli_solve import solve_shape_fields
from ._client import JVPClient
from ._jobs import Job
from ._types import JobTaskError


def _primals(args: argparse.Namespace, command: str) -> dict[str, Any]:
    primals = _parse_assignments(args.primal, "--primal")
    if primals is None:
        raise UsageError(f"{command}: give at least one --primal NAME=FILE.npy")
    return primals


def _target(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments every computing command passes on as they are."""
    return {
        "expression": args.expression,
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
    }


def _cmd_call(client: JVPClient, args: argparse.Namespace) -> int:
    primals = _primals(args, "call")
    result = client.jvp(
        **_target(args),
        primals=primals,
        tangents=_parse_assignments(args.tangent, "--tangent"),
        parameter_tangents=_parse_assignments(args.parameter_tangent, "--parameter-tangent"),
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
    primals = _primals(args, "jacobian")
    result = client.jacobian(**_target(args), primals=primals, wrt=args.wrt)
    _print_jacobian(result)
    if args.out:
        _write_npz(args.out, _jacobian_arrays(result))
    return 0


def _cotangents(args: argparse.Namespace, command: str) -> Any:
    """--cotangent (values) or --cotangent-shape (shapes alone), one per output in order
    ('null': none): one cotangent, a tuple for several, None when none was given."""
    values: list[str] = args.cotangent or []
    shapes: list[str] = getattr(args, "cotangent_shape", None) or []
    if values and shapes:
        raise UsageError(f"{command}: give --cotangent or --cotangent-shape, not both")
    if shapes:
        given = [None if s == "null" else _parse_shape(s, "--cotangent-shape") for s in shapes]
    else:
        given = [None if c == "null" else _load_value(c) for c in values]
    if not given:
        return None
    return given[0] if len(given) == 1 else tuple(given)


def _cmd_vjp(client: JVPClient, args: argparse.Namespace) -> int:
    primals = _primals(args, "vjp")
    cotangents = _cotangents(args, "vjp")
    if cotangents is None:
        raise UsageError("vjp: give --cotangent FILE.npy (one per output, in order; 'null': none)")
    result = client.vjp(
        **_target(args),
        primals=primals,
        cotangents=cotangents,
        wrt=args.wrt,
        cotangent_batch=args.cotangent_batch,
        check=args.check,
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
    primals = _primals(args, "hvp")
    tangents = _parse_assignments(args.tangent, "--tangent")
    parameter_tangents = _parse_assignments(args.parameter_tangent, "--parameter-tangent")
    if tangents is None and parameter_tangents is None:
        raise UsageError("hvp: give at least one --tangent NAME=FILE.npy (the direction v)")
    result = client.hvp(
        **_target(args),
        primals=primals,
        tangents=tangents,
        parameter_tangents=parameter_tangents,
        output_index=args.output_index,
        reduction=args.reduction,
        tangent_batch=args.tangent_batch,
    )
    _print_hvp(result)
    if args.out:
        _write_npz(
            args.out, {**_arrays("output", result.output), **_named_arrays("hvp", result.hvp)}
        )
    return 0


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
    cotangents = _cotangents(args, "eval-shape")
    if (cotangents is None) == (args.operation == "vjp"):
        raise UsageError(
            "eval-shape: --operation vjp takes --cotangent or --cotangent-shape (one per "
            "output), and only it does"
        )
    solve = solve_shape_fields(args)  # {} but for --operation solve
    options = {"cotangent_batch": True} if args.cotangent_batch else {}
    if args.transpose:
        options["transpose"] = True
    options.update(solve.pop("options", {}))
    result = client.eval_shape(
        args.operation,
        **_target(args),
        primals=primals,
        tangents=tangents or None,
        parameter_tangents=_parse_assignments(args.parameter_tangent, "--parameter-tangent"),
        wrt=args.wrt,
        output_index=args.output_index,
        reduction=args.reduction,
        tangent_batch=args.tangent_batch,
        cotangents=cotangents,
        options=options or None,
        **solve,
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
        **_target(args),
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
    if args.stack:
        return _jobs_results_stacked(job, args)
    arrays: dict[str, np.ndarray] = {}
    count = failed = 0
    for result in job.results(page_size=args.page_size):
        count += 1
        if result.error is not None:
            failed += 1
            _print_task_error(result.index, result.error)
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


def _print_task_error(index: int, err: JobTaskError) -> None:
    print(f"task {index}: {err.type or 'error'}: {err.message}", file=sys.stderr)


def _jobs_results_stacked(job: Job, args: argparse.Namespace) -> int:
    """``--stack``: ``output`` and ``jvp`` with a leading task dimension, and ``index``."""
    stacked = job.results_array(on_error="skip", page_size=args.page_size)
    for index, err in stacked.errors.items():
        _print_task_error(index, err)
    arrays = {
        **_arrays("output", stacked.output),
        **_arrays("jvp", stacked.jvp),
        "index": stacked.index,
    }
    rows, failed = len(stacked.index), len(stacked.errors)
    print(f"{rows + failed} results, {failed} failed (job {job.id}: {job.info.status})")
    if args.out:
        _write_npz(args.out, arrays)
    else:
        for name, value in arrays.items():
            print(f"{name}: {_describe(value)}")
    return 1 if failed else 0


def _cmd_jobs_list(client: JVPClient, args: argparse.Namespace) -> int:
    jobs = client.iter_jobs(status=args.status, page_size=min(args.limit, 1000))
    shown = 0
    for info in itertools.islice(jobs, args.limit):
        _print_job(info, created=True)
        shown += 1
    if not shown:
        print("no jobs" + (f" with status {args.status}" if args.status else ""))
    return 0


def _cmd_jobs_cancel(client: JVPClient, args: argparse.Namespace) -> int:
    job = client.get_job(args.id)
    _print_job(job.cancel())
    return 0
