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
only the cheap formula. Every node and intermediate value name starts with ``prefix`` so that the model can
be inlined into a bigger graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

INPUT_NAMES = ("input_ids", "attention_mask", "image_grid_thw", "video_grid_thw", "rope_deltas")
OUTPUT_NAMES = ("position_ids", "rope_deltas_out")

# Smallest IR version that may carry each default-domain opset (the ONNX release table).
_MIN_IR_VERSION = {18: 8, 19: 9, 20: 9, 21: 10, 22: 10, 23: 11, 24: 12, 25: 13, 26: 13, 27: 13, 28: 14}
_MIN_OPSET = min(_MIN_IR_VERSION)  # ReduceMax axes as an input and Split(num_outputs) need opset 18

# The per-image table gathered by every token: one column per quantity, in this order.
_TABLE_COLUMNS = ("start", "grid_h", "grid_w", "tokens", "advance")
# The row that text tokens gather: divisors 1 so that the (discarded) image arithmetic stays defined.
_TEXT_ROW = {"start": 0, "grid_h": 1, "grid_w": 1, "tokens": 1, "advance": 0}


class _Scope:
    """Appends default-domain nodes to a list; names each node and its outputs ``prefix + scope + name``."""

    def __init__(self, nodes: list[ir.Node], prefix: str) -> None:
        self.nodes = nodes
        self.prefix = prefix

    def child(self, name: str) -> _Scope:
        return _Scope(self.nodes, f"{self.prefix}{name}/")

    def op(
        self,
        op_type: str,
        name: str,
        inputs: Sequence[ir.Value | None],
        attributes: dict | None = None,
        num_outputs: int = 1,
    ) -> ir.Value:
        node = ir.node(op_type, inputs, attributes, num_outputs=num_outputs, name=f"{self.prefix}{name}")
        for i, out in enumerate(node.outputs):
            out.name = f"{self.prefix}{name}" if num_outputs == 1 else f"{self.prefix}{name}_{i}"
        self.nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else node.outputs

    def const(self, name: str, value: int | Sequence[int] | np.ndarray) -> ir.Value:
        array = np.asarray(value, dtype=np.int64)
        return self.op("Constant", name, [], {"value": ir.tensor(array, name=f"{self.prefix}{name}")})


def _frames_of(s: _Scope, video_grid_thw: ir.Value) -> ir.Value:
    """Each video's grid split into one (1, h, w) row per frame group, in order (transformers' per-frame split:
    Qwen3-VL separates a video's frame groups with text timestamps, so each is positioned like an image)."""
    t = s.op("Gather", "t", [video_grid_thw, s.const("col_t", 0)], {"axis": 1})  # [videos]
    frames = s.op("ReduceSum", "frames", [t, s.const("axes0", [0])], {"keepdims": 1})  # [1]
    ends = s.op("CumSum", "ends", [t, s.const("axis0", 0)])
    # the video of frame f: how many videos end at or before it (marks at the ends, then a running count)
    zeros = s.op("ConstantOfShape", "zeros", [s.op("Add", "frames_plus_one", [frames, s.const("one", [1])])],
                 {"value": ir.tensor(np.zeros(1, np.int64))})
    ones = s.op("ConstantOfShape", "ones", [s.op("Shape", "ends_shape", [ends])],
                {"value": ir.tensor(np.ones(1, np.int64))})
    marks = s.op("ScatterElements", "marks", [zeros, ends, ones], {"axis": 0})
    video = s.op("Slice", "video_of_frame", [s.op("CumSum", "counted", [marks, s.const("axis0_", 0)]),
                                             s.const("start", [0]), frames, s.const("axes0_", [0])])
    hw = s.op("Gather", "frame_hw", [s.op("Slice", "hw", [video_grid_thw, s.const("from1", [1]), s.const("to3", [3]),
                                                          s.const("axes1", [1])]), video], {"axis": 0})
    unit = s.op("ConstantOfShape", "frame_t", [s.op("Concat", "t_shape", [frames, s.const("one_col", [1])],
                                                    {"axis": 0})], {"value": ir.tensor(np.ones(1, np.int64))})
    return s.op("Concat", "frame_grid", [unit, hw], {"axis": 1})  # [frame groups, 3]


def _lookup(s: _Scope, input_ids: ir.Value, is_mod: ir.Value, grid_thw: ir.Value,
            spatial_merge_size: int) -> tuple[dict[str, ir.Value], ir.Value]:
    """For the tokens of one modality (``is_mod`` [batch, sequence]) and its grids in order of appearance: each
    token's row of the per-grid table (columns [batch, sequence, 1]) and its index inside its grid. Tokens of other
    kinds get the text row and index 0. Matching is by rank among the modality's tokens of the batch (row-major),
    through a rank -> grid table built with one ScatterElements and one CumSum: linear in the tokens, no Loop."""
    mod_i64 = s.op("Cast", "mod_i64", [is_mod], {"to": ir.DataType.INT64})

    # Per grid, columns [grids, 1]: merged grid, tokens, position advance, first token's rank.
    g = s.child("grids")
    merged = g.op("Div", "merged_grid", [grid_thw, g.const("merge", [1, spatial_merge_size, spatial_merge_size])])
    grid_t, grid_h, grid_w = g.op("Split", "split", [merged], {"axis": 1, "num_outputs": 3}, num_outputs=3)
    tokens = g.op("Mul", "tokens", [grid_t, g.op("Mul", "area", [grid_h, grid_w])])
    advance = g.op("Max", "advance", [grid_h, grid_w])
    end = g.op("CumSum", "end", [tokens, g.const("axis0", 0)])
    start = g.op("Sub", "start", [end, tokens])
    columns = {"start": start, "grid_h": grid_h, "grid_w": grid_w, "tokens": tokens, "advance": advance}
    table = g.op("Concat", "table", [columns[c] for c in _TABLE_COLUMNS], {"axis": 1})
    text_row = g.const("text_row", [[_TEXT_ROW[c] for c in _TABLE_COLUMNS]])
    table = g.op("Concat", "table_with_text_row", [table, text_row], {"axis": 0})  # [grids + 1, 5]

    # Rank of each of the modality's tokens among all of them in the batch (row-major); other tokens get rank
    # total_tokens, which maps to the text row.
    r = s.child("rank")
    total = r.op("ReduceSum", "total_tokens", [tokens], {"keepdims": 0})  # scalar; 0 without grids
    flat = r.op("Reshape", "flat", [mod_i64, r.const("flat_shape", [-1])])
    inclusive = r.op("CumSum", "inclusive", [flat, r.const("axis0", 0)])
    rank_flat = r.op("Sub", "rank_flat", [inclusive, r.const("one", 1)])
    rank = r.op("Reshape", "rank_2d", [rank_flat, r.op("Shape", "ids_shape", [input_ids])])
    rank = r.op("Where", "rank", [is_mod, rank, total])  # [batch, sequence]

    # rank -> grid index: mark the rank just past each grid's last token, then count the marks.
    m = s.child("grid_of_rank")
    one = m.const("one", 1)
    size = m.op("Unsqueeze", "size", [m.op("Add", "total_plus_one", [total, one]), m.const("axis0", [0])])
    zeros = m.op("ConstantOfShape", "zeros", [size], {"value": ir.tensor(np.zeros(1, np.int64))})
    ends = m.op("Reshape", "ends", [end, m.const("flat", [-1])])
    ones = m.op(
        "ConstantOfShape", "ones", [m.op("Shape", "ends_shape", [ends])], {"value": ir.tensor(np.ones(1, np.int64))}
    )
    marks = m.op("ScatterElements", "marks", [zeros, ends, ones], {"axis": 0})
    grid_of_rank = m.op("CumSum", "index", [marks, m.const("axis0_cumsum", 0)])  # [total + 1]

    t = s.child("token")
    grid_index = t.op("Gather", "grid_index", [grid_of_rank, rank], {"axis": 0})
    row = t.op("Gather", "grid_row", [table, grid_index], {"axis": 0})  # [batch, sequence, 5]
    n_columns = len(_TABLE_COLUMNS)
    token_columns = t.op("Split", "columns", [row], {"axis": 2, "num_outputs": n_columns}, n_columns)
    tok = dict(zip(_TABLE_COLUMNS, token_columns, strict=True))
    index = t.op("Sub", "index_in_grid", [t.op("Unsqueeze", "rank3", [rank, t.const("axis2", [2])]), tok["start"]])
    index = t.op("Mul", "index", [index, t.op("Unsqueeze", "mod3", [mod_i64, t.const("axis2_", [2])])])
    return tok, index


def _first_call_branch(
    scope: _Scope,
    input_ids: ir.Value,
    attention_mask: ir.Value,
    image_grid_thw: ir.Value,
    video_grid_thw: ir.Value,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
) -> tuple[ir.Value, ir.Value]:
    """``get_rope_index`` for a call without past: here ``attention_mask`` is [batch, sequence]."""
    s = scope
    axis2 = s.const("axis2", [2])
    real = s.op("Cast", "real", [attention_mask], {"to": ir.DataType.BOOL})

    def tokens_of(name: str, token_id: int) -> ir.Value:
        found = s.op("Equal", f"is_{name}_id", [input_ids, s.const(f"{name}_token_id", token_id)])
        return s.op("And", f"is_{name}", [found, real])

    is_image = tokens_of("image", image_token_id)
    tok, index = _lookup(s.child("images"), input_ids, is_image, image_grid_thw, spatial_merge_size)
    is_video = tokens_of("video", video_token_id)
    frames = _frames_of(s.child("video_frames"), video_grid_thw)
    video_tok, video_index = _lookup(s.child("videos"), input_ids, is_video, frames, spatial_merge_size)
    is_video3 = s.op("Unsqueeze", "is_video3", [is_video, axis2])
    tok = {c: s.op("Where", f"{c}_of_token", [is_video3, video_tok[c], tok[c]]) for c in _TABLE_COLUMNS}
    index = s.op("Add", "index_of_token", [index, video_index])  # each is 0 away from its own modality
    is_vision = s.op("Or", "is_vision", [is_image, is_video])
    vision3 = s.op("Unsqueeze", "vision3", [s.op("Cast", "vision_i64", [is_vision], {"to": ir.DataType.INT64}), axis2])
    is_vision3 = s.op("Unsqueeze", "is_vision3", [is_vision, axis2])
    real3 = s.op("Unsqueeze", "real3", [s.op("Cast", "real_i64", [real], {"to": ir.DataType.INT64}), axis2])

    t = s.child("token")
    area = t.op("Mul", "area", [tok["grid_h"], tok["grid_w"]])
    t_idx = t.op("Div", "t_idx", [index, area])
    h_idx = t.op("Mod", "h_idx", [t.op("Div", "row_idx", [index, tok["grid_w"]]), tok["grid_h"]])
    w_idx = t.op("Mod", "w_idx", [index, tok["grid_w"]])
    offset = t.op("Concat", "offset_thw", [t_idx, h_idx, w_idx], {"axis": 2})
    offset = t.op("Mul", "offset", [offset, vision3])  # text tokens: 0

    # base = exclusive cumsum of the increments: 1 per text token, the advance on a grid's last token.
    b = s.child("base")
    last = b.op("Equal", "is_last_index", [index, b.op("Sub", "last_index", [tok["tokens"], b.const("one", 1)])])
    last_vision = b.op("And", "is_last_vision_token", [last, is_vision3])
    vision_step = b.op("Where", "vision_step", [last_vision, tok["advance"], b.const("zero", 0)])
    text_step = b.op("Sub", "text_step", [real3, vision3])
    step = b.op("Add", "step", [text_step, vision_step])
    base = b.op("CumSum", "base", [step, b.const("axis1", 1)], {"exclusive": 1})

    o = s.child("out")
    positions = o.op("Mul", "positions_bst", [o.op("Add", "unmasked", [base, offset]), real3])  # padding: 0
    position_ids = o.op("Transpose", "position_ids", [positions], {"perm": [2, 0, 1]})
    span = o.op("ReduceMax", "max_position", [positions, o.const("axes_seq_thw", [1, 2])], {"keepdims": 0})
    count = o.op("ReduceSum", "real_tokens", [real3, o.const("axes_seq", [1, 2])], {"keepdims": 0})
    delta = o.op("Sub", "delta_flat", [o.op("Add", "max_plus_one", [span, o.const("one", 1)]), count])
    rope_deltas = o.op("Unsqueeze", "rope_deltas", [delta, o.const("axis1", [1])])
    return position_ids, rope_deltas


def _decode_branch(
    scope: _Scope, input_ids: ir.Value, attention_mask: ir.Value, rope_deltas: ir.Value
) -> tuple[ir.Value, ir.Value]:
    """``(cumsum(attention_mask) - 1)[:, -sequence:] + rope_deltas`` on three rows; deltas pass through."""
    s = scope
    cumsum = s.op("CumSum", "cumsum", [attention_mask, s.const("axis1", 1)])
    sequence = s.op("Shape", "sequence", [input_ids], {"start": 1, "end": 2})
    tail = s.op(
        "Slice",
        "tail",
        [
            cumsum,
            s.op("Neg", "minus_sequence", [sequence]),
            s.const("end", [np.iinfo(np.int64).max]),
            s.const("axes", [1]),
        ],
    )
    shifted = s.op("Add", "shifted", [tail, s.op("Sub", "delta_minus_one", [rope_deltas, s.const("one", 1)])])
    rows = s.op("Unsqueeze", "rows", [shifted, s.const("axis0", [0])])
    position_ids = s.op("Expand", "position_ids", [rows, s.const("three_rows", [3, 1, 1])])
    return position_ids, s.op("Identity", "rope_deltas", [rope_deltas])


def _subgraph(name: str, nodes: list[ir.Node], outputs: Sequence[ir.Value], opset: int) -> ir.Graph:
    return ir.Graph([], list(outputs), nodes=nodes, opset_imports={"": opset}, name=name)


def build_rope_index(
    image_token_id: int, spatial_merge_size: int, opset: int = 21, prefix: str = "position/", *, video_token_id: int
) -> ir.Model:
    """A standalone model: ``input_ids``, ``attention_mask``, ``image_grid_thw``, ``video_grid_thw``,
    ``rope_deltas`` -> ``position_ids`` [3, batch, sequence], ``rope_deltas_out`` [batch, 1]; all int64.

    ``image_grid_thw`` and ``video_grid_thw`` list the images and the videos of the whole batch in order of
    appearance (row-major), 0 rows when there are none; batches are left-padded. The past length is
    ``total_sequence - sequence`` from the shapes of ``attention_mask`` and ``input_ids``.
    """
    if opset not in _MIN_IR_VERSION:
        raise ValueError(f"rope index needs a default-domain opset in {sorted(_MIN_IR_VERSION)}, got {opset}")
    if spatial_merge_size < 1:
        raise ValueError(f"spatial_merge_size must be a positive integer, got {spatial_merge_size}")
    if video_token_id == image_token_id:
        raise ValueError(f"image and video tokens must differ, both are {image_token_id}")

    int64 = ir.TensorType(ir.DataType.INT64)
    input_ids = ir.Value(name="input_ids", type=int64, shape=ir.Shape(["batch", "sequence"]))
    attention_mask = ir.Value(name="attention_mask", type=int64, shape=ir.Shape(["batch", "total_sequence"]))
    image_grid_thw = ir.Value(name="image_grid_thw", type=int64, shape=ir.Shape(["num_images", 3]))
    video_grid_thw = ir.Value(name="video_grid_thw", type=int64, shape=ir.Shape(["num_videos", 3]))
    rope_deltas = ir.Value(name="rope_deltas", type=int64, shape=ir.Shape(["batch", 1]))

    nodes: list[ir.Node] = []
    top = _Scope(nodes, prefix)
    total = top.op("Shape", "total_sequence", [attention_mask], {"start": 1, "end": 2})
    sequence = top.op("Shape", "sequence", [input_ids], {"start": 1, "end": 2})
    past = top.op("Sub", "past_sequence", [total, sequence])
    first_call = top.op("Equal", "is_first_call", [top.op("Squeeze", "past", [past]), top.const("zero", 0)])

    then_nodes: list[ir.Node] = []
    then_out = _first_call_branch(
        _Scope(then_nodes, f"{prefix}first_call/"),
        input_ids,
        attention_mask,
        image_grid_thw,
        video_grid_thw,
        image_token_id,
        video_token_id,
        spatial_merge_size,
    )
    else_nodes: list[ir.Node] = []
    else_out = _decode_branch(_Scope(else_nodes, f"{prefix}decode/"), input_ids, attention_mask, rope_deltas)

    if_node = ir.node(
        "If",
        [first_call],
        {
            "then_branch": _subgraph(f"{prefix}first_call", then_nodes, then_out, opset),
            "else_branch": _subgraph(f"{prefix}decode", else_nodes, else_out, opset),
        },
        num_outputs=2,
        name=f"{prefix}if_first_call",
    )
    nodes.append(if_node)
    position_ids, rope_deltas_out = if_node.outputs
    position_ids.name, rope_deltas_out.name = OUTPUT_NAMES
    position_ids.type = rope_deltas_out.type = int64
    position_ids.shape = ir.Shape([3, "batch", "sequence"])
    rope_deltas_out.shape = ir.Shape(["batch", 1])

    graph = ir.Graph(
        [input_ids, attention_mask, image_grid_thw, video_grid_thw, rope_deltas],
        [position_ids, rope_deltas_out],
        nodes=nodes,
        opset_imports={"": opset},
        name=f"{prefix}rope_index",
    )
    return ir.Model(graph, ir_version=_MIN_IR_VERSION[opset], producer_name="merge.graphs.rope_index")
