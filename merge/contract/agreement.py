"""A folder's ``config.json`` against the model it came with: the runtime sizes the KV cache, the patches and the
vision placeholders from the config, and the graph was built from the config the build read. If the two part
(a config edited, or copied from another model), every call would fail inside ONNX Runtime with a message about
tensor dimensions, or, for a vision token id, place image features at the wrong tokens without any error.

So :class:`merge.contract.folder.CombinedFolder` checks, from the model's bytes (its inputs, outputs and
metadata, read with :mod:`merge.contract.onnx_wire`) and from ``merge.json``, before anything runs: the layer
count, the KV heads and head size of ``past_key_values.*``, the vocabulary of ``logits``, the width of
``pixel_values``, and the vision token ids the model was built with. A dimension the model leaves symbolic, and
metadata an older folder lacks, are not checked.
"""

from __future__ import annotations

from merge.errors import MergeError

from .config import ModelConfig
from .manifest import Manifest
from .names import LOGITS, MANIFEST_FILE, PAST_PREFIX, PIXEL_VALUES
from .onnx_wire import Interface

SPECIAL_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def _fixed(dims: list, index: int) -> int | None:
    return dims[index] if len(dims) > abs(index) and isinstance(dims[index], int) and dims[index] >= 0 else None


def check_config_agrees(config: ModelConfig, interface: Interface, manifest: Manifest) -> None:
    """One MergeError naming config.json, the key and both numbers when the config and the model disagree."""
    where, text = config.where, config.text
    pasts = {name: dims for name, dims in interface.inputs.items() if name.startswith(PAST_PREFIX)}
    layers = {name[len(PAST_PREFIX):].split(".")[0] for name in pasts}
    if pasts and len(layers) != text.num_layers:
        raise MergeError(f"{where}: text_config num_hidden_layers {text.num_layers}, but the model has {len(layers)} "
                         f"layers (its {PAST_PREFIX}* inputs)")
    for name, dims in sorted(pasts.items()):
        heads, size = _fixed(dims, 1), _fixed(dims, 3)
        if len(dims) == 4 and heads is not None and heads != text.num_kv_heads:
            raise MergeError(f"{where}: text_config num_key_value_heads {text.num_kv_heads}, but the model's {name} "
                             f"has {heads} heads")
        if len(dims) == 4 and size is not None and size != text.head_dim:
            raise MergeError(f"{where}: text_config head_dim {text.head_dim}, but the model's {name} has heads of "
                             f"{size}")
    vocab = _fixed(interface.outputs.get(LOGITS, []), -1)
    if vocab is not None and vocab != text.vocab_size:
        raise MergeError(f"{where}: text_config vocab_size {text.vocab_size}, but the model's {LOGITS} have {vocab}")
    width = _fixed(interface.inputs.get(PIXEL_VALUES, []), -1)
    if width is not None and width != config.vision.patch_dim:
        raise MergeError(f"{where}: vision_config makes patches of {config.vision.patch_dim} values, but the model's "
                         f"{PIXEL_VALUES} takes {width}")
    built = interface.metadata.get("image_token_id")
    if built is not None and built.isdigit() and int(built) != config.image_token_id:
        raise MergeError(f"{where}: image_token_id {config.image_token_id}, but the model was built with {built}")
    for key in SPECIAL_TOKEN_KEYS:
        ours, recorded = getattr(config, key), manifest.special_token_ids.get(key)
        if ours is not None and recorded is not None and ours != recorded:
            raise MergeError(f"{where}: {key} {ours}, but the model was built with {recorded} ({MANIFEST_FILE})")
