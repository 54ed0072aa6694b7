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


def parameter_law(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, standard deviation) of :func:`draw_parameter`'s values for one parameter (its in-memory shape)."""
    leaf = name.rsplit(".", 1)[-1]
    if ("norm" in name or "layernorm" in name) and leaf == "weight":
        return 1.0, 0.1
    if leaf == "bias":
        return 0.0, 0.1
    if "embed_tokens" in name or "pos_embed" in name:
        return 0.0, 1.0
    if is_expert_stack(name):
        return 0.0, 1.0 / math.sqrt(shape[-1])
    if len(shape) >= 2:
        return 0.0, 1.0 / math.sqrt(math.prod(shape[1:]))
    return 0.0, 0.1


def _parameters(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter of the config's model class (built on the meta device: no memory), in name order."""
    config_class, model_class = model_classes(config.get("model_type", ""))
    with torch.device("meta"):
        skeleton = model_class(config_class(**config))
    return sorted(((n, tuple(p.shape)) for n, p in skeleton.named_parameters()), key=lambda kv: kv[0])


def stored_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A parameter's shape on disk: expert stacks in the published layout, [experts, in, out]."""
    return (shape[0], shape[2], shape[1]) if is_expert_stack(name) else shape


def write_seeded_weights(folder: Path, config: dict, seed: int) -> None:
    """``seeded_weights.json`` (:mod:`merge.sources.seeded`) for every parameter of the config's model: the same
    laws as :func:`write_random_weights`, drawn per tensor from ``seed`` when read, nothing stored."""
    from merge.contract.seeded import SEEDED_FILE, SeededTensor, seeded_json

    tensors = [SeededTensor(name, stored_shape(name, shape), *parameter_law(name, shape))
               for name, shape in _parameters(config)]
    (folder / SEEDED_FILE).write_text(json.dumps(seeded_json(seed, tensors), indent=1) + "\n")


def write_safetensors(folder: Path, weights, names: list[str] | None = None, label: str = "weights") -> None:
    """``weights`` (anything with ``names``/``load``: a seeded folder's :class:`merge.sources.checkpoint.Checkpoint`)
    written as bfloat16 safetensors shards in ``folder``, one tensor in memory at a time (bfloat16 values are
    written exactly)."""
    names = sorted(names if names is not None else weights.names())
    size = 2 * sum(math.prod(weights.shape(n)) for n in names)
    require_free_space(folder, size, f"{label} ({len(names)} bfloat16 tensors)")
    _write_shards(folder, ((n, torch.from_numpy(weights.load(n)).to(torch.bfloat16)) for n in names))


def write_random_weights(folder: Path, config: dict, seed: int, label: str = "random weights") -> None:
    """Every parameter of ``Qwen3VLForConditionalGeneration(config)`` (``Qwen3VLMoeForConditionalGeneration`` for a
    ``qwen3_vl_moe`` config), drawn by :func:`draw_parameter` in name order from ``seed``, stored in bfloat16 shards
    of at most 2 GiB (with an index when there are several); expert stacks in the published layout.

    Streamed: each shard is written as soon as it is full, so at most one shard is in memory.
    """
    params = _parameters(config)
    bf16_bytes = 2 * sum(math.prod(shape) for _, shape in params)
    require_free_space(folder.parent, bf16_bytes, f"{label} ({len(params)} bfloat16 weights)")
    gen = torch.Generator().manual_seed(seed)

    def tensors():
        from tqdm.auto import tqdm

        for name, shape in tqdm(params, desc=f"{label}: random weights", unit="tensor", disable=None, leave=False):
            tensor = draw_parameter(name, shape, gen).to(torch.bfloat16)
            if is_expert_stack(name):
                tensor = tensor.transpose(1, 2).contiguous()  # the published layout, [experts, in, out]
            yield name, tensor

    _write_shards(folder, tensors())


def _write_shards(folder: Path, tensors) -> None:
    """(name, tensor) pairs into shards of at most SHARD_BYTES, each written as soon as it is full, and the index."""
    from safetensors.torch import save_file

    shard_files: list[tuple[str, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        fname = f"model-{len(shard_files) + 1:05d}.safetensors"
        with naming_a_full_disk(folder / fname):
            save_file(shard, str(folder / fname), metadata={"format": "pt"})
        shard_files.append((fname, list(shard)))
        shard.clear()

    for name, tensor in tensors:
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
