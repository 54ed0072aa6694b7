"""A tied model's token embedding table *is* its head's weight: read it there, and store it once.

- fp32 head (``MatMul`` with a [hidden, vocab] weight): the token lookup gathers columns of that weight
  (bit-equal to the table).
- quantized head (``MatMulNBits``, 4 or 8 bits, with or without zero points, no padding): the lookup reads the
  head's own blocks [vocab, blocks, block * bits / 8], scales and zero points with ``GatherBlockQuantized``, so
  neither the bytes nor the scales are stored a second time, and no fp32 table is kept. (Its 4-bit zero points
  are unpacked to one per byte by a few ops on constants, which ONNX Runtime folds when the session starts.)

The checkpoint's own table, no longer read, is dropped by the clean-up (it was never loaded: it is lazy).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from graphs.builder import GraphBuilder
from graphs.embedding_merge import token_embeddings
from merge.contract.names import EMBEDDING_PREFIX, LOGITS, TOKEN_EMBEDS_NODE

from .base import StitchError, StitchPass, find_node

log = logging.getLogger(__name__)


def head_node(graph: ir.Graph) -> ir.Node | None:
    """The node that produces ``logits`` (the head)."""
    logits = next((v for v in graph.outputs if v.name == LOGITS), None)
    return logits.producer() if logits is not None else None


class ShareTiedTable(StitchPass):
    """Sets ``layout`` to the table layout it leaves: vocab_major (untouched), hidden_major, int4_blocks or
    int8_blocks."""

    summary = "a tied head's weight (fp32, 4- or 8-bit blocks) serves as the token embedding table"

    def __init__(self, tied: bool, hidden_size: int) -> None:
        self.tied = tied
        self.hidden_size = hidden_size
        self.layout = "vocab_major"

    def requires(self, model: ir.Model) -> None:
        if self.tied and find_node(model.graph, TOKEN_EMBEDS_NODE) is None:
            raise StitchError(f"no token embedding lookup {TOKEN_EMBEDS_NODE!r} to point at the head")

    def apply(self, model: ir.Model) -> bool:
        if not self.tied:
            return False
        graph = model.graph
        head = head_node(graph)
        source = self._fp32_weight(head) or self._blocks(head)
        if source is None:
            log.warning("tied embeddings, but the head (%s) is not a layout the embedding can read; the table is "
                        "stored twice", head.op_type if head is not None else "none")
            return False
        layout, table, scales, block_size, zero_points = source
        old = find_node(graph, TOKEN_EMBEDS_NODE)
        b = GraphBuilder(EMBEDDING_PREFIX + "embeds/tied")
        # the ids the old lookup read: input_ids once CheckContract has checked them against the vocabulary
        embeds = token_embeddings(b, table, old.inputs[1], layout, self.hidden_size, scales, block_size, zero_points)
        b.add_to(graph)
        ir.convenience.replace_all_uses_with(old.outputs[0], embeds)
        graph.remove(old, safe=True)
        self.layout = layout
        return True

    def _fp32_weight(self, head: ir.Node | None):
        if head is None or head.op_type != "MatMul":
            return None
        weight = head.inputs[1]
        if weight is None or weight.const_value is None or weight.shape is None or weight.shape[0] != self.hidden_size:
            return None
        return "hidden_major", weight, None, 0, None

    def _blocks(self, head: ir.Node | None):
        if head is None or head.op_type != "MatMulNBits" or len(head.inputs) > 4:
            return None  # g_idx or a bias: not a plain block table
        attrs = {k: a.value for k, a in head.attributes.items()}
        block, bits = int(attrs.get("block_size", 0)), attrs.get("bits")
        layout = {4: "int4_blocks", 8: "int8_blocks"}.get(bits)
        if layout is None or attrs.get("K") != self.hidden_size or not block or self.hidden_size % block:
            return None
        weight, scales = head.inputs[1], head.inputs[2]
        zero_points = head.inputs[3] if len(head.inputs) > 3 else None
        vocab, blocks = int(attrs["N"]), self.hidden_size // block
        if (weight.shape is None or list(weight.shape) != [vocab, blocks, block * bits // 8]
                or scales.shape is None or list(scales.shape) != [vocab, blocks]
                or (zero_points is not None and (zero_points.shape is None or zero_points.const_value is None
                                                 or list(zero_points.shape) != [vocab, -(-blocks * bits // 8)]))):
            return None
        return layout, weight, scales, block, zero_points
