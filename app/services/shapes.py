"""What `POST /eval_shape` does: an operation's output shapes and cost, computing nothing.

The body is an operation route's body plus ``operation``; any tensor may be given as
``{"shape", "dtype"}`` without data (a meta tensor here, never allocated). The request
goes through the operation's own checks (`JVPService.prepare`, the derivative
service's), so it gets the same 4xx its operation would get, and then the same
abstract evaluation every computing request gets before it is queued (NOTE [abstract
evaluation] in app/engine/abstract.py).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from app.engine.abstract import Estimate, Spec
from app.engine.devices import DTYPE_NAMES, parse_dtype
from app.engine.errors import InvalidRequest
from app.engine.task import JVPTask
from app.schemas import HVPRequest, JacobianRequest, JVPRequest, LinearizeRequest
from app.schemas_solve import SolveRequest
from app.schemas_vjp import VJPRequest
from app.services.derivatives import DerivativeService
from app.wire.codec import check_limits

REQUESTS: dict[str, type[BaseModel]] = {
    "jvp": JVPRequest,
    "jacobian": JacobianRequest,
    "hvp": HVPRequest,
    "linearize": LinearizeRequest,
    "vjp": VJPRequest,
    "solve": SolveRequest,
}
TENSOR_FIELDS = ("primals", "tangents", "parameter_tangents")


class InvalidBody(Exception):
    """The body does not validate as the operation's request: pydantic's errors, located in
    the body, for the web layer to answer as it answers any body (app/api/routes/shapes.py)."""

    def __init__(self, errors: list[Any]) -> None:
        super().__init__(errors)
        self.errors = errors


def _spec(shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, Any]:
    return {"shape": list(shape), "dtype": DTYPE_NAMES.get(dtype, str(dtype))}


class ShapeService:
    """`POST /eval_shape` on the services of the operation routes."""

    def __init__(self, derivatives: DerivativeService, vjp: Any = None, solve: Any = None) -> None:
        self.derivatives = derivatives
        self.service = derivatives.service
        self.vjp = vjp  # app.services.vjp.VJPService, for operation "vjp"
        self.solve = solve  # app.services.solve.SolveService, for operation "solve"

    def _shape_only(self, value: Any, param: str) -> Any:
        """A ``{"shape", "dtype"}`` tensor as a meta tensor; anything else as it came."""
        if not isinstance(value, dict) or "data" in value or "b64" in value:
            return value
        extra = set(value) - {"shape", "dtype"}
        if extra or "shape" not in value:
            raise InvalidRequest(
                f'Expected tensor \'{param}\' as {{"shape", "dtype"}} (or with data or b64); '
                f"got the keys {sorted(value)}",
                param=param,
            )
        shape = value["shape"]
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise InvalidRequest(
                f"Expected '{param}.shape' as a list of non-negative integers, got {shape!r}",
                param=f"{param}.shape",
            )
        limits = self.service.limits
        for d in shape:  # each dimension first: no product of unbounded numbers
            if d > limits.max_tensor_elements:
                check_limits([d], param, limits)
        check_limits(shape, param, limits)
        dtype = parse_dtype(value.get("dtype", "float32"), param=f"{param}.dtype")
        return torch.empty(shape, dtype=dtype, device="meta")

    def _request(self, operation: str, body: dict[str, Any]) -> BaseModel:
        body = dict(body)
        for name in TENSOR_FIELDS:
            given = body.get(name)
            if isinstance(given, dict):
                body[name] = {k: self._shape_only(v, f"{name}.{k}") for k, v in given.items()}
        cotangents = body.get("cotangents")
        if operation == "vjp" and isinstance(cotangents, dict):
            body["cotangents"] = self._shape_only(cotangents, "cotangents")
        if operation == "solve" and isinstance(body.get("rhs"), dict):
            body["rhs"] = self._shape_only(body["rhs"], "rhs")
        elif operation == "vjp" and isinstance(cotangents, list):
            body["cotangents"] = [
                self._shape_only(c, f"cotangents.{i}") if isinstance(c, dict) else c
                for i, c in enumerate(cotangents)
            ]
        try:
            return REQUESTS[operation].model_validate(body)
        except ValidationError as e:
            raise InvalidBody(
                [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
            ) from None

    def _task(self, operation: str, request: BaseModel) -> tuple[JVPTask, tuple[str, ...]]:
        d = self.derivatives
        if operation == "jvp":
            assert isinstance(request, JVPRequest)
            return self.service.prepare(request, bound=False), ()
        if operation == "jacobian":
            assert isinstance(request, JacobianRequest)
            task, names, _ = d._prepare_jacobian(request)
            return task, names
        if operation == "hvp":
            assert isinstance(request, HVPRequest)
            task, hvp_names = d._prepare_hvp(request)
            return task, tuple(hvp_names)
        if operation == "vjp":
            assert isinstance(request, VJPRequest) and self.vjp is not None
            task, vjp_names = self.vjp.eval_shape(request)
            return task, vjp_names
        if operation == "solve":
            assert isinstance(request, SolveRequest) and self.solve is not None
            task, op = self.solve.prepare(request, strict=True)
            return task, op.names
        assert isinstance(request, LinearizeRequest)
        task, names, _ = d._prepare_linearize(request)
        return task, names

    def evaluate(self, body: dict[str, Any]) -> dict[str, Any]:
        """The 200 body of /eval_shape (or the 4xx the operation would get)."""
        operation = body.pop("operation", "jvp")
        request = self._request(operation, body)
        task, names = self._task(operation, request)
        estimate: object = task.estimate  # solve: the whole solve's (app/services/solve.py)
        if operation != "solve":
            estimate = self.service.bound(task, strict=True)
        assert isinstance(estimate, Estimate)
        return self.render(operation, task, names, estimate)

    @staticmethod
    def render(
        operation: str, task: JVPTask, names: tuple[str, ...], estimate: Estimate
    ) -> dict[str, Any]:
        def one(spec: Spec) -> dict[str, Any]:
            return _spec(spec.shape, spec.dtype)

        single = task.target.single_output and len(estimate.outputs) == 1
        outputs = [one(o) for o in estimate.outputs]
        body: dict[str, Any] = {"output": outputs[0] if single or operation == "hvp" else outputs}
        results = [one(r) for r in estimate.results]
        if operation in ("jvp", "linearize"):
            body["jvp"] = results[0] if single else results
        elif operation == "vjp":
            body["vjp"] = dict(zip(names, results, strict=True))
        elif operation == "solve":
            unknowns = [task.inputs[task.target.input_names.index(n)] for n in names]
            body["solution"] = {
                n: _spec(tuple(x.shape), task.dtype) for n, x in zip(names, unknowns, strict=True)
            }
        elif operation == "jacobian":
            n = len(names)
            maps = [
                dict(zip(names, results[i * n : (i + 1) * n], strict=True))
                for i in range(len(outputs))
            ]
            body["jacobian"] = maps[0] if single else maps
        else:
            body["hvp"] = dict(zip(names, results, strict=True))
        body["cost"] = {"flops": int(estimate.flops), "peak_bytes": int(estimate.peak_bytes)}
        return body
