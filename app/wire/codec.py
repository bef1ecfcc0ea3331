"""Tensors on the wire (API.md "Tensors on the wire"), decoded to and encoded from torch.

Three request forms: a nested list (or a bare number), ``{"shape", "dtype",
"data"}`` and ``{"shape", "dtype", "b64"}`` (little-endian, row-major bytes).
JSON has no NaN or infinity, so lists carry them as the strings "NaN",
"Infinity" and "-Infinity". Every malformed tensor is an `InvalidRequest` (422)
that names the field; size limits are `TooLarge` (413).
"""

from __future__ import annotations

import binascii
import itertools
import math
import reprlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pybase64
import torch

from app.engine.devices import DTYPE_NAMES, api_float, parse_dtype
from app.engine.errors import InvalidRequest, TooLarge

_NONFINITE_IN = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_NUMPY_OF: dict[torch.dtype, np.dtype[Any]] = {
    torch.float16: np.dtype("<f2"),
    torch.float32: np.dtype("<f4"),
    torch.float64: np.dtype("<f8"),
}
_NATIVE_OF = {t: d.newbyteorder("=") for t, d in _NUMPY_OF.items()}


@dataclass(frozen=True)
class Limits:
    max_tensor_elements: int
    max_dims: int


def brief(value: object) -> str:
    """``repr`` cut short: a client's malformed value can be a million entries long."""
    return _BRIEF.repr(value)


_BRIEF = reprlib.Repr()
_BRIEF.maxlist = _BRIEF.maxdict = 10
_BRIEF.maxlevel = 3
_BRIEF.maxstring = _BRIEF.maxother = 40
_BRIEF.maxlong = 40


def checked_shape(shape: object, param: str, limits: Limits, *, what: str) -> tuple[int, ...]:
    """A declared shape as a tuple, after `check_limits`; else 422 saying what came.

    ``what`` names the field in the message (``'primals.x.shape'``).
    """
    if not isinstance(shape, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise InvalidRequest(
            f"Expected {what} as a list of non-negative integers, got {brief(shape)}",
            param=f"{param}.shape",
        )
    check_limits(shape, param, limits)
    return tuple(shape)


def _check_shape(shape: object, param: str, limits: Limits) -> tuple[int, ...]:
    return checked_shape(shape, param, limits, what=f"'{param}.shape'")


def check_limits(shape: Sequence[int], param: str, limits: Limits) -> None:
    """413 when a tensor of ``shape`` passes the dimension or element limit.

    Every dimension is bounded by the element limit on its own too: a zero elsewhere
    makes the product 0, and a shape such as ``[0, 2**63]`` would otherwise pass, to
    overflow a C integer in numpy or torch later (or to make a huge tensor from an empty
    one). The product is a Python int, exact however large, and never reaches numpy or
    torch before these checks.
    """
    if len(shape) > limits.max_dims:
        raise TooLarge(
            f"Tensor '{param}' has {len(shape)} dimensions; the limit is {limits.max_dims}",
            param=param,
        )
    count = math.prod(shape)  # a Python int: exact, however large
    if count > limits.max_tensor_elements:
        raise TooLarge(
            f"Tensor '{param}' has {count} elements; the limit is {limits.max_tensor_elements}",
            param=param,
        )
    if count:  # each dimension is at most the product: only a zero can hide one here
        return
    for axis, size in enumerate(shape):
        if size > limits.max_tensor_elements:
            raise TooLarge(
                f"Tensor '{param}' has shape {list(shape)}: dimension {axis} of size {size} "
                f"passes the limit of {limits.max_tensor_elements} elements "
                "(JVP_MAX_TENSOR_ELEMENTS), which bounds every dimension, even beside a zero",
                param=param,
            )


def _replace_nonfinite(value: Any, param: str) -> Any:
    """Nested lists with "NaN"/"Infinity"/"-Infinity" turned into floats (the slow path);
    anything but a number, a list or those strings is a 422."""
    if isinstance(value, list):
        return [_replace_nonfinite(v, param) for v in value]
    if isinstance(value, str):
        if value in _NONFINITE_IN:
            return _NONFINITE_IN[value]
        raise InvalidRequest(
            f"Tensor '{param}' holds the string {value[:40]!r}; expected numbers "
            '(or "NaN", "Infinity", "-Infinity")',
            param=param,
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _not_a_number(value, param)
    return value


def _not_a_number(value: object, param: str) -> InvalidRequest:
    if value is None:
        return InvalidRequest(
            f"Tensor '{param}' holds null; expected numbers (NaN is the string \"NaN\")",
            param=param,
        )
    kind = (
        "a boolean"
        if isinstance(value, bool)
        else f"the JSON object {brief(value)}"
        if isinstance(value, dict)
        else brief(value)
    )
    return InvalidRequest(
        f'Tensor \'{param}\' holds {kind}; expected numbers (or "NaN", "Infinity", "-Infinity")',
        param=param,
    )


def _holds_bool(data: Any, ndim: int) -> bool:
    """Whether a rectangular nested list of ``ndim`` levels holds a boolean.

    numpy reads ``[true, 2.5]`` as ``[1.0, 2.5]``: a boolean leaves no trace in the array
    but a 0 or 1 where it was, so a large array is scanned only when it holds a 0 or a 1
    (`_may_hold_bool`; the scan costs about as much as numpy's own read of the list, 12 ms
    against 15 ms for a million numbers).
    """
    if ndim == 0:
        return isinstance(data, bool)
    flat: Any = data
    for _ in range(ndim - 1):
        flat = itertools.chain.from_iterable(flat)
    return bool in set(map(type, flat))


def _may_hold_bool(array: np.ndarray) -> bool:
    # Up to ~100 values the scan itself is cheaper than numpy's test (3 us of ufunc calls).
    return array.size <= 100 or bool(((array == 0) | (array == 1)).any())


def _numbers(data: Any, param: str) -> np.ndarray:
    """A float64 array from a nested JSON list or number, or a 422 saying what was wrong."""
    try:
        array = np.asarray(data)
        if array.dtype.kind in "UO":  # strings (non-finite markers) or something odd
            array = np.asarray(_replace_nonfinite(data, param), dtype=np.float64)
    except OverflowError:
        raise InvalidRequest(
            f"Tensor '{param}' holds an integer too large for a float64", param=param
        ) from None
    except ValueError:
        raise InvalidRequest(
            f"Tensor '{param}' is not a rectangular nested list of numbers "
            "(rows of different lengths?)",
            param=param,
        ) from None
    if array.dtype.kind not in "iuf" or array.dtype == np.bool_:
        raise InvalidRequest(
            f"Tensor '{param}' must hold numbers, got {np.asarray(data).dtype.kind!r} values "
            "(booleans, objects or mixed types are not tensors)",
            param=param,
        )
    if _may_hold_bool(array) and _holds_bool(data, array.ndim):
        raise _not_a_number(True, param)
    return array.astype(np.float64, copy=False)


def decode_tensor(
    value: Any, *, param: str, default_dtype: torch.dtype, limits: Limits
) -> torch.Tensor:
    """Decode one request tensor (any of the three forms) to a CPU tensor.

    What numpy or torch raise on a malformed tensor that the checks here did not foresee
    is a 422 naming the tensor, not a 500. (Their RuntimeErrors pass: an allocation that
    fails is an out-of-memory, answered as such by app/api/errors.py.)
    """
    with _Malformed(param):
        return _decode(value, param=param, default_dtype=default_dtype, limits=limits)


@dataclass(frozen=True, slots=True)
class RawTensor:
    """A b64 request tensor checked as `decode_tensor` checks it and kept as the bytes it
    came in (little-endian, row-major), not decoded (NOTE [tensors kept as they came])."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    data: bytes


# NOTE [tensors kept as they came]: the job store keeps a task's tensors as safetensors
# bytes, and on a little-endian machine those are the b64 form's bytes as they are.
# Decoding such a tensor to torch only to serialize it again took half of POST /jobs's
# CPU (bench/README.md, "Job throughput"): `decode_stored` checks a b64 tensor as
# `decode_tensor` does, with the same messages, and keeps its bytes. The other forms,
# and every tensor on a big-endian machine, are decoded to torch.
_LITTLE_ENDIAN = sys.byteorder == "little"


def decode_stored(
    value: Any, *, param: str, default_dtype: torch.dtype, limits: Limits
) -> torch.Tensor | RawTensor:
    """`decode_tensor` for a tensor that is only stored: a b64 one stays bytes."""
    with _Malformed(param):
        if _LITTLE_ENDIAN and isinstance(value, dict) and "b64" in value:
            shape, dtype = _header(value, param, limits)
            return RawTensor(dtype, shape, _b64_bytes(value["b64"], shape, dtype, param))
        return _decode(value, param=param, default_dtype=default_dtype, limits=limits)


class _Malformed:
    """What numpy or torch raise on a malformed tensor, as a 422 naming it (a class, not a
    contextlib generator: it wraps every tensor of a request)."""

    __slots__ = ("param",)

    def __init__(self, param: str) -> None:
        self.param = param

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, _: Any) -> None:
        if kind is not None and issubclass(
            kind, (ValueError, TypeError, OverflowError, IndexError)
        ):
            raise InvalidRequest(
                f"Tensor '{self.param}' cannot be built: {kind.__name__}: {str(e)[:200]}",
                param=self.param,
            ) from None


def _decode(value: Any, *, param: str, default_dtype: torch.dtype, limits: Limits) -> torch.Tensor:
    if isinstance(value, dict):
        return _decode_object(value, param=param, limits=limits)
    if isinstance(value, bool) or not isinstance(value, (int, float, list, str)):
        raise InvalidRequest(
            f"Expected tensor '{param}' as a number, a nested list, or an object with "
            f"shape, dtype and data or b64; got {type(value).__name__}",
            param=param,
        )
    array = _numbers(value, param)
    check_limits(array.shape, param, limits)  # numpy's shape: non-negative ints already
    return _from_float64(array, default_dtype)


def _from_float64(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A float64 array as a tensor of ``dtype``: one rounding, by numpy for float32 (a few
    µs cheaper than a torch cast), by torch otherwise (numpy rounds float64 to float16
    directly, torch through float32; the service keeps torch's)."""
    if dtype == torch.float32 or dtype == torch.float64:
        return torch.from_numpy(array.astype(_NUMPY_OF[dtype], copy=False))
    return torch.from_numpy(array).to(dtype)


def _header(
    value: dict[str, Any], param: str, limits: Limits
) -> tuple[tuple[int, ...], torch.dtype]:
    """The checked shape and dtype of a tensor object (form 2 or 3)."""
    unknown = set(value) - {"shape", "dtype", "data", "b64"}
    if unknown:
        raise InvalidRequest(
            f"Tensor '{param}' has unknown keys {sorted(unknown)}; expected shape, dtype and "
            "data or b64",
            param=param,
        )
    if "shape" not in value or "dtype" not in value:
        raise InvalidRequest(
            f"Tensor '{param}' needs 'shape' and 'dtype' beside 'data' or 'b64'", param=param
        )
    if ("data" in value) == ("b64" in value):
        raise InvalidRequest(f"Tensor '{param}' needs exactly one of 'data' or 'b64'", param=param)
    shape = _check_shape(value["shape"], param, limits)
    return shape, parse_dtype(value["dtype"], param=f"{param}.dtype")


def _decode_object(value: dict[str, Any], *, param: str, limits: Limits) -> torch.Tensor:
    shape, dtype = _header(value, param, limits)
    if "data" in value:
        count = math.prod(shape)
        array = _numbers(value["data"], param)
        if array.size != count:
            raise InvalidRequest(
                f"Tensor '{param}' has shape {list(shape)}, which needs {count} values; "
                f"its data has {array.size}",
                param=param,
            )
        return _from_float64(array.reshape(shape), dtype)
    raw = _b64_bytes(value["b64"], shape, dtype, param)
    if dtype == torch.bfloat16:  # numpy has no bfloat16: read the bits as int16
        bits = np.frombuffer(raw, dtype="<i2").astype(np.int16, copy=True)
        return torch.from_numpy(bits).view(torch.bfloat16).reshape(shape)
    array = np.frombuffer(raw, dtype=_NUMPY_OF[dtype]).astype(_NATIVE_OF[dtype])
    return torch.from_numpy(array).reshape(shape)


def _b64_bytes(text: object, shape: tuple[int, ...], dtype: torch.dtype, param: str) -> bytes:
    """The bytes of a b64 tensor, checked to be as many as its shape and dtype need."""
    if not isinstance(text, str):
        raise InvalidRequest(f"Tensor '{param}.b64' must be a base64 string", param=f"{param}.b64")
    try:
        raw = pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            f"Tensor '{param}.b64' is not valid base64 (standard alphabet, with padding)",
            param=f"{param}.b64",
        ) from None
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidRequest(
            f"Tensor '{param}' of shape {list(shape)} and dtype {DTYPE_NAMES[dtype]} needs "
            f"{expected} bytes; its b64 holds {len(raw)}",
            param=f"{param}.b64",
        )
    return raw


def encode_tensor(tensor: torch.Tensor, *, encoding: str) -> dict[str, Any]:
    """A response tensor in form 2 (``data``: a flat list) or form 3 (``b64``)."""
    tensor = tensor.detach().cpu().contiguous()
    out: dict[str, Any] = {
        "shape": list(tensor.shape),
        "dtype": DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype).removeprefix("torch.")),
    }
    if encoding == "b64":
        bits = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        array = bits.numpy()
        wire = array.dtype.newbyteorder("<")  # equal to the native order on little-endian
        if array.dtype != wire:
            array = array.astype(wire)
        out["b64"] = pybase64.b64encode_as_string(array.reshape(-1).view(np.uint8).data)
        return out
    # bfloat16 values are exact in float32; orjson writes numpy arrays of finite
    # numbers directly (the shortest repr that reads back to the same value).
    array = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy().reshape(-1)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        out["data"] = [api_float(float(v)) for v in array]
    else:
        out["data"] = array
    return out
