"""What /jacobian, /hvp and /linearize do between the route and the engine.

Each request is decoded and checked by `JVPService.prepare` (the same names,
shapes, dtypes and limits as /jvp), then queued on the device worker with an
operation of `app.engine.operations`; the result is encoded here. A linearize
session is made and applied on the worker of its device only.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from functools import partial
from typing import Any

import torch

from app.engine.errors import InvalidRequest, TooLarge
from app.engine.linearize import LinearizeStore
from app.engine.operations import (
    HVPOperation,
    JacobianOperation,
    LinearizedJVPOperation,
    LinearizeOperation,
    tangent_batch_size,
)
from app.engine.target import Target
from app.engine.task import JVPResult, JVPTask
from app.schemas import (
    HVPRequest,
    JacobianRequest,
    JVPOptions,
    JVPRequest,
    LinearizedJVPRequest,
    LinearizeRequest,
)
from app.services.jvp import JVPService
from app.services.render import encoded, one_or_list, placement
from app.settings import Settings
from app.wire.codec import decode_tensor, encode_tensor

Names = tuple[str, ...]


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat().replace("+00:00", "Z")


class DerivativeService:
    """Jacobians, Hessian-vector products and linearize sessions, on `JVPService`'s checks."""

    def __init__(self, service: JVPService, store: LinearizeStore) -> None:
        self.service = service
        self.store = store
        self.settings = service.settings

    # Shared steps.

    def _prepare(
        self,
        body: JacobianRequest | HVPRequest | LinearizeRequest,
        *,
        tangents: dict[str, Any] | None = None,
        parameter_tangents: dict[str, Any] | None = None,
        tangent_batch: bool = False,
    ) -> JVPTask:
        request = JVPRequest(
            expression=body.expression,
            model=body.model,
            primals=body.primals,
            tangents=tangents or {},
            parameter_tangents=parameter_tangents or {},
            options=JVPOptions(
                dtype=body.options.dtype,
                device=body.options.device,
                encoding=body.options.encoding,
                tangent_batch=tangent_batch,
            ),
        )
        task = self.service.prepare(request, bound=False)  # bounded once its operation is set
        task.operation = None
        return task

    @staticmethod
    def _wrt(
        target: Target, wrt: list[str] | None
    ) -> tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...]]:
        """(input indices, parameter names, all names in argument order) of ``wrt``."""
        names = list(target.input_names) if wrt is None else wrt
        inputs = list(target.input_names)
        parameters = list(target.parameter_shapes)
        if not names:
            raise InvalidRequest(
                f"'wrt' is empty; name at least one of the inputs {inputs}"
                + (f" or parameters {parameters}" if parameters else ""),
                param="wrt",
            )
        seen: set[str] = set()
        indices: list[int] = []
        params: list[str] = []
        for name in names:
            if name in seen:
                raise InvalidRequest(f"'wrt' names {name!r} twice", param="wrt")
            seen.add(name)
            if name in inputs:
                indices.append(inputs.index(name))
            elif name in target.parameter_shapes:
                params.append(name)
            else:
                raise InvalidRequest(
                    f"Unknown name {name!r} in 'wrt'; the inputs are {inputs}"
                    + (f" and the parameters are {parameters}" if parameters else ""),
                    param="wrt",
                )
        ordered = tuple(inputs[i] for i in indices) + tuple(params)
        return tuple(indices), tuple(params), ordered

    # POST /jacobian.

    def _prepare_jacobian(
        self, body: JacobianRequest
    ) -> tuple[JVPTask, tuple[str, ...], JacobianOperation]:
        task = self._prepare(body)
        indices, params, names = self._wrt(task.target, body.wrt)
        sizes = [(task.target.input_names[i], task.inputs[i].numel()) for i in indices]
        sizes += [(p, int(torch.Size(task.target.parameter_shapes[p]).numel())) for p in params]
        columns = sum(n for _, n in sizes)
        limit = self.settings.max_jacobian_elements
        if columns > limit:
            detail = ", ".join(f"{name}: {n}" for name, n in sizes)
            raise TooLarge(
                f"The Jacobian is taken with respect to {columns} elements ({detail}); the "
                f"limit is {limit} (JVP_MAX_JACOBIAN_ELEMENTS). Narrow 'wrt', or use /jvp "
                "with options.tangent_batch for the columns you need",
                param="wrt",
            )
        op = JacobianOperation(indices, params, self.settings.max_request_elements)
        task.operation = op
        self.service.bound(task)
        return task, names, op

    async def jacobian(self, body: JacobianRequest, arrived: float | None = None) -> dict[str, Any]:
        encoding = body.options.encoding

        def render(prepared: tuple[JVPTask, Names, Any], result: JVPResult) -> dict[str, Any]:
            task, names, _ = prepared
            blocks = encoded(result.jvps, encoding)
            n = len(names)
            maps = [
                dict(zip(names, blocks[i * n : (i + 1) * n], strict=True))
                for i in range(len(result.outputs))
            ]
            return {
                "output": one_or_list(task, encoded(result.outputs, encoding)),
                "jacobian": one_or_list(task, maps),
                **placement(task),
            }

        return await self.service.answer(partial(self._prepare_jacobian, body), render, arrived)

    # POST /hvp.

    def _prepare_hvp(self, body: HVPRequest) -> tuple[JVPTask, list[str]]:
        if not body.tangents and not body.parameter_tangents:
            raise InvalidRequest(
                "/hvp needs at least one tangent: H·v is taken with respect to the inputs "
                "(and parameters) that have one",
                param="tangents",
            )
        task = self._prepare(
            body,
            tangents=body.tangents,
            parameter_tangents=body.parameter_tangents,
            tangent_batch=body.options.tangent_batch,
        )
        task.operation = HVPOperation(
            output_index=body.output_index,
            reduction=body.reduction,
            tangent_batch=body.options.tangent_batch,
        )
        self.service.bound(task)
        names = [
            n for n, t in zip(task.target.input_names, task.tangents, strict=True) if t is not None
        ]
        return task, names + list(task.parameter_tangents)

    async def hvp(self, body: HVPRequest, arrived: float | None = None) -> dict[str, Any]:
        encoding = body.options.encoding

        def render(prepared: tuple[JVPTask, list[str]], result: JVPResult) -> dict[str, Any]:
            task, names = prepared
            return {
                "output": encode_tensor(result.outputs[0], encoding=encoding),
                "hvp": {
                    n: encode_tensor(h, encoding=encoding)
                    for n, h in zip(names, result.jvps, strict=True)
                },
                **placement(task),
            }

        return await self.service.answer(partial(self._prepare_hvp, body), render, arrived)

    # POST /linearize, POST /linearize/{id}/jvp, DELETE /linearize/{id}.

    def _prepare_linearize(
        self, body: LinearizeRequest
    ) -> tuple[JVPTask, tuple[str, ...], LinearizeOperation]:
        task = self._prepare(body)
        indices, params, names = self._wrt(task.target, body.wrt)
        op = LinearizeOperation(
            self.store, task.target, indices, params, names, transpose=body.options.transpose
        )
        task.operation = op
        self.service.bound(task)
        return task, names, op

    async def linearize(
        self, body: LinearizeRequest, arrived: float | None = None
    ) -> dict[str, Any]:
        encoding = body.options.encoding

        def render(
            prepared: tuple[JVPTask, Names, LinearizeOperation], result: JVPResult
        ) -> dict[str, Any]:
            task, names, op = prepared
            session = op.session
            assert session is not None
            return {
                "id": session.id,
                "output": one_or_list(task, encoded(result.outputs, encoding)),
                "expires_at": _iso(session.expires_at),
                "wrt": list(names),
                "bytes": session.nbytes,
                **placement(task),
            }

        return await self.service.answer(partial(self._prepare_linearize, body), render, arrived)

    # A long method on purpose: each tangent checked against the shapes the session
    # recorded, one message per check, as /jvp checks its tangents.
    def _prepare_linearized_jvp(self, session_id: str, body: LinearizedJVPRequest) -> JVPTask:
        session = self.store.get(session_id)
        target: Target = session.target
        batched = body.options.tangent_batch
        n_inputs = len(session.input_indices)
        input_names = session.argument_names[:n_inputs]
        parameter_names = session.argument_names[n_inputs:]
        shapes = dict(zip(session.argument_names, session.shapes, strict=True))
        wrt = list(session.argument_names)
        for where, given, allowed in (
            ("tangents", body.tangents, input_names),
            ("parameter_tangents", body.parameter_tangents, parameter_names),
        ):
            unknown = [n for n in given if n not in allowed]
            if unknown:
                raise InvalidRequest(
                    f"Unknown name {unknown[0]!r} in {where}; this session is linearized with "
                    f"respect to {wrt}",
                    param=f"{where}.{unknown[0]}",
                )

        def decode(where: str, name: str, value: Any) -> torch.Tensor:
            param = f"{where}.{name}"
            tangent = decode_tensor(
                value, param=param, default_dtype=session.dtype, limits=self.service.limits
            )
            shape = shapes[name]
            ok = (
                tangent.dim() == len(shape) + 1 and tuple(tangent.shape[1:]) == shape
                if batched
                else tuple(tangent.shape) == shape
            )
            if not ok:
                expected = ["K", *shape] if batched else list(shape)
                raise InvalidRequest(
                    f"Expected tangent {name!r} of shape {expected}"
                    + (" with options.tangent_batch (K directions)" if batched else "")
                    + f", got {list(tangent.shape)}",
                    param=param,
                )
            return tangent

        given = {n: decode("tangents", n, v) for n, v in body.tangents.items()}
        given_params = {
            n: decode("parameter_tangents", n, v) for n, v in body.parameter_tangents.items()
        }
        if batched:
            tangent_batch_size(given, given_params)
        total = sum(t.numel() for t in (*given.values(), *given_params.values()))
        self.service.check_elements(total, "tangents")
        tangents = tuple(given.get(n) for n in target.input_names)
        return JVPTask(
            target=target,
            inputs=(),
            tangents=tangents,
            parameter_tangents=given_params,
            dtype=session.dtype,
            device=session.device,
            engine="functional",
            operation=LinearizedJVPOperation(
                session=session,
                input_indices=session.input_indices,
                parameter_names=tuple(parameter_names),
                tangent_batch=batched,
            ),
        )

    async def linearized_jvp(self, session_id: str, body: LinearizedJVPRequest) -> dict[str, Any]:
        encoding = body.options.encoding

        def prepare() -> tuple[JVPTask]:
            return (self._prepare_linearized_jvp(session_id, body),)

        def render(prepared: tuple[JVPTask], result: JVPResult) -> dict[str, Any]:
            return {"jvp": one_or_list(prepared[0], encoded(result.jvps, encoding))}

        return await self.service.answer(prepare, render)

    def delete_session(self, session_id: str) -> None:
        self.store.delete(session_id)


class SessionSweeper:
    """Drops expired linearize sessions every ``interval_s`` (lookups drop them lazily too)."""

    def __init__(self, store: LinearizeStore, interval_s: float) -> None:
        self.store = store
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.store.sweep()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.store.clear()


def derivative_service(
    settings: Settings, service: JVPService
) -> tuple[DerivativeService, SessionSweeper]:
    """The /jacobian, /hvp, /linearize service and its session sweeper (not yet started)."""
    store = LinearizeStore(
        ttl_s=settings.linearize_ttl_s,
        max_session_bytes=settings.linearize_max_session_bytes,
        budget_bytes=settings.linearize_budget_bytes,
    )
    sweeper = SessionSweeper(store, settings.linearize_sweep_s)
    return DerivativeService(service, store), sweeper
