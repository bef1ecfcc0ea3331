"""Bodies of POST /vjp and POST /linearize/{id}/vjp (API.md "Additions (v1.1)")."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from app.schemas import (
    ComputeOptions,
    Outputs,
    PointRequest,
    Strict,
    TimingMs,
    encoding_option,
    flag,
)

COTANGENTS = (
    "One tensor shaped like the output; for a function with several outputs a list, one "
    "per output, null for an output that gets no cotangent (it contributes nothing)."
)


class VJPOptions(ComputeOptions):
    encoding: Literal["json", "b64"] = encoding_option()
    cotangent_batch: bool = flag(
        "Every cotangent has a leading dimension K (the same for all); every vjp "
        "entry then has that leading K: Jᵀ·U for K cotangents in one call.",
    )
    check: bool = flag(
        "Also check <Jᵀu, v> against float64 central differences of J·v and the "
        "identity <u, J v> = <Jᵀu, v> for a random v, and report it ('check').",
    )


class VJPRequest(PointRequest):
    cotangents: Any = Field(description=COTANGENTS)
    wrt: list[str] | None = Field(
        None, description="Input and parameter names to differentiate by; default all inputs."
    )
    options: VJPOptions = Field(default_factory=VJPOptions)


class IdentityCheck(BaseModel):
    max_abs_error: float | str = Field(description="max |<u, J v> - <Jᵀu, v>|.")
    max_rel_error: float | str = Field(description="max_abs_error over the terms' magnitude.")
    passed: bool


class VJPCheck(BaseModel):
    """<Jᵀu, v> against float64 central differences (NOTE [VJP check] in app/engine/vjp.py)."""

    max_abs_error: float | str = Field(description="max |<Jᵀu, v> - <u, FD(J v)>|.")
    max_rel_error: float | str = Field(
        description="max_abs_error / max(Σ|u||J v|, Σ|Jᵀu||v|): relative to the terms."
    )
    passed: bool = Field(description="Both comparisons within tolerance, nothing non-finite.")
    eps: float | str = Field(description="The largest perturbation of any input element.")
    rtol: float
    atol: float
    nonfinite: Literal["jvp", "estimate", "both"] | None = Field(
        None, description="'jvp': the VJP's side is NaN or infinite where the estimate is not."
    )
    identity: IdentityCheck | None = Field(
        None,
        description="<u, J v> = <Jᵀu, v> with J v by forward mode; null where forward mode "
        "has no formula.",
    )


class VJPResponse(BaseModel):
    output: Outputs
    vjp: dict[str, Any] = Field(description='{"<name>": Jᵀu}, shaped like that input or parameter.')
    dtype: str
    device: str
    method: Literal["reverse"] = Field(description="torch.func.vjp (reverse-mode AD).")
    timing_ms: TimingMs
    check: VJPCheck | None = Field(None, description="With options.check only.")


class LinearizedVJPOptions(Strict):
    cotangent_batch: bool = flag("Cotangents have a leading K.")
    encoding: Literal["json", "b64"] = encoding_option()


class LinearizedVJPRequest(Strict):
    cotangents: Any = Field(description=COTANGENTS)
    options: LinearizedVJPOptions = Field(default_factory=LinearizedVJPOptions)


class LinearizedVJPResponse(BaseModel):
    vjp: dict[str, Any] = Field(description='{"<name>": Jᵀu} for every name in the session\'s wrt.')
    timing_ms: TimingMs
