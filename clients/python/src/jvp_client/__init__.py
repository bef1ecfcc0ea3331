"""Python client SDK of the JVP (Jacobian-vector product) service.

    >>> import numpy as np
    >>> from jvp_client import JVPClient
    >>> with JVPClient(base_url="http://127.0.0.1:8000") as client:  # doctest: +SKIP
    ...     result = client.jvp(expression="x**2 + y**2",
    ...                         primals={"x": np.ones(3), "y": np.zeros(3)},
    ...                         tangents={"x": np.ones(3)})
    ...     result.jvp
    array([2., 2., 2.])

See :mod:`jvp_client._exceptions` for the exception tree.
"""

from __future__ import annotations

from ._base import BINARY_MIN_ELEMENTS, DEFAULT_BASE_URL, DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT
from ._client import AsyncJVPClient, JVPClient
from ._exceptions import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    DeadlineExceededError,
    ForwardADUnsupportedError,
    InternalServerError,
    JVPError,
    NotFoundError,
    OutOfMemoryError,
    OverloadedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    UnprocessableEntityError,
)
from ._jobs import AsyncJob, Job
from ._linearize import AsyncLinearization, Linearization
from ._solve import SolveResult
from ._stacking import JobArrays, stack_results
from ._tensors import B64_MIN_ELEMENTS, decode_tensor, encode_tensor
from ._types import (
    BufferSpec,
    EvalShapeResult,
    GradientCheck,
    HealthStatus,
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
    TensorSpec,
)
from ._version import __version__
from ._vjp import VJPResult

__all__ = [
    "B64_MIN_ELEMENTS",
    "BINARY_MIN_ELEMENTS",
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncJVPClient",
    "VJPResult",
    "SolveResult",
    "AsyncJob",
    "AsyncLinearization",
    "AuthenticationError",
    "BadRequestError",
    "BufferSpec",
    "DeadlineExceededError",
    "ForwardADUnsupportedError",
    "GradientCheck",
    "EvalShapeResult",
    "HVPResult",
    "ShapeInfo",
    "HealthStatus",
    "InternalServerError",
    "JVPClient",
    "JVPError",
    "JVPResult",
    "JacobianResult",
    "Job",
    "JobArrays",
    "JobInfo",
    "JobResultsPage",
    "JobTaskError",
    "JobTaskResult",
    "Linearization",
    "LinearizationInfo",
    "ModelInfo",
    "NotFoundError",
    "OutOfMemoryError",
    "OverloadedError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "TensorSpec",
    "UnprocessableEntityError",
    "__version__",
    "decode_tensor",
    "encode_tensor",
    "stack_results",
]
