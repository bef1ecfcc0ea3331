"""What `POST /jvp` does between the route and the engine: resolve, decode, check, queue, encode.

Decoding and encoding run in a worker thread of the event loop's pool, so a large
body never stalls other requests; the JVP itself runs on the device worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

import torch

from app.engine.abstract import Bounds, Estimate, Estimator, Plan, check_deadline, plan_of
from app.engine.devices import device_memory, parse_device, parse_dtype
from app.engine.engine import Engine
from app.engine.errors import InvalidRequest, TooLarge
from app.engine.expressions import compile_expression
from app.engine.operations import jvp_operation, tangent_batch_size
from app.engine.target import Materialized, Target
from app.engine.task import JVPResult, JVPTask
from app.metrics import Metrics
from app.models.registry import ModelRegistry, ServedModel
from app.schemas import JVPRequest
from app.services.render import encoded, one_or_list, placement
from app.settings import Settings
from app.wire.codec import Limits, decode_tensor
from app.wire.safetensors import SafetensorsBody, encode_response

T = TypeVar("T")
P = TypeVar("P", bound=tuple[Any, ...])


@lru_cache(maxsize=4096)
def expression_target(source: str, max_length: int, max_nodes: int, max_depth: int) -> Target:
    """The JVP target of an expression; compiled once per source text."""
    compiled = compile_expression(
        source, max_length=max_length, max_nodes=max_nodes, max_depth=max_depth
    )

    def build(dtype: torch.dtype, device: torch.device) -> Materialized:
        bound = compiled.bind(dtype, device)
        return Materialized(fn=lambda args, state: (bound(*args),), parameters={}, buffers={})

    return Target(
        key=f"expression:{source}",
        input_names=compiled.variables,
        single_output=True,
        build=build,
        operations=compiled.operations,
        elementwise=compiled.elementwise,
    )


def _shape_matches(shape: tuple[int, ...], declared: tuple[int, ...]) -> bool:
    return len(shape) == len(declared) and all(
        d in (-1, s) for s, d in zip(shape, declared, strict=True)
    )


def _check_names(target: Target, request: JVPRequest) -> None:
    """Every input has a primal, and no primal or tangent names anything else."""
    names = target.input_names
    missing = [n for n in names if n not in request.primals]
    if missing:
        raise InvalidRequest(
            f"Missing primal for input {missing[0]!r}; the inputs are {list(names)}",
            param=f"primals.{missing[0]}",
        )
    for where, given in (("primals", request.primals), ("tangents", request.tangents)):
        unknown = [n for n in given if n not in names]
        if unknown:
            raise InvalidRequest(
                f"Unknown input {unknown[0]!r} in {where}; the inputs are {list(names)}",
                param=f"{where}.{unknown[0]}",
            )


# NOTE [small requests inline]
# Decoding, checking and encoding a request move to a worker thread only when the
# request is large: for a 10x10 tensor the hop to a thread and back (and the GIL
# handed between three threads) costs more than the work, and halves throughput.
INLINE_ELEMENTS = 16_384


# Work estimated to take longer than this is watched for its deadline between operators
# (app/engine/abstract.py `DeadlineWatch`); shorter work is not: each operator would pay.
WATCH_AFTER_S = 0.2
# A first abstract evaluation runs on the event loop only for a small expression of at
# most this many operator calls (bench/abstract_eval.py: 0.3-0.8 ms); else in a thread.
ABSTRACT_INLINE_MAX_OPERATIONS = 32
MISSING = object()  # `JVPService.bound(cached_only=True)`: not evaluated yet


async def _offload(fn: Callable[..., T], *args: Any, inline: bool) -> T:
    """``fn(*args)`` here when ``inline``, else in a worker thread off the event loop."""
    return fn(*args) if inline else await asyncio.to_thread(fn, *args)


_FORWARD_PLAN = Plan("jvp", directions=0)  # the forward pass alone


class JVPService:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        registry: ModelRegistry,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.metrics = metrics
        self.limits = Limits(settings.max_tensor_elements, settings.max_dims)
        # NOTE [abstract evaluation] (app/engine/abstract.py): every request is bounded by
        # what it makes before it is queued; the bytes limit is per device.
        self.estimator = Estimator(settings.max_tensor_elements)
        self.bounds = {
            d: Bounds(
                settings.max_tensor_elements,
                settings.max_request_bytes or device_memory(d) // 4,
                settings.max_request_flops,
            )
            for d in engine.devices
        }
        # NOTE [dynamic batching] (app/engine/batching.py); batch sizes go to the metrics.
        engine.configure_batching(
            max_batch_size=settings.max_batch_size,
            batch_wait_us=settings.batch_wait_us,
            observe_batch=getattr(metrics, "observe_batch", None),
            inline_max_us=settings.inline_max_us,
        )

    def resolve(self, request: JVPRequest) -> tuple[Target, ServedModel | None]:
        """The request's target, and its model when it names one, read from the registry
        once, so target, default dtype and batch limit all come from one model version."""
        if (request.expression is None) == (request.model is None):
            raise InvalidRequest("Give exactly one of 'expression' or 'model'", param="expression")
        if request.expression is not None:
            if request.parameter_tangents:
                raise InvalidRequest(
                    "'parameter_tangents' applies to models only; an expression has no parameters",
                    param="parameter_tangents",
                )
            s = self.settings
            target = expression_target(
                request.expression,
                s.max_expression_length,
                s.max_expression_nodes,
                s.max_expression_depth,
            )
            return target, None
        assert request.model is not None
        model = self.registry.get(request.model)
        return model.target, model

    @staticmethod
    def dtype_name(request: JVPRequest, model: ServedModel | None) -> str:
        """options.dtype, else the model's default dtype (config.json), else float32."""
        if request.options.dtype is not None:
            return request.options.dtype
        if model is not None:
            return model.default_dtype or "float32"
        return "float32"

    @staticmethod
    def batch_limit(model: ServedModel | None) -> int | None:
        """The largest batch this request's target may join (NOTE [dynamic batching]):
        None (the engine's limit) for expressions and built-in models, which are per-sample;
        a repository model's config.json ``max_batch_size`` (0, the default: never)."""
        if model is None:
            return None
        declared = model.config.get("max_batch_size")
        if model.source == "builtin" and declared is None:
            return None
        return declared if isinstance(declared, int) and not isinstance(declared, bool) else 0

    def prepare(self, request: JVPRequest, bound: bool = True) -> JVPTask:
        """Everything that can be checked before queueing: names, shapes, dtypes, limits,
        and (``bound``) what the computation will make (`bound`). In order: the target,
        its names, the decoded tensors checked against it, the size, the work item."""
        target, model = self.resolve(request)
        dtype = parse_dtype(self.dtype_name(request, model))
        device = parse_device(request.options.device, self.engine.devices)
        _check_names(target, request)

        def decode(value: Any, param: str) -> torch.Tensor:
            if isinstance(value, torch.Tensor):  # a safetensors body (checked by app/wire/)
                return value
            return decode_tensor(value, param=param, default_dtype=dtype, limits=self.limits)

        inputs, tangents, parameter_tangents = self._decode(target, request, decode)
        self._check_size(inputs, tangents, parameter_tangents)
        batched = request.options.tangent_batch
        task = JVPTask(
            target=target,
            inputs=inputs,
            tangents=tangents,
            parameter_tangents=parameter_tangents,
            dtype=dtype,
            device=device,
            # Batched tangents run vmap over torch.func.jvp (make_dual has no batching rule).
            engine="functional" if batched else request.options.engine,
            operation=jvp_operation(
                target,
                engine=request.options.engine,
                tangent_batch=batched,
                check=request.options.check,
                fallback=request.options.fallback,
            ),
            fallback=request.options.fallback,
            max_batch_size=self.batch_limit(model),
        )
        if bound:
            self.bound(task)
        return task

    def _decode(
        self, target: Target, request: JVPRequest, decode: Callable[[Any, str], torch.Tensor]
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...], dict[str, torch.Tensor]]:
        """The request's tensors decoded, each checked against the shape the target declares
        (inputs), its primal's (tangents) or its parameter's (parameter tangents)."""
        names = target.input_names
        inputs = tuple(decode(request.primals[n], f"primals.{n}") for n in names)
        for name, x in zip(names, inputs, strict=True):
            declared = target.input_shapes.get(name)
            if declared is not None and not _shape_matches(tuple(x.shape), declared):
                raise InvalidRequest(
                    f"Expected input {name!r} of shape {list(declared)} (-1: any size), "
                    f"got {list(x.shape)}",
                    param=f"primals.{name}",
                )
        batched = request.options.tangent_batch
        tangents = tuple(
            self._tangent(
                decode, f"tangents.{n}", f"tangent {n!r}", request.tangents[n], x.shape, batched
            )
            if n in request.tangents
            else None
            for n, x in zip(names, inputs, strict=True)
        )
        parameter_tangents = {}
        for name, value in request.parameter_tangents.items():
            if name not in target.parameter_shapes:
                raise InvalidRequest(
                    f"Unknown parameter {name!r}; the parameters are "
                    f"{list(target.parameter_shapes)}",
                    param=f"parameter_tangents.{name}",
                )
            shape = torch.Size(target.parameter_shapes[name])
            parameter_tangents[name] = self._tangent(
                decode,
                f"parameter_tangents.{name}",
                f"parameter tangent {name!r}",
                value,
                shape,
                batched,
            )
        if batched:  # the same leading K everywhere (422 with the shapes otherwise)
            tangent_batch_size(
                {n: t for n, t in zip(names, tangents, strict=True) if t is not None},
                parameter_tangents,
            )
        return inputs, tangents, parameter_tangents

    def _check_size(
        self,
        inputs: tuple[torch.Tensor, ...],
        tangents: tuple[torch.Tensor | None, ...],
        parameter_tangents: dict[str, torch.Tensor],
    ) -> None:
        total = sum(x.numel() for x in inputs)
        total += sum(t.numel() for t in tangents if t is not None)
        total += sum(t.numel() for t in parameter_tangents.values())
        self.check_elements(total, "primals")

    def forward_estimate(self, task: JVPTask) -> Estimate | None:
        """The target's forward pass on the inputs' shapes (cached; None where meta tensors
        cannot run it): the output shapes /vjp and /solve need before their operation."""
        shapes = tuple(tuple(x.shape) for x in task.inputs)
        bounds = self.bounds.get(task.device)
        return self.estimator(task.target, shapes, task.dtype, _FORWARD_PLAN, bounds)

    def bound(
        self, task: JVPTask, *, strict: bool = False, cached_only: bool = False
    ) -> Estimate | None | object:
        """The task's abstract evaluation (NOTE [abstract evaluation]), kept on the task:
        413 when anything it makes passes a limit, 422 when its shapes do not fit the
        target. None for work on a linearize session (bounded when it was made), and when
        the target cannot run on meta tensors (the 422 `NotEvaluated` when ``strict``);
        ``cached_only``: `MISSING` instead of evaluating when it is not cached yet."""
        plan = plan_of(
            task.target, task.inputs, task.tangents, task.parameter_tangents, task.operation
        )
        if plan is None:
            return None
        shapes = tuple(x.shape for x in task.inputs)
        if cached_only and not self.estimator.has(task.target, shapes, task.dtype, plan):
            return MISSING
        task.estimate = self.estimator(
            task.target, shapes, task.dtype, plan, self.bounds.get(task.device), strict=strict
        )
        return task.estimate

    def schedule(self, task: JVPTask, arrived: float | None) -> None:
        """The task's deadline, ``JVP_REQUEST_TIMEOUT_S`` from the request's arrival: 504 at
        once when its estimated work cannot fit in what is left on this device; long work
        is watched between operators (`WATCH_AFTER_S`)."""
        start = time.monotonic() if arrived is None else arrived
        task.deadline = start + self.settings.request_timeout_s
        if task.estimate is not None:
            task.seconds = check_deadline(
                task.estimate, self.engine.rates.get(task.device), task.deadline
            )
            task.watch = task.seconds > WATCH_AFTER_S

    @staticmethod
    def _tangent(
        decode: Any, param: str, label: str, value: Any, shape: torch.Size, batched: bool = False
    ) -> torch.Tensor:
        tangent: torch.Tensor = decode(value, param)
        if batched:  # options.tangent_batch: [K, *shape]
            if tangent.dim() != len(shape) + 1 or tangent.shape[1:] != shape:
                raise InvalidRequest(
                    f"Expected {label} of shape [K, {', '.join(map(str, shape))}] with "
                    f"options.tangent_batch (K directions), got {list(tangent.shape)}".replace(
                        "[K, ]", "[K]"
                    ),
                    param=param,
                )
        elif tangent.shape != shape:
            raise InvalidRequest(
                f"Expected {label} of shape {list(shape)}, got {list(tangent.shape)}",
                param=param,
            )
        return tangent

    async def bound_off_loop(self, task: JVPTask, *, small: bool) -> None:
        """`bound` on the event loop when it is a dictionary look-up or a small
        expression's first evaluation (well under a millisecond); else in a worker thread
        (a model's first forward pass on meta tensors takes milliseconds, and runs the
        model's own Python code)."""
        ops = task.target.operations
        quick = small and ops is not None and ops <= ABSTRACT_INLINE_MAX_OPERATIONS
        if quick:
            self.bound(task)
        elif self.bound(task, cached_only=True) is MISSING:
            await asyncio.to_thread(self.bound, task)

    async def _run(
        self, request: JVPRequest, *, small: bool, arrived: float | None = None
    ) -> tuple[JVPTask, JVPResult]:
        task = await _offload(self.prepare, request, False, inline=small)
        await self.bound_off_loop(task, small=small)
        self.schedule(task, arrived)
        result = await self.engine.run(task, timeout_s=self.settings.request_timeout_s)
        if self.metrics is not None:
            self.metrics.observe_result(task.device, result)
        return task, result

    async def answer(
        self,
        prepare: Callable[[], P],
        render: Callable[[P, JVPResult], dict[str, Any]],
        arrived: float | None = None,
    ) -> dict[str, Any]:
        """The steps of a derivative request after its route: ``prepare()`` off the event
        loop (every 4xx before anything is queued; its first item is the `JVPTask`), the
        task on the engine under its deadline, ``render(prepared, result)`` off the loop,
        then the timings."""
        started = time.monotonic()
        prepared = await asyncio.to_thread(prepare)
        task: JVPTask = prepared[0]
        self.schedule(task, arrived)
        result = await self.engine.run(task, timeout_s=self.settings.request_timeout_s)
        response = await asyncio.to_thread(render, prepared, result)
        response["timing_ms"] = self._timing(result, started)
        return response

    def check_elements(self, total: int, param: str) -> None:
        """413 when a request holds more tensor elements than JVP_MAX_REQUEST_ELEMENTS."""
        if total > self.settings.max_request_elements:
            raise TooLarge(
                f"The request holds {total} tensor elements; the limit is "
                f"{self.settings.max_request_elements}",
                param=param,
            )

    @staticmethod
    def _timing(result: JVPResult, started: float) -> dict[str, float]:
        return {
            "queue": round(result.queue_ms, 3),
            "compute": round(result.compute_ms, 3),
            "total": round((time.monotonic() - started) * 1e3, 3),
        }

    async def jvp(
        self, request: JVPRequest, *, small: bool = False, arrived: float | None = None
    ) -> dict[str, Any]:
        """The JVP as a JSON body. ``small``: the request body is small enough to decode
        on the event loop (NOTE [small requests inline]); ``arrived``: when the request
        arrived (time.monotonic()), where its deadline starts."""
        started = time.monotonic()
        task, result = await self._run(request, small=small, arrived=arrived)
        inline = sum(o.numel() for o in result.outputs + result.jvps) <= INLINE_ELEMENTS
        body = await _offload(self.render, task, result, request.options.encoding, inline=inline)
        body["timing_ms"] = self._timing(result, started)
        return body

    async def jvp_safetensors(
        self, request: JVPRequest, *, small: bool = False, arrived: float | None = None
    ) -> SafetensorsBody:
        """The JVP as a safetensors body (app/wire/safetensors.py): tensors ``output`` and
        ``jvp`` (or ``output/i``, ``jvp/i``), the other response fields as metadata
        ``"response"``."""
        started = time.monotonic()
        task, result = await self._run(request, small=small, arrived=arrived)
        fields = {
            **placement(task),
            "engine": task.engine,
            "method": result.method,
            **(task.operation.report() if task.operation is not None else {}),
        }
        single = task.target.single_output and len(result.outputs) == 1
        fields["timing_ms"] = self._timing(result, started)
        args = (result.outputs, result.jvps, single, fields)
        # Building the header is cheap; a copy to the host or into contiguous memory is not.
        ready = all(
            t.device.type == "cpu" and t.is_contiguous() for t in result.outputs + result.jvps
        )
        return encode_response(*args) if ready else await asyncio.to_thread(encode_response, *args)

    @staticmethod
    def render(task: JVPTask, result: JVPResult, encoding: str) -> dict[str, Any]:
        return {
            "output": one_or_list(task, encoded(result.outputs, encoding)),
            "jvp": one_or_list(task, encoded(result.jvps, encoding)),
            **placement(task),
            "engine": task.engine,
            "method": result.method,
            **(task.operation.report() if task.operation is not None else {}),
        }
