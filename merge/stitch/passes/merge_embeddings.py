"""The decoder's ``inputs_embeds`` now come from the embedding merge: token embeddings with the image and video
features put in place at the image and video tokens, and one dense DeepStack term per level."""

from __future__ import annotations

import onnx_ir as ir

from graphs.builder import INT64, tensor_input
from merge.contract.names import (
    DECODER_INPUTS_EMBEDS,
    EMBEDDING_DEEPSTACK_EMBEDS,
    EMBEDDING_IMAGE_EMBEDS,
    EMBEDDING_IMAGE_ROWS,
    EMBEDDING_PREFIX,
    EMBEDDING_TOKEN_TABLE,
    EMBEDDING_VISUAL_MASK,
    INPUT_IDS,
    VISION_DEEPSTACK_EMBEDS,
    VISION_IMAGE_EMBEDS,
    VISION_IMAGE_ROWS,
    deepstack_term,
    embedding_merge_level,
    embedding_merge_outputs,
)

from .base import StitchError, StitchPass, graph_input, has_input, inline_part, require_value


class MergeEmbeddings(StitchPass):
    """Adds the input ``input_ids``; ``inputs_embeds`` stops being an input. ``table`` is the token embedding
    table [vocab, hidden] (a lazy initializer); :class:`~merge.stitch.passes.share_tied_table.ShareTiedTable`
    may later point the token lookup at a tied head instead."""

    summary = "embedding merge: input_ids -> inputs_embeds with image/video features and DeepStack terms"

    def __init__(self, embedding_merge: ir.Model, table: ir.Value, num_levels: int) -> None:
        self.part = embedding_merge
        self.table = table
        self.num_levels = num_levels

    def requires(self, model: ir.Model) -> None:
        graph = model.graph
        graph_input(graph, DECODER_INPUTS_EMBEDS, str(self))
        require_value(graph, VISION_IMAGE_EMBEDS, str(self))
        if has_input(graph, INPUT_IDS):
            raise StitchError(f"the model already has an input {INPUT_IDS!r}")
        expected = set(embedding_merge_outputs(self.num_levels))
        found = {v.name for v in self.part.graph.outputs}
        if found != expected:
            raise StitchError(f"the embedding merge's outputs are {sorted(found)}, expected {sorted(expected)}")

    def apply(self, model: ir.Model) -> bool:
        graph = model.graph
        decoder_embeds = graph_input(graph, DECODER_INPUTS_EMBEDS, str(self))
        input_ids = tensor_input(INPUT_IDS, INT64, ["batch_size", "sequence_length"])
        graph.inputs.append(input_ids)
        graph.register_initializer(self.table)
        feeds = {INPUT_IDS: input_ids, EMBEDDING_TOKEN_TABLE: self.table,
                 EMBEDDING_IMAGE_EMBEDS: require_value(graph, VISION_IMAGE_EMBEDS, str(self)),
                 EMBEDDING_DEEPSTACK_EMBEDS: require_value(graph, VISION_DEEPSTACK_EMBEDS, str(self)),
                 EMBEDDING_IMAGE_ROWS: require_value(graph, VISION_IMAGE_ROWS, str(self))}
        outputs = inline_part(graph, self.part, feeds, str(self))
        ir.convenience.replace_all_uses_with(decoder_embeds, outputs[DECODER_INPUTS_EMBEDS])
        graph.inputs.remove(decoder_embeds)
        for k in range(self.num_levels):
            outputs[embedding_merge_level(k)].name = deepstack_term(k)
        outputs[EMBEDDING_VISUAL_MASK].name = EMBEDDING_PREFIX + EMBEDDING_VISUAL_MASK
        return True


    def ensures(self, model: ir.Model) -> None:
        if has_input(model.graph, DECODER_INPUTS_EMBEDS):
            raise StitchError(f"{DECODER_INPUTS_EMBEDS} is still an input")
