"""What the sync and async clients share: configuration, request bodies, retry policy, parsing.

Nothing here performs I/O; :mod:`jvp_client._client` sends the requests.

# NOTE [retries]
A request is retried, up to ``max_retries`` times, after a connection error or
timeout and after a 408, 429, 503 or any other 5xx except 501 (the operator has
no forward-AD formula: retrying cannot help) and 507 (out of device memory: the
same request would most likely run out again). Every request the client sends
is safe to repeat: GETs and DELETEs, ``POST /jvp``, ``/jacobian``, ``/hvp`` and
``/linearize/{id}/jvp`` (pure computations), ``POST /jobs``, which carries one
``Idempotency-Key`` for all its attempts so a retried submission returns the job
already made, and ``POST /linearize``: a 503 (the sessions' memory budget is
spent) made no session, and an attempt that timed out after the service made
one leaves a session nobody knows, which the service drops when it expires.
The delay is the response's ``Retry-After`` (seconds or an HTTP date) when
there is one, capped at ``MAX_RETRY_AFTER_S``; otherwise an exponential backoff
from ``INITIAL_RETRY_DELAY_S`` doubling up to ``MAX_RETRY_DELAY_S``, less up to
25% jitter so clients that failed together do not retry together.

# NOTE [binary bodies]
``POST /jvp`` also takes and gives safetensors files (``application/x-safetensors``,
README "Binary bodies" of the service): raw little-endian bytes beside a JSON
header, so no number is written or parsed as text and nothing is base64'd. A
``jvp()`` whose primals, tangents and parameter tangents hold at least
``binary_min_elements`` elements in all (65,536 by default; None: never) is sent
that way: tensors ``primals/<name>``, ``tangents/<name>``,
``parameter_tangents/<name>``, the rest of the request (``expression`` or
``model``, ``options``) as JSON in the metadata under ``"request"``; with
``Accept: application/x-safetensors`` the answer holds tensors ``output`` and
``jvp`` (``output/0``, ``jvp/0``, ... for several outputs) and the other fields
as JSON in the metadata under ``"response"``. Each tensor keeps its dtype (Python
numbers and lists, and integer arrays, go as the computation dtype, else float64;
the service casts). The other routes are JSON only. Errors are JSON envelopes
either way. The file is written and read by ``_safetensors.py`` (numpy only).
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from ._exceptions import APIResponseValidationError
from ._safetensors import SAFETENSORS, decode_safetensors, encode_safetensors
from ._tensors import (
    B64_MIN_ELEMENTS,
    Array,
    count_elements,
    decode_tensor,
    decode_tensors,
    encode_tensor,
    encode_tensor_map,
    infer_dtype,
    is_torch_tensor,
    normalize_dtype,
)
from ._tensors import _to_output as to_output
from ._tensors import _to_wire_array as to_wire_array
from ._types import (
    EvalShapeResult,
    GradientCheck,
    HVPResult,
    JacobianResult,
    JobInfo,
    JobResultsPage,
    JobTaskError,
    JobTaskResult,
    JVPResult,
    LinearizationInfo,
    ModelInfo,
    ShapeInfo,
)
from ._version import __version__

__all__ = [
    "B64_MIN_ELEMENTS",
    "BINARY_MIN_ELEMENTS",
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "NOT_GIVEN",
    "BaseClient",
    "Encoding",
    "OutputKind",
    "REDUCTIONS",
    "Reduction",
    "TimeoutTypes",
    "job_path",
    "linearization_path",
    "model_path",
]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
DEFAULT_MAX_RETRIES = 2
#: ``POST /jvp`` requests with at least this many elements in all go as safetensors.
BINARY_MIN_ELEMENTS = 65_536
INITIAL_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 8.0
MAX_RETRY_AFTER_S = 60.0

TimeoutTypes = float | httpx.Timeout | None
Encoding = Literal["auto", "json", "b64"]
Reduction = Literal["sum", "mean", "none"]
REDUCTIONS: tuple[str, ...] = ("sum", "mean", "none")
_RETRY_STATUSES = frozenset({408, 429})
_NO_RETRY_STATUSES = frozenset({501, 507})


class _NotGiven:
    """Marks an argument left out, where None means something (``timeout=None``: no timeout)."""

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN: Any = _NotGiven()


@dataclass(frozen=True)
class OutputKind:
    """How decoded tensors are returned: torch tensors (on ``device``) or numpy arrays."""

    as_torch: bool = False
    device: Any = None

    @classmethod
    def of(cls, *maps: Mapping[str, object] | None) -> OutputKind:
        """torch output on the first torch input's device when any input is a torch tensor."""
        for values in maps:
            for value in (values or {}).values():
                if is_torch_tensor(value):
                    return cls(as_torch=True, device=value.device)  # type: ignore[attr-defined]
        return cls()


class BaseClient:
    """Configuration and request logic shared by :class:`JVPClient` and :class:`AsyncJVPClient`."""

    base_url: httpx.URL
    api_key: str | None
    timeout: TimeoutTypes
    max_retries: int

    def __init__(
        self,
        *,
        base_url: str | httpx.URL | None,
        api_key: str | None,
        timeout: TimeoutTypes | _NotGiven,
        max_retries: int,
        b64_min_elements: int,
        binary_min_elements: int | None = BINARY_MIN_ELEMENTS,
    ) -> None:
        if base_url is None:
            base_url = os.environ.get("JVP_BASE_URL") or DEFAULT_BASE_URL
        if api_key is None:
            api_key = os.environ.get("JVP_API_KEY") or None
        if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
            raise ValueError(f"max_retries: expected an int >= 0, got {max_retries!r}")
        if not isinstance(b64_min_elements, int) or b64_min_elements < 0:
            raise ValueError(f"b64_min_elements: expected an int >= 0, got {b64_min_elements!r}")
        if binary_min_elements is not None and (
            not isinstance(binary_min_elements, int)
            or isinstance(binary_min_elements, bool)
            or binary_min_elements < 0
        ):
            raise ValueError(
                f"binary_min_elements: expected an int >= 0 or None, got {binary_min_elements!r}"
            )
        url = httpx.URL(str(base_url))
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url: expected an http(s) URL, got {str(base_url)!r}")
        # A trailing slash so relative paths join below any prefix (http://host/api/ + jvp).
        self.base_url = url.copy_with(path=url.path.rstrip("/") + "/")
        self.api_key = api_key
        self.timeout = DEFAULT_TIMEOUT if isinstance(timeout, _NotGiven) else timeout
        self.max_retries = max_retries
        self.b64_min_elements = b64_min_elements
        self.binary_min_elements = binary_min_elements

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={str(self.base_url)!r})"

    # -- requests -------------------------------------------------------------------------

    def _url(self, path: str) -> httpx.URL:
        return self.base_url.join(path.lstrip("/"))

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": f"jvp-client/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if extra:
            headers.update(extra)
        return headers

    def _request_parts(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: TimeoutTypes | _NotGiven = NOT_GIVEN,
    ) -> dict[str, Any]:
        """Keyword arguments for ``http_client.build_request`` (sync and async alike).

        The body is ``json_body`` (sent as JSON) or ``content`` (bytes, whose
        ``Content-Type`` is in ``headers``).
        """
        all_headers = self._headers(headers)
        if json_body is not None:
            # allow_nan=False: JSON has no NaN; tensors spell it "NaN" (see _tensors.py).
            content = json.dumps(json_body, allow_nan=False, separators=(",", ":")).encode()
            all_headers["Content-Type"] = "application/json"
        return {
            "method": method,
            "url": self._url(path),
            "content": content,
            "params": params,
            "headers": all_headers,
            "timeout": self.timeout if isinstance(timeout, _NotGiven) else timeout,
        }

    @staticmethod
    def _should_retry(response: httpx.Response) -> bool:
        """See NOTE [retries]."""
        code = response.status_code
        if code in _NO_RETRY_STATUSES:
            return False
        return code in _RETRY_STATUSES or code >= 500

    @staticmethod
    def _retry_after_s(response: httpx.Response | None) -> float | None:
        """The delay a response asks for (``Retry-After``/``Retry-After-Ms``), or None."""
        if response is None:
            return None
        ms = response.headers.get("retry-after-ms")
        if ms is not None:
            try:
                return max(0.0, float(ms) / 1000.0)
            except ValueError:
                pass
        value = response.headers.get("retry-after")
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                return None
            seconds = when.timestamp() - time.time()
        if math.isnan(seconds):
            return None
        return max(0.0, seconds)

    def _retry_delay_s(self, retries_taken: int, response: httpx.Response | None) -> float:
        """How long to wait before retry number ``retries_taken + 1``; see NOTE [retries]."""
        retry_after = self._retry_after_s(response)
        if retry_after is not None:
            return min(retry_after, MAX_RETRY_AFTER_S)
        delay = min(INITIAL_RETRY_DELAY_S * 2.0**retries_taken, MAX_RETRY_DELAY_S)
        return delay * (1.0 - 0.25 * random.random())

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise APIResponseValidationError(
                f"Expected a JSON body from {response.request.method} {response.request.url.path},"
                f" got {response.text[:200]!r}",
                response=response,
            ) from exc

    # -- bodies ---------------------------------------------------------------------------

    def _options(
        self,
        *,
        dtype: str | None,
        device: str | None,
        engine: str | None,
        fallback: str | None,
        encoding: str | None,
        extra: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        options: dict[str, Any] = dict(extra or {})
        for key, value in (
            ("dtype", dtype),
            ("device", device),
            ("engine", engine),
            ("fallback", fallback),
            ("encoding", encoding),
        ):
            if value is not None:
                options[key] = value
        return options

    def _point_body(
        self,
        *,
        where: str,
        expression: str | None,
        model: str | None,
        primals: Mapping[str, object],
        tangents: Mapping[str, object] | None = None,
        parameter_tangents: Mapping[str, object] | None = None,
        dtype: object,
        encoding: Encoding,
    ) -> tuple[dict[str, Any], str | None, str | None, OutputKind]:
        """The target and tensors of a request at one point (/jvp, /jacobian, /hvp, /linearize).

        Returns ``(body, computation dtype, response encoding, how to return tensors)``.
        """
        body = _target(expression, model, where=where)
        if not isinstance(primals, Mapping):
            raise TypeError(
                f"{where}: expected primals to be a mapping of input names to tensors, "
                f"got {type(primals).__name__}"
            )
        if parameter_tangents is not None and model is None:
            raise ValueError(f"{where}: parameter_tangents= is for models only (pass model=)")
        _check_encoding(encoding, where)
        wire_dtype = normalize_dtype(dtype)
        if wire_dtype is None:
            wire_dtype = infer_dtype(primals.values())
        any_b64 = False
        for key, values in (
            ("primals", primals),
            ("tangents", tangents),
            ("parameter_tangents", parameter_tangents),
        ):
            wire, used = encode_tensor_map(
                values, what=key, dtype=wire_dtype, b64_min_elements=self.b64_min_elements
            )
            if wire is not None:
                body[key] = wire
            any_b64 = any_b64 or used
        kind = OutputKind.of(primals, tangents, parameter_tangents)
        return body, wire_dtype, _response_encoding(encoding, any_b64), kind

    def _jvp_body(
        self,
        *,
        expression: str | None,
        model: str | None,
        primals: Mapping[str, object],
        tangents: Mapping[str, object] | None,
        parameter_tangents: Mapping[str, object] | None,
        dtype: object,
        device: str | None,
        engine: str | None,
        fallback: str | None,
        encoding: Encoding,
        options: Mapping[str, Any] | None,
        tangent_batch: bool = False,
        check: bool = False,
    ) -> tuple[dict[str, Any], OutputKind]:
        """The ``POST /jvp`` body, validated; and how to return its tensors."""
        body, wire_dtype, wire_encoding, kind = self._point_body(
            where="jvp()",
            expression=expression,
            model=model,
            primals=primals,
            tangents=tangents,
            parameter_tangents=parameter_tangents,
            dtype=dtype,
            encoding=encoding,
        )
        opts = self._options(
            dtype=wire_dtype,
            device=device,
            engine=engine,
            fallback=fallback,
            encoding=wire_encoding,
            extra=options,
        )
        _set_flag(opts, "tangent_batch", tangent_batch, "jvp()")
        _set_flag(opts, "check", check, "jvp()")
        if opts:
            body["options"] = opts
        return body, kind

    def _use_binary(self, *maps: Mapping[str, object] | None) -> bool:
        """Whether a ``POST /jvp`` goes as safetensors; see NOTE [binary bodies]."""
        threshold = self.binary_min_elements
        if threshold is None:
            return False
        total = 0
        for values in maps:
            if values is None:
                continue
            if not isinstance(values, Mapping):
                return False  # the JSON path raises the usual TypeError
            total += sum(count_elements(v) for v in values.values())
        return total >= threshold

    def _jvp_request(
        self,
        *,
        expression: str | None,
        model: str | None,
        primals: Mapping[str, object],
        tangents: Mapping[str, object] | None,
        parameter_tangents: Mapping[str, object] | None,
        dtype: object,
        device: str | None,
        engine: str | None,
        fallback: str | None,
        encoding: Encoding,
        options: Mapping[str, Any] | None,
        tangent_batch: bool,
        check: bool,
    ) -> tuple[dict[str, Any], OutputKind]:
        """Keyword arguments of ``_request`` for ``POST /jvp`` (a JSON or a safetensors
        body, see NOTE [binary bodies]), and how to return its tensors."""
        args: dict[str, Any] = {
            "expression": expression,
            "model": model,
            "primals": primals,
            "tangents": tangents,
            "parameter_tangents": parameter_tangents,
            "dtype": dtype,
            "device": device,
            "engine": engine,
            "fallback": fallback,
            "encoding": encoding,
            "options": options,
            "tangent_batch": tangent_batch,
            "check": check,
        }
        if not self._use_binary(primals, tangents, parameter_tangents):
            body, kind = self._jvp_body(**args)
            return {"json_body": body}, kind
        content, kind = self._jvp_safetensors_body(**args)
        headers = {"Content-Type": SAFETENSORS, "Accept": f"{SAFETENSORS}, application/json"}
        return {"content": content, "headers": headers}, kind

    def _jvp_safetensors_body(
        self,
        *,
        expression: str | None,
        model: str | None,
        primals: Mapping[str, object],
        tangents: Mapping[str, object] | None,
        parameter_tangents: Mapping[str, object] | None,
        dtype: object,
        device: str | None,
        engine: str | None,
        fallback: str | None,
        encoding: Encoding,
        options: Mapping[str, Any] | None,
        tangent_batch: bool = False,
        check: bool = False,
    ) -> tuple[bytes, OutputKind]:
        """The ``POST /jvp`` safetensors body, validated as :meth:`_jvp_body` validates."""
        where = "jvp()"
        request = _target(expression, model, where=where)
        if not isinstance(primals, Mapping):
            raise TypeError(
                f"{where}: expected primals to be a mapping of input names to tensors, "
                f"got {type(primals).__name__}"
            )
        if parameter_tangents is not None and model is None:
            raise ValueError(f"{where}: parameter_tangents= is for models only (pass model=)")
        _check_encoding(encoding, where)
        wire_dtype = normalize_dtype(dtype)
        if wire_dtype is None:
            wire_dtype = infer_dtype(primals.values())
        tensors: dict[str, tuple[Any, str]] = {}
        for group, values in (
            ("primals", primals),
            ("tangents", tangents),
            ("parameter_tangents", parameter_tangents),
        ):
            if values is None:
                continue
            if not isinstance(values, Mapping):
                raise TypeError(
                    f"{group}: expected a mapping of names to tensors, got {type(values).__name__}"
                )
            for name, value in values.items():
                if not isinstance(name, str):
                    raise TypeError(f"{group}: expected string names, got {name!r}")
                try:
                    array, wire, _ = to_wire_array(value, wire_dtype or "float64")
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"{group}[{name!r}]: {exc}") from exc
                tensors[f"{group}/{name}"] = (array, wire)
        opts = self._options(
            dtype=wire_dtype,
            device=device,
            engine=engine,
            fallback=fallback,
            encoding=None,  # the answer is safetensors: no JSON tensor form to choose
            extra=options,
        )
        _set_flag(opts, "tangent_batch", tangent_batch, where)
        _set_flag(opts, "check", check, where)
        if opts:
            request["options"] = opts
        text = json.dumps(request, allow_nan=False, separators=(",", ":"))
        kind = OutputKind.of(primals, tangents, parameter_tangents)
        return encode_safetensors(tensors, {"request": text}), kind

    def _jacobian_body(
        self,
        *,
        where: str,
        expression: str | None,
        model: str | None,
        primals: Mapping[str, object],
        wrt: str | Sequence[str] | None,
        dtype: object,
        device: str | None,
        encoding: Encoding,
        options: Mapping[str, Any] | None,
    ) -> tuple[dict[str, Any], OutputKind]:
        """The ``POST /jacobian`` body (``POST /linearize`` takes the same)."""
        body, wire_dtype, wire_encoding, kind = self._point_body(
            where=where,
            expression=expression,
            model=model,
            primals=primals,
            dtype=dtype,
            encoding=encoding,
        )
        if wrt is not None:
            body["wrt"] = _names(wrt, where)
        opts = self._options(
            dtype=wire_dtype,
            device=device,
            engine=None,
            fallback=None,
            encoding=wire_encoding,
            extra=options,
        )
        if opts:
            body["options"] = opts
        return body, kind

    def _hvp_body(
        self,
        *,
        expression: str | None,
        model: str | None,
        primals: Mapping[str, object],
        tangents: Mapping[str, object] | None,
        parameter_tangents: Mapping[str, object] | None,
        output_index: int,
        reduction: Reduction,
        tangent_batch: bool,
        dtype: object,
        device: str | None,
        encoding: Encoding,
        options: Mapping[str, Any] | None,
    ) -> tuple[dict[str, Any], OutputKind]:
        """The ``POST /hvp`` body: H·v along ``tangents`` of a scalar-valued function."""
        where = "hvp()"
        if tangents is None and parameter_tangents is None:
            raise ValueError(
                f"{where}: pass tangents= (or parameter_tangents= for a model): H·v is taken "
                "along the inputs that have one"
            )
        if isinstance(output_index, bool) or not isinstance(output_index, int) or output_index < 0:
            raise ValueError(
                f"{where}: expected output_index to be an int >= 0, got {output_index!r}"
            )
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"{where}: expected reduction 'sum', 'mean' or 'none', got {reduction!r}"
            )
        body, wire_dtype, wire_encoding, kind = self._point_body(
            where=where,
            expression=expression,
            model=model,
            primals=primals,
            tangents=tangents,
            parameter_tangents=parameter_tangents,
            dtype=dtype,
            encoding=encoding,
        )
        if output_index:
            body["output_index"] = output_index
        if reduction != "none":
            body["reduction"] = reduction
        opts = self._options(
            dtype=wire_dtype,
            device=device,
            engine=None,
            fallback=None,
            encoding=wire_encoding,
            extra=options,
        )
        _set_flag(opts, "tangent_batch", tangent_batch, where)
        if opts:
            body["options"] = opts
        return body, kind

    def _linearized_jvp_body(
        self,
        *,
        tangents: Mapping[str, object] | None,
        parameter_tangents: Mapping[str, object] | None,
        dtype: str | None,
        tangent_batch: bool,
        encoding: Encoding,
    ) -> tuple[dict[str, Any], OutputKind | None]:
        """The ``POST /linearize/{id}/jvp`` body; tensors without a dtype take the session's.

        The kind is None when no torch tensor went in (the session's kind then applies).
        """
        where = "Linearization.jvp()"
        _check_encoding(encoding, where)
        body: dict[str, Any] = {}
        any_b64 = False
        for key, values in (("tangents", tangents), ("parameter_tangents", parameter_tangents)):
            wire, used = encode_tensor_map(
                values, what=key, dtype=dtype, b64_min_elements=self.b64_min_elements
            )
            if wire is not None:
                body[key] = wire
            any_b64 = any_b64 or used
        opts: dict[str, Any] = {}
        _set_flag(opts, "tangent_batch", tangent_batch, where)
        wire_encoding = _response_encoding(encoding, any_b64)
        if wire_encoding is not None:
            opts["encoding"] = wire_encoding
        if opts:
            body["options"] = opts
        kind = OutputKind.of(tangents, parameter_tangents)
        return body, kind if kind.as_torch else None

    def _job_body(
        self,
        tasks: Iterable[Mapping[str, Any]],
        *,
        expression: str | None,
        model: str | None,
        dtype: object,
        device: str | None,
        engine: str | None,
        fallback: str | None,
        encoding: Encoding,
        options: Mapping[str, Any] | None,
    ) -> tuple[dict[str, Any], OutputKind]:
        """The ``POST /jobs`` body: job-wide defaults and tasks that may override them."""
        if isinstance(tasks, (str, bytes, Mapping)) or not isinstance(tasks, Iterable):
            raise TypeError(
                "submit_job(): expected tasks to be a list of task mappings, "
                f"got {type(tasks).__name__}"
            )
        task_list = list(tasks)
        if not task_list:
            raise ValueError("submit_job(): expected at least one task, got none")
        if expression is not None and model is not None:
            raise TypeError("submit_job(): pass at most one of expression= or model=")
        if encoding not in ("auto", "json", "b64"):
            raise ValueError(
                f"submit_job(): expected encoding 'auto', 'json' or 'b64', got {encoding!r}"
            )
        wire_dtype = normalize_dtype(dtype)
        if wire_dtype is None:
            wire_dtype = infer_dtype(
                v
                for task in task_list
                if isinstance(task, Mapping)
                for v in (task.get("primals") or {}).values()
            )
        body: dict[str, Any] = {}
        if expression is not None:
            body["expression"] = expression
        if model is not None:
            body["model"] = model
        any_b64 = False
        kinds: list[OutputKind] = []
        wire_tasks = []
        for i, task in enumerate(task_list):
            where = f"submit_job(): tasks[{i}]"
            if not isinstance(task, Mapping):
                raise TypeError(f"{where}: expected a mapping, got {type(task).__name__}")
            if "expression" in task and "model" in task:
                raise TypeError(f"{where}: pass at most one of 'expression' or 'model'")
            if "expression" not in task and "model" not in task and not body:
                raise ValueError(f"{where}: no expression or model (set one job-wide or per task)")
            if not isinstance(task.get("primals"), Mapping):
                raise TypeError(f"{where}: expected 'primals' to be a mapping of names to tensors")
            task_options = task.get("options") or {}
            task_dtype = normalize_dtype(task_options.get("dtype")) or wire_dtype
            wire_task = dict(task)
            for key in ("primals", "tangents", "parameter_tangents"):
                wire, used = encode_tensor_map(
                    task.get(key),
                    what=f"{where}.{key}",
                    dtype=task_dtype,
                    b64_min_elements=self.b64_min_elements,
                )
                if wire is not None:
                    wire_task[key] = wire
                any_b64 = any_b64 or used
            wire_tasks.append(wire_task)
            kinds.append(
                OutputKind.of(
                    task.get("primals"), task.get("tangents"), task.get("parameter_tangents")
                )
            )
        body["tasks"] = wire_tasks
        opts = self._options(
            dtype=wire_dtype,
            device=device,
            engine=engine,
            fallback=fallback,
            encoding=_response_encoding(encoding, any_b64),
            extra=options,
        )
        if opts:
            body["options"] = opts
        kind = next((k for k in kinds if k.as_torch), OutputKind())
        return body, kind

    # -- parsing --------------------------------------------------------------------------

    def _parse_jvp(self, response: httpx.Response, kind: OutputKind) -> JVPResult:
        media = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media == SAFETENSORS:
            return self._parse_jvp_safetensors(response, kind)
        body = self._json(response)
        try:
            output = decode_tensors(body["output"], as_torch=kind.as_torch, device=kind.device)
            jvp = decode_tensors(body["jvp"], as_torch=kind.as_torch, device=kind.device)
            timing = _timing(body)
            return JVPResult(
                output=output,
                jvp=jvp,
                dtype=str(body.get("dtype", "")),
                device=str(body.get("device", "")),
                engine=body.get("engine"),
                method=body.get("method"),
                timing_ms=timing,
                check=None if body.get("check") is None else GradientCheck.from_json(body["check"]),
                raw=body,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise APIResponseValidationError(
                f"Unexpected /jvp response: {exc}", response=response, body=body
            ) from exc

    def _parse_jvp_safetensors(self, response: httpx.Response, kind: OutputKind) -> JVPResult:
        """A safetensors ``POST /jvp`` answer; see NOTE [binary bodies]."""
        try:
            tensors, metadata = decode_safetensors(response.content)
        except ValueError as exc:
            raise APIResponseValidationError(
                f"Unexpected /jvp response: not a valid safetensors body: {exc}",
                response=response,
            ) from exc
        body: Any = None
        try:
            body = json.loads(metadata.get("response", "{}"))
            if not isinstance(body, dict):
                raise TypeError(f"the 'response' metadata is a {type(body).__name__}")

            def pick(key: str) -> Array | list[Array]:
                def out(name: str) -> Array:
                    array, wire = tensors[name]
                    return to_output(array, wire, as_torch=kind.as_torch, device=kind.device)

                if key in tensors:
                    return out(key)
                count = sum(1 for name in tensors if name.startswith(f"{key}/"))
                if not count:
                    raise KeyError(f"no tensor {key!r} or {key + '/0'!r}")
                return [out(f"{key}/{i}") for i in range(count)]

            return JVPResult(
                output=pick("output"),
                jvp=pick("jvp"),
                dtype=str(body.get("dtype", "")),
                device=str(body.get("device", "")),
                engine=body.get("engine"),
                method=body.get("method"),
                timing_ms=_timing(body),
                check=None if body.get("check") is None else GradientCheck.from_json(body["check"]),
                raw=body,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise APIResponseValidationError(
                f"Unexpected /jvp response: {exc}", response=response, body=body
            ) from exc

    def _parse_jacobian(self, response: httpx.Response, kind: OutputKind) -> JacobianResult:
        body = self._json(response)
        try:
            blocks = body["jacobian"]
            jacobian: dict[str, Array] | list[dict[str, Array]]
            if isinstance(blocks, list):
                jacobian = [_decode_map(block, kind) for block in blocks]
            else:
                jacobian = _decode_map(blocks, kind)
            return JacobianResult(
                output=decode_tensors(body["output"], as_torch=kind.as_torch, device=kind.device),
                jacobian=jacobian,
                dtype=str(body.get("dtype", "")),
                device=str(body.get("device", "")),
                timing_ms=_timing(body),
                raw=body,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise APIResponseValidationError(
                f"Unexpected /jacobian response: {exc}", response=response, body=body
            ) from exc

    def _eval_shape_body(
        self,
        *,
        operation: str,
        expression: str | None,
        model: str | None,
        primals: Mapping[str, object],
        tangents: Mapping[str, object] | None,
        parameter_tangents: Mapping[str, object] | None,
        wrt: str | Sequence[str] | None,
        output_index: int | None,
        reduction: str | None,
        tangent_batch: bool,
        dtype: object,
        device: str | None,
        options: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """The body of ``POST /eval_shape``: `ShapeInfo` values (or ``{"shape", "dtype"}``
        mappings) travel without data; arrays as they would to the operation."""
        where = "eval_shape()"
        body = _target(expression, model, where=where)
        body["operation"] = operation
        wire_dtype = normalize_dtype(dtype)
        for key, values in (
            ("primals", primals),
            ("tangents", tangents),
            ("parameter_tangents", parameter_tangents),
        ):
            if values is None:
                continue
            if not isinstance(values, Mapping):
                raise TypeError(f"{where}: expected {key} to be a mapping of names to tensors")
            wire: dict[str, Any] = {}
            for name, value in values.items():
                if isinstance(value, ShapeInfo):
                    wire[name] = {"shape": [int(d) for d in value.shape], "dtype": value.dtype}
                elif isinstance(value, Mapping) and "shape" in value:
                    wire[name] = dict(value)
                else:
                    wire[name], _ = encode_tensor(
                        value, dtype=wire_dtype, b64_min_elements=self.b64_min_elements
                    )
            body[key] = wire
        if wrt is not None:
            body["wrt"] = [wrt] if isinstance(wrt, str) else list(wrt)
        if output_index is not None:
            body["output_index"] = output_index
        if reduction is not None:
            body["reduction"] = reduction
        opts: dict[str, Any] = dict(options or {})
        if tangent_batch:
            opts["tangent_batch"] = True
        if wire_dtype is not None:
            opts["dtype"] = wire_dtype
        if device is not None:
            opts["device"] = device
        if opts:
            body["options"] = opts
        return body

    def _parse_eval_shape(self, response: httpx.Response, operation: str) -> EvalShapeResult:
        body = self._json(response)

        def specs(value: Any) -> Any:
            if isinstance(value, dict) and "shape" in value:
                return ShapeInfo(tuple(int(d) for d in value["shape"]), str(value["dtype"]))
            if isinstance(value, dict):
                return {str(k): specs(v) for k, v in value.items()}
            if isinstance(value, list):
                return [specs(v) for v in value]
            raise TypeError(f"expected a shape, got {value!r}")

        name = {"linearize": "jvp"}.get(operation, operation)
        try:
            cost = body["cost"]
            return EvalShapeResult(
                output=specs(body["output"]),
                result=specs(body[name]),
                flops=int(cost["flops"]),
                peak_bytes=int(cost["peak_bytes"]),
                raw=body,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise APIResponseValidationError(
                f"Unexpected /eval_shape response: {exc}", response=response, body=body
            ) from exc

    def _parse_hvp(self, response: httpx.Response, kind: OutputKind) -> HVPResult:
        body = self._json(response)
        try:
            return HVPResult(
                output=decode_tensor(body["output"], as_torch=kind.as_torch, device=kind.device),
                hvp=_decode_map(body["hvp"], kind),
                dtype=str(body.get("dtype", "")),
                device=str(body.get("device", "")),
                timing_ms=_timing(body),
                raw=body,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise APIResponseValidationError(
                f"Unexpected /hvp response: {exc}", response=response, body=body
            ) from exc

    def _parse_linearize(self, response: httpx.Response, kind: OutputKind) -> LinearizationInfo:
        body = self._json(response)
        try:
            session_id = body["id"]
            if not isinstance(session_id, str) or not session_id or "/" in session_id:
                raise ValueError(f"expected a session id, got {session_id!r}")
            return LinearizationInfo(
                id=session_id,
                output=decode_tensors(body["output"], as_torch=kind.as_torch, device=kind.device),
                expires_at=str(body["expires_at"]),
                wrt=[str(name) for name in body.get("wrt", [])],
                bytes=int(body.get("bytes", 0)),
                dtype=str(body.get("dtype", "")),
                device=str(body.get("device", "")),
                timing_ms=_timing(body),
                raw=body,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise APIResponseValidationError(
                f"Unexpected /linearize response: {exc}", response=response, body=body
            ) from exc

    def _parse_linearized_jvp(
        self, response: httpx.Response, kind: OutputKind
    ) -> Array | list[Array]:
        body = self._json(response)
        try:
            return decode_tensors(body["jvp"], as_torch=kind.as_torch, device=kind.device)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise APIResponseValidationError(
                f"Unexpected /linearize/{{id}}/jvp response: {exc}", response=response, body=body
            ) from exc

    def _parse_models(self, response: httpx.Response) -> list[ModelInfo]:
        body = self._json(response)
        try:
            items = body["models"] if isinstance(body, dict) else body
            return [ModelInfo.from_json(item) for item in items]
        except (KeyError, TypeError, ValueError) as exc:
            raise APIResponseValidationError(
                f"Unexpected /models response: {exc}", response=response, body=body
            ) from exc

    def _parse_model(self, response: httpx.Response) -> ModelInfo:
        body = self._json(response)
        try:
            return ModelInfo.from_json(body)
        except (KeyError, TypeError, ValueError) as exc:
            raise APIResponseValidationError(
                f"Unexpected model response: {exc}", response=response, body=body
            ) from exc

    def _parse_model_if_any(self, response: httpx.Response) -> ModelInfo | None:
        """The ModelInfo in a response body, or None when there is none (204, a status body)."""
        try:
            body = response.json()
        except ValueError:
            return None
        if isinstance(body, dict) and "name" in body and "inputs" in body:
            return self._parse_model(response)
        return None

    def _parse_job(self, response: httpx.Response) -> JobInfo:
        body = self._json(response)
        try:
            return JobInfo.from_json(body)
        except (KeyError, TypeError, ValueError) as exc:
            raise APIResponseValidationError(
                f"Unexpected job response: {exc}", response=response, body=body
            ) from exc

    def _parse_job_if_any(self, response: httpx.Response) -> JobInfo | None:
        """The Job in a response body, or None when the body is empty or not a Job (204)."""
        try:
            body = response.json()
        except ValueError:
            return None
        if isinstance(body, dict) and "id" in body and "status" in body:
            return self._parse_job(response)
        return None

    def _parse_jobs(self, response: httpx.Response) -> list[JobInfo]:
        body = self._json(response)
        try:
            items = body["jobs"] if isinstance(body, dict) else body
            return [JobInfo.from_json(item) for item in items]
        except (KeyError, TypeError, ValueError) as exc:
            raise APIResponseValidationError(
                f"Unexpected /jobs response: {exc}", response=response, body=body
            ) from exc

    def _parse_results_page(self, response: httpx.Response, kind: OutputKind) -> JobResultsPage:
        body = self._json(response)
        try:
            results = []
            for item in body["results"]:
                err = item.get("error")
                if err is not None:
                    if isinstance(err, Mapping):
                        error = JobTaskError(
                            type=err.get("type"),
                            message=str(err.get("message", "")),
                            param=err.get("param"),
                        )
                    else:
                        error = JobTaskError(type=None, message=str(err))
                    results.append(JobTaskResult(index=int(item["index"]), error=error))
                    continue
                results.append(
                    JobTaskResult(
                        index=int(item["index"]),
                        output=decode_tensors(
                            item["output"], as_torch=kind.as_torch, device=kind.device
                        ),
                        jvp=decode_tensors(item["jvp"], as_torch=kind.as_torch, device=kind.device),
                    )
                )
            next_offset = body.get("next_offset")
            return JobResultsPage(
                results=results, next_offset=None if next_offset is None else int(next_offset)
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise APIResponseValidationError(
                f"Unexpected job results response: {exc}", response=response, body=body
            ) from exc


def _target(expression: str | None, model: str | None, *, where: str) -> dict[str, Any]:
    if (expression is None) == (model is None):
        raise TypeError(f"{where}: pass exactly one of expression= or model=")
    if expression is not None:
        if not isinstance(expression, str):
            raise TypeError(
                f"{where}: expected expression to be a str, got {type(expression).__name__}"
            )
        return {"expression": expression}
    if not isinstance(model, str):
        raise TypeError(f"{where}: expected model to be a str, got {type(model).__name__}")
    return {"model": model}


def _check_encoding(encoding: object, where: str) -> None:
    if encoding not in ("auto", "json", "b64"):
        raise ValueError(f"{where}: expected encoding 'auto', 'json' or 'b64', got {encoding!r}")


def _set_flag(options: dict[str, Any], key: str, value: bool, where: str) -> None:
    """Set ``options[key] = True`` for a true flag (a false one is the service default)."""
    if not isinstance(value, bool):
        raise TypeError(f"{where}: expected {key} to be True or False, got {value!r}")
    if value:
        options[key] = True


def _names(wrt: str | Sequence[str], where: str) -> list[str]:
    """``wrt=`` as a list of names (one name may be given as a str)."""
    names = [wrt] if isinstance(wrt, str) else list(wrt)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{where}: expected wrt to be input or parameter names, got {wrt!r}")
    return names


def _timing(body: Mapping[str, Any]) -> dict[str, float]:
    return {str(k): float(v) for k, v in (body.get("timing_ms") or {}).items()}


def _decode_map(obj: Any, kind: OutputKind) -> dict[str, Array]:
    """A ``{name: T}`` map of a response (jacobian blocks, hvp)."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected an object of names to tensors, got {type(obj).__name__}")
    return {
        str(name): decode_tensor(value, as_torch=kind.as_torch, device=kind.device)
        for name, value in obj.items()
    }


def _response_encoding(encoding: Encoding, any_b64: bool) -> str | None:
    """The ``options.encoding`` to ask for: b64 answers when b64 went out.

    See NOTE [wire form choice] in ``_tensors.py``.
    """
    if encoding == "auto":
        return "b64" if any_b64 else None
    return encoding


def job_path(job_id: str) -> str:
    if not isinstance(job_id, str) or not job_id or "/" in job_id:
        raise ValueError(f"expected a job id, got {job_id!r}")
    return f"jobs/{job_id}"


def linearization_path(session_id: str) -> str:
    if not isinstance(session_id, str) or not session_id or "/" in session_id:
        raise ValueError(f"expected a linearize session id, got {session_id!r}")
    return f"linearize/{session_id}"


def model_path(name: str) -> str:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"expected a model name, got {name!r}")
    return f"models/{name}"
