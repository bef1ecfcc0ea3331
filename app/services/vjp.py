"""What POST /vjp and POST /linearize/{id}/vjp do between the route and the engine.

A /vjp request is checked by `JVPService.prepare` (names, shapes, dtypes, limits, as for
/jvp) and `DerivativeService._wrt`; its cotangents are decoded here and checked against
the output shapes of the abstract evaluation (NOTE [abstract evaluation]) before it is
queued with an `app.engine.vjp.VJPOperation`; the VJP runs on the device worker.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from app.engine.errors import InvalidRequest, NotFound
from app.engine.linearize import LinearizeStore
from app.engine.target import Target
from app.engine.task import JVPResult, JVPTask
from app.engine.vjp import (
    LinearizedVJPOperation,
    VJPOperation,
    check_cotangent_shapes,
    total_elements,
)
from app.schemas import JVPOptions, JVPRequest
from app.schemas_vjp import LinearizedVJPRequest, VJPRequest
from app.services.derivatives import DerivativeService
from app.services.jvp import JVPService
from app.services.render import encoded, one_or_list, placement
from app.wire.codec import decode_tensor, encode_tensor

OptionalTensors = tuple[torch.Tensor | None, ...]


class VJPService:
    """Vector-Jacobian products, on the checks of `JVPService` and `DerivativeService`
    (``store``: the linearize sessions; None where there are none, as in a job worker)."""

    def __init__(self, service: JVPService, store: LinearizeStore | None = None) -> None:
        self.service = service
        self.store = store
        self.settings = service.settings

    def decode_cotangents(
        self, value: Any, target: Target, dtype: torch.dtype, outputs: int | None
    ) -> OptionalTensors:
        """One tensor (or None) per output. A single-output target takes one tensor (or
        null); any other a list, one entry per output (``outputs`` when known)."""

        def one(v: Any, param: str) -> torch.Tensor | None:
            if v is None:
                return None
            if isinstance(v, torch.Tensor):
                return v  # a meta tensor from /eval_shape
            return decode_tensor(v, param=param, default_dtype=dtype, limits=self.service.limits)

        if target.single_output and (outputs is None or outputs == 1):
            return (one(value, "cotangents"),)
        if not isinstance(value, list):
            raise InvalidRequest(
                "This function has several outputs: 'cotangents' is a list with one tensor "
                f"per output (null for an output without one), got {type(value).__name__}",
                param="cotangents",
            )
        if outputs is not None and len(value) != outputs:
            raise InvalidRequest(
                f"Expected {outputs} cotangents (one per output, null for a zero one), got "
                f"{len(value)}",
                param="cotangents",
            )
        return tuple(one(v, f"cotangents.{i}") for i, v in enumerate(value))

    def prepare(self, body: VJPRequest) -> tuple[JVPTask, tuple[str, ...], VJPOperation]:
        """The queued task of a /vjp request (every 4xx before it is queued)."""
        point = JVPRequest(
            expression=body.expression,
            model=body.model,
            primals=body.primals,
            options=JVPOptions(dtype=body.options.dtype, device=body.options.device),
        )
        task = self.service.prepare(point, bound=False)  # bounded once its operation is set
        task.operation = None
        indices, params, names = DerivativeService._wrt(task.target, body.wrt)
        # The output count first, from the forward pass on meta tensors (cached).
        forward = self.service.forward_estimate(task)
        n_outputs = len(forward.outputs) if forward is not None else None
        cotangents = self.decode_cotangents(body.cotangents, task.target, task.dtype, n_outputs)
        batched = body.options.cotangent_batch
        single = task.target.single_output and len(cotangents) == 1
        if forward is not None:
            check_cotangent_shapes([s.shape for s in forward.outputs], cotangents, batched, single)
        total = sum(x.numel() for x in task.inputs) + total_elements(cotangents)
        self.service.check_elements(total, "cotangents")
        op = VJPOperation(
            input_indices=indices,
            parameter_names=params,
            cotangents=cotangents,
            cotangent_batch=batched,
            check_target=task.target if body.options.check else None,
            source=task.target,
            single_output=single,
            names=names,
        )
        task.operation = op
        self.service.bound(task)
        return task, names, op

    async def vjp(self, body: VJPRequest, arrived: float | None = None) -> dict[str, Any]:
        encoding = body.options.encoding

        def render(
            prepared: tuple[JVPTask, tuple[str, ...], VJPOperation], result: JVPResult
        ) -> dict[str, Any]:
            task, names, op = prepared
            return {
                "output": one_or_list(task, encoded(result.outputs, encoding)),
                "vjp": {
                    n: encode_tensor(g, encoding=encoding)
                    for n, g in zip(names, result.jvps, strict=True)
                },
                **placement(task),
                "method": op.method,
                **op.report(),
            }

        return await self.service.answer(partial(self.prepare, body), render, arrived)

    # POST /linearize/{id}/vjp.

    def _prepare_linearized(
        self, session_id: str, body: LinearizedVJPRequest
    ) -> tuple[JVPTask, tuple[str, ...]]:
        if self.store is None:
            raise NotFound(f"Unknown or expired linearize session {session_id!r}", param="id")
        session = self.store.get(session_id)
        transpose = session.transpose
        if transpose is None:
            raise InvalidRequest(
                f"Linearize session {session_id!r} keeps no reverse pass: make it with "
                '"options": {"transpose": true} to ask it for VJPs',
                param="id",
            )
        target: Target = session.target
        shapes = transpose.output_shapes
        cotangents = self.decode_cotangents(body.cotangents, target, session.dtype, len(shapes))
        batched = body.options.cotangent_batch
        single = target.single_output and len(shapes) == 1
        check_cotangent_shapes(shapes, cotangents, batched, single)
        self.service.check_elements(total_elements(cotangents), "cotangents")
        task = JVPTask(
            target=target,
            inputs=(),
            tangents=tuple(None for _ in target.input_names),
            parameter_tangents={},
            dtype=session.dtype,
            device=session.device,
            engine="functional",
            operation=LinearizedVJPOperation(
                transpose=transpose,
                cotangents=cotangents,
                cotangent_batch=batched,
                single_output=single,
            ),
        )
        return task, session.argument_names

    async def linearized_vjp(self, session_id: str, body: LinearizedVJPRequest) -> dict[str, Any]:
        encoding = body.options.encoding

        def render(prepared: tuple[JVPTask, tuple[str, ...]], result: JVPResult) -> dict[str, Any]:
            names = prepared[1]
            return {
                "vjp": {
                    n: encode_tensor(g, encoding=encoding)
                    for n, g in zip(names, result.jvps, strict=True)
                }
            }

        return await self.service.answer(
            partial(self._prepare_linearized, session_id, body), render
        )

    def eval_shape(self, body: VJPRequest) -> tuple[JVPTask, tuple[str, ...]]:
        """/eval_shape's task for operation "vjp" (the same checks as /vjp)."""
        task, names, _ = self.prepare(body)
        return task, names


# The plain forward pass's evaluation: the output shapes, cached with every other estimate.
