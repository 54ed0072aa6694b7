"""The combined model checks its own inputs, for clients in any language: when two inputs disagree, the session
fails with an error that names the check (``merge/checks/...``) and both numbers, instead of computing on.

- ``attention_mask`` has as many rows as ``input_ids``, and as many columns as past + new tokens: the past
  tensors hold exactly the past (the cache grows by ``present``), or they are buffers of a fixed capacity larger
  than the mask's length, bound to the same memory as ``present`` (the attention then writes the new keys and
  values in place and nothing is copied per step; the past's length is the mask's length minus the new tokens);
- ``rope_deltas`` has one row per ``input_ids`` row;
- a call with a past (a decode step) carries no patches, of images or of videos.

(The embedding merge checks image tokens against image features, and the vision part patch rows against the
grid: see :mod:`graphs.embedding_merge`, :mod:`graphs.vision`.) Each check yields a zero added to the position
ids, so every call runs it and no optimizer can drop it; a decode step pays a few scalar ops.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphs.builder import GraphBuilder
from merge.contract.names import (
    ATTENTION_MASK,
    DECODER_POSITION_IDS,
    INPUT_IDS,
    MERGE_SCOPE,
    PAST_PREFIX,
    PIXEL_VALUES,
    ROPE_DELTAS,
    VISION_HAS_PATCHES,
)

from .base import StitchError, StitchPass, find_node, graph_input, require_value

CHECKS = ("attention_mask_rows_vs_input_ids_rows", "attention_mask_length_vs_past_plus_sequence",
          "rope_deltas_rows_vs_input_ids_rows", "patches_on_a_decode_call_vs_none")


class CheckContract(StitchPass):
    summary = "the inputs checked against each other in the graph (merge/checks/*): mask, rope_deltas, decode calls"

    def requires(self, model: ir.Model) -> None:
        for name in (INPUT_IDS, ATTENTION_MASK, ROPE_DELTAS, PIXEL_VALUES):
            graph_input(model.graph, name, str(self))
        if not any(v.name.startswith(PAST_PREFIX) for v in model.graph.inputs):
            raise StitchError("the model has no past_key_values inputs")
        require_value(model.graph, DECODER_POSITION_IDS, str(self))

    def apply(self, model: ir.Model) -> bool:
        graph = model.graph
        ids, mask = graph_input(graph, INPUT_IDS, str(self)), graph_input(graph, ATTENTION_MASK, str(self))
        deltas = graph_input(graph, ROPE_DELTAS, str(self))
        # the decode check gates the vision part itself: it fails before any vision work starts
        guard = find_node(graph, VISION_HAS_PATCHES)
        if guard is None:
            raise StitchError(f"no vision guard {VISION_HAS_PATCHES!r} to check decode calls in")
        patches = guard.inputs[0]  # image + video patches
        past = next(v for v in graph.inputs if v.name.startswith(PAST_PREFIX))
        positions = require_value(graph, DECODER_POSITION_IDS, str(self))
        b = GraphBuilder(MERGE_SCOPE)

        def dim(value: ir.Value, axis: int, name: str) -> ir.Value:
            return b.op("Shape", [value], {"start": axis, "end": axis + 1}, name=name)

        rows, sequence = dim(ids, 0, "input_ids_rows"), dim(ids, 1, "input_ids_sequence")
        total = dim(mask, 1, "attention_mask_length")
        # the past tensors hold exactly the past (a growing cache), or are buffers with room for more than the
        # whole call (capacity > total; the attention writes the new keys in place). Not >=: a mask that was not
        # grown on a decode step (total == past) must still fail here, not overwrite the last key.
        capacity = dim(past, 2, "past_capacity")
        expected_total = b.op("Where", [b.op("Greater", [capacity, total], name="past_is_a_buffer"), total,
                                        b.op("Add", [capacity, sequence], name="past_plus_sequence")],
                              name="expected_attention_mask_length")
        past_length = b.op("Sub", [total, sequence], name="past_length")
        has_past = b.op("Clip", [past_length, b.const(np.array(0, np.int64), "zero"),
                                 b.const(np.array(1, np.int64), "one")], name="has_past")
        zeros = [
            b.check_equal(CHECKS[0], dim(mask, 0, "attention_mask_rows"), rows),
            b.check_equal(CHECKS[1], total, expected_total),
            b.check_equal(CHECKS[2], dim(deltas, 0, "rope_deltas_rows"), rows),
            b.check_equal(CHECKS[3], b.op("Mul", [patches, has_past], name="patches_with_past"),
                          b.const(np.array([0], np.int64), "none")),
        ]
        passed = zeros[0]
        for zero in zeros[1:3]:
            passed = b.op("Add", [passed, zero], name="checks/all_passed")
        checked = b.op("Add", [positions, passed], name="checks/position_ids")
        gated = b.op("Add", [guard.inputs[0], zeros[3]], name="checks/patches_checked")
        b.add_to(graph)
        for node in list(positions.uses()):
            if node.node is not checked.producer():
                node.node.replace_input_with(node.idx, checked)
        guard.replace_input_with(0, gated)
        return True

    def ensures(self, model: ir.Model) -> None:
        names = {n.name for n in model.graph}
        missing = [c for c in CHECKS if f"{MERGE_SCOPE}/checks/{c}" not in names]
        if missing:
            raise StitchError(f"checks missing from the graph: {missing}")
