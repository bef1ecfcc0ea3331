"""What POST /solve does between the route and the engine: the point checked as /jvp
checks it (`JVPService.prepare`), the unknowns and ``rhs`` checked against the inputs
and the output shapes of the abstract evaluation, the cost bounded, and the whole solve
queued as one `app.engine.solve.SolveOperation` (NOTE [the solve is one work item]).

# NOTE [the cost of a solve]
A solve's work is not known before it runs, only bounded: at most ``max_iterations``
iterations, each at most ``max_krylov`` products of J (plus GMRES's restart residuals),
the line search's evaluations of f and, for least squares, as many products of Jᵀ.
So the estimate is one J·v's abstract evaluation (NOTE [abstract evaluation]) times
those caps (`products`), an evaluation of f and a Jᵀ·u each counted as a J·v (a JVP's
estimate covers a forward pass and its tangent, a VJP's backward pass costs about as
much), and its peak is one product's plus the Krylov vectors (GMRES keeps ``restart +
1`` of them). Past JVP_MAX_REQUEST_FLOPS or JVP_MAX_REQUEST_BYTES it is a 413, and where
it cannot fit in the request's deadline a 504, before anything runs, each saying that a
batch job (``"operation": "solve"``) takes it: a job's task has no request deadline and
is bounded by one product, not the caps. /eval_shape answers the same estimate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from typing import Any

import torch

from app.engine.abstract import Bounds, Estimate, check_deadline
from app.engine.devices import DTYPE_NAMES
from app.engine.errors import DeadlineExceeded, InvalidRequest, TooLarge
from app.engine.solve import (
    LINE_SEARCH_STEPS,
    SolveDeadlineExceeded,
    SolveOperation,
    SolveOptions,
    check_square,
)
from app.engine.task import JVPTask
from app.schemas import JVPOptions, JVPRequest
from app.schemas_solve import SolveRequest
from app.services.jvp import JVPService
from app.wire.codec import decode_tensor, encode_tensor

BATCH_HINT = (
    'Submit it as a batch job (POST /jobs with "operation": "solve"), which has no '
    "request deadline, or lower options.max_iterations / options.max_krylov"
)


def products(options: SolveOptions) -> int:
    """The most J·v-sized products the solve may compute (NOTE [the cost of a solve])."""
    k = options.max_krylov
    restarts = math.ceil(k / options.restart) if options.krylov == "gmres" else 0
    if options.method == "linear":
        return k + restarts + 1
    if options.method == "least_squares":
        return options.max_iterations * (2 * k + 3) + 1
    return options.max_iterations * (k + restarts + LINE_SEARCH_STEPS + 1) + 1


def _options(body: SolveRequest) -> SolveOptions:
    o = body.options
    return SolveOptions(
        method=body.method,
        tol=o.tol,
        max_iterations=o.max_iterations,
        krylov=o.krylov,
        krylov_tol=None if o.krylov_tol == "auto" else float(o.krylov_tol),
        max_krylov=o.max_krylov,
        restart=o.restart,
        line_search=o.line_search,
    )


class SolveService:
    """Solves on the checks of `JVPService`."""

    def __init__(self, service: JVPService) -> None:
        self.service = service
        self.settings = service.settings

    def _unknowns(self, body: SolveRequest, task: JVPTask) -> tuple[int, ...]:
        names = task.target.input_names
        if not body.unknowns:
            raise InvalidRequest(
                f"'unknowns' is empty: name the inputs to solve for, out of {list(names)}",
                param="unknowns",
            )
        for name in body.unknowns:
            if name not in names:
                raise InvalidRequest(
                    f"Unknown input {name!r} in unknowns; the inputs are {list(names)}",
                    param="unknowns",
                )
        if len(set(body.unknowns)) != len(body.unknowns):
            raise InvalidRequest(
                f"'unknowns' names an input twice: {body.unknowns}", param="unknowns"
            )
        return tuple(names.index(n) for n in body.unknowns)

    def _rhs(
        self, body: SolveRequest, task: JVPTask, shapes: list[tuple[int, ...]] | None
    ) -> torch.Tensor | None:
        if body.method != "linear":
            if body.rhs is not None:
                raise InvalidRequest(
                    f"'rhs' applies to method 'linear' only, not {body.method!r}", param="rhs"
                )
            return None
        if body.rhs is None:
            raise InvalidRequest(
                "Method 'linear' needs 'rhs' (J δ = rhs), shaped like f's output", param="rhs"
            )
        several = not task.target.single_output or (shapes is not None and len(shapes) > 1)
        given = body.rhs if several else [body.rhs]
        if several and not isinstance(given, list):
            raise InvalidRequest(
                "This function has several outputs: 'rhs' is a list with one tensor per output",
                param="rhs",
            )
        tensors = [
            v
            if isinstance(v, torch.Tensor)
            else decode_tensor(
                v,
                param=f"rhs.{i}" if several else "rhs",
                default_dtype=task.dtype,
                limits=self.service.limits,
            )
            for i, v in enumerate(given)
        ]
        if shapes is not None:
            if len(tensors) != len(shapes):
                raise InvalidRequest(
                    f"Expected {len(shapes)} rhs tensors (one per output), got {len(tensors)}",
                    param="rhs",
                )
            for i, (t, s) in enumerate(zip(tensors, shapes, strict=True)):
                if tuple(t.shape) != tuple(s):
                    raise InvalidRequest(
                        f"Expected rhs{f' {i}' if several else ''} of shape {list(s)} (f's "
                        f"output), got {list(t.shape)}",
                        param=f"rhs.{i}" if several else "rhs",
                    )
        # The rhs is one of the request's tensors: JVP_MAX_REQUEST_ELEMENTS counts it, as
        # /vjp counts its cotangents.
        total = sum(x.numel() for x in task.inputs) + sum(t.numel() for t in tensors)
        self.service.check_elements(total, "rhs")
        return torch.cat([t.reshape(-1) for t in tensors])

    def prepare(
        self, body: SolveRequest, *, job: bool = False, strict: bool = False
    ) -> tuple[JVPTask, SolveOperation]:
        """The queued task of a /solve request (every 4xx before it is queued); ``job``: a
        batch job's task, bounded by one product, not the caps; ``strict``: a target that
        cannot run on meta tensors is a 422 (/eval_shape), not a solve left unbounded."""
        point = JVPRequest(
            expression=body.expression,
            model=body.model,
            primals=body.primals,
            options=JVPOptions(dtype=body.options.dtype or "float64", device=body.options.device),
        )
        task = self.service.prepare(point, bound=False)
        indices = self._unknowns(body, task)
        forward = self.service.forward_estimate(task)
        shapes = [tuple(s.shape) for s in forward.outputs] if forward is not None else None
        n = sum(task.inputs[i].numel() for i in indices)
        if shapes is not None:
            check_square(sum(math.prod(s) for s in shapes), n, body.method)
        rhs = self._rhs(body, task, shapes)
        op = SolveOperation(
            unknown_indices=indices,
            names=tuple(body.unknowns),
            options=_options(body),
            rhs=rhs,
            source=task.target,
        )
        task.operation = op
        per = self.service.bound(task, strict=strict)
        if isinstance(per, Estimate):
            bounds = self.service.bounds.get(task.device)
            task.estimate = self.total(per, op.options, n, task.dtype, bounds, bounded=not job)
        return task, op

    def total(
        self,
        per: Estimate,
        options: SolveOptions,
        n: int,
        dtype: torch.dtype,
        bounds: Bounds | None,
        *,
        bounded: bool,
    ) -> Estimate:
        """One product's estimate times the caps (NOTE [the cost of a solve]); 413 past a
        limit when ``bounded``."""
        count = products(options)
        vectors = (options.restart + 1 if options.krylov == "gmres" else 0) + 8
        whole = dataclasses.replace(
            per,
            flops=per.flops * count,
            matmul_flops=per.matmul_flops * count,
            elements=per.elements * count,
            peak_bytes=per.peak_bytes * (2 if options.method == "least_squares" else 1)
            + vectors * n * dtype.itemsize,
        )
        if not bounded or bounds is None:
            return whole
        if whole.flops > bounds.max_flops:
            raise TooLarge(
                f"The solve may take up to about {whole.flops} floating-point operations "
                f"({count} products of J at most, {per.flops} each); the limit is "
                f"{bounds.max_flops} per request (JVP_MAX_REQUEST_FLOPS). " + BATCH_HINT,
                param="options.max_iterations",
            )
        if whole.peak_bytes > bounds.max_bytes:
            raise TooLarge(
                f"The solve would need about {whole.peak_bytes} bytes at its peak; the limit "
                f"is {bounds.max_bytes} bytes per request (JVP_MAX_REQUEST_BYTES). " + BATCH_HINT,
                param="primals",
            )
        return whole

    def schedule(self, task: JVPTask, arrived: float | None) -> None:
        """`JVPService.schedule` on the whole solve's estimate: a 504 at once (saying a
        batch job takes it) when its caps cannot fit in the deadline; the solve checks
        the deadline before each product (NOTE [a solve's deadline] in app/engine/solve.py)."""
        start = time.monotonic() if arrived is None else arrived
        task.deadline = start + self.settings.request_timeout_s
        if isinstance(task.operation, SolveOperation):  # checked per product, not per operator
            task.operation.deadline = task.deadline  # NOTE [a solve's deadline]
        task.watch = False
        if task.estimate is None:
            return
        try:
            task.seconds = check_deadline(
                task.estimate, self.service.engine.rates.get(task.device), task.deadline
            )
        except DeadlineExceeded as e:
            raise DeadlineExceeded(
                e.message.replace("The computation", "The solve, at its iteration caps,")
                + ". "
                + BATCH_HINT,
                param="options.max_iterations",
            ) from None

    async def solve(self, body: SolveRequest, arrived: float | None = None) -> dict[str, Any]:
        started = time.monotonic()
        task, op = await asyncio.to_thread(self.prepare, body)
        self.schedule(task, arrived)
        timeout_s = self.settings.request_timeout_s
        try:
            result = await self.service.engine.run(task, timeout_s=timeout_s)
        except DeadlineExceeded as e:
            # The await gives up at the deadline, as the solve does at its next product
            # (NOTE [a solve's deadline]): the first usually wins, so its 504 says what the
            # solve's would have said.
            if isinstance(e, SolveDeadlineExceeded):
                raise
            raise DeadlineExceeded(
                f"The solve did not finish within the request's deadline of {timeout_s:g} s "
                "(JVP_REQUEST_TIMEOUT_S) and was stopped. " + BATCH_HINT,
                param=e.param,
            ) from None
        encoding = body.options.encoding

        def render() -> dict[str, Any]:
            outputs = [encode_tensor(o, encoding=encoding) for o in result.outputs]
            single = task.target.single_output and len(outputs) == 1
            return {
                "solution": {
                    n: encode_tensor(x, encoding=encoding)
                    for n, x in zip(op.names, result.jvps, strict=True)
                },
                "output": outputs[0] if single else outputs,
                **op.report(),
                "dtype": DTYPE_NAMES[task.dtype],
                "device": str(task.device),
            }

        response = await asyncio.to_thread(render)
        response["timing_ms"] = JVPService._timing(result, started)
        return response
