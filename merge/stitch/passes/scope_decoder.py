"""The decoder graph becomes the base graph; its node, value and initializer names move under ``decoder/``."""

from __future__ import annotations

import onnx_ir as ir

from merge.contract.names import ATTENTION_MASK, DECODER_INPUTS_EMBEDS, DECODER_POSITION_IDS, DECODER_SCOPE

from .base import StitchError, StitchPass, has_input


def scoped(scope: str, name: str) -> str:
    return f"{scope}{name}" if name.startswith("/") else f"{scope}/{name}"


class ScopeDecoder(StitchPass):
    summary = "decoder names move under decoder/ (graph inputs and outputs keep theirs)"

    def requires(self, model: ir.Model) -> None:
        for needed in (DECODER_INPUTS_EMBEDS, ATTENTION_MASK, DECODER_POSITION_IDS):
            if not has_input(model.graph, needed):
                raise StitchError(f"the decoder has no input {needed!r}; it was not exported with exclude_embeds")

    def apply(self, model: ir.Model) -> None:
        graph = model.graph
        io_values = {id(v) for v in (*graph.inputs, *graph.outputs)}
        for node in ir.traversal.RecursiveGraphIterator(graph):
            node.name = scoped(DECODER_SCOPE, node.name or node.op_type)
            for out in node.outputs:
                if id(out) not in io_values and out.name:
                    out.name = scoped(DECODER_SCOPE, out.name)
        inits = list(graph.initializers.values())
        graph.initializers.clear()
        for init in inits:
            init.name = scoped(DECODER_SCOPE, init.name)
            if init.const_value is not None:
                init.const_value.name = init.name
            graph.register_initializer(init)

    def ensures(self, model: ir.Model) -> None:
        stray = [n.name for n in model.graph if not (n.name or "").startswith(f"{DECODER_SCOPE}/")]
        if stray:
            raise StitchError(f"decoder nodes outside decoder/: {stray[:3]}")
