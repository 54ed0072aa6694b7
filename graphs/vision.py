"""Export Qwen3-VL's vision tower to ONNX, dynamic in every dimension, with DeepStack outputs.

The graph is written op by op from the checkpoint's tensors (no tracing), so nothing depends on an
example image: everything that HF computes from ``grid_thw`` in Python (``.tolist()``) is computed here
in the graph from ``image_grid_thw``:

* ``vision/grid``: for every patch, its image, frame, row and column (patches arrive in spatial-merge
  block order, as the image processor emits them; picture in :meth:`VisionGraph.grid`);
* ``vision/pos_embed``: bilinear interpolation (align_corners) of the learned square position grid to
  each image's h x w, as 4 gathered taps and their weights;
* ``vision/rotary``: the 2-D rotary angles from each patch's (row, column);
* ``vision/segments``: every frame of every image is one attention segment. The segments are grouped by
  length (picture in :meth:`VisionGraph.segment_layout`) and the tower runs on that grouped patch order from
  the patch embedding to the mergers, whose outputs go back to the input order. In each block, attention runs
  per run of equal-length segments as one [segments, length, hidden] batch through MultiHeadAttention with no
  padding and no mask (ONNX Runtime's tiled, O(length)-memory path): an ``If`` takes the single-run case
  (one image, or images of one size) straight, a ``Loop`` does one iteration per distinct length otherwise.
  Cost grows with the square of each segment's patches, not with the square of all patches in the call.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import onnx_ir as ir

from merge.contract.names import MS_DOMAIN, OPSET, VISION_SCOPE
from merge.contract.vision import VISION_INPUTS, VISION_OUTPUTS, VisionSpec
from merge.errors import MergeError

from .builder import BOOL, FLOAT, INT64, GraphBuilder, make_model, tensor_input

log = logging.getLogger(__name__)

VISION_PREFIXES = ("model.visual.", "visual.", "vision_tower.")


class Weights(Protocol):
    """What the graph needs of a checkpoint (``merge.sources.checkpoint.Checkpoint`` is one)."""

    def __contains__(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def load(self, name: str) -> np.ndarray: ...
    def find_prefix(self, candidates: tuple[str, ...], probe: str) -> str: ...


class VisionGraph:
    """Builds the vision graph into a :class:`GraphBuilder`; one method per part of the tower."""

    def __init__(self, spec: VisionSpec, ckpt: Weights, prefix: str, b: GraphBuilder) -> None:
        self.spec = spec
        self.ckpt = ckpt
        self.prefix = prefix
        self.b = b

    # -- weights -----------------------------------------------------------------------------------
    def _param(self, hf_name: str, name: str, transform=None, shape=None) -> ir.Value:
        full = self.prefix + hf_name
        shape = shape or self.ckpt.shape(full)

        def load() -> np.ndarray:
            array = self.ckpt.load(full)
            return transform(array) if transform else array

        return self.b.weight(name, shape, load)

    def linear(self, x: ir.Value, hf_module: str, name: str, rows: slice | None = None) -> ir.Value:
        """``x @ W.T + b`` of a checkpoint Linear on a 2-D ``x``, as one Gemm (the bias added inside the kernel,
        the weight kept in the checkpoint's [out, in] layout); ``rows`` takes a slice of its outputs (q, k, v of a
        fused qkv)."""
        b = self.b
        out_dim, in_dim = self.ckpt.shape(self.prefix + hf_module + ".weight")
        rows = rows or slice(0, out_dim)
        out_dim = rows.stop - rows.start
        with b.scope(name):
            w = self._param(hf_module + ".weight", "weight", lambda a: a[rows], shape=(out_dim, in_dim))
            inputs = [x, w]
            if self.prefix + hf_module + ".bias" in self.ckpt:
                inputs.append(self._param(hf_module + ".bias", "bias", lambda a: a[rows], shape=(out_dim,)))
            return b.op("Gemm", inputs, {"transB": 1})

    def layer_norm(self, x: ir.Value, hf_module: str, name: str) -> ir.Value:
        b = self.b
        with b.scope(name):
            gamma = self._param(hf_module + ".weight", "weight")
            beta = self._param(hf_module + ".bias", "bias")
            return b.op("LayerNormalization", [x, gamma, beta], {"axis": -1, "epsilon": self.spec.layer_norm_eps})

    def activation(self, x: ir.Value, kind: str) -> ir.Value:
        b = self.b
        if kind == "gelu":
            return b.op("Gelu", [x])
        if kind in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            return b.op("Gelu", [x], {"approximate": "tanh"})
        if kind == "silu":
            return b.op("Mul", [x, b.op("Sigmoid", [x])], name="SiLU")
        if kind == "quick_gelu":
            scaled = b.op("Mul", [x, b.const(np.float32(1.702), "quick_gelu_scale")])
            return b.op("Mul", [x, b.op("Sigmoid", [scaled])], name="QuickGELU")
        raise AssertionError(kind)  # VisionSpec.validate refuses other activations

    # -- grid-dependent tensors --------------------------------------------------------------------
    def grid(self, pixel_values: ir.Value, grid_thw: ir.Value) -> dict[str, ir.Value]:
        """Per-patch image, frame, position inside the frame, row and column; per-image sizes.

        Across images: an image's patches follow the previous image's, frame after frame::

            grid_thw [[1, 4, 6], [2, 2, 4]]:   counts t*h*w = [24, 16], ends = [24, 40], starts = [0, 24]
            patch        0 ... 23 | 24 ... 31 | 32 ... 39
            image           0     |     1     |     1         how many images end at or before the patch
            frame           0     |     0     |     1         (patch - start) // (h * w)
            within       0 ... 23 |  0 ... 7  |  0 ... 7      (patch - start) % (h * w)

        Inside a frame (h = 4, w = 6, merge m = 2), the processor emits m x m blocks, each row-major, the blocks
        row-major; the number at each (row, col) is ``within``::

                    col  0  1    2  3    4  5
                row 0:   0  1 |  4  5 |  8  9
                row 1:   2  3 |  6  7 | 10 11       within 13: block 13 // m^2 = 3 of 6 // m = 3 per row,
                        ------+-------+------       so block row 1, block col 0; in the block
                row 2:  12 13 | 16 17 | 20 21       row (13 // m) % m = 0, col 13 % m = 1:
                row 3:  14 15 | 18 19 | 22 23       row 1 * m + 0 = 2, col 0 * m + 1 = 1
        """
        b, m = self.b, self.spec.spatial_merge_size
        c = {}
        with b.scope("grid"):
            axis0, axes0, axes1 = b.const(0, "axis0"), b.const([0], "axes0"), b.const([1], "axes1")
            merge = b.const(m, "merge")
            t, h, w = (b.op("Gather", [grid_thw, b.const(i, f"col{i}")], {"axis": 1}, name=f"{n}")
                       for i, n in enumerate("thw"))
            hw = b.op("Mul", [h, w], name="frame_patches")
            counts = b.op("Mul", [t, hw], name="image_patches")
            ends = b.op("CumSum", [counts, axis0], name="image_ends")
            starts = b.op("Sub", [ends, counts], name="image_starts")
            # the contract, for clients in any language: one pixel row per patch the grid describes, and every
            # h and w a multiple of the merge size (a mismatch fails naming the check and both numbers); every
            # use of the patch count below goes through the checks, so they run before anything else
            rows = b.op("Shape", [pixel_values], {"start": 0, "end": 1}, name="pixel_rows")
            grid_patches = b.op("ReduceSum", [counts, axes0], {"keepdims": 1}, name="grid_patches")
            odd = b.op("ReduceSum", [b.op("Add", [b.op("Mod", [h, merge]), b.op("Mod", [w, merge])]), axes0],
                       {"keepdims": 1}, name="grid_sides_not_multiple_of_merge")
            checked = b.op("Add", [b.check_equal("patch_rows_vs_image_grid", rows, grid_patches),
                                   b.check_equal("grid_sides_off_merge_vs_zero", odd, b.const([0], "none"))])
            num_patches = b.op("Add", [rows, checked], name="num_patches")
            patch = b.op("Range", [b.const(0, "zero"), b.op("Squeeze", [num_patches, axes0]), b.const(1, "one")],
                         name="patch_index")
            # repeat_interleave(arange(num_images), counts) without a loop: a patch belongs to the number
            # of images that end at or before it.
            after_end = b.op("GreaterOrEqual", [b.op("Unsqueeze", [patch, axes1]), b.op("Unsqueeze", [ends, axes0])])
            image = b.op("ReduceSum", [b.op("Cast", [after_end], {"to": INT64}), axes1], {"keepdims": 0},
                         name="patch_image")
            rel = b.op("Sub", [patch, b.op("Gather", [starts, image], name="patch_image_start")])
            p_hw = b.op("Gather", [hw, image], name="patch_frame_patches")
            p_w = b.op("Gather", [w, image], name="patch_width")
            within = b.op("Mod", [rel, p_hw], name="index_in_frame")
            frame = b.op("Div", [rel, p_hw], name="frame_in_image")
            # Patches come in merge-block order: (block_row, block_col, row_in_block, col_in_block); the
            # picture in the docstring above.
            merge_unit = b.const(m * m, "merge_unit")
            col_in = b.op("Mod", [within, merge], name="col_in_block")
            row_in = b.op("Mod", [b.op("Div", [within, merge]), merge], name="row_in_block")
            blocks_w = b.op("Div", [p_w, merge], name="blocks_per_row")
            block = b.op("Div", [within, merge_unit], name="block_index")
            block_col = b.op("Mod", [block, blocks_w], name="block_col")
            block_row = b.op("Div", [block, blocks_w], name="block_row")
            c["row"] = b.op("Add", [b.op("Mul", [block_row, merge]), row_in], name="row")
            c["col"] = b.op("Add", [b.op("Mul", [block_col, merge]), col_in], name="col")
            c["height"] = b.op("Gather", [h, image], name="patch_height")
            c["width"] = p_w
            c.update(patch=patch, image=image, within=within, frame=frame, t=t, hw=hw, num_patches=num_patches,
                     starts=starts)
        return c

    def interpolated_pos_embed(self, g: dict[str, ir.Value]) -> ir.Value:
        """Bilinear (align_corners) resampling of the learned position grid to each image's grid."""
        b, side = self.b, self.spec.grid_side
        with b.scope("pos_embed"):
            table = self._param("pos_embed.weight", "weight")
            taps_h, weights_h = self._axis_taps(g["row"], g["height"], side, "rows")
            taps_w, weights_w = self._axis_taps(g["col"], g["width"], side, "cols")
            side_c = b.const(side, "side")
            idx, wts = [], []
            for i in range(2):
                for j in range(2):
                    idx.append(b.op("Add", [b.op("Mul", [taps_h[i], side_c]), taps_w[j]], name=f"tap{i}{j}"))
                    wts.append(b.op("Mul", [weights_h[i], weights_w[j]], name=f"weight{i}{j}"))
            ax1 = b.const([1], "axes1")
            index = b.op("Concat", [b.op("Unsqueeze", [x, ax1]) for x in idx], {"axis": 1}, name="taps")
            weight = b.op("Concat", [b.op("Unsqueeze", [x, ax1]) for x in wts], {"axis": 1}, name="weights")
            gathered = b.op("Gather", [table, index], name="gather_taps")  # [N, 4, hidden]
            weighted = b.op("Mul", [gathered, b.op("Unsqueeze", [weight, b.const([2], "axes2")])])
            return b.op("ReduceSum", [weighted, ax1], {"keepdims": 0}, name="sum_taps")

    def _axis_taps(self, index: ir.Value, size: ir.Value, side: int, name: str):
        b = self.b
        with b.scope(name):
            one_i = b.const(1, "one")
            denom = b.op("Cast", [b.op("Max", [b.op("Sub", [size, one_i]), one_i])], {"to": FLOAT})
            scaled = b.op("Mul", [b.op("Cast", [index], {"to": FLOAT}), b.const(np.float32(side - 1), "side_m1")])
            src = b.op("Div", [scaled, denom], name="source")
            floor = b.op("Floor", [src])
            frac = b.op("Sub", [src, floor], name="frac")
            one_f = b.const(np.float32(1), "one_f")
            w0 = b.op("Sub", [one_f, frac], name="weight0")
            w1 = b.op("Sub", [one_f, b.op("Abs", [b.op("Sub", [frac, one_f])])], name="weight1")
            t0 = b.op("Cast", [floor], {"to": INT64}, name="tap0")
            lo, hi = b.const(0, "lo"), b.const(side - 1, "hi")
            taps = [b.op("Min", [b.op("Max", [t, lo]), hi], name=f"clamp{k}")
                    for k, t in enumerate((t0, b.op("Add", [t0, one_i], name="tap1")))]
            return taps, (w0, w1)

    def rotary(self, g: dict[str, ir.Value]) -> dict[str, ir.Value]:
        """The 2-D rotary tables as ORT's RotaryEmbedding reads them: every patch is its own "position", whose
        cos/sin rows [patches, head_dim / 2] hold the row frequencies then the column frequencies."""
        b, hd = self.b, self.spec.head_dim
        spatial = hd // 2
        inv_freq = 1.0 / (self.spec.rope_theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
        with b.scope("rotary"):
            inv = b.const(inv_freq.astype(np.float32), "inv_freq")
            ax1 = b.const([1], "axes1")
            freqs = [b.op("Mul", [b.op("Unsqueeze", [b.op("Cast", [g[k]], {"to": FLOAT}), ax1]), inv], name=k)
                     for k in ("row", "col")]
            half = b.op("Concat", freqs, {"axis": 1}, name="freqs")  # [patches, head_dim / 2]
            positions = b.op("Unsqueeze", [g["patch"], b.const([0], "axes0")], name="position_ids")  # [1, patches]
            return {"cos": b.op("Cos", [half], name="cos_cache"), "sin": b.op("Sin", [half], name="sin_cache"),
                    "positions": positions}

    def segment_layout(self, g: dict[str, ir.Value]) -> dict[str, ir.Value]:
        """Attention segments (every frame of every image) grouped by length, so that attention runs on
        [segments of one length, length, hidden] batches with no padding and no mask, which is what lets ONNX
        Runtime's MultiHeadAttention take its flash (tiled, O(length) memory) path.

        Returns ``perm`` (patch p of the grouped order is patch ``perm[p]`` of the input), the runs (one per
        distinct length: ``run_length``, ``run_count`` segments, ``run_offset`` first grouped row) and
        ``token_inverse`` (merged token t of the input order is grouped token ``token_inverse[t]``). Whole
        segments move, so merge blocks stay together and the tower runs on the grouped order from the patch
        embedding to the mergers; only their outputs are put back in order.

        An image, a 2-frame video and an image (merge unit m^2 = 4)::

            grid_thw         [[1, 4, 6], [2, 2, 4], [1, 4, 6]]
            input patches    0 ....... 23 | 24 .. 31 | 32 .. 39 | 40 ....... 63
            segment (length) 0 (24)       | 1 (8)    | 2 (8)    | 3 (24)
            run (Unique)     1            | 0        | 0        | 1              run_length [8, 24], run_count [2, 2]
            key = run * segments + segment = [4, 1, 2, 7]  ->  order (TopK, smallest first) [1, 2, 0, 3]

            grouped patch     0 ..  7 |  8 .. 15 | 16 ...... 39 | 40 ...... 63
            perm             24 .. 31 | 32 .. 39 |  0 ...... 23 | 40 ...... 63     input patch of each
            run               run 0: 2 x 8, offset 0 | run 1: 2 x 24, offset 16
            attention         [2, 8, hidden]         | [2, 24, hidden]

            token_inverse    [4 5 6 7 8 9 | 0 1 2 3 | 10 ... 15]    input token t is grouped token token_inverse[t]
                             (grouped token g is input token perm[g * 4] // 4; scattered back)
        """
        b, mu = self.b, self.spec.merge_unit
        with b.scope("segments"):
            axis0, axes0, axes1 = b.const(0, "axis0"), b.const([0], "axes0"), b.const([1], "axes1")
            zero, one = b.const(0, "zero"), b.const(1, "one")
            t_end = b.op("CumSum", [g["t"], axis0], name="image_segment_ends")
            t_first = b.op("Sub", [t_end, g["t"]], name="image_first_segment")
            total = b.op("ReduceSum", [g["t"], axes0], {"keepdims": 0}, name="num_segments")
            segment = b.op("Range", [zero, total, one], name="segment_index")
            # the image of each segment: how many images end at or before it (segments x images, both small)
            after = b.op("GreaterOrEqual", [b.op("Unsqueeze", [segment, axes1]), b.op("Unsqueeze", [t_end, axes0])])
            image = b.op("ReduceSum", [b.op("Cast", [after], {"to": INT64}), axes1], {"keepdims": 0},
                         name="segment_image")
            length = b.op("Gather", [g["hw"], image], name="segment_length")
            frame = b.op("Sub", [segment, b.op("Gather", [t_first, image])], name="segment_frame")
            start = b.op("Add", [b.op("Gather", [g["starts"], image]), b.op("Mul", [frame, length])],
                         name="segment_start")
            # runs: the distinct lengths (ascending), how many segments have each, and each segment's run
            run_length, _, run_of, run_count = b.op_multi("Unique", [length], {"sorted": 1}, num_outputs=4,
                                                          name="runs")
            # a stable order by run: key = run * segments + segment, ascending
            key = b.op("Add", [b.op("Mul", [run_of, total]), segment], name="group_key")
            k = b.op("Unsqueeze", [total, axes0], name="k")
            _, order = b.op_multi("TopK", [key, k], {"largest": 0, "sorted": 1}, num_outputs=2, name="group_order")
            g_length = b.op("Gather", [length, order], name="grouped_length")
            g_start = b.op("Gather", [start, order], name="grouped_input_start")
            g_end = b.op("CumSum", [g_length, axis0], name="grouped_end")
            g_first = b.op("Sub", [g_end, g_length], name="grouped_first")
            # patch p of the grouped order belongs to grouped segment (number of grouped ends <= p): one mark at
            # each end, then a running count (linear in the patches)
            n = g["num_patches"]
            marks = b.op("ConstantOfShape", [b.op("Add", [n, b.const([1], "one_1d")])],
                         {"value": ir.tensor(np.zeros(1, np.int64))}, name="no_marks")
            ones = b.op("ConstantOfShape", [b.op("Shape", [g_end])], {"value": ir.tensor(np.ones(1, np.int64))})
            marks = b.op("ScatterElements", [marks, g_end, ones], {"axis": 0}, name="end_marks")
            start0 = b.const([0], "start0")
            owner = b.op("Slice", [b.op("CumSum", [marks, axis0]), start0, n], name="patch_segment")
            offset = b.op("Sub", [g["patch"], b.op("Gather", [g_first, owner])], name="offset_in_segment")
            perm = b.op("Add", [b.op("Gather", [g_start, owner]), offset], name="patch_order")
            # merged tokens: grouped token t is input token perm[t * mu] / mu
            mu_1d = b.const([mu], "merge_unit_1d")
            tokens = b.op("Div", [n, mu_1d], name="num_tokens")
            t_perm = b.op("Div", [b.op("Slice", [perm, start0, n, axes0, mu_1d]), b.const(mu, "merge_unit")],
                          name="token_order")
            t_index = b.op("Range", [zero, b.op("Squeeze", [tokens]), one], name="token_index")
            t_inverse = b.op("ScatterElements", [b.op("ConstantOfShape", [tokens],
                                                      {"value": ir.tensor(np.zeros(1, np.int64))}),
                                                 t_perm, t_index], {"axis": 0}, name="token_inverse")
            run_rows = b.op("Mul", [run_length, run_count], name="run_rows")
            run_offset = b.op("Sub", [b.op("CumSum", [run_rows, axis0]), run_rows], name="run_offset")
            runs = b.op("Squeeze", [b.op("Shape", [run_length])], name="num_runs")
        return {"perm": perm, "token_inverse": t_inverse, "run_length": run_length, "run_count": run_count,
                "run_offset": run_offset, "num_runs": runs}

    # -- blocks ------------------------------------------------------------------------------------
    def attention(self, x: ir.Value, i: int, rot: dict[str, ir.Value], lay: dict[str, ir.Value]) -> ir.Value:
        b, s = self.b, self.spec
        hf, h = f"blocks.{i}.attn", s.hidden_size
        with b.scope("attn"):
            row = b.const([1, -1, h], "batch_of_one")
            heads = {}
            for j, name in enumerate("qkv"):  # three products from the fused weight: no split of their output
                y = b.op("Reshape", [self.linear(x, f"{hf}.qkv", name, rows=slice(j * h, (j + 1) * h)), row])
                if name != "v":
                    y = b.op("RotaryEmbedding", [y, rot["positions"], rot["cos"], rot["sin"]],
                             {"interleaved": 0, "num_heads": s.num_heads}, domain=MS_DOMAIN, name=f"{name}_rotary")
                heads[name] = y
            out = self.attention_by_runs(heads["q"], heads["k"], heads["v"], lay)
            return self.linear(out, f"{hf}.proj", "proj")

    def attention_by_runs(self, q: ir.Value, k: ir.Value, v: ir.Value, lay: dict[str, ir.Value]) -> ir.Value:
        """Attention within each segment, q/k/v [1, patches, hidden] in the grouped order -> [patches, hidden].

        One run (all segments of one length: one image, or a video's frames) is one [count, length, hidden] batch
        through MultiHeadAttention with no mask, whose CPU kernel then tiles the scores (flash attention): memory
        linear in the patches. Several runs go through a Loop, one iteration per distinct length (the runs: see
        :meth:`segment_layout`)::

            If(num_runs == 1)
            ├─ then: single_run   run 0: q, k, v -> [count, length, hidden] -> MultiHeadAttention -> [patches, hidden]
            └─ else: runs         Loop over the runs, rows_in [0, hidden] to start:
                                    rows = q, k, v [offset, offset + count * length)   (axis 1)
                                    rows_out = Concat(rows_in, MultiHeadAttention of that run's batch)
        """
        b, s = self.b, self.spec
        hidden = s.hidden_size
        with b.scope("segments"):
            flat = b.const([-1, hidden], "flatten_shape")
            axes0, axes1 = b.const([0], "axes0"), b.const([1], "axes1")
            width = b.const([hidden], "width")

            def run(builder: GraphBuilder, index: ir.Value, rows: tuple[ir.Value, ...]) -> ir.Value:
                length = builder.op("Gather", [lay["run_length"], index], name="length")
                count = builder.op("Gather", [lay["run_count"], index], name="count")
                shape = builder.op("Concat", [builder.op("Unsqueeze", [count, axes0]),
                                              builder.op("Unsqueeze", [length, axes0]), width], {"axis": 0},
                                   name="batch_shape")
                batch = [builder.op("Reshape", [x, shape], name=f"{n}_batch") for x, n in zip(rows, "qkv",
                                                                                              strict=True)]
                out = builder.op("MultiHeadAttention", batch, {"num_heads": s.num_heads}, domain=MS_DOMAIN,
                                 name="MultiHeadAttention")
                return builder.op("Reshape", [out, flat], name="run_out")

            with b.subgraph() as one:  # the common case: a single run, no copies
                single = one.graph("single_run", [run(one, one.const(0, "first_run"), (q, k, v))])
            with b.subgraph() as body:
                step = tensor_input(body.scoped("run"), INT64, [])
                cond = tensor_input(body.scoped("cond_in"), BOOL, [])
                done = tensor_input(body.scoped("rows_in"), FLOAT, ["rows", hidden])
                first = body.op("Unsqueeze", [body.op("Gather", [lay["run_offset"], step]), axes0], name="offset")
                size = body.op("Mul", [body.op("Gather", [lay["run_count"], step]),
                                       body.op("Gather", [lay["run_length"], step])], name="size")
                last = body.op("Add", [first, body.op("Unsqueeze", [size, axes0])], name="end")
                rows = tuple(body.op("Slice", [x, first, last, axes1], name=f"{n}_rows") for x, n in zip(
                    (q, k, v), "qkv", strict=True))
                rows_out = body.op("Concat", [done, run(body, step, rows)], {"axis": 0}, name="rows_out")
                cond_out = body.op("Identity", [cond], name="cond_out")
                loop_body = body.graph("run_body", [cond_out, rows_out], inputs=[step, cond, done])
            with b.subgraph() as several:
                start = several.const(np.zeros((0, hidden), np.float32), "no_rows")
                # Loop(M: trip count, cond: none, v_initial: the rows so far)
                looped = several.op("Loop", [lay["num_runs"], None, start], {"body": loop_body}, name="Loop")
                runs = several.graph("runs", [looped])
            is_single = b.op("Equal", [lay["num_runs"], b.const(1, "one_run")], name="is_single_run")
            out = b.op("If", [is_single], {"then_branch": single, "else_branch": runs}, name="If")
        return out

    def block(self, x: ir.Value, i: int, rot, lay) -> ir.Value:
        b = self.b
        with b.scope(f"blocks.{i}"):
            h = self.attention(self.layer_norm(x, f"blocks.{i}.norm1", "norm1"), i, rot, lay)
            x = b.op("Add", [x, h], name="attn_residual")
            with b.scope("mlp"):
                h = self.layer_norm(x, f"blocks.{i}.norm2", "norm2")
                h = self.linear(h, f"blocks.{i}.mlp.linear_fc1", "linear_fc1")
                h = self.activation(h, self.spec.hidden_act)
                h = self.linear(h, f"blocks.{i}.mlp.linear_fc2", "linear_fc2")
            return b.op("Add", [x, h], name="mlp_residual")

    def merger(self, x: ir.Value, hf: str, name: str, postshuffle: bool) -> ir.Value:
        b, s = self.b, self.spec
        with b.scope(name):
            shuffle = b.const([-1, s.hidden_size * s.merge_unit], "shuffle_shape")
            if postshuffle:
                x = self.layer_norm(b.op("Reshape", [x, shuffle], name="shuffle"), f"{hf}.norm", "norm")
            else:
                x = b.op("Reshape", [self.layer_norm(x, f"{hf}.norm", "norm"), shuffle], name="shuffle")
            x = self.linear(x, f"{hf}.linear_fc1", "linear_fc1")
            x = b.op("Gelu", [x])
            return self.linear(x, f"{hf}.linear_fc2", "linear_fc2")

    def build(self, pixel_values: ir.Value, grid_thw: ir.Value) -> tuple[ir.Value, ir.Value]:
        b, s = self.b, self.spec
        g = self.grid(pixel_values, grid_thw)
        lay = self.segment_layout(g)
        with b.scope("grouped"):  # the tower runs on the segments grouped by length (see segment_layout)
            pixel_values = b.op("Gather", [pixel_values, lay["perm"]], name="pixel_values")
            g = {**g, **{key: b.op("Gather", [g[key], lay["perm"]], name=key) for key in ("row", "col", "height",
                                                                                        "width")}}
        with b.scope("patch_embed"):
            conv = self.prefix + "patch_embed.proj.weight"
            # the Conv3d with stride = kernel is a product with the flattened kernel ([hidden, C*T*P*P], as is)
            w = self._param("patch_embed.proj.weight", "weight",
                            lambda a: a.reshape(a.shape[0], -1), shape=(s.hidden_size, s.patch_dim))
            if self.ckpt.shape(conv)[1:] != (s.in_channels, s.temporal_patch_size, s.patch_size, s.patch_size):
                raise MergeError(f"{conv}: shape {self.ckpt.shape(conv)} does not match the vision config "
                                 f"({s.in_channels}, {s.temporal_patch_size}, {s.patch_size}, {s.patch_size})")
            x = b.op("Gemm", [pixel_values, w, self._param("patch_embed.proj.bias", "bias")], {"transB": 1},
                     name="proj")
        x = b.op("Add", [x, self.interpolated_pos_embed(g)], name="add_pos_embed")
        rot = self.rotary(g)
        levels = []
        for i in range(s.depth):
            x = self.block(x, i, rot, lay)
            if i in s.deepstack_visual_indexes:
                k = s.deepstack_visual_indexes.index(i)
                levels.append((k, self.merger(x, f"deepstack_merger_list.{k}", f"deepstack_merger.{k}", True)))
        image_embeds = self.merger(x, "merger", "merger", postshuffle=False)
        # back from the grouped order to the order of the images and their tokens
        image_embeds = b.op("Gather", [image_embeds, lay["token_inverse"]], {"axis": 0}, name="merger/in_order")
        with b.scope("deepstack"):
            if levels:
                ax0 = b.const([0], "axes0")
                # HF stacks the levels in the order of the tower's layers, each through the merger at the
                # layer's position in deepstack_visual_indexes (which need not be sorted)
                stacked = [b.op("Unsqueeze", [v, ax0], name=f"level{j}") for j, (_, v) in enumerate(levels)]
                deepstack = b.op("Concat", stacked, {"axis": 0}, name="stack")
                deepstack = b.op("Gather", [deepstack, lay["token_inverse"]], {"axis": 1}, name="in_order")
            else:  # a config without DeepStack: an empty [0, tokens, out_hidden] tensor keeps the contract
                tokens = b.op("Shape", [image_embeds])
                shape = b.op("Concat", [b.const([0], "no_levels"), tokens], {"axis": 0})
                deepstack = b.op("ConstantOfShape", [shape], {"value": ir.tensor(np.zeros(1, np.float32))})
        return image_embeds, deepstack


def build_vision_model(weights: Weights, spec: VisionSpec, scope: str = VISION_SCOPE) -> ir.Model:
    """The vision part as an onnx_ir model whose weights load lazily from ``weights`` when it is written; its
    inputs and outputs are the contract's (:data:`merge.contract.vision.VISION_INPUTS`, ``VISION_OUTPUTS``)."""
    prefix = weights.find_prefix(VISION_PREFIXES, "patch_embed.proj.weight")
    b = GraphBuilder(scope)
    pixels_name, grid_name = VISION_INPUTS
    pixel_values = tensor_input(pixels_name, FLOAT, ["num_patches", spec.patch_dim])
    grid_thw = tensor_input(grid_name, INT64, ["num_images", 3])
    image_embeds, deepstack = VisionGraph(spec, weights, prefix, b).build(pixel_values, grid_thw)
    embeds_name, deepstack_name = VISION_OUTPUTS
    image_embeds = b.op("Identity", [image_embeds], name=embeds_name)
    deepstack = b.op("Identity", [deepstack], name=deepstack_name)
    image_embeds.name, deepstack.name = embeds_name, deepstack_name
    image_embeds.type, deepstack.type = ir.TensorType(FLOAT), ir.TensorType(FLOAT)
    image_embeds.shape = ir.Shape([ir.SymbolicDim("num_image_tokens"), spec.out_hidden_size])
    deepstack.shape = ir.Shape([len(spec.deepstack_visual_indexes), ir.SymbolicDim("num_image_tokens"),
                                spec.out_hidden_size])
    return make_model(b, [pixel_values, grid_thw], [image_embeds, deepstack], name="qwen3vl_vision",
                      opset_imports={"": OPSET, MS_DOMAIN: 1})
