"""The named-model registry: what `GET /models` lists and `POST /jvp` with ``model`` runs."""

from __future__ import annotations

import copy
import math
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from app.engine.devices import DTYPE_NAMES
from app.engine.errors import NotFound
from app.engine.target import Materialized, Target


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # -1 where the size may vary
    dtype: str


@dataclass
class ServedModel:
    """A model as served: its JVP target and the signature `GET /models/{name}` shows."""

    name: str
    description: str
    source: str  # "builtin" | "repository"
    target: Target
    inputs: list[TensorSpec]
    outputs: int
    parameters: list[TensorSpec]
    buffers: list[TensorSpec]
    config: dict[str, object] = field(default_factory=dict)
    state: str = "ready"  # what GET /models shows; a model in the registry is served

    @property
    def default_dtype(self) -> str | None:
        """The computation dtype when a request names none (config ``dtype``)."""
        dtype = self.config.get("dtype")
        return dtype if isinstance(dtype, str) else None

    @property
    def parameter_count(self) -> int:
        return sum(math.prod(s.shape) for s in self.parameters)

    def info(self) -> dict[str, object]:
        max_batch_size = self.config.get("max_batch_size", None if self.source == "builtin" else 0)
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "state": self.state,
            "parameter_count": self.parameter_count,
            "default_dtype": self.default_dtype or "float32",
            "max_batch_size": max_batch_size if isinstance(max_batch_size, int | None) else 0,
            "inputs": [
                {"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in self.inputs
            ],
            "outputs": self.outputs,
            "parameters": [
                {"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in self.parameters
            ],
            "buffers": [{"name": s.name, "shape": list(s.shape)} for s in self.buffers],
        }


def _cast_module(module: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A copy of ``module`` on ``device`` with floating tensors in ``dtype``.

    `nn.Module.to` moves parameters and buffers only; exported programs also keep
    plain tensor attributes (lifted constants), which are moved here as well.
    """
    # Each (dtype, device) gets its own copy: functional_call swaps tensors in place
    # while it runs, so two device workers must never share one module.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree deprecation, on copy
        moved = copy.deepcopy(module)
    moved = moved.to(device=device, dtype=dtype)
    for sub in moved.modules():
        for attr, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                cast_dtype = dtype if value.is_floating_point() else value.dtype
                setattr(sub, attr, value.to(device=device, dtype=cast_dtype))
    return moved


def module_target(
    key: str,
    module: nn.Module,
    inputs: list[TensorSpec],
    outputs: int,
    select: tuple[int, ...] | None = None,
) -> Target:
    """Wrap an `nn.Module` as a JVP target over its parameters and buffers.

    ``select`` keeps only those outputs (by index, in that order); ``outputs`` is
    the count after selection. Built-in modules are put in eval mode by their
    makers; an exported program is rewritten to eval mode by the repository
    loader (its module refuses ``.eval()``).
    """

    def build(dtype: torch.dtype, device: torch.device) -> Materialized:
        moved = _cast_module(module, dtype, device)
        params = {k: v.detach() for k, v in moved.named_parameters()}
        buffers = {k: v.detach() for k, v in moved.named_buffers()}

        stateless = not params and not buffers

        def fn(
            args: tuple[torch.Tensor, ...], state: dict[str, torch.Tensor]
        ) -> tuple[torch.Tensor, ...]:
            # A module without parameters or buffers (a PDE residual whose coefficients are
            # inputs) is called as it is: functional_call would swap nothing in and out, at
            # 40 µs a call (12% of a JVP of the exported Bratu residual).
            out = moved(*args) if stateless and not state else functional_call(moved, state, args)
            every = tuple(out) if isinstance(out, (tuple, list)) else (out,)
            return every if select is None else tuple(every[i] for i in select)

        return Materialized(fn=fn, parameters=params, buffers=buffers)

    return Target(
        key=key,
        input_names=tuple(s.name for s in inputs),
        single_output=outputs == 1,
        build=build,
        input_shapes={s.name: s.shape for s in inputs},
        parameter_shapes={k: tuple(v.shape) for k, v in module.named_parameters()},
    )


def specs_of(named: Iterator[tuple[str, torch.Tensor]]) -> list[TensorSpec]:
    return [TensorSpec(k, tuple(v.shape), DTYPE_NAMES.get(v.dtype, str(v.dtype))) for k, v in named]


class ModelRegistry:
    """Models by name; safe to read from the event loop while a loader replaces one."""

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self._lock = threading.Lock()

    def add(self, model: ServedModel) -> None:
        with self._lock:
            self._models[model.name] = model

    def remove(self, name: str) -> None:
        with self._lock:
            if self._models.pop(name, None) is None:
                raise NotFound(f"Unknown model {name!r}", param="model")

    def find(self, name: str) -> ServedModel | None:
        with self._lock:
            return self._models.get(name)

    def get(self, name: str) -> ServedModel:
        with self._lock:
            model = self._models.get(name)
            names = sorted(self._models)
        if model is None:
            raise NotFound(
                f"Unknown model {name!r}; available models: {', '.join(names) or 'none'}",
                param="model",
            )
        return model

    def all(self) -> list[ServedModel]:
        with self._lock:
            return [self._models[k] for k in sorted(self._models)]
