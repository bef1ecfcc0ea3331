"""``jvp solve``: a POST /solve from the command line (its parser and its command).

    jvp solve -e "u**3 - a" -p u=u0.npy -p a=a.npy --unknown u [--method linear --rhs b.npy]
              [--tol 1e-10] [--max-iterations 50] [--krylov gmres] [--no-line-search]
              --out solution.npz

Exit status 0 when the solve converged, 1 when it did not (the reason is printed).

``jvp eval-shape --operation solve`` takes the same ``--unknown``, ``--method``, ``--rhs``
(or ``--rhs-shape``) and the caps the estimate is made at (``--max-iterations``,
``--max-krylov``, ``--krylov``): the solution's shapes and the whole solve's cost at its
caps (NOTE [the cost of a solve] in the service's app/services/solve.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ._cli_io import (
    UsageError,
    _arrays,
    _describe,
    _load_value,
    _named_arrays,
    _parse_assignments,
    _parse_shape,
    _print_facts,
    _write_npz,
)
from ._client import JVPClient


def add_solve_command(
    commands: Any,
    add: Callable[[Any, str, str], argparse.ArgumentParser],
    add_target: Callable[..., None],
    add_tensors: Callable[..., None],
) -> None:
    """The ``solve`` subcommand, with the parser helpers of ``cli.py``."""
    solve = add(commands, "solve", "solve f = 0, J δ = rhs or min ||f||² (POST /solve)")
    add_target(solve, required=True, jvp_options=False)
    add_tensors(solve, tangents=False)
    solve.add_argument(
        "--unknown", "-x", action="append", metavar="NAME", help="an input to solve for; repeat"
    )
    solve.add_argument(
        "--method", choices=["newton_krylov", "linear", "least_squares"], default="newton_krylov"
    )
    solve.add_argument("--rhs", metavar="FILE", help="linear: rhs, shaped like f (.npy or JSON)")
    solve.add_argument("--tol", type=float, help="the tolerance (default 1e-8)")
    solve.add_argument("--max-iterations", type=int, metavar="N")
    solve.add_argument("--krylov", choices=["gmres", "bicgstab", "cg"])
    solve.add_argument("--krylov-tol", type=float, help="fixed forcing term (default: auto)")
    solve.add_argument("--max-krylov", type=int, metavar="N")
    solve.add_argument("--no-line-search", action="store_true", help="take full Newton steps")
    solve.add_argument("--out", "-o", metavar="FILE.npz", help="write solution_NAME and output")
    solve.set_defaults(handler=cmd_solve)


def cmd_solve(client: JVPClient, args: argparse.Namespace) -> int:
    primals = _parse_assignments(args.primal, "--primal")
    if primals is None:
        raise UsageError("solve: give at least one --primal NAME=FILE.npy")
    if not args.unknown:
        raise UsageError("solve: give --unknown NAME (an input to solve for)")
    result = client.solve(
        expression=args.expression,
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        primals=primals,
        unknowns=args.unknown,
        method=args.method,
        rhs=None if args.rhs is None else _load_value(args.rhs),
        tol=args.tol,
        max_iterations=args.max_iterations,
        krylov=args.krylov,
        krylov_tol=args.krylov_tol,
        max_krylov=args.max_krylov,
        line_search=False if args.no_line_search else None,
    )
    state = "converged" if result.converged else "did NOT converge"
    print(
        f"{state} in {result.iterations} iteration(s): ||f|| {result.residual_norm:.3g}, "
        f"{result.jvp_count} JVPs, {result.vjp_count} VJPs"
    )
    if result.reason:
        print(f"reason: {result.reason}")
    for name, value in result.solution.items():
        print(f"solution {name}: {_describe(value)}")
    _print_facts(result.dtype, result.device, result.timing_ms)
    if args.out:
        arrays = {**_named_arrays("solution", result.solution), **_arrays("output", result.output)}
        _write_npz(args.out, arrays)
    return 0 if result.converged else 1


# The eval-shape flags of a solve, by destination (any of them given: --operation solve).
_SHAPE_FLAGS = {
    "unknown": "--unknown",
    "method": "--method",
    "rhs": "--rhs",
    "rhs_shape": "--rhs-shape",
    "max_iterations": "--max-iterations",
    "max_krylov": "--max-krylov",
    "krylov": "--krylov",
}


def add_solve_shape_options(shapes: argparse.ArgumentParser) -> None:
    """The flags of ``jvp eval-shape --operation solve`` (as ``jvp solve``'s, shapes allowed)."""
    group = shapes.add_argument_group("--operation solve")
    group.add_argument(
        "--unknown", "-x", action="append", metavar="NAME", help="an input solved for; repeat"
    )
    group.add_argument("--method", choices=["newton_krylov", "linear", "least_squares"])
    group.add_argument("--rhs", metavar="FILE", help="linear: rhs (.npy or JSON)")
    group.add_argument("--rhs-shape", metavar="D0,D1", help="linear: rhs by its shape alone")
    group.add_argument("--max-iterations", type=int, metavar="N", help="the cap (default 50)")
    group.add_argument("--max-krylov", type=int, metavar="N", help="the cap (default 200)")
    group.add_argument("--krylov", choices=["gmres", "bicgstab", "cg"])


def solve_shape_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The `client.eval_shape` arguments of the solve flags ({} for another operation)."""
    given = [flag for dest, flag in _SHAPE_FLAGS.items() if getattr(args, dest) is not None]
    if args.operation != "solve":
        if given:
            raise UsageError(f"eval-shape: {given[0]} is for --operation solve")
        return {}
    if not args.unknown:
        raise UsageError("eval-shape: --operation solve takes --unknown NAME (solved for)")
    if args.rhs is not None and args.rhs_shape is not None:
        raise UsageError("eval-shape: give --rhs or --rhs-shape, not both")
    rhs = None if args.rhs is None else _load_value(args.rhs)
    if args.rhs_shape is not None:
        rhs = _parse_shape(args.rhs_shape, "--rhs-shape")
    caps = {"max_iterations": args.max_iterations, "max_krylov": args.max_krylov}
    options = {k: v for k, v in {**caps, "krylov": args.krylov}.items() if v is not None}
    return {"unknowns": args.unknown, "method": args.method, "rhs": rhs, "options": options}
