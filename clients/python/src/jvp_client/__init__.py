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

from . import _exceptions, _types
from ._base import BINARY_MIN_ELEMENTS, DEFAULT_BASE_URL, DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT
from ._client import AsyncJVPClient, JVPClient
from ._exceptions import *  # noqa: F403 - the exception tree, as _exceptions.__all__ lists it
from ._jobs import AsyncJob, Job
from ._linearize import AsyncLinearization, Linearization
from ._solve import SolveResult
from ._stacking import JobArrays, stack_results
from ._tensors import B64_MIN_ELEMENTS, decode_tensor, encode_tensor
from ._types import *  # noqa: F403 - the result and info types, as _types.__all__ lists them
from ._version import __version__
from ._vjp import VJPResult

# The rest of the public names: those of the two modules above are added from their lists.
__all__ = [
    "B64_MIN_ELEMENTS",
    "BINARY_MIN_ELEMENTS",
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "AsyncJVPClient",
    "AsyncJob",
    "AsyncLinearization",
    "JVPClient",
    "Job",
    "JobArrays",
    "Linearization",
    "SolveResult",
    "VJPResult",
    "__version__",
    "decode_tensor",
    "encode_tensor",
    "stack_results",
]
__all__ += _exceptions.__all__
__all__ += _types.__all__
