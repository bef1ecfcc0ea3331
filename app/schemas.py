"""Request and response bodies, as the OpenAPI schema shows them (API.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Tensors are validated by app.wire.codec, which gives messages naming the tensor;
# the schema here documents the three wire forms.
Tensor = Annotated[
    Any,
    Field(
        description="A tensor: a nested list of numbers (or a bare number); "
        '{"shape", "dtype", "data"}; or {"shape", "dtype", "b64"} (little-endian bytes). '
        'NaN and infinities are the strings "NaN", "Infinity", "-Infinity".',
        json_schema_extra={
            "anyOf": [
                {"type": "number"},
                {"type": "array"},
                {
                    "type": "object",
                    "properties": {
                        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                        "dtype": {"type": "string"},
                        "data": {"type": "array"},
                        "b64": {"type": "string"},
                    },
                    "required": ["shape", "dtype"],
                },
            ]
        },
    ),
]

# The ``output`` of a response: f at the primals.
Outputs = Annotated[Any, Field(description="A tensor, or a list of tensors for several outputs.")]


def flag(description: str) -> Any:
    """An option that is off unless the request sets it."""
    return Field(False, description=description)


def encoding_option() -> Any:
    """The ``encoding`` option of a route that answers tensors."""
    return Field("json", description="Response tensors as data or b64.")


def _by_name(description: str) -> Any:
    """A field of tensors by name, empty unless given."""
    return Field(default_factory=dict, description=description)


def _dtype(unset: str) -> Any:
    """The ``dtype`` option; ``unset``: what an unset one means before float32."""
    return Field(
        None,
        description="Computation dtype: float16, bfloat16, float32, float64 (or FP16...). "
        f"Unset: {unset}, else float32.",
    )


class Strict(BaseModel):
    """A request body or options object: an unknown field is a 422 (a misspelt option is
    refused, never ignored)."""

    model_config = ConfigDict(extra="forbid")


class ComputeOptions(Strict):
    """The options every derivative of a target shares: where and in which dtype."""

    dtype: str | None = _dtype("the model's default dtype (config.json)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")


class PointRequest(Strict):
    """What every derivative of a target is taken at: the target and the primals."""

    expression: str | None = Field(None, description="An expression such as 'x**2 + y**2'.")
    model: str | None = Field(None, description="A registered model's name (GET /models).")
    primals: dict[str, Tensor] = Field(description="One tensor per input, by name.")


class JVPOptions(ComputeOptions):
    engine: Literal["dual", "functional"] = Field(
        "dual", description="dual: make_dual/unpack_dual; functional: torch.func.jvp."
    )
    encoding: Literal["json", "b64"] = encoding_option()
    fallback: Literal["auto", "none"] = Field(
        "auto", description="Whether anything but forward AD may compute the JVP."
    )
    tangent_batch: bool = flag(
        "Every tangent has a leading dimension K (the same for all); jvp then "
        "has that leading K: J·V for K directions in one call.",
    )
    check: bool = flag(
        "Also estimate J·v by central finite differences in float64 and "
        "report the difference ('check').",
    )


class JVPRequest(PointRequest):
    tangents: dict[str, Tensor] = _by_name("Per input; a missing one is zero.")
    parameter_tangents: dict[str, Tensor] = _by_name(
        "Models only: tangents of parameters, by name."
    )
    options: JVPOptions = Field(default_factory=JVPOptions)


class TimingMs(BaseModel):
    queue: float
    compute: float
    total: float


class GradientCheck(BaseModel):
    """J·v against central finite differences in float64 (README "Beyond one JVP")."""

    max_abs_error: float | str = Field(
        description="max |jvp - fd| over all outputs, where both are finite."
    )
    max_rel_error: float | str = Field(
        description="max_abs_error / max(|fd|_inf, |jvp|_inf); 0 when both are 0."
    )
    passed: bool = Field(
        description="max_abs_error <= atol + rtol * max(|fd|_inf, |jvp|_inf), and no element "
        "NaN or infinite on one side only (nonfinite null)."
    )
    eps: float | str = Field(description="The largest perturbation of any input element.")
    rtol: float = Field(description="The relative tolerance for the computation dtype.")
    atol: float = Field(description="The absolute tolerance for the computation dtype.")
    nonfinite: Literal["jvp", "estimate", "both"] | None = Field(
        None,
        description="Which side holds a NaN or infinity where the other is finite (then "
        "passed is false): the JVP, the estimate, or both (each somewhere); null if none.",
    )


class JVPResponse(BaseModel):
    output: Outputs
    jvp: Any = Field(description="J·v, shaped like output.")
    dtype: str
    device: str
    engine: str
    method: Literal["forward", "decomposed", "double_vjp"]
    timing_ms: TimingMs
    check: GradientCheck | None = Field(None, description="With options.check only.")


class TensorInfo(BaseModel):
    name: str
    shape: list[int]
    dtype: str


class BufferInfo(BaseModel):
    name: str
    shape: list[int]


class ModelInfo(BaseModel):
    name: str
    description: str
    source: Literal["builtin", "repository"]
    inputs: list[TensorInfo] = Field(description="Input signature; -1 marks a size that may vary.")
    outputs: int = Field(description="How many outputs a JVP returns (after config selection).")
    parameters: list[TensorInfo]
    buffers: list[BufferInfo]
    state: Literal["ready"] = Field(
        "ready", description="ready: served (a failed reload leaves the old version ready)."
    )
    parameter_count: int = Field(0, description="Elements across all parameters.")
    default_dtype: str = Field(
        "float32", description="The computation dtype when a request gives no options.dtype."
    )
    max_batch_size: int | None = Field(
        0,
        description="From config.json; 0: no dynamic batching; null (built-in models): "
        "the service's JVP_MAX_BATCH_SIZE.",
    )


class ModelList(BaseModel):
    models: list[ModelInfo]


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Status(BaseModel):
    status: str


# Beyond one JVP: /jacobian, /hvp, /linearize (app/api/routes/derivatives.py).


class DerivativeOptions(ComputeOptions):
    dtype: str | None = _dtype("the model's default dtype")
    encoding: Literal["json", "b64"] = encoding_option()


class HVPOptions(DerivativeOptions):
    tangent_batch: bool = flag("Every tangent has a leading K; each hvp then has that leading K.")


class JacobianRequest(PointRequest):
    wrt: list[str] | None = Field(
        None, description="Input and parameter names to differentiate by; default all inputs."
    )
    options: DerivativeOptions = Field(default_factory=DerivativeOptions)


class JacobianResponse(BaseModel):
    output: Outputs
    jacobian: Any = Field(
        description='{"<name>": T} of shape output shape + that input\'s shape; a list of '
        "such maps for several outputs."
    )
    dtype: str
    device: str
    timing_ms: TimingMs


class HVPRequest(PointRequest):
    tangents: dict[str, Tensor] = _by_name("Per input; only inputs with a tangent are varied.")
    parameter_tangents: dict[str, Tensor] = _by_name(
        "Models only: tangents of parameters, by name."
    )
    output_index: int = Field(0, ge=0, description="Which output is the scalar (models).")
    reduction: Literal["sum", "mean", "none"] = Field(
        "none", description="How the output becomes a scalar; none needs a scalar output."
    )
    options: HVPOptions = Field(default_factory=HVPOptions)


class HVPResponse(BaseModel):
    output: Any = Field(description="The scalar value of the function.")
    hvp: Any = Field(description='{"<name>": T}: H·v for each input with a tangent.')
    dtype: str
    device: str
    timing_ms: TimingMs


class LinearizeOptions(DerivativeOptions):
    transpose: bool = flag(
        "Also keep what the reverse pass needs, for POST /linearize/{id}/vjp "
        "(counted in the session's bytes).",
    )


class LinearizeRequest(JacobianRequest):
    options: LinearizeOptions = Field(default_factory=LinearizeOptions)


class LinearizeResponse(BaseModel):
    id: str = Field(description="The session id for POST /linearize/{id}/jvp.")
    output: Any = Field(description="f(primals): a tensor, or a list for several outputs.")
    expires_at: str = Field(description="When the session is dropped (ISO 8601, UTC).")
    wrt: list[str] = Field(description="The names the tangents of /linearize/{id}/jvp may use.")
    bytes: int = Field(description="The session's estimated size, counted against the budget.")
    dtype: str
    device: str
    timing_ms: TimingMs


class LinearizedJVPOptions(Strict):
    tangent_batch: bool = flag("Tangents have a leading K.")
    encoding: Literal["json", "b64"] = encoding_option()


class LinearizedJVPRequest(Strict):
    tangents: dict[str, Tensor] = _by_name("Per input in the session's wrt; a missing one is zero.")
    parameter_tangents: dict[str, Tensor] = _by_name("Per parameter in the session's wrt.")
    options: LinearizedJVPOptions = Field(default_factory=LinearizedJVPOptions)


class LinearizedJVPResponse(BaseModel):
    jvp: Any = Field(description="J·t at the session's point; a list for several outputs.")
    timing_ms: TimingMs


# Shapes first: POST /eval_shape (app/services/shapes.py).

SHAPE_ONLY = (
    'Any tensor may be {"shape": [...], "dtype": "..."} with no data: only its shape is used.'
)


class EvalShapeRequest(BaseModel):
    """The body of /jvp, /jacobian, /hvp or /linearize, plus ``operation``."""

    model_config = ConfigDict(extra="allow")

    operation: Literal["jvp", "vjp", "jacobian", "hvp", "linearize", "solve"] = Field(
        "jvp",
        description="Whose shapes and cost: jvp, vjp, jacobian, hvp, linearize, solve (the "
        "whole solve at its iteration caps). The other fields are that route's body. " + SHAPE_ONLY,
    )
    expression: str | None = Field(None, description="An expression such as 'x**2 + y**2'.")
    model: str | None = Field(None, description="A registered model's name (GET /models).")
    primals: dict[str, Tensor] = Field(description="One tensor per input, by name. " + SHAPE_ONLY)


class ShapeSpec(BaseModel):
    shape: list[int]
    dtype: str


class Cost(BaseModel):
    flops: int = Field(description="Estimated floating-point operations of the computation.")
    peak_bytes: int = Field(description="Estimated peak bytes it holds while computing.")


class EvalShapeResponse(BaseModel):
    """``output`` and the operation's result (``jvp``, ``jacobian`` or ``hvp``) as shapes."""

    model_config = ConfigDict(extra="allow")

    output: ShapeSpec | list[ShapeSpec] = Field(description="What the operation's output is.")
    jvp: ShapeSpec | list[ShapeSpec] | None = Field(
        None, description="jvp (and linearize: a later J·t of the session): shaped like output."
    )
    jacobian: dict[str, ShapeSpec] | list[dict[str, ShapeSpec]] | None = Field(
        None, description="jacobian: per input, output shape + input shape."
    )
    hvp: dict[str, ShapeSpec] | None = Field(None, description="hvp: per input with a tangent.")
    vjp: dict[str, ShapeSpec] | None = Field(None, description="vjp: per name in wrt.")
    solution: dict[str, ShapeSpec] | None = Field(None, description="solve: per unknown.")
    cost: Cost
