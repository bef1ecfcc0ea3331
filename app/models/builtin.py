"""Built-in models, with fixed weights.

Weights come from PyTorch's default initialisation under a fixed seed (drawn in
a forked RNG, so loading them never disturbs the caller's random state):
``linear`` uses seed 0, ``mlp`` seed 1, ``convnet`` seed 2, ``transformer``
seed 3 (the weights of an ``nn.TransformerEncoder`` made under that seed, so the
parameter names and values are those of PyTorch's own encoder). The same torch
release always gives the same weights; `GET /models/{name}` lists their names
and shapes. Every built-in is served in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from app.engine.attention import attention
from app.models.registry import ServedModel, TensorSpec, module_target, specs_of


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = make()
    return module.eval()


def _served(
    name: str,
    description: str,
    weights: tuple[int, Callable[[], nn.Module]],
    x_shape: tuple[int, ...],
    example_x: list[int] | None = None,
) -> ServedModel:
    """A built-in of one float32 input ``x``; ``weights``: the seed and what to make under it."""
    module = _seeded(*weights)
    inputs = [TensorSpec("x", x_shape, "float32")]
    return ServedModel(
        name=name,
        description=description,
        source="builtin",
        target=module_target(f"builtin:{name}", module, inputs, outputs=1),
        inputs=inputs,
        outputs=1,
        parameters=specs_of(module.named_parameters()),
        buffers=specs_of(module.named_buffers()),
        config={"example_inputs": {"x": example_x} if example_x else {}},
    )


def linear() -> ServedModel:
    """The forward-AD tutorial's model: ``nn.Linear(5, 5)``."""
    description = "nn.Linear(5, 5), the PyTorch forward-AD tutorial's model (seed 0)."
    return _served("linear", description, (0, lambda: nn.Linear(5, 5)), (-1, 5))


def _mlp_module() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64))


def mlp() -> ServedModel:
    """A small tanh MLP: 64 -> 256 -> 64."""
    description = "Tanh MLP 64 -> 256 -> 64 (Linear, Tanh, Linear; seed 1)."
    return _served("mlp", description, (1, _mlp_module), (-1, 64))


def _convnet_module() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 14 * 14, 10),
    )


def convnet() -> ServedModel:
    """A small CNN for 28x28 one-channel images: conv-relu-pool-linear, 10 outputs."""
    description = (
        "CNN for [-1, 1, 28, 28] images: Conv2d(1, 8, 3, padding 1), ReLU, MaxPool2d(2), "
        "Linear(1568, 10) (seed 2)."
    )
    return _served("convnet", description, (2, _convnet_module), (-1, 1, 28, 28), [2, 1, 28, 28])


class SelfAttention(nn.Module):
    """Multi-head self-attention with `nn.MultiheadAttention`'s parameter layout.

    The attention itself is `app.engine.attention.Attention`, which has a forward-AD
    formula on every device (see NOTE [attention without fused kernels]).
    """

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d_model = x.shape[-1]
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # [..., L, 3 * D] -> [..., L, 3, H, D / H] -> three [..., H, L, D / H]
        qkv = qkv.unflatten(-1, (3, self.heads, d_model // self.heads))
        q, k, v = (t.transpose(-3, -2) for t in qkv.unbind(-3))
        out = attention(q, k, v)  # [..., H, L, D / H]
        return self.out_proj(out.transpose(-3, -2).flatten(-2))


class EncoderLayer(nn.Module):
    """A pre-norm encoder layer, as ``nn.TransformerEncoderLayer(norm_first=True,
    activation="gelu", dropout=0)`` computes it, with the same parameter names."""

    def __init__(self, d_model: int, heads: int, d_ff: int) -> None:
        super().__init__()
        self.self_attn = SelfAttention(d_model, heads)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class TransformerEncoder(nn.Module):
    """Encoder layers and a final layer norm; parameter names as ``nn.TransformerEncoder``'s."""

    def __init__(self, d_model: int = 32, heads: int = 2, d_ff: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d_model, heads, d_ff) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


TRANSFORMER_SHAPE = {"d_model": 32, "heads": 2, "d_ff": 64, "layers": 2}


def reference_encoder() -> nn.TransformerEncoder:
    """PyTorch's own encoder with the layout of the ``transformer`` built-in (dropout 0).

    Made under the built-in's seed, so its weights are the built-in's weights.
    """
    d, h, ff, n = (TRANSFORMER_SHAPE[k] for k in ("d_model", "heads", "d_ff", "layers"))
    layer = nn.TransformerEncoderLayer(
        d, h, ff, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, n, norm=nn.LayerNorm(d), enable_nested_tensor=False)


def _transformer_module() -> nn.Module:
    reference = reference_encoder()
    module = TransformerEncoder(**TRANSFORMER_SHAPE)
    module.load_state_dict(reference.state_dict())
    return module


def transformer() -> ServedModel:
    """A 2-layer pre-norm transformer encoder, d_model 32, 2 heads, whose attention has a
    hand-written JVP (so it works where fused attention kernels have none)."""
    description = (
        "Transformer encoder: 2 pre-norm layers (d_model 32, 2 heads, GELU MLP 64, layer norm), "
        "final layer norm; input x [batch, sequence, 32]. Attention is a custom autograd "
        "Function with its own JVP. Weights: nn.TransformerEncoder's initialisation (seed 3)."
    )
    return _served("transformer", description, (3, _transformer_module), (-1, -1, 32), [2, 8, 32])


BUILTINS = (linear, mlp, convnet, transformer)
