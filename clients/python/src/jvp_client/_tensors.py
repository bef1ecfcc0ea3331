"""Tensors on the wire: numpy arrays, torch tensors and Python numbers to and from JSON.

API.md allows three request forms: (1) a nested JSON list, (2)
``{"shape", "dtype", "data"}`` and (3) ``{"shape", "dtype", "b64"}`` with the
little-endian row-major bytes. Responses use form 2, or form 3 when the request
says ``"options": {"encoding": "b64"}``.

# NOTE [wire form choice]
A tensor with fewer than ``b64_min_elements`` elements (64 by default) travels
as JSON: form 2 for arrays (their dtype is kept), form 1 for Python numbers and
lists (they take the request's computation dtype, as plain JSON does on the
service). Anything bigger travels as form 3: base64 is exact, about 4x smaller
than decimal text, and needs no parsing. NaN and infinities are written as the
strings "NaN", "Infinity" and "-Infinity" in the JSON forms.

# NOTE [bfloat16]
numpy has no bfloat16. A torch bfloat16 tensor is sent as bfloat16 (its raw
16-bit patterns) and bfloat16 answers come back as torch bfloat16 tensors when
the caller gave torch tensors; otherwise bfloat16 answers are widened to
float32 numpy arrays (exactly: a bfloat16 is the top half of a float32). An
``ml_dtypes.bfloat16`` numpy array is sent as bfloat16 too.
"""

from __future__ import annotations

import base64
import math
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Union

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "B64_MIN_ELEMENTS",
    "DTYPES",
    "Array",
    "count_elements",
    "decode_tensor",
    "decode_tensors",
    "encode_tensor",
    "infer_dtype",
    "is_torch_tensor",
    "normalize_dtype",
    "parse_number",
]

#: A decoded tensor: a numpy array, or a torch tensor when torch tensors went in.
Array = Union[np.ndarray, "torch.Tensor"]

#: Tensors with at least this many elements travel base64 (form 3).
B64_MIN_ELEMENTS = 64

#: Wire dtype names (API.md); the Open Inference Protocol names are accepted too.
DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")

_DTYPE_ALIASES = {
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float64": "float64",
    "fp64": "float64",
    "double": "float64",
}

# Little-endian numpy dtypes of the wire dtypes; bfloat16 travels as its bit pattern.
_NUMPY_WIRE: dict[str, np.dtype[Any]] = {
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}

_NAN_STRINGS = {
    "nan": math.nan,
    "+nan": math.nan,
    "-nan": math.nan,
    "infinity": math.inf,
    "+infinity": math.inf,
    "inf": math.inf,
    "+inf": math.inf,
    "-infinity": -math.inf,
    "-inf": -math.inf,
}


def _torch_module() -> Any:
    """torch if it is already imported (never imports it: torch is optional)."""
    return sys.modules.get("torch")


def is_torch_tensor(value: object) -> bool:
    """Whether ``value`` is a torch tensor (False whenever torch was never imported)."""
    torch = _torch_module()
    return torch is not None and isinstance(value, torch.Tensor)


def normalize_dtype(dtype: object) -> str | None:
    """The wire name of a dtype given as a string, numpy dtype or torch dtype.

    >>> normalize_dtype("FP32"), normalize_dtype(np.float64), normalize_dtype(None)
    ('float32', 'float64', None)
    """
    if dtype is None:
        return None
    torch = _torch_module()
    if torch is not None and isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name  # type: ignore[call-overload]
        except TypeError as exc:
            raise TypeError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}") from exc
    wire = _DTYPE_ALIASES.get(name.strip().lower())
    if wire is None:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    return wire


def _array_wire_dtype(value: object) -> str | None:
    """The wire dtype of a floating numpy array or torch tensor; None for anything else."""
    if is_torch_tensor(value):
        name = str(value.dtype).removeprefix("torch.")  # type: ignore[attr-defined]
    elif isinstance(value, (np.ndarray, np.generic)):
        name = value.dtype.name
    else:
        return None
    return name if name in _NUMPY_WIRE else None


def count_elements(value: object) -> int:
    """How many elements a tensor, array, number or nested list holds (0 if it is none)."""
    if is_torch_tensor(value):
        return int(value.numel())  # type: ignore[attr-defined]
    if isinstance(value, (np.ndarray, np.generic)):
        return int(value.size)
    if isinstance(value, (int, float)):
        return 1
    try:
        return int(np.asarray(value).size)
    except (TypeError, ValueError):  # not a tensor: encoding says so
        return 0


def infer_dtype(values: Iterable[object]) -> str | None:
    """The computation dtype the inputs imply: the dtype their floating arrays share.

    Python numbers and lists, and integer arrays, imply nothing; arrays of
    different floating dtypes imply nothing either (the service default applies).
    """
    names = {_array_wire_dtype(v) for v in values} - {None}
    return names.pop() if len(names) == 1 else None


def _json_number(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _json_nested(value: Any) -> Any:
    if isinstance(value, list):
        return [_json_nested(v) for v in value]
    return _json_number(float(value))


def _bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> the same values as float32, exactly."""
    # np.asarray: arithmetic on a 0-d array gives a numpy scalar.
    return np.asarray(bits.astype(np.uint32) << 16).view(np.float32)


def _float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (NaN stays NaN)."""
    as_int = np.asarray(values, dtype=np.float32, order="C").view(np.uint32).astype(np.uint64)
    rounded = np.asarray((as_int + 0x7FFF + ((as_int >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def _to_wire_array(value: object, dtype: str | None) -> tuple[np.ndarray, str, bool]:
    """(little-endian C-contiguous array, wire dtype, was an array) for one input.

    A bfloat16 array comes back as its uint16 bit patterns. Integer and bool
    arrays and Python values are cast to ``dtype`` (the computation dtype), or
    float32 when it is unknown.
    """
    target = dtype or "float32"
    if is_torch_tensor(value):
        torch = _torch_module()
        tensor = value.detach().cpu().contiguous()  # type: ignore[attr-defined]
        if tensor.is_complex():
            raise TypeError("complex tensors are not supported by the JVP service")
        if tensor.dtype == torch.bfloat16:
            bits = tensor.view(torch.int16).numpy().view(np.uint16)
            return bits.astype("<u2", copy=False), "bfloat16", True
        wire = _array_wire_dtype(tensor)
        if wire is None:  # integer or bool tensor
            if target == "bfloat16":
                bits = tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
                return bits.astype("<u2", copy=False), "bfloat16", True
            return tensor.numpy().astype(_NUMPY_WIRE[target]), target, True
        return tensor.numpy().astype(_NUMPY_WIRE[wire], copy=False), wire, True
    is_array = isinstance(value, (np.ndarray, np.generic))
    array = np.asarray(value)
    if array.dtype.name == "bfloat16":  # ml_dtypes
        return np.asarray(array, order="C").view("<u2"), "bfloat16", True
    if array.dtype.kind == "c":
        raise TypeError("complex arrays are not supported by the JVP service")
    if array.dtype.kind not in "fiub":
        raise TypeError(f"expected a numeric array, tensor or number, got {type(value).__name__}")
    wire = array.dtype.name if is_array and array.dtype.name in _NUMPY_WIRE else None
    if wire is None:
        wire = target
        if wire == "bfloat16":
            bits = _float32_to_bf16_bits(array.astype(np.float32))
            return bits.astype("<u2", copy=False), wire, is_array
    return np.asarray(array, dtype=_NUMPY_WIRE[wire], order="C"), wire, is_array


def encode_tensor(
    value: object, *, dtype: str | None = None, b64_min_elements: int = B64_MIN_ELEMENTS
) -> tuple[Any, bool]:
    """One input as a wire tensor; returns ``(wire, used_b64)``.

    See NOTE [wire form choice]. ``dtype`` is the request's computation dtype
    (used for values that carry none).

    >>> encode_tensor(np.array([1.0, float("nan")], dtype=np.float32))
    ({'shape': [2], 'dtype': 'float32', 'data': [1.0, 'NaN']}, False)
    >>> encode_tensor(2.5)
    (2.5, False)
    """
    array, wire, was_array = _to_wire_array(value, dtype)
    shape = [int(n) for n in array.shape]
    if array.size >= b64_min_elements:
        b64 = base64.b64encode(array.tobytes(order="C")).decode("ascii")
        return {"shape": shape, "dtype": wire, "b64": b64}, True
    if wire == "bfloat16":
        values = _bits_to_float32(array)
    else:
        values = array
    if not was_array:  # form 1: takes the request's computation dtype
        return _json_nested(values.astype(np.float64).tolist()), False
    data = [_json_number(v) for v in values.astype(np.float64).ravel().tolist()]
    return {"shape": shape, "dtype": wire, "data": data}, False


def encode_tensor_map(
    values: Mapping[str, object] | None,
    *,
    what: str,
    dtype: str | None,
    b64_min_elements: int,
) -> tuple[dict[str, Any] | None, bool]:
    """Encode a ``{name: tensor}`` mapping; returns ``(wire map, any used b64)``."""
    if values is None:
        return None, False
    if not isinstance(values, Mapping):
        raise TypeError(
            f"{what}: expected a mapping of names to tensors, got {type(values).__name__}"
        )
    out: dict[str, Any] = {}
    any_b64 = False
    for name, value in values.items():
        if not isinstance(name, str):
            raise TypeError(f"{what}: expected string names, got {name!r}")
        try:
            out[name], used = encode_tensor(value, dtype=dtype, b64_min_elements=b64_min_elements)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{what}[{name!r}]: {exc}") from exc
        any_b64 = any_b64 or used
    return out, any_b64


def parse_number(value: Any) -> float:
    """A JSON number, or one of the strings "NaN", "Infinity", "-Infinity", as a float."""
    if isinstance(value, str):
        try:
            return _NAN_STRINGS[value.strip().lower()]
        except KeyError:
            raise ValueError(
                f"expected a number or 'NaN'/'Infinity'/'-Infinity', got {value!r}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _parse_nested(value: Any) -> Any:
    if isinstance(value, list):
        return [_parse_nested(v) for v in value]
    return parse_number(value)


def _to_output(array: np.ndarray, wire: str, *, as_torch: bool, device: Any) -> Array:
    """A decoded array (bfloat16 as uint16 bits) as the caller's kind of tensor."""
    if as_torch:
        import torch

        if wire == "bfloat16":
            tensor = torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(array.copy())
        return tensor.to(device) if device is not None else tensor
    if wire == "bfloat16":
        return _bits_to_float32(array)
    return array.copy() if not array.flags.writeable else array


def decode_tensor(obj: Any, *, as_torch: bool = False, device: Any = None) -> Array:
    """One wire tensor (any of the three forms) as a numpy array or torch tensor.

    bfloat16 becomes float32 numpy unless ``as_torch`` (see NOTE [bfloat16]).
    Raises ValueError for a malformed tensor.

    >>> decode_tensor({"shape": [2], "dtype": "float32", "data": [1, "-Infinity"]})
    array([  1., -inf], dtype=float32)
    """
    if isinstance(obj, Mapping):
        try:
            shape = tuple(int(n) for n in obj["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"tensor without a valid 'shape': {obj!r:.200}") from exc
        wire = normalize_dtype(obj.get("dtype", "float32")) or "float32"
        count = math.prod(shape)
        if "b64" in obj:
            try:
                raw = base64.b64decode(obj["b64"], validate=True)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"tensor with invalid base64: {exc}") from exc
            np_dtype = _NUMPY_WIRE[wire]
            if len(raw) != count * np_dtype.itemsize:
                raise ValueError(
                    f"tensor of shape {list(shape)} and dtype {wire} needs "
                    f"{count * np_dtype.itemsize} bytes, got {len(raw)}"
                )
            array = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
            array = array.astype(np_dtype.newbyteorder("="), copy=True)
        elif "data" in obj:
            values = np.array(_parse_nested(obj["data"]), dtype=np.float64)
            if values.size != count:
                raise ValueError(f"tensor of shape {list(shape)} with {values.size} values")
            values = values.reshape(shape)
            if wire == "bfloat16":
                array = _float32_to_bf16_bits(values.astype(np.float32))
            else:
                array = values.astype(_NUMPY_WIRE[wire].newbyteorder("="))
        else:
            raise ValueError(f"tensor with neither 'data' nor 'b64': {obj!r:.200}")
        return _to_output(array, wire, as_torch=as_torch, device=device)
    # Form 1: a bare number or a nested list.
    values = np.array(_parse_nested(obj), dtype=np.float64)
    if values.dtype == object:  # pragma: no cover - ragged lists raise in np.array
        raise ValueError("ragged nested list")
    return _to_output(values, "float64", as_torch=as_torch, device=device)


def decode_tensors(obj: Any, *, as_torch: bool = False, device: Any = None) -> Array | list[Array]:
    """A response's ``output`` or ``jvp``: one tensor, or a list of them (several outputs)."""
    if isinstance(obj, list) and all(isinstance(item, Mapping) for item in obj):
        return [decode_tensor(item, as_torch=as_torch, device=device) for item in obj]
    return decode_tensor(obj, as_torch=as_torch, device=device)
