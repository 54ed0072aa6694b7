"""The decoder's ``position_ids`` [3, batch, sequence] now come from the rope index subgraph (HF's
``get_rope_index`` on the first call, ``cumsum(mask) - 1 + rope_deltas`` later), which also returns
``rope_deltas_out``."""

from __future__ import annotations

import onnx_ir as ir

from graphs.builder import INT64, tensor_input
from merge.contract.names import (
    ATTENTION_MASK,
    DECODER_POSITION_IDS,
    IMAGE_GRID_THW,
    INPUT_IDS,
    ROPE_DELTAS,
    ROPE_DELTAS_OUT,
    VIDEO_GRID_THW,
)

from .base import StitchError, StitchPass, graph_input, has_input, inline_part


class WirePositions(StitchPass):
    summary = "3-D MRoPE positions and rope_deltas computed in the graph; input rope_deltas, output rope_deltas_out"

    def __init__(self, rope_index: ir.Model) -> None:
        self.part = rope_index

    def requires(self, model: ir.Model) -> None:
        for name in (DECODER_POSITION_IDS, INPUT_IDS, ATTENTION_MASK, IMAGE_GRID_THW, VIDEO_GRID_THW):
            graph_input(model.graph, name, str(self))
        if has_input(model.graph, ROPE_DELTAS):
            raise StitchError(f"the model already has an input {ROPE_DELTAS!r}")
        outputs = sorted(v.name for v in self.part.graph.outputs)
        if outputs != sorted([DECODER_POSITION_IDS, ROPE_DELTAS_OUT]):
            raise StitchError(f"the rope index part's outputs are {outputs}")

    def apply(self, model: ir.Model) -> bool:
        graph = model.graph
        positions = graph_input(graph, DECODER_POSITION_IDS, str(self))
        rope_deltas = tensor_input(ROPE_DELTAS, INT64, ["batch_size", 1])
        graph.inputs.append(rope_deltas)
        feeds = {name: graph_input(graph, name, str(self))
                 for name in (INPUT_IDS, ATTENTION_MASK, IMAGE_GRID_THW, VIDEO_GRID_THW)}
        outputs = inline_part(graph, self.part, {**feeds, ROPE_DELTAS: rope_deltas}, str(self))
        ir.convenience.replace_all_uses_with(positions, outputs[DECODER_POSITION_IDS])
        graph.inputs.remove(positions)
        deltas = outputs[ROPE_DELTAS_OUT]
        deltas.shape = ir.Shape([ir.SymbolicDim("batch_size"), 1])
        graph.outputs.append(deltas)
        return True


    def ensures(self, model: ir.Model) -> None:
        if has_input(model.graph, DECODER_POSITION_IDS):
            raise StitchError(f"{DECODER_POSITION_IDS} is still an input")
