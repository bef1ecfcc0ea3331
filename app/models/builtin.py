"""Built-in models, with fixed weights.

Weights come from PyTorch's default initialisation under a fixed seed (drawn in
a forked RNG, so loading them never disturbs the caller's random state):
``linear`` uses seed 0, ``mlp`` seed 1. The same torch release always gives the
same weights; `GET /models/{name}` lists their names and shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from app.models.registry import ServedModel, TensorSpec, module_target, specs_of


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = make()
    return module.eval()


def _served(
    name: str, description: str, module: nn.Module, inputs: list[TensorSpec]
) -> ServedModel:
    return ServedModel(
        name=name,
        description=description,
        source="builtin",
        target=module_target(f"builtin:{name}", module, inputs, outputs=1),
        inputs=inputs,
        outputs=1,
        parameters=specs_of(module.named_parameters()),
        buffers=specs_of(module.named_buffers()),
    )


def linear() -> ServedModel:
    """The forward-AD tutorial's model: ``nn.Linear(5, 5)``."""
    module = _seeded(0, lambda: nn.Linear(5, 5))
    return _served(
        "linear",
        "nn.Linear(5, 5), the PyTorch forward-AD tutorial's model (seed 0).",
        module,
        [TensorSpec("x", (-1, 5), "float32")],
    )


def mlp() -> ServedModel:
    """A small tanh MLP: 64 -> 256 -> 64."""
    module = _seeded(1, lambda: nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64)))
    return _served(
        "mlp",
        "Tanh MLP 64 -> 256 -> 64 (Linear, Tanh, Linear; seed 1).",
        module,
        [TensorSpec("x", (-1, 64), "float32")],
    )


BUILTINS = (linear, mlp)
