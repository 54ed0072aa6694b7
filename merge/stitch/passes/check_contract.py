"""The combined model checks its own inputs, for clients in any language: when two inputs disagree, the session
fails with an error that names the check (``merge/checks/...``) and both numbers, instead of computing on.

- ``attention_mask`` has as many rows as ``input_ids``, and as many columns as past + new tokens: the past
  tensors hold exactly the past (the cache grows by ``present``), or they are buffers of a fixed capacity larger
  than the mask's length, bound to the same memory as ``present`` (the attention then writes the new keys and
  values in place and nothing is copied per step; the past's length is the mask's length minus the new tokens);
- ``rope_deltas`` has one row per ``input_ids`` row;
- a call with a past (a decode step) carries no patches, of images or of videos;
- every id of ``input_ids`` is a row of the token table (0 <= id < vocab_size): ONNX Runtime's Gather would take
  -1 as the last row, and the int4 table's GatherBlockQuantized reads past the end without a word;
- ``attention_mask`` holds only 0 and 1, each row is left-padded (non-decreasing: 0...0 1...1 over the whole
  past + new length) and holds at least one 1 (the decoder counts a row's 1s as its length; a right-padded row,
  a 2 or an empty row would give wrong numbers, not an error).

(The embedding merge checks image tokens against image features, and the vision part patch rows against the
grid: see :mod:`graphs.embedding_merge`, :mod:`graphs.vision`.) Each check yields a zero added to the data
path, so every call runs it and no optimizer can drop it: the shape checks' zeros to the position ids, the id
check's to ``input_ids`` before any lookup reads them (a bad id fails by name, never in a Gather), the mask checks'
to ``attention_mask``. The value checks count the offending entries and compare the count with 0 (the message's
first number is how many offend); a decode step pays a few scalar ops and a few reductions over its [batch, 1] ids
and [batch, total] mask.
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
    TOKEN_EMBEDS_NODE,
    VISION_HAS_PATCHES,
)

from .base import StitchError, StitchPass, find_node, graph_input, require_value

CHECKS = ("attention_mask_rows_vs_input_ids_rows", "attention_mask_length_vs_past_plus_sequence",
          "rope_deltas_rows_vs_input_ids_rows", "patches_on_a_decode_call_vs_none")
VALUE_CHECKS = ("input_ids_in_vocabulary", "attention_mask_values_are_0_or_1", "attention_mask_left_padded",
                "attention_mask_rows_not_empty")


class CheckContract(StitchPass):
    summary = ("the inputs checked in the graph (merge/checks/*): against each other (mask, rope_deltas, decode "
               "calls) and their values (ids in the vocabulary, a 0/1 left-padded mask)")

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def requires(self, model: ir.Model) -> None:
        for name in (INPUT_IDS, ATTENTION_MASK, ROPE_DELTAS, PIXEL_VALUES):
            graph_input(model.graph, name, str(self))
        lookup = find_node(model.graph, TOKEN_EMBEDS_NODE)
        table = lookup.inputs[0] if lookup is not None else None
        if table is None or table.shape is None or table.shape[0] != self.vocab_size:
            raise StitchError(f"no token lookup {TOKEN_EMBEDS_NODE!r} reading a table of vocab_size "
                              f"{self.vocab_size} rows (got {None if table is None else table.shape})")
        if not any(v.name.startswith(PAST_PREFIX) for v in model.graph.inputs):
            raise StitchError("the model has no past_key_values inputs")
        require_value(model.graph, DECODER_POSITION_IDS, str(self))

    def apply(self, model: ir.Model) -> bool:
        graph = model.graph
        ids, mask = graph_input(graph, INPUT_IDS, str(self)), graph_input(graph, ATTENTION_MASK, str(self))
        deltas = graph_input(graph, ROPE_DELTAS, str(self))
        # the readers of ids and mask before this pass (not the checks) will read the checked values
        readers = {ids: list(ids.uses()), mask: list(mask.uses())}
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

        # the values: each check counts what offends and compares the count with 0 (0 zeros built on success)
        def count(flags: ir.Value, name: str) -> ir.Value:
            number = b.op("Cast", [flags], {"to": ir.DataType.INT64}, name=f"{name}_flags")
            return b.op("ReduceSum", [number], {"keepdims": 0}, name=name)  # over every axis

        def none_of(flags: ir.Value, what: str) -> ir.Value:
            offending = b.op("Reshape", [count(flags, f"checks/{what}_count"), b.const([1], "one_dim")],
                             name=f"checks/{what}_offending")
            return b.check_equal(what, offending, b.const(np.array([0], np.int64), "none"))

        def outside(value: ir.Value, low: ir.Value, high: ir.Value, what: str) -> ir.Value:
            """True where ``value`` is not within [low, high] (a Clip that changes it)."""
            clipped = b.op("Clip", [value, low, high], name=f"checks/{what}_clipped")
            return b.op("Not", [b.op("Equal", [clipped, value], name=f"checks/{what}_inside")],
                        name=f"checks/{what}_outside")

        zero, one = b.const(np.array(0, np.int64), "zero"), b.const(np.array(1, np.int64), "one")
        ids_zero = none_of(outside(ids, zero, b.const(self.vocab_size - 1, "last_id"), "ids"), VALUE_CHECKS[0])
        # the mask's checks run in turn, each on the mask with the zero of the one before it added (so a mask
        # holding a 2 fails as that, not as a row that drops): values, then left padding, then empty rows
        values = b.op("Add", [mask, none_of(outside(mask, zero, one, "mask"), VALUE_CHECKS[1])],
                      name="checks/mask_values_checked")
        # left padding: no position holds less than the one before it (a 1 followed by a 0)
        axis = b.const([1], "axis_1")
        earlier = b.op("Slice", [values, b.const([0], "from_first"), b.const([-1], "to_last"), axis],
                       name="checks/mask_earlier")
        later = b.op("Slice", [values, b.const([1], "from_second"), b.const([np.iinfo(np.int64).max], "to_end"),
                               axis], name="checks/mask_later")
        left = none_of(b.op("Less", [later, earlier], name="checks/mask_drops"), VALUE_CHECKS[2])
        most = b.op("Add", [b.op("ReduceMax", [values, axis], {"keepdims": 0}, name="checks/mask_row_max"), left],
                    name="checks/mask_row_max_checked")
        mask_zero = none_of(b.op("Less", [most, one], name="checks/mask_row_empty"), VALUE_CHECKS[3])
        checked_ids = b.op("Add", [ids, ids_zero], name="checks/input_ids")
        checked_mask = b.op("Add", [mask, mask_zero], name="checks/attention_mask")
        b.add_to(graph)
        for node in list(positions.uses()):
            if node.node is not checked.producer():
                node.node.replace_input_with(node.idx, checked)
        guard.replace_input_with(0, gated)
        for value, checked_value in ((ids, checked_ids), (mask, checked_mask)):
            for use in readers[value]:
                use.node.replace_input_with(use.idx, checked_value)
        return True

    def ensures(self, model: ir.Model) -> None:
        names = {n.name for n in model.graph}
        missing = [c for c in CHECKS + VALUE_CHECKS if f"{MERGE_SCOPE}/checks/{c}" not in names]
        if missing:
            raise StitchError(f"checks missing from the graph: {missing}")
        for name in (INPUT_IDS, ATTENTION_MASK):  # only the checks (and shapes) read the inputs unchecked
            unchecked = [u.node.name for u in graph_input(model.graph, name, str(self)).uses()
                         if u.node.op_type != "Shape" and not (u.node.name or "").startswith(f"{MERGE_SCOPE}/checks/")]
            if unchecked:
                raise StitchError(f"{name} read unchecked by {unchecked}")
