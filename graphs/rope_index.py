"""Qwen3-VL's 3-D multimodal rotary position ids as an ONNX subgraph.

The graph reproduces transformers' ``Qwen3VLModel.get_rope_index`` (``mm_token_type_ids`` 1 at
``image_token_id``, 2 at ``video_token_id``) on the first call and the decode formula on later calls:

- first call (``total_sequence == sequence``): per real token, ``position = base + offset``. ``base`` is the
  exclusive cumulative sum along the row of a per-token increment (1 for a text token, ``max(h, w) // m`` on
  the *last* token of an image, 0 elsewhere), so every token of an image sees the image's start position and
  the tokens after it see the start advanced by ``max(h, w) // m``. ``offset`` is ``(t_idx, h_idx, w_idx)``,
  the token's index inside its image unravelled over ``(t, h // m, w // m)``; text tokens have offset 0.
  Image tokens are matched to ``image_grid_thw`` rows by their rank among all image tokens of the batch
  (row-major), through a rank -> image table built with one ScatterElements and one CumSum: all linear in
  the number of tokens, no Loop. Videos are split first into one ``(1, h, w)`` grid per frame group, as
  transformers does (Qwen3-VL writes a text timestamp before each group, so each group is positioned like
  an image), and matched the same way among the video tokens. Padding gets position 0;
  ``rope_deltas = max(position) + 1 - real tokens``.
- later calls: ``(cumsum(attention_mask) - 1)[:, -sequence:] + rope_deltas`` on all three rows, and
  ``rope_deltas`` passes through.

An ``If`` on ``past_sequence == total_sequence - sequence == 0`` picks the branch, so a decode step runs
only the cheap formula (worked examples of the lookups: :func:`_frames_of`, :func:`_lookup`,
:func:`_first_call_branch`)::

    {prefix}if_first_call
    ├─ then: first_call/           images/ (grids, rank, grid_of_rank, token)  ─┐
    │                              video_frames/ -> videos/ (the same lookup)  ─┴─ token/ -> base/ -> out/
    └─ else: decode/               cumsum, tail, + rope_deltas - 1, three rows

Every node, intermediate value and initializer name starts with ``prefix`` so that the model can be inlined
into a bigger graph; the branches read their constants from the main graph's initializers.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from merge.contract.names import MIN_IR_VERSION, OPSET, ROPE_INDEX_INPUTS, ROPE_INDEX_OUTPUTS

from .builder import BOOL, INT64, GraphBuilder, make_model, tensor_input

INPUT_NAMES = ROPE_INDEX_INPUTS  # input_ids, attention_mask, image_grid_thw, video_grid_thw, rope_deltas
OUTPUT_NAMES = ROPE_INDEX_OUTPUTS  # position_ids, rope_deltas_out

_MIN_OPSET = 18  # ReduceMax's axes as an input and Split's num_outputs

# The per-image table gathered by every token: one column per quantity, in this order.
_TABLE_COLUMNS = ("start", "grid_h", "grid_w", "tokens", "advance")
# The row that text tokens gather: divisors 1 so that the (discarded) image arithmetic stays defined.
_TEXT_ROW = {"start": 0, "grid_h": 1, "grid_w": 1, "tokens": 1, "advance": 0}
_THW = 3  # position rows (and grid columns): temporal, height, width


def _frames_of(b: GraphBuilder, video_grid_thw: ir.Value) -> ir.Value:
    """Each video's grid split into one (1, h, w) row per frame group, in order (transformers' per-frame split:
    Qwen3-VL separates a video's frame groups with text timestamps, so each is positioned like an image)::

        video_grid_thw   [[3, 4, 6], [2, 8, 8]]       t = [3, 2], frames = 5, ends = [3, 5]
        marks            slot:  0  1  2  3  4  5       a 1 at each end (frames + 1 slots)
                                0  0  0  1  0  1
        video_of_frame          0  0  0  1  1          CumSum, the first `frames` slots
        frame_grid       [[1, 4, 6], [1, 4, 6], [1, 4, 6], [1, 8, 8], [1, 8, 8]]
    """
    axis0, axes0 = b.const(0, "axis0"), b.const([0], "axes0")
    t = b.op("Gather", [video_grid_thw, b.const(0, "col_t")], {"axis": 1}, name="t")  # [videos]
    frames = b.op("ReduceSum", [t, axes0], {"keepdims": 1}, name="frames")  # [1]
    ends = b.op("CumSum", [t, axis0], name="ends")
    # the video of frame f: how many videos end at or before it (marks at the ends, then a running count)
    zeros = b.op("ConstantOfShape", [b.op("Add", [frames, b.const([1], "one")], name="frames_plus_one")],
                 {"value": ir.tensor(np.zeros(1, np.int64))}, name="zeros")
    ones = b.op("ConstantOfShape", [b.op("Shape", [ends], name="ends_shape")],
                {"value": ir.tensor(np.ones(1, np.int64))}, name="ones")
    marks = b.op("ScatterElements", [zeros, ends, ones], {"axis": 0}, name="marks")
    video = b.op("Slice", [b.op("CumSum", [marks, axis0], name="counted"), b.const([0], "start"), frames, axes0],
                 name="video_of_frame")
    hw = b.op("Slice", [video_grid_thw, b.const([1], "from1"), b.const([_THW], "to3"), b.const([1], "axes1")],
              name="hw")
    hw = b.op("Gather", [hw, video], {"axis": 0}, name="frame_hw")
    unit = b.op("ConstantOfShape", [b.op("Concat", [frames, b.const([1], "one_col")], {"axis": 0}, name="t_shape")],
                {"value": ir.tensor(np.ones(1, np.int64))}, name="frame_t")
    return b.op("Concat", [unit, hw], {"axis": 1}, name="frame_grid")  # [frame groups, 3]


def _lookup(b: GraphBuilder, input_ids: ir.Value, is_mod: ir.Value, grid_thw: ir.Value,
            spatial_merge_size: int) -> tuple[dict[str, ir.Value], ir.Value]:
    """For the tokens of one modality (``is_mod`` [batch, sequence]) and its grids in order of appearance: each
    token's row of the per-grid table (columns [batch, sequence, 1]) and its index inside its grid. Tokens of other
    kinds get the text row and index 0. Matching is by rank among the modality's tokens of the batch (row-major),
    through a rank -> grid table built with one ScatterElements and one CumSum: linear in the tokens, no Loop.

    Two images, grids (t, h, w) merged (1, 1, 2) and (1, 2, 2), in a batch of two rows (``.`` a text token or
    padding, ``I`` an image token)::

        tokens          row 0: . I I .      row 1: . I I I I .
        rank            row 0: 6 0 1 6      row 1: 6 2 3 4 5 6      rank among the image tokens, row-major;
                                                                    the others get total = 6
        grids/end       [2, 6]                                      CumSum of the tokens per grid
        grid_of_rank    rank:   0  1  2  3  4  5  6                 ScatterElements: a 1 at each end, then
                        marks:  0  0  1  0  0  0  1                 CumSum counts the grids ended at or before
                        index:  0  0  1  1  1  1  2                 each rank: 2 = the text row
        token/grid_row  table[index[rank]]: (start, grid_h, grid_w, tokens, advance)
                        grid 0: (0, 1, 2, 2, 2)   grid 1: (2, 2, 2, 4, 2)   text row: (0, 1, 1, 1, 0)
        index_in_grid   rank - start at the image's tokens, 0 elsewhere: row 0: . 0 1 .   row 1: . 0 1 2 3 .
    """
    mod_i64 = b.op("Cast", [is_mod], {"to": INT64}, name="mod_i64")

    # Per grid, columns [grids, 1]: merged grid, tokens, position advance, first token's rank.
    with b.scope("grids"):
        merge = b.const([1, spatial_merge_size, spatial_merge_size], "merge")
        merged = b.op("Div", [grid_thw, merge], name="merged_grid")
        grid_t, grid_h, grid_w = b.op_multi("Split", [merged], {"axis": 1, "num_outputs": _THW}, num_outputs=_THW,
                                            name="split")
        tokens = b.op("Mul", [grid_t, b.op("Mul", [grid_h, grid_w], name="area")], name="tokens")
        advance = b.op("Max", [grid_h, grid_w], name="advance")
        end = b.op("CumSum", [tokens, b.const(0, "axis0")], name="end")
        start = b.op("Sub", [end, tokens], name="start")
        columns = {"start": start, "grid_h": grid_h, "grid_w": grid_w, "tokens": tokens, "advance": advance}
        table = b.op("Concat", [columns[c] for c in _TABLE_COLUMNS], {"axis": 1}, name="table")
        text_row = b.const([[_TEXT_ROW[c] for c in _TABLE_COLUMNS]], "text_row")
        table = b.op("Concat", [table, text_row], {"axis": 0}, name="table_with_text_row")  # [grids + 1, 5]

    # Rank of each of the modality's tokens among all of them in the batch (row-major); other tokens get rank
    # total_tokens, which maps to the text row.
    with b.scope("rank"):
        total = b.op("ReduceSum", [tokens], {"keepdims": 0}, name="total_tokens")  # scalar; 0 without grids
        flat = b.op("Reshape", [mod_i64, b.const([-1], "flat_shape")], name="flat")
        inclusive = b.op("CumSum", [flat, b.const(0, "axis0")], name="inclusive")
        rank_flat = b.op("Sub", [inclusive, b.const(1, "one")], name="rank_flat")
        rank = b.op("Reshape", [rank_flat, b.op("Shape", [input_ids], name="ids_shape")], name="rank_2d")
        rank = b.op("Where", [is_mod, rank, total], name="rank")  # [batch, sequence]

    # rank -> grid index: mark the rank just past each grid's last token, then count the marks.
    with b.scope("grid_of_rank"):
        size = b.op("Unsqueeze", [b.op("Add", [total, b.const(1, "one")], name="total_plus_one"),
                                  b.const([0], "axes0")], name="size")
        zeros = b.op("ConstantOfShape", [size], {"value": ir.tensor(np.zeros(1, np.int64))}, name="zeros")
        ends = b.op("Reshape", [end, b.const([-1], "flat")], name="ends")
        ones = b.op("ConstantOfShape", [b.op("Shape", [ends], name="ends_shape")],
                    {"value": ir.tensor(np.ones(1, np.int64))}, name="ones")
        marks = b.op("ScatterElements", [zeros, ends, ones], {"axis": 0}, name="marks")
        grid_of_rank = b.op("CumSum", [marks, b.const(0, "axis0")], name="index")  # [total + 1]

    with b.scope("token"):
        grid_index = b.op("Gather", [grid_of_rank, rank], {"axis": 0}, name="grid_index")
        row = b.op("Gather", [table, grid_index], {"axis": 0}, name="grid_row")  # [batch, sequence, 5]
        n_columns = len(_TABLE_COLUMNS)
        token_columns = b.op_multi("Split", [row], {"axis": 2, "num_outputs": n_columns}, num_outputs=n_columns,
                                   name="columns")
        tok = dict(zip(_TABLE_COLUMNS, token_columns, strict=True))
        axes2 = b.const([2], "axes2")
        index = b.op("Sub", [b.op("Unsqueeze", [rank, axes2], name="rank3"), tok["start"]], name="index_in_grid")
        index = b.op("Mul", [index, b.op("Unsqueeze", [mod_i64, axes2], name="mod3")], name="index")
    return tok, index


def _first_call_branch(
    b: GraphBuilder,
    input_ids: ir.Value,
    attention_mask: ir.Value,
    image_grid_thw: ir.Value,
    video_grid_thw: ir.Value,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
) -> tuple[ir.Value, ir.Value]:
    """``get_rope_index`` for a call without past: here ``attention_mask`` is [batch, sequence].

    One row, text, a (1, 2, 2)-merged image, text (``t``, ``I``), as the columns below compute it::

        token             t   t   I   I   I   I   t   t
        index in grid     0   0   0   1   2   3   0   0        (h_idx, w_idx) = unravel(index, (2, 2))
        offset (t, h, w)  0   0  000 001 010 011  0   0
        step              1   1   0   0   0   2   1   1        text: 1; an image's last token: max(h, w)
        base              0   1   2   2   2   2   4   5        exclusive CumSum of step
        position (t, h, w) = base + offset:
                     t:   0   1   2   2   2   2   4   5
                     h:   0   1   2   2   3   3   4   5
                     w:   0   1   2   3   2   3   4   5        rope_deltas = max + 1 - tokens = 6 - 8 = -2
    """
    axes2 = b.const([2], "axes2")
    real = b.op("Cast", [attention_mask], {"to": BOOL}, name="real")

    def tokens_of(name: str, token_id: int) -> ir.Value:
        found = b.op("Equal", [input_ids, b.const(token_id, f"{name}_token_id")], name=f"is_{name}_id")
        return b.op("And", [found, real], name=f"is_{name}")

    is_image = tokens_of("image", image_token_id)
    with b.scope("images"):
        tok, index = _lookup(b, input_ids, is_image, image_grid_thw, spatial_merge_size)
    is_video = tokens_of("video", video_token_id)
    with b.scope("video_frames"):
        frames = _frames_of(b, video_grid_thw)
    with b.scope("videos"):
        video_tok, video_index = _lookup(b, input_ids, is_video, frames, spatial_merge_size)
    is_video3 = b.op("Unsqueeze", [is_video, axes2], name="is_video3")
    tok = {c: b.op("Where", [is_video3, video_tok[c], tok[c]], name=f"{c}_of_token") for c in _TABLE_COLUMNS}
    index = b.op("Add", [index, video_index], name="index_of_token")  # each is 0 away from its own modality
    is_vision = b.op("Or", [is_image, is_video], name="is_vision")
    vision3 = b.op("Unsqueeze", [b.op("Cast", [is_vision], {"to": INT64}, name="vision_i64"), axes2], name="vision3")
    is_vision3 = b.op("Unsqueeze", [is_vision, axes2], name="is_vision3")
    real3 = b.op("Unsqueeze", [b.op("Cast", [real], {"to": INT64}, name="real_i64"), axes2], name="real3")

    with b.scope("token"):
        area = b.op("Mul", [tok["grid_h"], tok["grid_w"]], name="area")
        t_idx = b.op("Div", [index, area], name="t_idx")
        h_idx = b.op("Mod", [b.op("Div", [index, tok["grid_w"]], name="row_idx"), tok["grid_h"]], name="h_idx")
        w_idx = b.op("Mod", [index, tok["grid_w"]], name="w_idx")
        offset = b.op("Concat", [t_idx, h_idx, w_idx], {"axis": 2}, name="offset_thw")
        offset = b.op("Mul", [offset, vision3], name="offset")  # text tokens: 0

    # base = exclusive cumsum of the increments: 1 per text token, the advance on a grid's last token.
    with b.scope("base"):
        one = b.const(1, "one")
        last_index = b.op("Sub", [tok["tokens"], one], name="last_index")
        last = b.op("Equal", [index, last_index], name="is_last_index")
        last_vision = b.op("And", [last, is_vision3], name="is_last_vision_token")
        vision_step = b.op("Where", [last_vision, tok["advance"], b.const(0, "zero")], name="vision_step")
        text_step = b.op("Sub", [real3, vision3], name="text_step")
        step = b.op("Add", [text_step, vision_step], name="step")
        base = b.op("CumSum", [step, b.const(1, "axis1")], {"exclusive": 1}, name="base")

    with b.scope("out"):
        positions = b.op("Mul", [b.op("Add", [base, offset], name="unmasked"), real3], name="positions_bst")
        position_ids = b.op("Transpose", [positions], {"perm": [2, 0, 1]}, name="position_ids")  # padding: 0
        span = b.op("ReduceMax", [positions, b.const([1, 2], "axes_seq_thw")], {"keepdims": 0}, name="max_position")
        count = b.op("ReduceSum", [real3, b.const([1, 2], "axes_seq")], {"keepdims": 0}, name="real_tokens")
        max_plus_one = b.op("Add", [span, b.const(1, "one")], name="max_plus_one")
        delta = b.op("Sub", [max_plus_one, count], name="delta_flat")
        rope_deltas = b.op("Unsqueeze", [delta, b.const([1], "axes1")], name="rope_deltas")
    return position_ids, rope_deltas


def _decode_branch(
    b: GraphBuilder, input_ids: ir.Value, attention_mask: ir.Value, rope_deltas: ir.Value
) -> tuple[ir.Value, ir.Value]:
    """``(cumsum(attention_mask) - 1)[:, -sequence:] + rope_deltas`` on three rows; deltas pass through."""
    cumsum = b.op("CumSum", [attention_mask, b.const(1, "axis1")], name="cumsum")
    sequence = b.op("Shape", [input_ids], {"start": 1, "end": 2}, name="sequence")
    tail = b.op(
        "Slice",
        [
            cumsum,
            b.op("Neg", [sequence], name="minus_sequence"),
            b.const([np.iinfo(np.int64).max], "end"),
            b.const([1], "axes"),
        ],
        name="tail",
    )
    shifted = b.op("Add", [tail, b.op("Sub", [rope_deltas, b.const(1, "one")], name="delta_minus_one")],
                   name="shifted")
    rows = b.op("Unsqueeze", [shifted, b.const([0], "axes0")], name="rows")
    position_ids = b.op("Expand", [rows, b.const([_THW, 1, 1], "three_rows")], name="position_ids")
    return position_ids, b.op("Identity", [rope_deltas], name="rope_deltas")


def build_rope_index(
    image_token_id: int,
    spatial_merge_size: int,
    opset: int = OPSET,
    prefix: str = "position/",
    *,
    video_token_id: int,
) -> ir.Model:
    """A standalone model: ``input_ids``, ``attention_mask``, ``image_grid_thw``, ``video_grid_thw``,
    ``rope_deltas`` -> ``position_ids`` [3, batch, sequence], ``rope_deltas_out`` [batch, 1]; all int64.

    ``image_grid_thw`` and ``video_grid_thw`` list the images and the videos of the whole batch in order of
    appearance (row-major), 0 rows when there are none; batches are left-padded. The past length is
    ``total_sequence - sequence`` from the shapes of ``attention_mask`` and ``input_ids``. Every node, value and
    initializer name starts with ``prefix``; the If branches read their constants from the main graph's
    initializers.
    """
    if opset < _MIN_OPSET or opset not in MIN_IR_VERSION:
        supported = [o for o in sorted(MIN_IR_VERSION) if o >= _MIN_OPSET]
        raise ValueError(f"rope index needs a default-domain opset in {supported}, got {opset}")
    if spatial_merge_size < 1:
        raise ValueError(f"spatial_merge_size must be a positive integer, got {spatial_merge_size}")
    if video_token_id == image_token_id:
        raise ValueError(f"image and video tokens must differ, both are {image_token_id}")

    shapes = (["batch", "sequence"], ["batch", "total_sequence"], ["num_images", _THW], ["num_videos", _THW],
              ["batch", 1])
    inputs = [tensor_input(name, INT64, shape) for name, shape in zip(INPUT_NAMES, shapes, strict=True)]
    input_ids, attention_mask, image_grid_thw, video_grid_thw, rope_deltas = inputs

    b = GraphBuilder(prefix)
    total = b.op("Shape", [attention_mask], {"start": 1, "end": 2}, name="total_sequence")
    sequence = b.op("Shape", [input_ids], {"start": 1, "end": 2}, name="sequence")
    past = b.op("Sub", [total, sequence], name="past_sequence")
    first_call = b.op("Equal", [b.op("Squeeze", [past], name="past"), b.const(0, "zero")], name="is_first_call")

    with b.subgraph() as then_b:
        with then_b.scope("first_call"):
            then_out = _first_call_branch(then_b, input_ids, attention_mask, image_grid_thw, video_grid_thw,
                                          image_token_id, video_token_id, spatial_merge_size)
        then_branch = then_b.graph("first_call", then_out)
    with b.subgraph() as else_b:
        with else_b.scope("decode"):
            else_out = _decode_branch(else_b, input_ids, attention_mask, rope_deltas)
        else_branch = else_b.graph("decode", else_out)

    position_ids, rope_deltas_out = b.op_multi("If", [first_call], {"then_branch": then_branch,
                                                                    "else_branch": else_branch},
                                               num_outputs=2, name="if_first_call")
    position_ids.name, rope_deltas_out.name = OUTPUT_NAMES
    position_ids.type = rope_deltas_out.type = ir.TensorType(INT64)
    position_ids.shape = ir.Shape([_THW, "batch", "sequence"])
    rope_deltas_out.shape = ir.Shape(["batch", 1])

    return make_model(b, inputs, [position_ids, rope_deltas_out], name=f"{prefix}rope_index",
                      opset_imports={"": opset})
