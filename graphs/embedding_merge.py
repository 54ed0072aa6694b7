"""Qwen3-VL's embedding merge and DeepStack scatter as one ONNX subgraph.

The graph reproduces what ``Qwen3VLModel.forward`` and ``Qwen3VLTextModel._deepstack_process`` do with the
vision tower's outputs:

- ``inputs_embeds = embed_tokens[input_ids].masked_scatter(image_mask, image_embeds)``, then the same at the
  video tokens with the video features: the rows at image tokens are replaced, in row-major order over the
  whole batch, by the image rows of ``image_embeds``, the rows at video tokens by its video rows;
- per DeepStack level ``k``, the term that HF adds with ``hidden_states[visual_mask, :] += deepstack[k]``
  after decoder layer ``k``, here as a dense ``deepstack_k`` [batch, sequence, hidden] that holds the level's
  features at the image tokens and zeros elsewhere, so that the decoder adds it unconditionally.

One index per token does both: the image token of rank ``r`` (row-major over the batch) gets ``r + 1`` (an
inclusive CumSum of the flat mask), the video token of rank ``r`` gets ``image tokens + r + 1``, every other
token gets 0 (the masks multiply it away). Each visual
table gets one zero row *in front* (``Pad``), so index 0 reads zeros and index ``r + 1`` reads feature row
``r``. ``inputs_embeds`` picks between the gathered token embedding and the gathered image row with one
``Where``; each DeepStack term is one Gather from its level of the padded table: image tokens read their
feature row, the rest read zeros, and no Where is needed. No Loop, no ScatterND, no copy of the vocabulary
table: a decode step (no image rows) costs O(batch * sequence * hidden). Two image rows and three video rows
(``I`` an image token, ``V`` a video token)::

    token          .   I   I   .   V   V   V   .
    image rank     0   1   2   2   2   2   2   2      inclusive CumSum of the image mask (flat over the batch)
    video rank     0   0   0   0   1   2   3   3
    index          0   1   2   0   3   4   5   0      image: rank; video: image tokens + rank; others: 0
    padded table   [zeros, image 0, image 1, video 0, video 1, video 2]      (Pad: one zero row in front)

Safety: the counts of image and video tokens are checked against the image and video feature rows in the
graph (``check_equal``: an error naming both numbers), as HF's ``get_placeholder_mask`` does on the host.

Every node and intermediate value name starts with ``prefix`` so that the model can be inlined into the
combined graph.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphs.builder import BOOL, FLOAT, INT64, GraphBuilder, make_model, tensor_input
from merge.contract.names import (
    EMBEDDING_MERGE_INPUTS,
    EMBEDDING_TABLE_SCALES,
    MS_DOMAIN,
    OPSET,
    embedding_merge_outputs,
)

INPUT_NAMES = EMBEDDING_MERGE_INPUTS
output_names = embedding_merge_outputs
TABLE_LAYOUTS = ("vocab_major", "hidden_major", "int4_blocks", "int8_blocks")
# a tied quantized head's blocks (MatMulNBits' B), by the bits of their codes
BLOCK_LAYOUT_BITS = {"int4_blocks": 4, "int8_blocks": 8}
SCALES_INPUT = EMBEDDING_TABLE_SCALES  # only with table_layout="int4_blocks"


def token_embeddings(b: GraphBuilder, table: ir.Value, input_ids: ir.Value, layout: str, hidden_size: int,
                     scales: ir.Value | None = None, block_size: int = 32,
                     zero_points: ir.Value | None = None) -> ir.Value:
    """``table[input_ids]`` -> [batch, sequence, hidden] for each table layout; the node is ``token_embeds``.

    ``vocab_major`` [vocab, hidden]: a Gather. ``hidden_major`` [hidden, vocab] (a tied fp32 head's weight):
    Gather of columns, then a transpose (bit-equal). ``int4_blocks`` / ``int8_blocks``: a tied quantized head's own
    MatMulNBits blocks, uint8 [vocab, blocks, block_size * bits / 8] with scales [vocab, blocks] and, unless
    symmetric, ``zero_points`` as MatMulNBits holds them ([vocab, ceil(blocks * bits / 8)]), read by
    ``GatherBlockQuantized`` along the last axis, so the head's bytes are stored once.
    """
    if layout == "vocab_major":
        return b.op("Gather", [table, input_ids], {"axis": 0}, name="token_embeds")
    if layout == "hidden_major":  # [hidden, batch, sequence] -> [batch, sequence, hidden]
        columns = b.op("Gather", [table, input_ids], {"axis": 1}, name="token_columns")
        return b.op("Transpose", [columns], {"perm": [1, 2, 0]}, name="token_embeds")
    if layout not in BLOCK_LAYOUT_BITS or scales is None:
        need = "scales" if layout in BLOCK_LAYOUT_BITS else "a known layout"
        raise ValueError(f"table layout {layout!r} needs {need}")
    bits = BLOCK_LAYOUT_BITS[layout]
    # GatherBlockQuantized wants scales (and zero points) of the data's rank: [vocab, blocks] -> [vocab, blocks, 1]
    axis = b.const([2], "scales_axis")
    inputs = [table, input_ids, b.op("Unsqueeze", [scales, axis], name="scales_3d")]
    if zero_points is not None:
        inputs.append(b.op("Unsqueeze", [_zero_points_per_block(b, zero_points, hidden_size // block_size, bits),
                                         axis], name="zero_points_3d"))
    rows = b.op("GatherBlockQuantized", inputs,
                {"gather_axis": 0, "quantize_axis": 2, "block_size": block_size, "bits": bits},
                domain=MS_DOMAIN, name="token_blocks")  # [batch, sequence, blocks, block_size]
    shape = b.op("Concat", [b.op("Shape", [input_ids], name="ids_shape"), b.const([hidden_size], "hidden")],
                 {"axis": 0}, name="embeds_shape")
    return b.op("Reshape", [rows, shape], name="token_embeds")


def _zero_points_per_block(b: GraphBuilder, zero_points: ir.Value, blocks: int, bits: int) -> ir.Value:
    """MatMulNBits' zero points [vocab, ceil(blocks * bits / 8)] -> one per byte [vocab, blocks], as
    GatherBlockQuantized reads them (measured on ONNX Runtime 1.32: it reads 4-bit zero points one per byte, not
    packed as MatMulNBits stores them). Constant inputs only: ONNX Runtime folds this once, at session creation."""
    if bits == 8:
        return zero_points
    low = b.op("BitwiseAnd", [zero_points, b.const(np.uint8(0x0F), "low_nibble")], name="zero_points_low")
    high = b.op("BitShift", [zero_points, b.const(np.uint8(4), "nibble_bits")], {"direction": "RIGHT"},
                name="zero_points_high")
    axis = b.const([2], "pair_axis")
    pairs = b.op("Concat", [b.op("Unsqueeze", [low, axis], name="low_3d"), b.op("Unsqueeze", [high, axis],
                                                                             name="high_3d")],
                 {"axis": 2}, name="zero_point_pairs")  # [vocab, ceil(blocks / 2), 2], low nibble first
    flat = b.op("Reshape", [pairs, b.const([0, -1], "pairs_flat")], name="zero_points_unpacked")
    if blocks % 2:  # the last byte's unused high nibble
        flat = b.op("Slice", [flat, b.const([0], "zero_points_start"), b.const([blocks], "zero_points_stop"),
                              b.const([1], "zero_points_axis")], name="zero_points_used")
    return flat


def build_embedding_merge(
    image_token_id: int,
    hidden_size: int,
    num_levels: int,
    prefix: str = "merge/",
    table_layout: str = "vocab_major",
    block_size: int = 32,
    *,
    video_token_id: int,
) -> ir.Model:
    """A standalone model: ``input_ids`` int64 [batch, sequence], ``embed_tokens`` float [vocab, hidden],
    ``image_embeds`` float [visual_tokens, hidden], ``deepstack_embeds`` float [levels, visual_tokens, hidden],
    ``image_rows`` int64 [1] -> ``inputs_embeds`` float [batch, sequence, hidden], ``visual_mask`` bool [batch,
    sequence], ``deepstack_0 .. deepstack_{levels-1}`` float [batch, sequence, hidden].

    The feature rows are the vision tower's output for the images, then for the videos (the tower runs once on
    both): the first ``image_rows`` go to the image tokens in order, the rest to the video tokens in order, as
    transformers' two ``masked_scatter`` calls put them. ``embed_tokens`` is an input here so the graph can be
    tested alone; the combined model binds it to the decoder's embedding table. With no images or videos, feed
    0 feature rows: the outputs are the plain token embeddings and all-zero DeepStack terms.
    ``table_layout="hidden_major"`` takes the table as [hidden, vocab]: a tied model's head weight as the
    decoder stores it, so the combined model does not store it twice. ``table_layout="int4_blocks"`` takes a
    tied int4 head's own 4-bit blocks as MatMulNBits stores them: ``embed_tokens`` uint8 [vocab,
    hidden/block_size, block_size/2] and ``embed_scales`` [vocab, hidden/block_size] (symmetric), read by
    ``GatherBlockQuantized`` (see :func:`token_embeddings`); ``int8_blocks`` likewise with 8-bit blocks
    [vocab, hidden/block_size, block_size].
    """
    if hidden_size < 1:
        raise ValueError(f"hidden_size must be a positive integer, got {hidden_size}")
    if table_layout not in TABLE_LAYOUTS:
        raise ValueError(f"table_layout must be one of {TABLE_LAYOUTS}, got {table_layout!r}")
    if num_levels < 0:
        raise ValueError(f"num_levels must be 0 (a config without DeepStack) or more, got {num_levels}")
    if video_token_id == image_token_id:
        raise ValueError(f"image and video tokens must differ, both are {image_token_id}")

    ids_name, table_name, embeds_name, deepstack_name, rows_name = INPUT_NAMES
    input_ids = tensor_input(ids_name, INT64, ["batch", "sequence"])
    embed_scales = None
    if table_layout in BLOCK_LAYOUT_BITS:
        if hidden_size % block_size:
            raise ValueError(f"quantized blocks need hidden_size {hidden_size} divisible by block_size {block_size}")
        blocks = hidden_size // block_size
        blob = block_size * BLOCK_LAYOUT_BITS[table_layout] // 8
        embed_tokens = tensor_input(table_name, ir.DataType.UINT8, ["vocab", blocks, blob])
        embed_scales = tensor_input(SCALES_INPUT, FLOAT, ["vocab", blocks])
    else:
        table_shape = ["vocab", hidden_size] if table_layout == "vocab_major" else [hidden_size, "vocab"]
        embed_tokens = tensor_input(table_name, FLOAT, table_shape)
    image_embeds = tensor_input(embeds_name, FLOAT, ["visual_tokens", hidden_size])
    deepstack_embeds = tensor_input(deepstack_name, FLOAT, [num_levels, "visual_tokens", hidden_size])
    image_rows = tensor_input(rows_name, INT64, [1])

    b = GraphBuilder(prefix)
    is_image = b.op("Equal", [input_ids, b.const(image_token_id, "image_token_id")], name="is_image")
    is_video = b.op("Equal", [input_ids, b.const(video_token_id, "video_token_id")], name="is_video")
    visual_mask = b.op("Or", [is_image, is_video], name="visual_mask")

    # Row of each token in the zero-headed visual tables: rank + 1 at image tokens, image rows + rank + 1 at video
    # tokens, 0 elsewhere.
    with b.scope("index"):
        all_tokens = b.const([0], "all")
        flat_shape = b.const([-1], "flat_shape")
        axis0 = b.const(0, "axis0")

        def ranks(mask: ir.Value, kind: str) -> tuple[ir.Value, ir.Value, ir.Value]:
            flat = b.op("Reshape", [b.op("Cast", [mask], {"to": INT64}, name=f"{kind}_i64"), flat_shape],
                        name=f"flat_{kind}")
            inclusive = b.op("CumSum", [flat, axis0], name=f"{kind}_rank_plus_one")
            count = b.op("ReduceSum", [flat, all_tokens], {"keepdims": 1}, name=f"{kind}_tokens")
            return flat, inclusive, count

        image_flat, image_rank, image_tokens = ranks(is_image, "image")
        video_flat, video_rank, video_tokens = ranks(is_video, "video")
        rows = b.op("Shape", [image_embeds], {"start": 0, "end": 1}, name="feature_rows")
        video_rows = b.op("Sub", [rows, image_rows], name="video_rows")
        # the contract: as many image tokens as image feature rows, and video tokens as video rows (a client that
        # sends 3 tokens for 4 features, or pixels with no tokens, gets an error naming the check and both numbers)
        image_index = b.op("Mul", [image_rank, image_flat], name="image_index")
        video_index = b.op("Mul", [b.op("Add", [video_rank, image_tokens], name="video_rank_after_images"),
                                   video_flat], name="video_index")
        flat_index = b.op("Add", [image_index, video_index], name="flat_index")
        checks = b.op("Add", [b.check_equal("image_tokens_vs_image_features", image_tokens, image_rows),
                              b.check_equal("video_tokens_vs_video_features", video_tokens, video_rows)],
                      name="checks")
        flat_index = b.op("Add", [flat_index, checks], name="checked_index")
        index = b.op("Reshape", [flat_index, b.op("Shape", [input_ids], name="ids_shape")], name="token_row")

    with b.scope("embeds"):
        text = token_embeddings(b, embed_tokens, input_ids, table_layout, hidden_size, embed_scales, block_size)
        image_table = b.op("Pad", [image_embeds, b.const([1, 0, 0, 0], "zero_row_first")], name="image_table")
        image = b.op("Gather", [image_table, index], {"axis": 0}, name="image_rows")
        mask3 = b.op("Unsqueeze", [visual_mask, b.const([-1], "axis_hidden")], name="mask3")
        inputs_embeds = b.op("Where", [mask3, image, text], name="inputs_embeds")

    # Take each level's small [tokens + 1, hidden] table first, then gather it straight into its
    # [batch, sequence, hidden] output: no [levels, batch, sequence, hidden] intermediate to copy apart.
    names = output_names(num_levels)
    _, _, *level_names = names
    with b.scope("deepstack"):
        table = b.op("Pad", [deepstack_embeds, b.const([0, 1, 0, 0, 0, 0], "zero_row_first")], name="table")
        deepstack = []
        for k in range(num_levels):
            level = b.op("Gather", [table, b.const(k, f"level_{k}")], {"axis": 0}, name=f"table_{k}")
            deepstack.append(b.op("Gather", [level, index], {"axis": 0}, name=level_names[k]))

    outputs = [inputs_embeds, visual_mask, *deepstack]
    per_token = [ir.SymbolicDim("batch"), ir.SymbolicDim("sequence")]
    for value, name in zip(outputs, names, strict=True):
        value.name = name
        is_mask = value is visual_mask
        value.type = ir.TensorType(BOOL if is_mask else FLOAT)
        value.shape = ir.Shape(per_token if is_mask else [*per_token, hidden_size])

    inputs = [input_ids, embed_tokens, image_embeds, deepstack_embeds, image_rows]
    if embed_scales is not None:
        inputs.append(embed_scales)
    return make_model(
        b,
        inputs,
        outputs,
        name=f"{prefix}embedding_merge",
        opset_imports={"": OPSET, MS_DOMAIN: 1} if embed_scales is not None else {"": OPSET},
    )
