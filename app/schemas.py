"""Request and response bodies, as the OpenAPI schema shows them (API.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Tensors are validated by app.codec, which gives messages naming the tensor;
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


class JVPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: str = Field(
        "float32",
        description="Computation dtype: float16, bfloat16, float32, float64 (or FP16...).",
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    engine: Literal["dual", "functional"] = Field(
        "dual", description="dual: make_dual/unpack_dual; functional: torch.func.jvp."
    )
    encoding: Literal["json", "b64"] = Field("json", description="Response tensors as data or b64.")
    fallback: Literal["auto", "none"] = Field(
        "auto", description="Whether anything but forward AD may compute the JVP."
    )


class JVPRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expression: str | None = Field(None, description="An expression such as 'x**2 + y**2'.")
    model: str | None = Field(None, description="A registered model's name (GET /models).")
    primals: dict[str, Tensor] = Field(description="One tensor per input, by name.")
    tangents: dict[str, Tensor] = Field(
        default_factory=dict, description="Per input; a missing one is zero."
    )
    parameter_tangents: dict[str, Tensor] = Field(
        default_factory=dict, description="Models only: tangents of parameters, by name."
    )
    options: JVPOptions = Field(default_factory=JVPOptions)


class TimingMs(BaseModel):
    queue: float
    compute: float
    total: float


class JVPResponse(BaseModel):
    output: Any = Field(description="A tensor, or a list of tensors for several outputs.")
    jvp: Any = Field(description="J·v, shaped like output.")
    dtype: str
    device: str
    engine: str
    method: Literal["forward", "decomposed", "double_vjp"]
    timing_ms: TimingMs


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
    inputs: list[TensorInfo]
    outputs: int
    parameters: list[TensorInfo]
    buffers: list[BufferInfo]


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
