"""The vision part goes inside ``If(num_patches > 0)``: decode steps (no patches) never run it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from merge.contract.names import IMAGE_GRID_THW, PIXEL_VALUES, VISION_DEEPSTACK_EMBEDS, VISION_IMAGE_EMBEDS
from merge.contract.vision import VISION_INPUTS, VISION_OUTPUTS

from .base import StitchError, StitchPass, constant_node, has_input, inline_part, named_node, tensor_value


class GuardVision(StitchPass):
    """Adds the inputs ``pixel_values`` [num_patches, patch_dim] and ``image_grid_thw`` [num_images, 3] and the
    values ``vision/image_embeds`` and ``vision/deepstack_embeds`` (empty when the call has no patches)."""

    summary = "vision part behind If(num_patches > 0); inputs pixel_values, image_grid_thw"

    def __init__(self, vision: ir.Model, patch_dim: int, hidden_size: int, num_levels: int) -> None:
        self.vision = vision
        self.patch_dim = patch_dim
        self.hidden_size = hidden_size
        self.num_levels = num_levels

    def requires(self, model: ir.Model) -> None:
        outputs = [v.name for v in self.vision.graph.outputs]
        if outputs != list(VISION_OUTPUTS):
            raise StitchError(f"the vision part's outputs are {outputs}, not {list(VISION_OUTPUTS)}")
        inputs = [v.name for v in self.vision.graph.inputs]
        if inputs != list(VISION_INPUTS):
            raise StitchError(f"the vision part's inputs are {inputs}, not {list(VISION_INPUTS)}")
        if has_input(model.graph, PIXEL_VALUES):
            raise StitchError(f"the model already has an input {PIXEL_VALUES!r}")

    def apply(self, model: ir.Model) -> None:
        graph = model.graph
        pixel_values = tensor_value(PIXEL_VALUES, ir.DataType.FLOAT, ["num_patches", self.patch_dim])
        image_grid_thw = tensor_value(IMAGE_GRID_THW, ir.DataType.INT64, ["num_images", 3])
        graph.inputs.extend([pixel_values, image_grid_thw])
        branch = ir.Graph([], [], nodes=[], name="vision")  # filled below; weights stay in the main graph
        outputs = inline_part(branch, self.vision, {PIXEL_VALUES: pixel_values, IMAGE_GRID_THW: image_grid_thw},
                              str(self), weights_to=graph)
        branch.outputs.extend(outputs[name] for name in VISION_OUTPUTS)
        empty = [
            constant_node("vision/skipped/image_embeds", np.zeros((0, self.hidden_size), np.float32)),
            constant_node("vision/skipped/deepstack_embeds",
                          np.zeros((self.num_levels, 0, self.hidden_size), np.float32)),
        ]
        skipped = ir.Graph([], [n.outputs[0] for n in empty], nodes=empty, name="vision/skipped")

        shape = named_node("Shape", [pixel_values], "vision/guard/num_patches", {"start": 0, "end": 1})
        zero = constant_node("vision/guard/zero", np.array([0], np.int64))
        has = named_node("Greater", [shape.outputs[0], zero.outputs[0]], "vision/guard/has_patches")
        flag = named_node("Squeeze", [has.outputs[0]], "vision/guard/condition")
        guard = ir.node("If", [flag.outputs[0]], {"then_branch": branch, "else_branch": skipped}, num_outputs=2,
                        name="vision/if_has_patches")
        image_embeds, deepstack = guard.outputs
        image_embeds.name, deepstack.name = VISION_IMAGE_EMBEDS, VISION_DEEPSTACK_EMBEDS
        image_embeds.type = deepstack.type = ir.TensorType(ir.DataType.FLOAT)
        image_embeds.shape = ir.Shape([ir.SymbolicDim("num_image_tokens"), self.hidden_size])
        deepstack.shape = ir.Shape([self.num_levels, ir.SymbolicDim("num_image_tokens"), self.hidden_size])
        graph.extend([shape, zero, has, flag, guard])
