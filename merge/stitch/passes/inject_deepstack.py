"""DeepStack level k is added to the residual stream right after decoder layer k.

The anchor is a name (:func:`merge.contract.names.mlp_output`): the decoder graph names each layer's MLP output,
the down projection whose output is the ``skip`` input of the next SkipSimplifiedLayerNormalization. Adding the
level there equals HF's ``hidden_states[visual_mask] += deepstack[k]`` after layer k::

    layers.k/mlp/down_proj ──> layers.k/mlp/output ──> merge/deepstack/layers.k/add ──> layers.k+1/input_norm (skip)
                                                                      ^
                         merge/embedding/deepstack_k (zeros away from image and video tokens)
"""

from __future__ import annotations

import onnx_ir as ir

from graphs.builder import GraphBuilder
from merge.contract.names import DEEPSTACK_PREFIX, deepstack_term, mlp_output

from .base import StitchError, StitchPass


class InjectDeepStack(StitchPass):
    summary = "DeepStack terms added after the MLP of decoder layers 0..levels-1"

    def __init__(self, num_layers: int, num_levels: int) -> None:
        self.num_layers = num_layers
        self.num_levels = num_levels

    def requires(self, model: ir.Model) -> None:
        if self.num_levels > self.num_layers:
            raise StitchError(f"{self.num_levels} DeepStack levels but only {self.num_layers} decoder layers")
        values = ir.convenience.create_value_mapping(model.graph, include_subgraphs=False)
        for k in range(self.num_levels):
            for name in (mlp_output(k), deepstack_term(k)):
                if name not in values:
                    raise StitchError(f"the model has no value {name!r}: DeepStack level {k} has nothing to add "
                                      "or nowhere to go")
            if not values[mlp_output(k)].uses():
                raise StitchError(f"{mlp_output(k)!r} feeds nothing: decoder layer {k} does not end there")

    def apply(self, model: ir.Model) -> bool:
        graph = model.graph
        values = ir.convenience.create_value_mapping(graph, include_subgraphs=False)
        for k in range(self.num_levels):
            anchor = values[mlp_output(k)]
            uses = list(anchor.uses())
            b = GraphBuilder(DEEPSTACK_PREFIX)
            with b.scope(f"layers.{k}"):
                added = b.op("Add", [anchor, values[deepstack_term(k)]], name="add")  # deepstack_add(k)
            added.type, added.shape = anchor.type, anchor.shape
            b.add_to(graph, after=anchor.producer())
            for use in uses:
                use.node.replace_input_with(use.idx, added)
        return self.num_levels > 0

    def ensures(self, model: ir.Model) -> None:
        adds = [n for n in model.graph if n.name.startswith(DEEPSTACK_PREFIX)]
        if len(adds) != self.num_levels:
            raise StitchError(f"{len(adds)} DeepStack additions in the graph, expected {self.num_levels}")
