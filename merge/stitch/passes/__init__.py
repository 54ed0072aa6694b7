"""The stitch as a list of onnx_ir passes, in the order they run (see :func:`stitch_passes`).

The decoder graph arrives built for the stitch (:data:`graphs.decoder.COMBINED`: names under ``decoder/``, a key
padding mask for left-padded rows, the optional ``logits_to_keep``, each layer's MLP output named). Each pass is a
file of its own with its contracts (:mod:`.base`) and does what only the stitch can: join the parts, or change
the model after the fact.

1. ``GuardVision``        the vision part behind ``If(num_patches > 0)``
2. ``MergeEmbeddings``    token embeddings with the image and video features and DeepStack terms in place
3. ``InjectDeepStack``    each DeepStack level added to its decoder layer's named MLP output
4. ``WirePositions``      3-D MRoPE positions and ``rope_deltas`` computed in the graph
5. ``CheckContract``      the inputs checked against each other inside the graph (merge/checks/*)
6. ``QuantizeInt4``       (int4 only) decoder MatMuls -> MatMulNBits, quantized while written
7. ``QuantizeVisionInt8`` (vision int8 only) vision Gemms -> DynamicQuantizeMatMul, quantized while written
8. ``ShareTiedTable``     (tied heads) the head's weight serves as the token embedding table
9. ``SetInterface``       inputs and outputs in the contract's order
10. clean-up              unused nodes and initializers removed, nodes in topological order
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from merge.contract.config import ModelConfig
from merge.contract.names import DECODER_SCOPE, LOGITS_TO_KEEP
from merge.contract.quant import QuantSpec

from .base import StitchError, StitchPass, has_input, run_passes
from .check_contract import CheckContract
from .guard_vision import GuardVision
from .inject_deepstack import InjectDeepStack
from .merge_embeddings import MergeEmbeddings
from .quantize_int4 import QuantizeInt4
from .quantize_vision_int8 import QuantizeVisionInt8
from .set_interface import SetInterface
from .share_tied_table import ShareTiedTable
from .wire_positions import WirePositions

__all__ = ["Parts", "StitchError", "StitchPass", "run_passes", "stitch", "stitch_passes"]


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
        GuardVision(parts.vision, vision.patch_dim, text.hidden_size, levels, vision.spatial_merge_size),
        MergeEmbeddings(parts.embedding_merge, parts.embed_tokens, levels),
        InjectDeepStack(text.num_layers, levels),
        WirePositions(parts.rope_index),
        CheckContract(text.vocab_size),
    ]
    if quant is not None:
        passes.append(QuantizeInt4(quant))
    if vision_precision == "int8":
        passes.append(QuantizeVisionInt8())
    passes += [
        ShareTiedTable(config.tie_word_embeddings, text.hidden_size),
        SetInterface(),
        common_passes.RemoveUnusedNodesPass(),  # e.g. a tied model's unread token table goes
        common_passes.TopologicalSortPass(),
    ]
    return passes


def stitch(decoder: ir.Model, config: ModelConfig, parts: Parts, quant: QuantSpec | None,
           vision_precision: str = "fp32") -> tuple[ir.Model, str]:
    """Run the passes on ``decoder`` (in place); returns the combined model and its embedding table layout."""
    from merge.stitch.ort_schemas import register_ort_default_domain_ops

    register_ort_default_domain_ops()  # lets the clean-up read SimplifiedLayerNormalization's optional outputs
    stray = next((n.name for n in decoder.graph if not (n.name or "").startswith(f"{DECODER_SCOPE}/")), None)
    if stray is not None or not has_input(decoder.graph, LOGITS_TO_KEEP):
        raise StitchError("the decoder was not built for the stitch (graphs.decoder.COMBINED): "
                          + (f"node {stray!r} is outside {DECODER_SCOPE}/" if stray is not None
                             else f"it has no input {LOGITS_TO_KEEP!r}"))
    passes = stitch_passes(config, parts, quant, vision_precision)
    model = run_passes(decoder, passes)
    layout = next(p.layout for p in passes if isinstance(p, ShareTiedTable))
    return model, layout
