"""Result types: plain dataclasses built from the service's JSON (API.md)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ._tensors import Array, parse_number

__all__ = [
    "BufferSpec",
    "EvalShapeResult",
    "GradientCheck",
    "HVPResult",
    "HealthStatus",
    "JVPResult",
    "JacobianResult",
    "LinearizationInfo",
    "JobInfo",
    "JobResultsPage",
    "JobTaskError",
    "JobTaskResult",
    "ModelInfo",
    "ShapeInfo",
    "TensorSpec",
]

#: Job statuses after which nothing changes any more.
FINISHED_STATUSES = frozenset({"completed", "cancelled", "failed"})


@dataclass(frozen=True)
class GradientCheck:
    """``options.check`` of ``POST /jvp``: the JVP against float64 central finite differences.

    ``passed`` is ``max_abs_error <= atol + rtol * max(|fd|_inf, |jvp|_inf)``; the
    errors may be NaN or infinite (the service writes them as strings; here they
    are floats).
    """

    max_abs_error: float
    max_rel_error: float
    passed: bool
    eps: float
    rtol: float | None = None
    atol: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> GradientCheck:
        passed = obj["passed"]
        if not isinstance(passed, bool):
            raise ValueError(f"check.passed: expected true or false, got {passed!r}")

        def optional(key: str) -> float | None:
            value = obj.get(key)
            return None if value is None else parse_number(value)

        return cls(
            max_abs_error=parse_number(obj["max_abs_error"]),
            max_rel_error=parse_number(obj["max_rel_error"]),
            passed=passed,
            eps=parse_number(obj["eps"]),
            rtol=optional("rtol"),
            atol=optional("atol"),
            raw=dict(obj),
        )

    def summary(self) -> str:
        """One line for people: verdict, errors and tolerances."""
        verdict = "passed" if self.passed else "FAILED"
        text = (
            f"check {verdict}: max abs error {self.max_abs_error:.3g}, "
            f"max rel error {self.max_rel_error:.3g} (eps {self.eps:.3g}"
        )
        if self.rtol is not None and self.atol is not None:
            text += f", rtol {self.rtol:g}, atol {self.atol:g}"
        return text + ")"


@dataclass(frozen=True)
class Computed:
    """What every computing route's answer says besides its tensors (keyword-only, so
    each answer class lists its own fields first): the computation ``dtype`` and
    ``device``, ``timing_ms``, the ``raw`` body and the ``request_id``."""

    dtype: str = field(kw_only=True)
    device: str = field(kw_only=True)
    timing_ms: dict[str, float] = field(kw_only=True)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, kw_only=True)
    #: The ``X-Request-ID`` of the response (quote it when reporting a problem).
    request_id: str | None = field(default=None, kw_only=True)

    def __repr__(self) -> str:
        """The answer's own fields first, then these (the subclasses set ``repr=False``)."""
        shown = [f.name for f in fields(self) if f.repr]
        order = [n for n in shown if n not in _COMPUTED] + [n for n in shown if n in _COMPUTED]
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in order)})"


_COMPUTED = frozenset(f.name for f in fields(Computed))


@dataclass(frozen=True, repr=False)
class JVPResult(Computed):
    """The answer of ``POST /jvp``.

    ``output`` and ``jvp`` are arrays (numpy, or torch when torch tensors went
    in), or lists of arrays when the function returns several tensors. It unpacks
    as JAX's ``jax.jvp`` answers: ``out, jvp = client.jvp(...)``.
    """

    output: Array | list[Array]
    jvp: Array | list[Array]
    engine: str | None
    method: str | None
    check: GradientCheck | None = None

    def __iter__(self) -> Iterator[Array | list[Array]]:
        """``out, jvp = client.jvp(...)``, as ``jax.jvp`` answers ``(out, tangent_out)``."""
        return iter((self.output, self.jvp))


@dataclass(frozen=True, repr=False)
class JacobianResult(Computed):
    """The answer of ``POST /jacobian``.

    ``jacobian`` maps each name of ``wrt`` to an array of shape output shape +
    that input's (or parameter's) shape; for a function with several outputs,
    ``output`` is a list and ``jacobian`` a list of such maps, one per output.
    """

    output: Array | list[Array]
    jacobian: dict[str, Array] | list[dict[str, Array]]


@dataclass(frozen=True, repr=False)
class HVPResult(Computed):
    """The answer of ``POST /hvp``: the scalar ``output`` and ``hvp``, H·v per name."""

    output: Array
    hvp: dict[str, Array]


@dataclass(frozen=True, repr=False)
class LinearizationInfo(Computed):
    """The answer of ``POST /linearize``: a session kept on the service until ``expires_at``.

    ``wrt`` are the names the session's tangents may use; ``bytes`` is its estimated
    size (counted against the service's budget); ``expires_at`` is ISO 8601 (UTC).
    """

    id: str
    output: Array | list[Array]
    expires_at: str
    wrt: list[str]
    bytes: int


@dataclass(frozen=True)
class TensorSpec:
    """An input or parameter of a model; a dimension that may vary is ``-1``."""

    name: str
    shape: list[int]
    dtype: str | None = None

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TensorSpec:
        return cls(
            name=str(obj["name"]),
            shape=[int(n) for n in obj.get("shape", [])],
            dtype=obj.get("dtype"),
        )


@dataclass(frozen=True)
class BufferSpec:
    """A buffer of a model (not differentiated)."""

    name: str
    shape: list[int]

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> BufferSpec:
        return cls(name=str(obj["name"]), shape=[int(n) for n in obj.get("shape", [])])


@dataclass(frozen=True)
class ModelInfo:
    """``GET /models/{name}``."""

    name: str
    description: str
    source: str
    inputs: list[TensorSpec]
    outputs: int
    parameters: list[TensorSpec]
    buffers: list[BufferSpec]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    #: The ``X-Request-ID`` of the response (quote it when reporting a problem).
    request_id: str | None = None

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ModelInfo:
        return cls(
            name=str(obj["name"]),
            description=str(obj.get("description") or ""),
            source=str(obj.get("source") or ""),
            inputs=[TensorSpec.from_json(i) for i in obj.get("inputs", [])],
            outputs=int(obj.get("outputs", 1)),
            parameters=[TensorSpec.from_json(p) for p in obj.get("parameters", [])],
            buffers=[BufferSpec.from_json(b) for b in obj.get("buffers", [])],
            raw=dict(obj),
        )


@dataclass(frozen=True)
class HealthStatus:
    """``GET /healthz`` (live) and ``GET /readyz`` (ready)."""

    live: bool
    ready: bool
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobInfo:
    """A batch job's state: ``done`` counts ended tasks, ``failed`` those that ended in error,
    ``cancelled`` those that never ran because the job was cancelled.

    ``started_at``/``finished_at``: when the first task started and the job completed or
    was cancelled (ISO 8601, None until then); ``eta_s``: seconds until it completes at
    its rate so far (None before a rate is known, 0 once finished).
    """

    id: str
    status: str
    total: int
    done: int
    failed: int
    created_at: str | None = None
    updated_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    cancelled: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    eta_s: float | None = None
    #: The ``X-Request-ID`` of the response this state came in.
    request_id: str | None = None

    @property
    def finished(self) -> bool:
        """Whether the job reached a final status (completed or cancelled)."""
        return self.status in FINISHED_STATUSES

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> JobInfo:
        return cls(
            id=str(obj["id"]),
            status=str(obj["status"]),
            total=int(obj.get("total", 0)),
            done=int(obj.get("done", 0)),
            failed=int(obj.get("failed", 0)),
            created_at=obj.get("created_at"),
            updated_at=obj.get("updated_at"),
            raw=dict(obj),
            cancelled=int(obj.get("cancelled") or 0),
            started_at=obj.get("started_at"),
            finished_at=obj.get("finished_at"),
            eta_s=None if obj.get("eta_s") is None else float(obj["eta_s"]),
        )


@dataclass(frozen=True)
class JobTaskError:
    """The error one task of a job ended with (same fields as an HTTP error body)."""

    type: str | None
    message: str
    param: str | None = None


@dataclass(frozen=True)
class JobTaskResult:
    """One task's result: ``output``/``jvp`` on success, ``error`` on failure."""

    index: int
    output: Array | list[Array] | None = None
    jvp: Array | list[Array] | None = None
    error: JobTaskError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class JobResultsPage:
    """One page of ``GET /jobs/{id}/results``; ``next_offset`` is None on the last page."""

    results: list[JobTaskResult]
    next_offset: int | None


@dataclass(frozen=True)
class ShapeInfo:
    """A tensor without data: what ``POST /eval_shape`` answers, and may be sent
    (``primals={"x": ShapeInfo((1000, 64))}``) in place of a tensor there."""

    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class EvalShapeResult:
    """The answer of ``POST /eval_shape``: the shapes an operation would answer, and its
    estimated cost, computing nothing.

    ``output``: a `ShapeInfo` (a list for several outputs); ``result``: the operation's
    result (``jvp``: shaped like output; ``jacobian``: ``{name: ShapeInfo}``, a list of
    maps for several outputs; ``hvp``: ``{name: ShapeInfo}``; ``linearize``: a later
    J·t's shapes); ``flops`` and ``peak_bytes``: the service's estimates.
    """

    output: ShapeInfo | list[ShapeInfo]
    result: Any
    flops: int
    peak_bytes: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    #: The ``X-Request-ID`` of the response (quote it when reporting a problem).
    request_id: str | None = None
