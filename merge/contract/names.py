"""Every name the combined folder and its model are known by: files, inputs and outputs, scopes, domains.

One table, read by the build (which writes these names), the runtime (which feeds them), and the tools
(which look for them). Nothing here imports anything beyond the standard library.
"""

from __future__ import annotations

# -- files of a combined folder ------------------------------------------------------------------------------
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MANIFEST_FILE = "merge.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON_FILE = "chat_template.json"
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
VIDEO_PREPROCESSOR_CONFIG_FILE = "video_preprocessor_config.json"

# Copied from the checkpoint, so that the same preprocessing loads from the combined folder alone.
PREPROCESSING_FILES = (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    CHAT_TEMPLATE_FILE,
    CHAT_TEMPLATE_JSON_FILE,
    PREPROCESSOR_CONFIG_FILE,
    VIDEO_PREPROCESSOR_CONFIG_FILE,
    "processor_config.json",
)

TOOL_NAME = "qwen3vl-merge"

# -- the combined model's interface ---------------------------------------------------------------------------
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
PIXEL_VALUES = "pixel_values"
IMAGE_GRID_THW = "image_grid_thw"
PIXEL_VALUES_VIDEOS = "pixel_values_videos"  # 0 rows when a call has no video
VIDEO_GRID_THW = "video_grid_thw"
ROPE_DELTAS = "rope_deltas"
LOGITS = "logits"
ROPE_DELTAS_OUT = "rope_deltas_out"  # ONNX forbids an output with an input's name
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."

LOGITS_TO_KEEP = "logits_to_keep"  # optional (default 0: every position), after the cache

# The combined model's inputs before the cache, in the contract's order; then the cache; then the optional ones
# (initializers that a fed input overrides; some bindings, onnxruntime-node among them, list and feed only the
# required inputs, so nothing a client needs may be optional).
COMBINED_INPUTS = (INPUT_IDS, ATTENTION_MASK, PIXEL_VALUES, IMAGE_GRID_THW, PIXEL_VALUES_VIDEOS, VIDEO_GRID_THW,
                   ROPE_DELTAS)
OPTIONAL_INPUTS = (LOGITS_TO_KEEP,)

# The decoder part's own inputs (the GenAI builder's, with exclude_embeds).
DECODER_INPUTS_EMBEDS = "inputs_embeds"
DECODER_POSITION_IDS = "position_ids"


def past_name(layer: int, kind: str) -> str:
    """``past_key_values.{layer}.{key|value}``."""
    return f"{PAST_PREFIX}{layer}.{kind}"


def present_name(past: str) -> str:
    """The output that feeds ``past`` on the next call."""
    return PRESENT_PREFIX + past.removeprefix(PAST_PREFIX)


# -- scopes (the first component of every node, value and initializer name) -----------------------------------
VISION_SCOPE = "vision"
MERGE_SCOPE = "merge"
DECODER_SCOPE = "decoder"
SCOPES = (VISION_SCOPE, MERGE_SCOPE, DECODER_SCOPE)

# Values inside the combined graph that the tools read (verify's debug outputs, inspect's stitch view).
VISION_IMAGE_EMBEDS = "vision/image_embeds"
VISION_DEEPSTACK_EMBEDS = "vision/deepstack_embeds"
VISION_IMAGE_ROWS = "vision/image_rows"  # how many of the embeds' rows are the images' (the videos' follow)
MERGED_INPUTS_EMBEDS = DECODER_INPUTS_EMBEDS  # the embedding merge's output keeps the decoder's input name
MERGED_POSITION_IDS = DECODER_POSITION_IDS
EMBEDDING_PREFIX = "merge/embedding/"
DEEPSTACK_PREFIX = "merge/deepstack/"
POSITION_PREFIX = "merge/position/"
TOKEN_TABLE = EMBEDDING_PREFIX + "embed_tokens"  # the token embedding table the merge gathers from
TOKEN_EMBEDS_NODE = EMBEDDING_PREFIX + "embeds/token_embeds"  # its lookup (a tied head's table replaces it)
VISION_NUM_PATCHES = "vision/guard/num_patches"  # image + video patches of the call
VISION_HAS_PATCHES = "vision/guard/has_patches"  # Greater(num_patches, 0): what the vision If tests
VISION_IF = "vision/if_has_patches"  # the If whose then-branch is the vision tower


def deepstack_term(level: int) -> str:
    """The embedding merge's dense [batch, sequence, hidden] DeepStack term of ``level`` (zeros away from image
    and video tokens)."""
    return f"{EMBEDDING_PREFIX}deepstack_{level}"


def deepstack_add(level: int) -> str:
    """The node (and value) that adds DeepStack ``level`` to the residual stream."""
    return f"{DEEPSTACK_PREFIX}layers.{level}/add"


def mlp_output(layer: int, scope: str = DECODER_SCOPE) -> str:
    """The output of decoder layer ``layer``'s MLP (its down projection): the residual-stream term DeepStack level
    ``layer`` is added to (the ``skip`` of the next SkipSimplifiedLayerNormalization). The decoder graph names it so;
    ``scope`` is the decoder's name scope (empty for a bare decoder)."""
    return f"{scope}/layers.{layer}/mlp/output" if scope else f"layers.{layer}/mlp/output"

# -- ONNX Runtime contrib ops' input positions (wired by index) ------------------------------------------------
# com.microsoft::GroupQueryAttention: query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
# cos_cache, sin_cache, position_ids, attention_bias, head_sink
GQA_SEQLENS_K = 5
GQA_TOTAL_SEQUENCE_LENGTH = 6
GQA_ATTENTION_BIAS = 10

# -- the parts' own interfaces (graphs/ builds each part with these; the stitch passes bind them by name) -------
ROPE_INDEX_INPUTS = (INPUT_IDS, ATTENTION_MASK, IMAGE_GRID_THW, VIDEO_GRID_THW, ROPE_DELTAS)
ROPE_INDEX_OUTPUTS = (DECODER_POSITION_IDS, ROPE_DELTAS_OUT)
EMBEDDING_TOKEN_TABLE = "embed_tokens"
EMBEDDING_TABLE_SCALES = "embed_scales"  # an int4-block token table's scales (ShareTiedTable), after the inputs
EMBEDDING_IMAGE_EMBEDS = "image_embeds"  # bound to VISION_IMAGE_EMBEDS
EMBEDDING_DEEPSTACK_EMBEDS = "deepstack_embeds"  # bound to VISION_DEEPSTACK_EMBEDS
EMBEDDING_IMAGE_ROWS = "image_rows"  # bound to VISION_IMAGE_ROWS
EMBEDDING_MERGE_INPUTS = (INPUT_IDS, EMBEDDING_TOKEN_TABLE, EMBEDDING_IMAGE_EMBEDS, EMBEDDING_DEEPSTACK_EMBEDS,
                          EMBEDDING_IMAGE_ROWS)
EMBEDDING_VISUAL_MASK = "visual_mask"


def embedding_merge_level(level: int) -> str:
    """The embedding merge part's output for DeepStack ``level`` (renamed :func:`deepstack_term` once inlined)."""
    return f"deepstack_{level}"


def embedding_merge_outputs(num_levels: int) -> tuple[str, ...]:
    """``inputs_embeds``, ``visual_mask``, then ``deepstack_{k}`` per DeepStack level."""
    return (DECODER_INPUTS_EMBEDS, EMBEDDING_VISUAL_MASK, *(embedding_merge_level(k) for k in range(num_levels)))


# -- operator domains and opsets ------------------------------------------------------------------------------
MS_DOMAIN = "com.microsoft"
# the experts of a Qwen3-VL-MoE sparse layer (fp32, and 4-bit): inputs x, router logits, expert stacks...
MOE_OPS = ((MS_DOMAIN, "MoE"), (MS_DOMAIN, "QMoE"))
MOE_ROUTER_INPUT = 1
OPSET = 22  # the combined model's and every part's default-domain opset (the GenAI builder's)
# The smallest IR version that may carry each default-domain opset (the ONNX release table); a model is written
# with the one its opset needs.
MIN_IR_VERSION = {18: 8, 19: 9, 20: 9, 21: 10, 22: 10, 23: 11, 24: 12, 25: 13, 26: 13, 27: 13, 28: 14}
IR_VERSION = MIN_IR_VERSION[OPSET]

# -- special tokens --------------------------------------------------------------------------------------------
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"

# model metadata: "1" when past_key_values.* may be buffers of a fixed capacity written in place (see
# merge.runtime.cache); folders built before lack it
KV_CACHE_IN_PLACE = "kv_cache_in_place"
# the model's metadata: the largest magnitude of the vision part's int8 weight codes (see merge.contract.quant's
# INT8_CODE_LIMIT); absent from folders built with full-range codes, which saturate on x86 CPUs without VNNI
VISION_INT8_CODE_LIMIT = "vision_int8_code_limit"
