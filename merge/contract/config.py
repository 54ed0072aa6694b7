"""The one parse of a Qwen3-VL ``config.json``: every command reads the model's shape through :class:`ModelConfig`.

It checks what the rest of the tool relies on and says, in one sentence naming the file and the key, what
is wrong: a model type other than Qwen3-VL, a missing section, a value that is not a positive integer, a
special token outside the vocabulary, vision features that cannot replace token embeddings.

Qwen3-VL-MoE (``model_type`` ``qwen3_vl_moe``) is the same model with a mixture of experts in place of the MLP of
its sparse layers: :class:`MoeSpec` (``TextSpec.moe``) holds the experts' shape and which layers are sparse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge.errors import MergeError

from .names import CONFIG_FILE
from .reading import load_json, read_regular
from .vision import VisionSpec

DENSE_MODEL_TYPE = "qwen3_vl"
MOE_MODEL_TYPE = "qwen3_vl_moe"
MOE_TEXT_MODEL_TYPE = "qwen3_vl_moe_text"
SUPPORTED_MODEL_TYPES = (DENSE_MODEL_TYPE, MOE_MODEL_TYPE)
# Sizes no Qwen3-VL config comes near; a value past them is a corrupt or hostile file, refused before any
# allocation depends on it.
MAX_VOCAB = 1 << 24
MAX_HIDDEN = 1 << 16
MAX_LAYERS = 1024
MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few KiB


def _int(section: dict, key: str, where: str, *, low: int = 1, high: int | None = None, default: Any = None) -> int:
    value = section.get(key, default)
    if value is None:
        raise MergeError(f"{where} has no {key!r}; is this a complete Qwen3-VL config?")
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise MergeError(f"{where}: {key} = {value!r} is not an integer")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise MergeError(f"{where}: {key} = {value} must be {bound}")
    return value


def _float(section: dict, key: str, where: str, *, default: Any) -> float:
    """A positive, finite number (an epsilon, a rotary base)."""
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise MergeError(f"{where}: {key} = {value!r} is not a positive finite number")
    return float(value)


TEXT_ACTIVATIONS = ("silu",)  # the decoder's MLP is written as SwiGLU (Sigmoid, Mul)
MAX_EXPERTS = 1 << 12  # published Qwen MoE models have 60 to 512


@dataclass(frozen=True)
class MoeSpec:
    """The mixture of experts of Qwen3-VL-MoE's sparse layers (transformers' ``Qwen3VLMoeTextSparseMoeBlock``).

    Layer ``i`` is sparse unless it is in ``mlp_only_layers``, when ``(i + 1) % decoder_sparse_step == 0``; a
    sparse layer routes each token to ``num_experts_per_tok`` of ``num_experts`` experts (softmax over all experts'
    router logits, the top k, divided by their sum), each a SwiGLU MLP of width ``moe_intermediate_size``. The
    other layers keep the dense MLP (``intermediate_size``)."""

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, text: dict, where: str, num_layers: int) -> MoeSpec:
        # the published configs say num_experts; transformers 5.x writes it as num_local_experts (its attribute_map)
        key = "num_experts" if "num_experts" in text or "num_local_experts" not in text else "num_local_experts"
        experts = _int(text, key, where, high=MAX_EXPERTS)
        top_k = _int(text, "num_experts_per_tok", where, high=experts)
        width = _int(text, "moe_intermediate_size", where, high=MAX_HIDDEN)
        step = _int(text, "decoder_sparse_step", where, high=MAX_LAYERS, default=1)
        only = text.get("mlp_only_layers")
        only = [] if only is None else only
        if not isinstance(only, list | tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers for i in only):
            raise MergeError(f"{where}: mlp_only_layers {only!r} is not a list of layer indexes in 0..{num_layers - 1}")
        norm = text.get("norm_topk_prob", True)
        if norm is not True:
            # transformers' Qwen3VLMoeTextTopKRouter always divides the top k by their sum: a model trained
            # without it would run differently here and there, and nothing would say so
            raise MergeError(f"{where}: norm_topk_prob = {norm!r}; Qwen3-VL-MoE renormalises its top-k routing "
                             "weights (norm_topk_prob true), and only that is supported")
        act = text.get("hidden_act", "silu")
        if act not in TEXT_ACTIVATIONS:
            raise MergeError(f"{where}: hidden_act {act!r} is not supported (Qwen3-VL-MoE's experts use 'silu')")
        spec = cls(experts, top_k, width, step, tuple(sorted(set(int(i) for i in only))))
        if not spec.sparse_layers(num_layers):
            raise MergeError(f"{where}: no layer is sparse (decoder_sparse_step {step}, mlp_only_layers "
                             f"{list(spec.mlp_only_layers)}, {num_layers} layers): this is not a mixture-of-experts "
                             "model")
        return spec

    def is_sparse(self, layer: int) -> bool:
        """Whether layer ``layer``'s MLP is the experts (transformers' rule, ``Qwen3VLMoeTextDecoderLayer``)."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    def sparse_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(i for i in range(num_layers) if self.is_sparse(i))


@dataclass(frozen=True)
class TextSpec:
    """The decoder's shape."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    mrope_section: tuple[int, ...]
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    rope_theta: float = 5_000_000.0
    moe: MoeSpec | None = None  # Qwen3-VL-MoE's experts; None for a dense model

    @classmethod
    def from_config(cls, text: dict, where: str, *, moe: bool = False) -> TextSpec:
        hidden = _int(text, "hidden_size", where, high=MAX_HIDDEN)
        heads = _int(text, "num_attention_heads", where, high=MAX_HIDDEN)
        kv_heads = _int(text, "num_key_value_heads", where, high=heads, default=heads)
        if heads % kv_heads:
            raise MergeError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                             f"{kv_heads}")
        head_dim = text.get("head_dim")
        head_dim = _int(text, "head_dim", where, high=MAX_HIDDEN) if head_dim is not None else hidden // heads
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise MergeError(f"{where}: rope_parameters is {type(rope).__name__}, not an object")
        section = rope.get("mrope_section") or ()
        if not isinstance(section, list | tuple) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in section):
            raise MergeError(f"{where}: mrope_section {section!r} is not a list of non-negative integers")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise MergeError(f"{where}: rope_type {rope_type!r} is not supported (Qwen3-VL's is 'default')")
        act = text.get("hidden_act", "silu")
        if act not in TEXT_ACTIVATIONS:
            raise MergeError(f"{where}: hidden_act {act!r} is not supported (Qwen3-VL's is 'silu')")
        if section and 2 * sum(section) != head_dim:
            raise MergeError(f"{where}: mrope_section {list(section)} covers {2 * sum(section)} rotary dimensions but "
                             f"head_dim is {head_dim}; they must be equal")
        layers = _int(text, "num_hidden_layers", where, high=MAX_LAYERS)
        return cls(
            vocab_size=_int(text, "vocab_size", where, high=MAX_VOCAB),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=_int(text, "max_position_embeddings", where, high=1 << 31, default=1 << 18),
            mrope_section=tuple(int(s) for s in section),
            rms_norm_eps=_float(text, "rms_norm_eps", where, default=1e-6),
            hidden_act=act,
            rope_theta=_float(rope, "rope_theta", where, default=text.get("rope_theta", 5_000_000.0)),
            moe=MoeSpec.from_config(text, where, layers) if moe else None,
        )


@dataclass(frozen=True)
class ModelConfig:
    """A checked Qwen3-VL config: the text and vision shapes and the special token ids, plus the raw dict."""

    raw: dict
    text: TextSpec
    vision: VisionSpec
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int | None
    vision_end_token_id: int | None
    tie_word_embeddings: bool
    where: str = CONFIG_FILE

    @classmethod
    def from_dict(cls, config: Any, where: str = CONFIG_FILE) -> ModelConfig:
        if not isinstance(config, dict):
            raise MergeError(f"{where}: expected a JSON object, found {type(config).__name__}")
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise MergeError(
                f"{where}: model_type is {model_type!r} (architectures {config.get('architectures')}); this tool "
                f"supports Qwen3-VL (model_type {' or '.join(map(repr, SUPPORTED_MODEL_TYPES))})"
            )
        for key in ("vision_config", "text_config"):
            if not isinstance(config.get(key), dict):
                raise MergeError(f"{where}: {key} is missing; a Qwen3-VL config has vision_config and text_config")
        moe = model_type == MOE_MODEL_TYPE
        text_type = config["text_config"].get("model_type")
        if moe and text_type not in (None, MOE_TEXT_MODEL_TYPE):
            raise MergeError(f"{where}: text_config.model_type is {text_type!r} in a {MOE_MODEL_TYPE} config; "
                             f"expected {MOE_TEXT_MODEL_TYPE!r}")
        text = TextSpec.from_config(config["text_config"], f"{where} text_config", moe=moe)
        vision = VisionSpec.from_config(config["vision_config"], f"{where} vision_config")
        if vision.out_hidden_size != text.hidden_size:
            raise MergeError(
                f"{where}: vision_config.out_hidden_size {vision.out_hidden_size} != text_config.hidden_size "
                f"{text.hidden_size}: image features cannot replace token embeddings"
            )
        if len(vision.deepstack_visual_indexes) > text.num_layers:
            raise MergeError(
                f"{where}: {len(vision.deepstack_visual_indexes)} DeepStack levels but only {text.num_layers} decoder "
                "layers to add them to"
            )
        ids = {}
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if key in ("image_token_id", "video_token_id") or config.get(key) is not None:
                ids[key] = _int(config, key, where, low=0, high=text.vocab_size - 1)
            else:
                ids[key] = None
        tie = config.get("tie_word_embeddings", config["text_config"].get("tie_word_embeddings", False))
        return cls(raw=config, text=text, vision=vision, tie_word_embeddings=bool(tie), where=where, **ids)

    @property
    def is_moe(self) -> bool:
        """Qwen3-VL-MoE: the sparse layers' MLPs are mixtures of experts (``text.moe``)."""
        return self.text.moe is not None

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        """``folder/config.json``, read and checked."""
        path = Path(folder) / CONFIG_FILE
        data = read_regular(path, str(path), MAX_CONFIG_BYTES,
                            missing=f"{folder}: no {CONFIG_FILE}; a Hugging Face Qwen3-VL folder is expected")
        return cls.from_dict(load_json(data, path), str(path))

    @property
    def special_token_ids(self) -> dict[str, int]:
        """The vision token ids the config names (for the manifest)."""
        keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
