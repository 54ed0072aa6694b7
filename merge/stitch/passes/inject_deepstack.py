"""DeepStack level k is added to the residual stream right after decoder layer k.

The anchor is found by pattern, in one place (:func:`deepstack_anchors`): a decoder layer ends with its MLP
down projection (MatMul or MatMulNBits fed by the SwiGLU product ``Mul``), whose output is the ``skip`` input
of the next SkipSimplifiedLayerNormalization. Adding the level there equals HF's
``hidden_states[visual_mask] += deepstack[k]`` after layer k.
"""

from __future__ import annotations

import onnx_ir as ir

from merge.contract.names import DEEPSTACK_PREFIX

from .base import StitchError, StitchPass, named_node, producer_op, require_value
from .merge_embeddings import deepstack_term

RESIDUAL_NORM = "SkipSimplifiedLayerNormalization"
PROJECTIONS = ("MatMul", "MatMulNBits")
SWIGLU_PRODUCT = "Mul"


def deepstack_anchors(graph: ir.Graph) -> list[tuple[ir.Node, ir.Value]]:
    """Per decoder layer, in graph order: (the normalization that reads the layer's MLP output as ``skip``,
    that MLP output). Nodes inside subgraphs are not searched (the decoder's layers are in the main graph)."""
    found = []
    for node in graph:
        if node.op_type != RESIDUAL_NORM or len(node.inputs) < 2:
            continue
        skip = node.inputs[1]
        producer = skip.producer() if skip is not None else None
        if producer is None or producer.op_type not in PROJECTIONS:
            continue
        if producer_op(producer.inputs[0]) == SWIGLU_PRODUCT:  # the SwiGLU product, not the attention output
            found.append((node, skip))
    return found


def deepstack_add_name(level: int) -> str:
    return f"{DEEPSTACK_PREFIX}layers.{level}/add"


class InjectDeepStack(StitchPass):
    summary = "DeepStack terms added after the MLP of decoder layers 0..levels-1"

    def __init__(self, num_layers: int, num_levels: int) -> None:
        self.num_layers = num_layers
        self.num_levels = num_levels

    def requires(self, model: ir.Model) -> None:
        anchors = deepstack_anchors(model.graph)
        if len(anchors) != self.num_layers:
            raise StitchError(
                f"found {len(anchors)} decoder MLP outputs feeding a {RESIDUAL_NORM}, expected {self.num_layers} "
                "(one per layer); the decoder's layout is not the one DeepStack injection knows"
            )
        if self.num_levels > self.num_layers:
            raise StitchError(f"{self.num_levels} DeepStack levels but only {self.num_layers} decoder layers")
        for k in range(self.num_levels):
            require_value(model.graph, deepstack_term(k), str(self))

    def apply(self, model: ir.Model) -> None:
        graph = model.graph
        anchors = deepstack_anchors(graph)
        for k in range(self.num_levels):
            consumer, skip = anchors[k]
            add = named_node("Add", [skip, require_value(graph, deepstack_term(k), str(self))], deepstack_add_name(k))
            graph.insert_after(skip.producer(), add)
            consumer.replace_input_with(1, add.outputs[0])

    def ensures(self, model: ir.Model) -> None:
        adds = [n for n in model.graph if n.name.startswith(DEEPSTACK_PREFIX)]
        if len(adds) != self.num_levels:
            raise StitchError(f"{len(adds)} DeepStack additions in the graph, expected {self.num_levels}")
