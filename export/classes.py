"""Which transformers classes a config is, and how Qwen3-VL-MoE's expert stacks are laid out on disk.

transformers 5.x holds an expert stack in memory as ``[experts, out, in]`` (``gate_up_proj`` [E, 2I, H], gate rows
first; ``down_proj`` [E, H, I]), while the published Qwen3-VL-MoE safetensors store each transposed, ``[experts, in,
out]`` (``mlp.experts.gate_up_proj`` [E, H, 2I], ``mlp.experts.down_proj`` [E, I, H]); its loader transposes them
(``conversion_mapping``: ``Transpose(1, 2, check_dims=True)``, which transposes only when the stored shape differs
from the parameter's, so a square stack, hidden size equal to 2I or I, would load untransposed). The presets write the
published layout; the graph reads it (:mod:`graphs.moe`).
"""

from __future__ import annotations

EXPERT_STACKS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # stored [E, in, out], held [E, out, in]


def is_expert_stack(name: str) -> bool:
    return name.endswith(EXPERT_STACKS)


def model_classes(model_type: str):
    """(config class, model class) of a ``config.json``'s ``model_type``: Qwen3-VL or Qwen3-VL-MoE."""
    import transformers

    if model_type == "qwen3_vl_moe":
        return transformers.Qwen3VLMoeConfig, transformers.Qwen3VLMoeForConditionalGeneration
    return transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration


def model_classes_of(folder) -> tuple:
    """:func:`model_classes` of a checkpoint folder's ``config.json``."""
    import json
    from pathlib import Path

    return model_classes(json.loads((Path(folder) / "config.json").read_text()).get("model_type", ""))
