"""The ``jvp`` command line.

    jvp call --expression "x**2 + y**2" --primal x=x.npy --primal y=y.npy \\
             --tangent x=v.npy --out result.npz
    jvp call --model linear --primal x=x.npy --parameter-tangent weight=dw.npy
    jvp call -e "sin(x)" -p x=x.npy -t x=V.npy --tangent-batch --check
    jvp jacobian --expression "sin(x) * y" --primal x=x.npy --primal y=y.npy \\
                 [--wrt x] --out jac.npz
    jvp hvp --expression "sum(x**3)" --primal x=x.npy --tangent x=v.npy --out hvp.npz
    jvp vjp --expression "sin(x) * y" --primal x=x.npy --primal y=y.npy \\
            --cotangent u.npy [--wrt x] [--cotangent-batch] [--check] --out vjp.npz
    jvp solve -e "u**3 - a" -p u=u0.npy -p a=a.npy --unknown u [--method linear --rhs b.npy]
              [--tol 1e-10] [--krylov bicgstab] --out solution.npz
    jvp eval-shape [--operation jacobian] -e "sin(x) * y" --shape x=3,4 --shape y=4
    jvp eval-shape --operation vjp -e "sin(x) * y" -s x=3,4 -s y=4 --cotangent-shape 3,4
    jvp eval-shape --operation solve -e "u**3 - a" -s u=100 -s a=100 --unknown u \\
                   [--method linear --rhs-shape 100] [--max-iterations 20] [--max-krylov 50]
    jvp models [NAME]
    jvp health
    jvp jobs submit tasks.jsonl [--expression ... | --model ...] [--wait]
    jvp jobs status ID
    jvp jobs wait ID
    jvp jobs results ID --out results.npz [--stack]
    jvp jobs list [--status running] [--limit 20]
    jvp jobs cancel ID

``--base-url`` and ``--api-key`` default to ``$JVP_BASE_URL`` and ``$JVP_API_KEY``.
A tensor argument is ``NAME=FILE.npy`` or ``NAME=JSON`` (a number or a nested list,
which takes the computation dtype). In a tasks file (JSON Lines, one task a line:
``{"primals": {...}, "tangents": {...}}``), a tensor is a JSON tensor of API.md or
a string naming a ``.npy`` file (relative to the tasks file).

Exit status: 0 on success, 1 when the service answered an error (its message is
printed), could not be reached, a job task failed, ``call --check`` (``vjp
--check``) did not pass or ``solve`` did not converge; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from . import _cli_commands as commands_
from ._base import NOT_GIVEN
from ._cli_io import UsageError
from ._cli_solve import add_solve_command, add_solve_shape_options
from ._client import JVPClient
from ._exceptions import APIStatusError, AuthenticationError, JVPError, PermissionDeniedError
from ._version import __version__

__all__ = ["main"]


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


def _add(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    command: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    _add_connection_options(command, suppress=True)
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jvp", description="Client of the JVP (Jacobian-vector product) service."
    )
    parser.add_argument("--version", action="version", version=f"jvp-client {__version__}")
    _add_connection_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_derivative_commands(commands)
    _add_vjp_command(commands)
    add_solve_command(commands, _add, _add_target_options, _add_tensor_options)
    _add_eval_shape_command(commands)

    models = _add(commands, "models", "list models, or describe one")
    models.add_argument("name", nargs="?", help="a model's name")
    models.set_defaults(handler=commands_._cmd_models)

    health = _add(commands, "health", "check /healthz and /readyz (exit 1 when not ready)")
    health.set_defaults(handler=commands_._cmd_health)

    jobs_parser = commands.add_parser("jobs", help="batch jobs", description="batch jobs")
    jobs = jobs_parser.add_subparsers(dest="jobs_command", required=True, metavar="JOBS_COMMAND")
    _add_job_commands(jobs)
    return parser


# The commands that compute: name -> (help, whether it takes tangents, what --out writes).
_COMPUTING = {
    "call": (
        "compute one JVP (POST /jvp)",
        True,
        "write output and jvp (output_0, jvp_0, ... for several outputs)",
    ),
    "jacobian": (
        "compute a full Jacobian (POST /jacobian)",
        False,
        "write output and jacobian_NAME (output_I, jacobian_I_NAME for several outputs)",
    ),
    "hvp": (
        "compute Hessian-vector products of a scalar (POST /hvp)",
        True,
        "write output and hvp_NAME",
    ),
    "vjp": (
        "compute a vector-Jacobian product Jᵀ·u (POST /vjp)",
        False,
        "write output and vjp_NAME",
    ),
}


def _add_computing(commands: Any, name: str) -> argparse.ArgumentParser:
    """A command of `_COMPUTING`: the target and tensor options, ``--out`` and the handler
    ``_cmd_<name>``."""
    help, tangents, out = _COMPUTING[name]
    command = _add(commands, name, help)
    _add_target_options(command, required=True, jvp_options=name == "call")
    _add_tensor_options(command, tangents=tangents)
    command.add_argument("--out", "-o", metavar="FILE.npz", help=out)
    command.set_defaults(handler=getattr(commands_, f"_cmd_{name}"))
    return command


def _add_derivative_commands(commands: Any) -> None:
    call = _add_computing(commands, "call")
    call.add_argument(
        "--check",
        action="store_true",
        help="compare with float64 central finite differences; exit 1 when it does not pass",
    )

    jacobian = _add_computing(commands, "jacobian")
    jacobian.add_argument(
        "--wrt",
        action="append",
        metavar="NAME",
        help="an input or parameter to differentiate by; repeat (default: all inputs)",
    )

    hvp = _add_computing(commands, "hvp")
    hvp.add_argument(
        "--reduction",
        choices=["sum", "mean", "none"],
        default="none",
        help="how the output becomes a scalar (default: none, it is one)",
    )
    hvp.add_argument(
        "--output-index", type=int, default=0, metavar="I", help="which output (models)"
    )


def _add_vjp_command(commands: Any) -> None:
    vjp = _add_computing(commands, "vjp")
    _add_cotangent_options(vjp)
    vjp.add_argument(
        "--wrt", action="append", metavar="NAME", help="differentiate by; repeat (default: all)"
    )
    vjp.add_argument(
        "--check", action="store_true", help="check it; exit 1 when the check does not pass"
    )


def _add_cotangent_options(parser: argparse.ArgumentParser, *, shapes: bool = False) -> None:
    """The cotangents u of `jvp vjp` and `jvp eval-shape --operation vjp`."""
    parser.add_argument(
        "--cotangent",
        "-u",
        action="append",
        metavar="FILE",
        help="u, shaped like the output (.npy or JSON); repeat per output, 'null' for none",
    )
    if shapes:
        parser.add_argument(
            "--cotangent-shape",
            action="append",
            metavar="D0,D1",
            help="a cotangent by its shape alone (vjp); repeat per output, 'null' for none",
        )
    parser.add_argument(
        "--cotangent-batch", action="store_true", help="cotangents have a leading K"
    )


def _add_eval_shape_command(commands: Any) -> None:
    shapes = _add(
        commands,
        "eval-shape",
        "the shapes and estimated cost of an operation, computing nothing (POST /eval_shape)",
    )
    shapes.add_argument(
        "--operation",
        choices=["jvp", "vjp", "jacobian", "hvp", "linearize", "solve"],
        default="jvp",
        help="whose shapes (default: jvp; solve: the whole solve at its caps)",
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
    _add_cotangent_options(shapes, shapes=True)
    shapes.add_argument("--wrt", action="append", metavar="NAME", help="vjp, jacobian, linearize")
    shapes.add_argument("--reduction", choices=["sum", "mean", "none"], help="hvp")
    shapes.add_argument("--output-index", type=int, metavar="I", help="hvp: which output")
    shapes.add_argument(
        "--transpose",
        action="store_true",
        help="linearize: a session that also answers vjp (keeps what the reverse pass needs)",
    )
    add_solve_shape_options(shapes)
    shapes.set_defaults(handler=commands_._cmd_eval_shape)


def _add_job_commands(jobs: Any) -> None:
    submit = _add(jobs, "submit", "submit a JSON Lines file of tasks (POST /jobs); prints the id")
    submit.add_argument("tasks", help="tasks file, one JSON task a line ('-' for stdin)")
    _add_target_options(submit, required=False)
    submit.add_argument("--idempotency-key", help="default: a new random key")
    submit.add_argument("--wait", action="store_true", help="wait for the job to finish")
    _add_poll_options(submit)
    submit.set_defaults(handler=commands_._cmd_jobs_submit)

    listing = _add(jobs, "list", "list jobs, newest first (GET /jobs, page after page)")
    listing.add_argument(
        "--status", choices=["queued", "running", "completed", "cancelled"], help="only these"
    )
    listing.add_argument(
        "--limit", type=int, default=20, metavar="N", help="at most N jobs (default: 20)"
    )
    listing.set_defaults(handler=commands_._cmd_jobs_list)

    for name, help in (
        ("status", "show a job's state"),
        ("cancel", "cancel a job (tasks not yet started never run)"),
    ):
        command = _add(jobs, name, help)
        command.add_argument("id")
        command.set_defaults(handler=getattr(commands_, f"_cmd_jobs_{name}"))

    wait = _add(jobs, "wait", "wait for a job, with a progress bar")
    wait.add_argument("id")
    _add_poll_options(wait)
    wait.add_argument("--timeout-s", type=float, metavar="S", help="give up after S seconds")
    wait.set_defaults(handler=commands_._cmd_jobs_wait)

    results = _add(jobs, "results", "fetch a job's results (exit 1 if any task failed)")
    results.add_argument("id")
    results.add_argument(
        "--out",
        "-o",
        metavar="FILE.npz",
        help="write task<i>_output and task<i>_jvp arrays (with --stack: output, jvp, index)",
    )
    results.add_argument(
        "--stack",
        action="store_true",
        help="stack the tasks: output and jvp with a leading task dimension, index the task "
        "of each row (failed tasks left out, and listed)",
    )
    results.add_argument("--page-size", type=int, default=100, metavar="N")
    results.set_defaults(handler=commands_._cmd_jobs_results)


def _error_text(exc: JVPError, *, api_key: str | None) -> str:
    """The message of an error, in the terms of the command line."""
    if isinstance(exc, (AuthenticationError, PermissionDeniedError)):
        return f"{exc.status_code} {exc.type or 'error'}: {_key_hint(exc, api_key)}"
    if isinstance(exc, APIStatusError):
        return str(exc)
    cause = exc.__cause__
    return f"{exc.message}" + (f" ({cause})" if cause and str(cause) not in exc.message else "")


def _key_hint(exc: APIStatusError, api_key: str | None) -> str:
    """What to do about a 401/403, in flags and variables rather than HTTP headers."""
    admin = "admin" in exc.message.lower()
    if isinstance(exc, PermissionDeniedError):
        return (
            "this command needs an admin key; the key given is an inference key: "
            "set JVP_API_KEY or pass --api-key with an admin key"
        )
    if api_key:
        return "the API key was refused: check JVP_API_KEY or --api-key"
    needs = "this command needs an admin key" if admin else "the service needs an API key"
    return f"{needs}: set JVP_API_KEY or pass --api-key"


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
        key = args.api_key or os.environ.get("JVP_API_KEY") or None
        print(f"jvp: error: {_error_text(exc, api_key=key)}", file=sys.stderr)
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
