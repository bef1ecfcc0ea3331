"""The client's operations, written once as plans (NOTE [plans] in ``_plans.py``).

# NOTE [adding an operation]
A new route is one function here: build its request with ``_bodies.request`` (or a
``Call``), ``response = yield call``, and return ``_parsing.parse(response, ...)``
with a reader in ``_parsing.py``. Then one line in each client class of
``_client.py``: ``name = sync_method(ops.name)`` in ``JVPClient`` and
``name = async_method(ops.name)`` in ``AsyncJVPClient``. Its signature and
docstring here are what ``help()``, IDEs and mypy show for both. A handle with its
own methods (as ``Linearization``) keeps its plans beside its classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

from . import _parsing as parsing
from ._base import (
    NOT_GIVEN,
    REDUCTIONS,
    Encoding,
    Limits,
    OutputKind,
    Reduction,
    TimeoutTypes,
)
from ._base import model_path as _model_path
from ._bodies import GROUPS, names, plan_request, shapes
from ._plans import Call, Plan
from ._types import (
    EvalShapeResult,
    HealthStatus,
    HVPResult,
    JacobianResult,
    JobInfo,
    JVPResult,
    LinearizationInfo,
    ModelInfo,
)

Tensors = Mapping[str, Any]
L = TypeVar("L", covariant=True)
J = TypeVar("J", covariant=True)
Lin = TypeVar("Lin")


class Handles(Limits, Protocol[L, J]):
    """A client as the plans see it: its options and the handles it makes."""

    def _linearization(self, info: LinearizationInfo, kind: OutputKind) -> L: ...

    def _job(self, info: JobInfo, kind: OutputKind, idempotency_key: str | None) -> J: ...


def jvp(
    client: Limits,
    *,
    expression: str | None = None,
    model: str | None = None,
    primals: Tensors,
    tangents: Tensors | None = None,
    parameter_tangents: Tensors | None = None,
    dtype: object = None,
    device: str | None = None,
    engine: str | None = None,
    fallback: str | None = None,
    encoding: Encoding = "auto",
    tangent_batch: bool = False,
    check: bool = False,
    options: Mapping[str, Any] | None = None,
    timeout: TimeoutTypes = NOT_GIVEN,
) -> Plan[JVPResult]:
    """``POST /jvp``: the function's output and its JVP along ``tangents``.

    Args:
        expression: an expression whose free variables are the inputs, or
        model: a registered model's name (exactly one of the two).
        primals: ``{input name: tensor}``: numpy arrays, torch tensors (then the
            result holds torch tensors), Python numbers or nested lists.
        tangents: per input, same shape as its primal; inputs left out get zero.
        parameter_tangents: models only: tangents for parameters by name.
        dtype: computation dtype (``"float32"``, ``torch.float64``, ...); default:
            the dtype the floating primal arrays share, else the service's (float32).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        engine: ``"dual"`` or ``"functional"``.
        fallback: ``"auto"`` or ``"none"``.
        encoding: ``"auto"`` (base64 answers when base64 went out), ``"json"``, ``"b64"``;
            unused when the request goes as safetensors (``binary_min_elements``).
        tangent_batch: every tangent has a leading dimension K (the same for all):
            ``jvp`` then has that leading K, J·v for K directions in one call.
        check: also compare the JVP with float64 central finite differences
            (``result.check``, a :class:`GradientCheck`).
        options: more ``options`` fields, sent as they are.
        timeout: this request's timeout, instead of the client's.

    Returns:
        :class:`JVPResult` with ``output`` and ``jvp`` (lists for several outputs),
        ``timing_ms``, ``device``, ``dtype``, ``engine``, ``method``, ``check`` and
        ``request_id``; it unpacks as ``out, jvp = client.jvp(...)``.
    """
    call, kind = plan_request(
        client,
        "jvp()",
        "jvp",
        locals(),
        groups=GROUPS,
        options={
            "engine": engine,
            "fallback": fallback,
            "tangent_batch": tangent_batch,
            "check": check,
        },
        form="binary",
    )
    response = yield call
    return parsing.parse_jvp(response, kind)


def jacobian(
    client: Limits,
    *,
    expression: str | None = None,
    model: str | None = None,
    primals: Tensors,
    wrt: str | Sequence[str] | None = None,
    dtype: object = None,
    device: str | None = None,
    encoding: Encoding = "auto",
    options: Mapping[str, Any] | None = None,
    timeout: TimeoutTypes = NOT_GIVEN,
) -> Plan[JacobianResult]:
    """``POST /jacobian``: the full Jacobian at ``primals``, computed by forward mode.

    Args:
        expression, model, primals, dtype, device, encoding, timeout: as for :meth:`jvp`.
        wrt: the input and parameter names to differentiate by (one name may be a
            str); default all inputs.
        options: more ``options`` fields, sent as they are.

    Returns:
        :class:`JacobianResult`: ``output`` and ``jacobian``, ``{name: array}`` of
        shape output shape + that input's shape (lists of both for several outputs).
    """
    fields = {"wrt": names(wrt, "jacobian()")}
    call, kind = plan_request(client, "jacobian()", "jacobian", locals(), fields=fields)
    response = yield call
    return parsing.parse(response, "/jacobian", parsing.read_jacobian(kind))


def hvp(
    client: Limits,
    *,
    expression: str | None = None,
    model: str | None = None,
    primals: Tensors,
    tangents: Tensors | None = None,
    parameter_tangents: Tensors | None = None,
    output_index: int = 0,
    reduction: Reduction = "none",
    tangent_batch: bool = False,
    dtype: object = None,
    device: str | None = None,
    encoding: Encoding = "auto",
    options: Mapping[str, Any] | None = None,
    timeout: TimeoutTypes = NOT_GIVEN,
) -> Plan[HVPResult]:
    """``POST /hvp``: Hessian-vector products of a scalar-valued function.

    Args:
        expression, model, primals, dtype, device, encoding, timeout: as for :meth:`jvp`.
        tangents: the directions v, per input (same shape as its primal); H·v is
            taken with respect to the inputs that have one.
        parameter_tangents: models only: directions for parameters, by name.
        output_index: which output is the function (models with several outputs).
        reduction: how that output becomes a scalar: ``"sum"``, ``"mean"`` or
            ``"none"`` (the output must be a scalar already).
        tangent_batch: every tangent has a leading K; each H·v then has that leading K.
        options: more ``options`` fields, sent as they are.

    Returns:
        :class:`HVPResult`: ``output`` (the scalar) and ``hvp``, ``{name: H·v}``.
    """
    where = "hvp()"
    if tangents is None and parameter_tangents is None:
        raise ValueError(
            f"{where}: pass tangents= (or parameter_tangents= for a model): H·v is taken "
            "along the inputs that have one"
        )
    if isinstance(output_index, bool) or not isinstance(output_index, int) or output_index < 0:
        raise ValueError(f"{where}: expected output_index to be an int >= 0, got {output_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: expected reduction 'sum', 'mean' or 'none', got {reduction!r}")
    fields = {
        "output_index": output_index or None,
        "reduction": None if reduction == "none" else reduction,
    }
    options_ = {"tangent_batch": tangent_batch}
    call, kind = plan_request(
        client, where, "hvp", locals(), groups=GROUPS, fields=fields, options=options_
    )
    response = yield call
    return parsing.parse(response, "/hvp", parsing.read_hvp(kind))


def eval_shape(
    client: Limits,
    operation: str = "jvp",
    *,
    expression: str | None = None,
    model: str | None = None,
    primals: Tensors,
    tangents: Tensors | None = None,
    parameter_tangents: Tensors | None = None,
    wrt: str | Sequence[str] | None = None,
    output_index: int | None = None,
    reduction: Reduction | None = None,
    tangent_batch: bool = False,
    cotangents: Any = None,
    unknowns: str | Sequence[str] | None = None,
    method: str | None = None,
    rhs: Any = None,
    dtype: object = None,
    device: str | None = None,
    options: Mapping[str, Any] | None = None,
    timeout: TimeoutTypes = NOT_GIVEN,
) -> Plan[EvalShapeResult]:
    """``POST /eval_shape``: the shapes ``operation`` (jvp, vjp, jacobian, hvp,
    linearize, solve) would answer, and its estimated FLOPs and peak bytes, computing
    nothing: size batches before sending them. A tensor may be a `ShapeInfo` (no data).

    Args:
        operation: ``"jvp"`` (default), ``"vjp"``, ``"jacobian"``, ``"hvp"``,
            ``"linearize"`` or ``"solve"``.
        expression, model, primals, tangents, parameter_tangents, wrt, output_index,
            reduction, tangent_batch, dtype, device, options, timeout: as for that
            operation's method.
        cotangents: ``"vjp"`` only: as for :meth:`vjp` (`ShapeInfo` entries allowed);
            ``cotangent_batch`` goes in ``options``.
        unknowns, method, rhs: ``"solve"`` only: as for :meth:`solve` (``rhs``, for
            ``method="linear"``, may be a `ShapeInfo`; the solve's options, such as
            ``max_iterations``, go in ``options``); ``result`` is then the solution's shapes
            and the cost that of the whole solve at its caps.

    Returns:
        :class:`EvalShapeResult`. Over a limit: the `PayloadTooLargeError` the
        operation would raise.
    """
    fields = {
        "operation": operation,
        "wrt": None if wrt is None else ([wrt] if isinstance(wrt, str) else list(wrt)),
        "output_index": output_index,
        "reduction": reduction,
        "cotangents": shapes(client, cotangents),
        "unknowns": [unknowns] if isinstance(unknowns, str) else unknowns,
        "method": method,
        "rhs": shapes(client, rhs),
    }
    call, _ = plan_request(
        client,
        "eval_shape()",
        "eval_shape",
        locals(),
        groups=GROUPS,
        fields=fields,
        options={"tangent_batch": tangent_batch},
        form="shapes",
    )
    response = yield call
    return parsing.parse(response, "/eval_shape", parsing.read_eval_shape(operation))


def linearize(
    client: Handles[Lin, Any],
    *,
    expression: str | None = None,
    model: str | None = None,
    primals: Tensors,
    wrt: str | Sequence[str] | None = None,
    dtype: object = None,
    device: str | None = None,
    encoding: Encoding = "auto",
    options: Mapping[str, Any] | None = None,
    timeout: TimeoutTypes = NOT_GIVEN,
) -> Plan[Lin]:
    """``POST /linearize``: linearize at ``primals`` once, then apply it to many tangents.

    The arguments are those of :meth:`jacobian`. Returns a :class:`Linearization`
    (``.id``, ``.output``, ``.expires_at``, ``.wrt``; ``.jvp(tangents=...)`` or
    ``lin(v)``; ``.close()``), a context manager that closes the session on exit. A
    session over the service's memory budget is a 503 (:class:`OverloadedError`,
    retried after its Retry-After as NOTE [retries] says).
    """
    fields = {"wrt": names(wrt, "linearize()")}
    call, kind = plan_request(client, "linearize()", "linearize", locals(), fields=fields)
    response = yield call
    info = parsing.parse(response, "/linearize", parsing.read_linearize(kind))
    return client._linearization(info, kind)


def models(client: Limits) -> Plan[list[ModelInfo]]:
    """``GET /models``: every registered model."""
    response = yield Call("GET", "models")
    return parsing.parse(response, "/models", parsing.read_models)


def model(client: Limits, name: str) -> Plan[ModelInfo]:
    """``GET /models/{name}``: one model's inputs, outputs, parameters and buffers."""
    response = yield Call("GET", _model_path(name))
    return parsing.parse(response, "model", ModelInfo.from_json)


def load_model(client: Limits, name: str) -> Plan[ModelInfo | None]:
    """``POST /models/{name}/load`` (admin key): (re)read a model from the repository."""
    response = yield Call("POST", f"{_model_path(name)}/load")
    if not parsing.is_model(parsing.json_or_none(response)):
        return None
    return parsing.parse(response, "model", ModelInfo.from_json)


def unload_model(client: Limits, name: str) -> Plan[None]:
    """``DELETE /models/{name}`` (admin key): stop serving a model."""
    yield Call("DELETE", _model_path(name))


def health(client: Limits) -> Plan[HealthStatus]:
    """``GET /healthz`` and ``GET /readyz``: whether the service is up and can take work.

    A not-ready service (503 on /readyz) gives ``ready=False`` rather than an error;
    an unreachable one raises :class:`APIConnectionError`.
    """
    live = yield Call("GET", "healthz")
    ready = yield Call("GET", "readyz", max_retries=0, ok_statuses=frozenset({503}))
    return HealthStatus(
        live=True,
        ready=ready.is_success,
        detail={"healthz": parsing.body_or_text(live), "readyz": parsing.body_or_text(ready)},
    )
