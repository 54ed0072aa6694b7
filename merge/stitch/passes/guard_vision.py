"""The vision part goes inside ``If(num_patches > 0)``: decode steps (no patches) never run it. Images and videos
share the tower: the branch runs it once on the image patches followed by the video patches."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphs.builder import FLOAT, INT64, GraphBuilder, tensor_input
from merge.contract.names import (
    IMAGE_GRID_THW,
    PIXEL_VALUES,
    PIXEL_VALUES_VIDEOS,
    VIDEO_GRID_THW,
    VISION_DEEPSTACK_EMBEDS,
    VISION_IF,
    VISION_IMAGE_EMBEDS,
    VISION_IMAGE_ROWS,
    VISION_SCOPE,
)
from merge.contract.vision import VISION_INPUTS, VISION_OUTPUTS

from .base import StitchError, StitchPass, has_input, inline_part


class GuardVision(StitchPass):
    """Adds the inputs ``pixel_values`` [num_patches, patch_dim], ``image_grid_thw`` [num_images, 3],
    ``pixel_values_videos`` [num_video_patches, patch_dim] and ``video_grid_thw`` [num_videos, 3] (0 rows when a call
    has none); the values ``vision/image_embeds`` and ``vision/deepstack_embeds`` (the images' rows, then the
    videos'; empty when the call has no patches) and ``vision/image_rows`` (how many of those rows are the
    images')."""

    summary = ("vision part behind If(num_patches > 0) on image then video patches; inputs pixel_values, "
               "image_grid_thw, pixel_values_videos, video_grid_thw")

    def __init__(self, vision: ir.Model, patch_dim: int, hidden_size: int, num_levels: int,
                 spatial_merge_size: int) -> None:
        self.vision = vision
        self.patch_dim = patch_dim
        self.hidden_size = hidden_size
        self.num_levels = num_levels
        self.merge = spatial_merge_size

    def requires(self, model: ir.Model) -> None:
        outputs = [v.name for v in self.vision.graph.outputs]
        if outputs != list(VISION_OUTPUTS):
            raise StitchError(f"the vision part's outputs are {outputs}, not {list(VISION_OUTPUTS)}")
        inputs = [v.name for v in self.vision.graph.inputs]
        if inputs != list(VISION_INPUTS):
            raise StitchError(f"the vision part's inputs are {inputs}, not {list(VISION_INPUTS)}")
        for name in (PIXEL_VALUES, PIXEL_VALUES_VIDEOS):
            if has_input(model.graph, name):
                raise StitchError(f"the model already has an input {name!r}")

    def apply(self, model: ir.Model) -> bool:
        graph = model.graph
        pixel_values = tensor_input(PIXEL_VALUES, FLOAT, ["num_patches", self.patch_dim])
        image_grid_thw = tensor_input(IMAGE_GRID_THW, INT64, ["num_images", 3])
        video_values = tensor_input(PIXEL_VALUES_VIDEOS, FLOAT, ["num_video_patches", self.patch_dim])
        video_grid_thw = tensor_input(VIDEO_GRID_THW, INT64, ["num_videos", 3])
        graph.inputs.extend([pixel_values, image_grid_thw, video_values, video_grid_thw])

        # Outside the If (a few scalar ops per call): each modality's patch rows against its own grid (the tower
        # checks only their sums), the images' share of the feature rows, and the guard's condition.
        b = GraphBuilder(VISION_SCOPE)
        with b.scope("guard"):
            def patch_rows(grid: ir.Value, kind: str) -> ir.Value:
                per = b.op("ReduceProd", [grid, b.const([1], f"{kind}_axis1")], {"keepdims": 0},
                           name=f"{kind}_grid_patches")
                return b.op("ReduceSum", [per, b.const([0], f"{kind}_axis0")], {"keepdims": 1},
                            name=f"{kind}_grid_total")

            def rows(values: ir.Value, kind: str) -> ir.Value:
                return b.op("Shape", [values], {"start": 0, "end": 1}, name=f"{kind}_patches")

            image_patches, video_patches = rows(pixel_values, "image"), rows(video_values, "video")
            zero = b.op("Add", [b.check_equal("image_patches_vs_image_grid", image_patches,
                                              patch_rows(image_grid_thw, "image")),
                                b.check_equal("video_patches_vs_video_grid", video_patches,
                                              patch_rows(video_grid_thw, "video"))], name="patch_checks")
            image_tokens = b.op("Div", [image_patches, b.const([self.merge * self.merge], "merge_area")],
                                name="image_tokens")
            b.op("Add", [image_tokens, zero], name="image_rows").name = VISION_IMAGE_ROWS
            # the checks gate the If: a mismatch fails here, naming the modality, before any vision work starts
            num = b.op("Add", [b.op("Add", [image_patches, video_patches], name="patches"), zero],
                       name="num_patches")
            has = b.op("Greater", [num, b.const(np.array([0], np.int64), "zero")], name="has_patches")
            flag = b.op("Squeeze", [has], name="condition")
        b.add_to(graph)

        # The then-branch: the tower on image then video patches; its weights stay in the main graph (read by name).
        with b.subgraph() as then:
            with then.scope("inputs"):
                patches = then.op("Concat", [pixel_values, video_values], {"axis": 0}, name="pixel_values")
                grids = then.op("Concat", [image_grid_thw, video_grid_thw], {"axis": 0}, name="grid_thw")
            branch = then.graph("tower", [])
        outputs = inline_part(branch, self.vision, {PIXEL_VALUES: patches, IMAGE_GRID_THW: grids}, str(self),
                              weights_to=graph)
        branch.outputs.extend(outputs[name] for name in VISION_OUTPUTS)
        # The else-branch: empty features, made in the branch (a branch output must be produced there).
        with b.subgraph() as skip:
            with skip.scope("skipped"):
                empty = [skip.op("Constant", [], {"value": ir.tensor(np.zeros(shape, np.float32))}, name=name)
                         for name, shape in (("image_embeds", (0, self.hidden_size)),
                                             ("deepstack_embeds", (self.num_levels, 0, self.hidden_size)))]
            skipped = skip.graph("skipped", empty)
        image_embeds, deepstack = b.op_multi("If", [flag], {"then_branch": branch, "else_branch": skipped},
                                             num_outputs=2, name="if_has_patches")
        image_embeds.name, deepstack.name = VISION_IMAGE_EMBEDS, VISION_DEEPSTACK_EMBEDS
        image_embeds.type = deepstack.type = ir.TensorType(ir.DataType.FLOAT)
        image_embeds.shape = ir.Shape([ir.SymbolicDim("num_visual_tokens"), self.hidden_size])
        deepstack.shape = ir.Shape([self.num_levels, ir.SymbolicDim("num_visual_tokens"), self.hidden_size])
        b.add_to(graph)
        return True

    def ensures(self, model: ir.Model) -> None:
        if not any(node.name == VISION_IF and node.op_type == "If" for node in model.graph):
            raise StitchError(f"no If named {VISION_IF!r} holds the vision part")
