"""The stitch as a list of onnx_ir passes, in the order they run (see :func:`stitch_passes`).

Each pass is a file of its own with its contracts (:mod:`.base`); together they turn the decoder graph
(:mod:`graphs.decoder`) into the combined model:

1. ``ScopeDecoder``      decoder names move under ``decoder/``
2. ``GuardVision``       the vision part behind ``If(num_patches > 0)``
3. ``MergeEmbeddings``   token embeddings with the image features and DeepStack terms in place
4. ``InjectDeepStack``   each DeepStack level added after its decoder layer
5. ``WirePositions``     3-D MRoPE positions and ``rope_deltas`` computed in the graph
6. ``PadLeftPadding``    a real key padding mask for every attention
   ``CheckContract``     the inputs checked against each other inside the graph (merge/checks/*)
   ``KeepLogits``        an optional input logits_to_keep: the head on the last positions only
7. ``QuantizeInt4``      (int4 only) decoder MatMuls -> MatMulNBits, quantized while written
8. ``QuantizeVisionInt8`` (vision int8 only) vision Gemms -> DynamicQuantizeMatMul, quantized while written
9. ``ShareTiedTable``    (tied heads) the head's weight serves as the token embedding table
10. ``SetInterface``     inputs and outputs in the contract's order
11. clean-up             unused nodes and initializers removed, nodes in topological order
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from merge.contract.config import ModelConfig
from merge.contract.quant import QuantSpec

from .base import StitchError, StitchPass, run_passes
from .check_contract import CheckContract
from .guard_vision import GuardVision
from .inject_deepstack import InjectDeepStack, deepstack_anchors
from .keep_logits import KeepLogits
from .merge_embeddings import MergeEmbeddings
from .pad_left_padding import PadLeftPadding
from .quantize_int4 import QuantizeInt4
from .quantize_vision_int8 import QuantizeVisionInt8
from .scope_decoder import ScopeDecoder
from .set_interface import SetInterface
from .share_tied_table import ShareTiedTable
from .wire_positions import WirePositions

__all__ = ["Parts", "StitchError", "StitchPass", "deepstack_anchors", "run_passes", "stitch", "stitch_passes"]


@dataclass
class Parts:
    """What the passes put into the decoder: the vision part, the two small subgraphs and the token table."""

    vision: ir.Model
    embedding_merge: ir.Model
    rope_index: ir.Model
    embed_tokens: ir.Value  # [vocab, hidden], a lazy initializer read from the checkpoint


def stitch_passes(config: ModelConfig, parts: Parts, quant: QuantSpec | None,
                  vision_precision: str = "fp32") -> list[ir.passes.PassBase]:
    text, vision = config.text, config.vision
    levels = len(vision.deepstack_visual_indexes)
    passes: list[ir.passes.PassBase] = [
        ScopeDecoder(),
        GuardVision(parts.vision, vision.patch_dim, text.hidden_size, levels, vision.spatial_merge_size),
        MergeEmbeddings(parts.embedding_merge, parts.embed_tokens, levels),
        InjectDeepStack(text.num_layers, levels),
        WirePositions(parts.rope_index),
        PadLeftPadding(),
        CheckContract(),
        KeepLogits(),
    ]
    if quant is not None:
        passes.append(QuantizeInt4(quant))
    if vision_precision == "int8":
        passes.append(QuantizeVisionInt8())
    passes += [
        ShareTiedTable(config.tie_word_embeddings, text.hidden_size),
        SetInterface(),
        common_passes.RemoveUnusedNodesPass(),  # the decoder's per-row lengths and an unread table go
        common_passes.TopologicalSortPass(),
    ]
    return passes


def stitch(decoder: ir.Model, config: ModelConfig, parts: Parts, quant: QuantSpec | None,
           vision_precision: str = "fp32") -> tuple[ir.Model, str]:
    """Run the passes on ``decoder`` (in place); returns the combined model and its embedding table layout."""
    from merge.stitch.ort_schemas import register_ort_default_domain_ops

    register_ort_default_domain_ops()  # lets the clean-up read SimplifiedLayerNormalization's optional outputs
    passes = stitch_passes(config, parts, quant, vision_precision)
    model = run_passes(decoder, passes)
    layout = next(p.layout for p in passes if isinstance(p, ShareTiedTable))
    return model, layout
