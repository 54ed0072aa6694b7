"""Seeded random weights that make mistakes visible, written as a Hugging Face safetensors checkpoint.

transformers initialises Qwen3-VL with std 0.02 everywhere: activations shrink layer by layer and a wrong
image grid moved the outputs by only ~5e-6 (DESIGN.md). Here every matrix gets std 1/sqrt(fan_in), so
activations stay of order one through every layer, and the learned position grid and the embeddings get
std 1, so the position interpolation, the rotary positions and the DeepStack terms all matter at order one.
Qwen3-VL-MoE's expert stacks ([experts, out, in] in memory) get std 1/sqrt(in) per expert, and are written in the
published on-disk layout, [experts, in, out] (:mod:`export.classes`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from merge.space import naming_a_full_disk, require_free_space

from .classes import is_expert_stack, model_classes

SHARD_BYTES = 2 * 1024**3


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
    if is_expert_stack(name):  # [experts, out, in]: each expert is a Linear of fan-in `in`
        return randn / math.sqrt(shape[-1])
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return randn / math.sqrt(fan_in)
    return 0.1 * randn


def write_random_weights(folder: Path, config: dict, seed: int, label: str = "random weights") -> None:
    """Every parameter of ``Qwen3VLForConditionalGeneration(config)`` (``Qwen3VLMoeForConditionalGeneration`` for a
    ``qwen3_vl_moe`` config), drawn by :func:`draw_parameter` in name order from ``seed``, stored in bfloat16 shards
    of at most 2 GiB (with an index when there are several); expert stacks in the published layout.

    Streamed: each shard is written as soon as it is full, so at most one shard is in memory.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    config_class, model_class = model_classes(config.get("model_type", ""))
    with torch.device("meta"):
        skeleton = model_class(config_class(**config))
    params = sorted(((n, tuple(p.shape)) for n, p in skeleton.named_parameters()), key=lambda kv: kv[0])
    del skeleton
    bf16_bytes = 2 * sum(math.prod(shape) for _, shape in params)
    require_free_space(folder.parent, bf16_bytes, f"{label} ({len(params)} bfloat16 weights)")
    gen = torch.Generator().manual_seed(seed)
    shard_files: list[tuple[str, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        fname = f"model-{len(shard_files) + 1:05d}.safetensors"
        with naming_a_full_disk(folder / fname):
            save_file(shard, str(folder / fname), metadata={"format": "pt"})
        shard_files.append((fname, list(shard)))
        shard.clear()

    for name, shape in tqdm(params, desc=f"{label}: random weights", unit="tensor", disable=None, leave=False):
        tensor = draw_parameter(name, shape, gen).to(torch.bfloat16)
        if is_expert_stack(name):
            tensor = tensor.transpose(1, 2).contiguous()  # the published layout, [experts, in, out]
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > SHARD_BYTES:
            flush()
            size = 0
        shard[name] = tensor
        size += nbytes
    flush()

    if len(shard_files) == 1:
        os.replace(folder / shard_files[0][0], folder / "model.safetensors")
        return
    total = len(shard_files)
    weight_map = {}
    for i, (fname, names) in enumerate(shard_files):
        final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(folder / fname, folder / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
