"""Seeded random weights that make mistakes visible.

transformers initialises Qwen3-VL with std 0.02 everywhere: activations shrink layer by layer and a wrong
image grid moved the outputs by only ~5e-6 (DESIGN.md). Here every matrix gets std 1/sqrt(fan_in), so
activations stay of order one through every layer, and the learned position grid and the embeddings get
std 1, so the position interpolation, the rotary positions and the DeepStack terms all matter at order one.
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def init_scaled_(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every parameter of ``model`` in place, deterministically from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        param.copy_(draw_parameter(name, tuple(param.shape), gen).to(param.dtype))
    return model


def draw_parameter(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """One parameter's scaled random value (float32), chosen by its name and shape."""
    randn = torch.randn(shape, generator=gen, dtype=torch.float32)
    leaf = name.rsplit(".", 1)[-1]
    is_norm = "norm" in name or "layernorm" in name
    if is_norm and leaf == "weight":
        return 1.0 + 0.1 * randn
    if leaf == "bias":
        return 0.1 * randn
    if "embed_tokens" in name or "pos_embed" in name:
        return randn
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return randn / math.sqrt(fan_in)
    return 0.1 * randn
