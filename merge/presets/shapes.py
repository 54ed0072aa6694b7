"""Built-in model presets: published Qwen3-VL shapes with seeded random weights.

A preset is a plain ``config.json`` dictionary. ``tiny`` is CI-sized (seconds to build); the others carry
the shapes of the published checkpoints, so speed and scale measurements mean something. Their weights are
random but *scaled* (see :mod:`merge.random_weights`) so that a mistake in a grid, a position or a
DeepStack term moves the outputs far more than any parity tolerance.
"""

from __future__ import annotations

import copy

# Qwen2/Qwen3 special tokens, in the order the published tokenizer numbers them. Their ids start at
# ``special_base``: 151643 for the published shapes, just below ``vocab_size`` for the tiny ones.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
PUBLISHED_SPECIAL_BASE = 151643


def special_token_ids(special_base: int) -> dict[str, int]:
    return {tok: special_base + i for i, tok in enumerate(SPECIAL_TOKENS)}


def _merge1_vision() -> dict:
    """tiny-merge1's vision tower (no spatial merge, patch 14, DeepStack at 1, 2), shared by tiny-moe-6x3."""
    return {
        "depth": 3,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_heads": 3,
        "out_hidden_size": 96,
        "spatial_merge_size": 1,
        "patch_size": 14,
        "num_position_embeddings": 36,
        "deepstack_visual_indexes": [1, 2],
    }


def _config(
    *,
    vision: dict,
    text: dict,
    special_base: int,
    tie_word_embeddings: bool,
    moe: dict | None = None,
) -> dict:
    """A Qwen3-VL ``config.json``; with ``moe`` (the experts' keys of ``text_config``) a Qwen3-VL-MoE one."""
    ids = special_token_ids(special_base)
    rope = {
        "rope_type": "default",
        "rope_theta": text.pop("rope_theta", 5_000_000.0),
        "mrope_section": text.pop("mrope_section"),
        "mrope_interleaved": True,
    }
    vision_cfg = {
        "model_type": "qwen3_vl_vision",
        "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "num_position_embeddings": 2304,
        "initializer_range": 0.02,
        **vision,
    }
    text_cfg = {
        "model_type": "qwen3_vl_text",
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 262144,
        "initializer_range": 0.02,
        "use_cache": True,
        "rope_parameters": rope,
        "dtype": "bfloat16",
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        **text,
    }
    architecture, model_type = "Qwen3VLForConditionalGeneration", "qwen3_vl"
    if moe is not None:
        architecture, model_type = "Qwen3VLMoeForConditionalGeneration", "qwen3_vl_moe"
        vision_cfg["model_type"] = "qwen3_vl_moe_vision"
        text_cfg.update({"model_type": "qwen3_vl_moe_text", "decoder_sparse_step": 1, "mlp_only_layers": [],
                         "norm_topk_prob": True, **moe})
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": tie_word_embeddings,
        "dtype": "bfloat16",
        "text_config": text_cfg,
        "vision_config": vision_cfg,
    }


_PUBLISHED_VISION_SMALL = {
    "depth": 24,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_heads": 16,
    "deepstack_visual_indexes": [5, 11, 17],
}


# The 8B's vision tower, which Qwen3-VL-30B-A3B shares (with its own output width)
_PUBLISHED_VISION_LARGE = {
    "depth": 27,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_heads": 16,
    "deepstack_visual_indexes": [8, 16, 24],
}


def _tiny_text(vocab_size: int) -> dict:
    return {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "mrope_section": [2, 3, 3],
    }


def _presets() -> dict[str, dict]:
    tiny_vocab = 1024
    tiny_base = tiny_vocab - 32
    return {
        "tiny": _config(
            vision={
                "depth": 4,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_heads": 4,
                "out_hidden_size": 64,
                "num_position_embeddings": 64,
                "deepstack_visual_indexes": [0, 2, 3],
            },
            text=_tiny_text(tiny_vocab),
            special_base=tiny_base,
            tie_word_embeddings=True,
        ),
        # A second tiny shape for generality: no spatial merge, a 3-tap DeepStack list in another order of
        # layers, non-square learned position grid side, untied head, a different head layout.
        "tiny-merge1": _config(
            vision=_merge1_vision(),
            text={
                **_tiny_text(tiny_vocab),
                "hidden_size": 96,
                "num_attention_heads": 6,
                "num_key_value_heads": 3,
                "head_dim": 16,
            },
            special_base=tiny_base,
            tie_word_embeddings=False,
        ),
        "qwen3-vl-2b": _config(
            vision={**_PUBLISHED_VISION_SMALL, "out_hidden_size": 2048},
            text={
                "vocab_size": 151936,
                "hidden_size": 2048,
                "intermediate_size": 6144,
                "num_hidden_layers": 28,
                "num_attention_heads": 16,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "mrope_section": [24, 20, 20],
            },
            special_base=PUBLISHED_SPECIAL_BASE,
            tie_word_embeddings=True,
        ),
        "qwen3-vl-4b": _config(
            vision={**_PUBLISHED_VISION_SMALL, "out_hidden_size": 2560},
            text={
                "vocab_size": 151936,
                "hidden_size": 2560,
                "intermediate_size": 9728,
                "num_hidden_layers": 36,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "mrope_section": [24, 20, 20],
            },
            special_base=PUBLISHED_SPECIAL_BASE,
            tie_word_embeddings=True,
        ),
        "qwen3-vl-8b": _config(
            vision={**_PUBLISHED_VISION_LARGE, "out_hidden_size": 4096},
            text={
                "vocab_size": 151936,
                "hidden_size": 4096,
                "intermediate_size": 12288,
                "num_hidden_layers": 36,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "mrope_section": [24, 20, 20],
            },
            special_base=PUBLISHED_SPECIAL_BASE,
            tie_word_embeddings=False,
        ),
        # Qwen3-VL-MoE, CI-sized: tiny's shape with 8 experts, 2 per token, in layers 0, 2 and 3; layer 1 keeps the
        # dense MLP (mlp_only_layers), so both kinds of layer carry a DeepStack level. The experts' width is neither
        # the hidden size nor half of it: transformers decides whether a stored expert stack needs transposing by
        # comparing shapes, and a square stack would load untransposed there.
        "tiny-moe": _config(
            vision={
                "depth": 4,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_heads": 4,
                "out_hidden_size": 64,
                "num_position_embeddings": 64,
                "deepstack_visual_indexes": [0, 2, 3],
            },
            text=_tiny_text(tiny_vocab),
            special_base=tiny_base,
            tie_word_embeddings=True,
            moe={"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "mlp_only_layers": [1]},
        ),
        # A second MoE shape: 6 experts, 3 per token, every second layer sparse (decoder_sparse_step 2: layers 1
        # and 3), experts narrower than the hidden size, head_dim 32 with 1 KV head, untied head, tiny-merge1's vision.
        "tiny-moe-6x3": _config(
            vision=_merge1_vision(),
            text={
                **_tiny_text(tiny_vocab),
                "hidden_size": 96,
                "num_attention_heads": 3,
                "num_key_value_heads": 1,
                "head_dim": 32,
                "mrope_section": [6, 5, 5],
            },
            special_base=tiny_base,
            tie_word_embeddings=False,
            moe={"num_experts": 6, "num_experts_per_tok": 3, "moe_intermediate_size": 64, "decoder_sparse_step": 2},
        ),
        # Qwen3-VL-30B-A3B's published shapes: 48 sparse layers of 128 experts (8 per token, width 768), 32 query and 4
        # KV heads, untied head, the 8B's vision tower with out 2048. 61 GB in bfloat16: its weights are drawn from
        # the seed when read (SEEDED_PRESETS), never stored.
        "qwen3-vl-30b-a3b": _config(
            vision={**_PUBLISHED_VISION_LARGE, "out_hidden_size": 2048},
            text={
                "vocab_size": 151936,
                "hidden_size": 2048,
                "intermediate_size": 6144,
                "num_hidden_layers": 48,
                "num_attention_heads": 32,
                "num_key_value_heads": 4,
                "head_dim": 128,
                "mrope_section": [24, 20, 20],
            },
            special_base=PUBLISHED_SPECIAL_BASE,
            tie_word_embeddings=False,
            moe={"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768},
        ),
    }


PRESETS: dict[str, dict] = _presets()
# presets whose weights are drawn from their seed when read (merge.sources.seeded): too large to store
SEEDED_PRESETS = frozenset({"qwen3-vl-30b-a3b"})
# by position: a preset added at the end leaves every earlier preset's weights as they were
PRESET_SEEDS = {name: 1234 + i for i, name in enumerate(PRESETS)}


def preset_config(name: str) -> dict:
    """A deep copy of one preset's ``config.json`` dictionary."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
