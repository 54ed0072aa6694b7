"""Every GroupQueryAttention gets a real key padding mask, so left-padded batch rows are right.

As built, GQA takes each row's length from the mask and assumes its tokens start at position 0, which is
wrong for left-padded rows. Here every row is treated as full length (``seqlens_k = total - 1``) and the
padded key positions get a large negative ``attention_bias``; unpadded rows compute exactly as before.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphs.builder import GraphBuilder
from merge.contract.names import ATTENTION_MASK, INPUT_IDS, PADDING_PREFIX

from .base import StitchError, StitchPass, graph_input, register_builder

NEG_LARGE = -1e9  # additive mask for padded keys: finite, so fully padded rows stay NaN-free
ATTENTION = "GroupQueryAttention"
SEQLENS_K, TOTAL_SEQUENCE_LENGTH, ATTENTION_BIAS = 5, 6, 10  # GroupQueryAttention's input positions


class PadLeftPadding(StitchPass):
    summary = "GroupQueryAttention gets seqlens_k = total - 1 and a key padding bias from attention_mask"

    def requires(self, model: ir.Model) -> None:
        attention = [n for n in model.graph if n.op_type == ATTENTION]
        if not attention:
            raise StitchError(f"the decoder has no {ATTENTION} node; left padding cannot be handled")
        if len(attention[0].inputs) <= TOTAL_SEQUENCE_LENGTH or attention[0].inputs[TOTAL_SEQUENCE_LENGTH] is None:
            raise StitchError(f"{ATTENTION} has no total_sequence_length input")
        graph_input(model.graph, ATTENTION_MASK, str(self))
        graph_input(model.graph, INPUT_IDS, str(self))

    def apply(self, model: ir.Model) -> None:
        graph = model.graph
        attention_mask = graph_input(graph, ATTENTION_MASK, str(self))
        input_ids = graph_input(graph, INPUT_IDS, str(self))
        attention = [n for n in graph if n.op_type == ATTENTION]
        total = attention[0].inputs[TOTAL_SEQUENCE_LENGTH]
        b = GraphBuilder(PADDING_PREFIX)
        batch = b.op("Shape", [attention_mask], {"start": 0, "end": 1}, name="batch")
        last = b.op("Sub", [total, b.const(np.int32(1), "one")], name="last_position")
        seqlens = b.op("Expand", [last, batch], name="seqlens_k")
        # bias[b, 0, q, t] = (mask[b, t] - 1) * 1e9: 0 at tokens, -1e9 at padding
        mask = b.op("Cast", [attention_mask], {"to": ir.DataType.FLOAT}, name="mask_float")
        pads = b.op("Sub", [mask, b.const(np.float32(1), "one_f")], name="mask_minus_one")
        key_bias = b.op("Mul", [pads, b.const(np.float32(-NEG_LARGE), "large")], name="key_bias")
        key_bias = b.op("Unsqueeze", [key_bias, b.const([1, 2], "axes")], name="key_bias_4d")  # [B, 1, 1, T]
        shape = b.op("Concat", [batch, b.const([1], "one_head"),
                                b.op("Shape", [input_ids], {"start": 1, "end": 2}, name="sequence"),
                                b.op("Shape", [attention_mask], {"start": 1, "end": 2}, name="total")],
                     {"axis": 0}, name="bias_shape")
        bias = b.op("Expand", [key_bias, shape], name="attention_bias")  # [B, 1, S, T]
        register_builder(graph, b)
        for node in attention:
            node.replace_input_with(SEQLENS_K, seqlens)
            while len(node.inputs) <= ATTENTION_BIAS:
                node.resize_inputs(len(node.inputs) + 1)
            node.replace_input_with(ATTENTION_BIAS, bias)

    def ensures(self, model: ir.Model) -> None:
        unpadded = [n.name for n in model.graph if n.op_type == ATTENTION
                    and (len(n.inputs) <= ATTENTION_BIAS or n.inputs[ATTENTION_BIAS] is None)]
        if unpadded:
            raise StitchError(f"{ATTENTION} node(s) without a padding bias: {unpadded[:3]}")
