"""Bodies of POST /solve (API.md "Additions (v1.1)" and "POST /solve")."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from app.schemas import Strict, Tensor, TimingMs, encoding_option


class SolveOptions(Strict):
    tol: float = Field(
        1e-8,
        gt=0,
        description="newton_krylov: ||f|| <= tol; least_squares: ||f|| <= tol or ||Jᵀf|| <= tol; "
        "linear: ||J δ - rhs|| <= tol ||rhs||.",
    )
    max_iterations: int = Field(
        50, ge=1, le=10_000, description="Newton (or Gauss-Newton) iterations at most."
    )
    krylov: Literal["gmres", "bicgstab", "cg"] = Field(
        "gmres",
        description="The Krylov method of each linear solve (least_squares always uses LSMR). "
        "cg only for a symmetric positive definite J: otherwise it stops with a reason.",
    )
    krylov_tol: float | Literal["auto"] = Field(
        "auto",
        description="Relative tolerance of each Newton step's linear solve; auto: the "
        "Eisenstat-Walker forcing term.",
    )

    @field_validator("krylov_tol")
    @classmethod
    def _forcing_in_range(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and not 0.0 < value < 1.0:
            raise ValueError(f"krylov_tol is in (0, 1) (a relative tolerance) or auto; got {value}")
        return value

    max_krylov: int = Field(
        200, ge=1, le=100_000, description="Products of J per linear solve at most."
    )
    restart: int = Field(50, ge=1, le=1000, description="GMRES restarts every this many products.")
    line_search: bool = Field(True, description="Backtrack each Newton step until ||f|| decreases.")
    dtype: str | None = Field(
        None,
        description="Computation dtype (float16, bfloat16, float32, float64). Unset: float64 "
        "(a tolerance of 1e-8 needs it).",
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    encoding: Literal["json", "b64"] = encoding_option()


class SolveRequest(Strict):
    expression: str | None = Field(None, description="An expression such as 'u**3 - a'.")
    model: str | None = Field(None, description="A registered model's name (GET /models).")
    primals: dict[str, Tensor] = Field(
        description="One tensor per input; those of the unknowns are the initial guess."
    )
    unknowns: list[str] = Field(description="Input names solved for; the others stay fixed.")
    method: Literal["newton_krylov", "linear", "least_squares"] = Field(
        "newton_krylov",
        description="newton_krylov: f = 0; linear: J δ = rhs at the primals; least_squares: "
        "min ||f||² (Gauss-Newton / Levenberg-Marquardt with LSMR).",
    )
    rhs: Any = Field(
        None,
        description="linear only: shaped like f's output (a list, one per output, for several).",
    )
    options: SolveOptions = Field(default_factory=SolveOptions)


class SolveStep(BaseModel):
    iteration: int
    residual_norm: float = Field(description="||f|| after the iteration (linear: ||J δ - rhs||).")
    krylov_iterations: int = Field(description="Products of J the iteration's linear solve took.")
    step: float = Field(
        description="The step length taken (the line search's; 0: a refused Levenberg-"
        "Marquardt step)."
    )


class SolveResponse(BaseModel):
    solution: dict[str, Any] = Field(
        description='{"<unknown>": T} (linear: δ, shaped like the unknowns).'
    )
    output: Any = Field(description="f at the solution (a list for several outputs).")
    residual_norm: float | str = Field(
        description="||f|| at the solution (linear: ||J δ - rhs||); a string for NaN."
    )
    converged: bool
    iterations: int
    jvp_count: int = Field(description="J·v products computed (forward mode).")
    vjp_count: int = Field(description="Jᵀ·u products computed (reverse mode).")
    history: list[SolveStep]
    reason: str | None = Field(
        None, description="Why it stopped short: a NaN or infinity, a breakdown, no decrease."
    )
    dtype: str
    device: str
    timing_ms: TimingMs
