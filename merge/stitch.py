"""Graph surgery: the vision part, the decoder and the small subgraphs become ONE model.

Each step is a small pass over an onnx_ir graph that checks what it needs before touching anything and
fails with a sentence naming what is missing:

1. ``ImportDecoder``      the builder's decoder becomes the base graph; its names move under ``decoder/``
2. ``GuardVision``        the vision part goes inside ``If(num_patches > 0)``: decode steps never run it
3. ``WireEmbeddings``     token embeddings gathered from the embedding table, image rows replaced by
                          ``image_embeds``, DeepStack terms placed at the image positions
4. ``InjectDeepStack``    each DeepStack level is added to the residual stream after its decoder layer
5. ``WirePositions``      3-D MRoPE position ids and ``rope_deltas`` computed in the graph
6. ``PadLeftPadding``     the attention gets a real padding mask, so left-padded batch rows are right
7. ``SetInterface``       the combined model's inputs and outputs, in the contract's order

Weights are never copied: initializers move between graphs as lazy or memory-mapped tensors and are read
only when the model is written.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graphs.builder import GraphBuilder

from .errors import MergeError
from .ort_schemas import register_ort_default_domain_ops

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
OPSET = 22
NEG_LARGE = -1e9  # additive mask for padded keys: finite, so fully padded rows stay NaN-free

COMBINED_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "rope_deltas")
ROPE_DELTAS_OUT = "rope_deltas_out"


class StitchError(MergeError):
    """A part does not have the structure the stitch relies on."""


@dataclass(frozen=True)
class StitchSpec:
    image_token_id: int
    spatial_merge_size: int
    hidden_size: int
    num_layers: int
    num_levels: int

    @classmethod
    def from_config(cls, config: dict) -> StitchSpec:
        try:
            return cls._parse(config)
        except KeyError as exc:
            raise StitchError(f"config.json has no {exc.args[0]!r}; is this a complete Qwen3-VL config?") from None

    @classmethod
    def _parse(cls, config: dict) -> StitchSpec:
        v, t = config["vision_config"], config["text_config"]
        if int(v["out_hidden_size"]) != int(t["hidden_size"]):
            raise StitchError(
                f"vision_config.out_hidden_size {v['out_hidden_size']} != text_config.hidden_size "
                f"{t['hidden_size']}: image features cannot replace token embeddings"
            )
        if len(v.get("deepstack_visual_indexes", ())) > int(t["num_hidden_layers"]):
            raise StitchError(
                f"{len(v['deepstack_visual_indexes'])} DeepStack levels but only {t['num_hidden_layers']} "
                "decoder layers to add them to"
            )
        return cls(
            image_token_id=int(config["image_token_id"]),
            spatial_merge_size=int(v["spatial_merge_size"]),
            hidden_size=int(t["hidden_size"]),
            num_layers=int(t["num_hidden_layers"]),
            num_levels=len(v.get("deepstack_visual_indexes", ())),
        )


@dataclass
class Parts:
    decoder: ir.Model
    vision: ir.Model
    embedding_merge: ir.Model
    rope_index: ir.Model
    embed_tokens: ir.Value  # the token embedding table: a lazy initializer, or the tied head's weight
    embed_scales: ir.Value | None = None  # with a tied int4 head: its block scales


# -- small graph utilities -------------------------------------------------------------------------------

def _value(name: str, dtype: ir.DataType, shape: Sequence[int | str]) -> ir.Value:
    dims = [ir.SymbolicDim(d) if isinstance(d, str) else d for d in shape]
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))


def _const_node(name: str, array: np.ndarray) -> ir.Node:
    node = ir.node("Constant", [], {"value": ir.tensor(array, name=name)}, name=name)
    node.outputs[0].name = name
    return node


def _node(op: str, inputs: Sequence[ir.Value | None], name: str, attrs: dict | None = None,
          domain: str = "") -> ir.Node:
    node = ir.node(op, list(inputs), attrs or {}, domain=domain, name=name)
    node.outputs[0].name = name
    return node


def _detach(part: ir.Model, feeds: dict[str, ir.Value]) -> tuple[list[ir.Node], list[ir.Value], dict]:
    """Take a part's nodes and initializers out of its graph, with its inputs rebound to ``feeds``."""
    graph = part.graph
    names = [v.name for v in graph.inputs]
    if set(names) != set(feeds):
        raise StitchError(f"{graph.name}: inputs {names} do not match the values wired to them {sorted(feeds)}")
    outputs = {v.name: v for v in graph.outputs}
    for inp in list(graph.inputs):
        ir.convenience.replace_all_uses_with(inp, feeds[inp.name])
    nodes = list(graph)
    graph.remove(nodes, safe=False)
    graph.outputs.clear()
    inits = list(graph.initializers.values())
    graph.initializers.clear()
    return nodes, inits, outputs


def _absorb(target: ir.Graph, nodes: list[ir.Node], inits: list[ir.Value]) -> None:
    target.extend(nodes)
    for init in inits:
        target.register_initializer(init)


def _producer_op(value: ir.Value | None) -> str | None:
    node = value.producer() if value is not None else None
    return node.op_type if node is not None else None


# -- passes ------------------------------------------------------------------------------------------------

class ImportDecoder:
    """The decoder is the base graph; its node, value and initializer names move under ``decoder/``."""

    def __call__(self, parts: Parts, spec: StitchSpec) -> ir.Graph:
        graph = parts.decoder.graph
        names = {v.name for v in graph.inputs}
        for needed in ("inputs_embeds", "attention_mask", "position_ids"):
            if needed not in names:
                raise StitchError(f"the decoder has no input {needed!r}; it was not exported with exclude_embeds")
        io_values = {id(v) for v in (*graph.inputs, *graph.outputs)}
        for node in ir.traversal.RecursiveGraphIterator(graph):
            node.name = _scoped("decoder", node.name or node.op_type)
            for out in node.outputs:
                if id(out) not in io_values and out.name:
                    out.name = _scoped("decoder", out.name)
        inits = list(graph.initializers.values())
        graph.initializers.clear()
        for init in inits:
            init.name = _scoped("decoder", init.name)
            if init.const_value is not None:
                init.const_value.name = init.name
            graph.register_initializer(init)
        return graph


def _scoped(scope: str, name: str) -> str:
    return f"{scope}{name}" if name.startswith("/") else f"{scope}/{name}"


class GuardVision:
    """Put the vision part inside ``If(num_patches > 0)``; with no patches, empty features come out."""

    def __call__(self, graph: ir.Graph, parts: Parts, spec: StitchSpec, pixel_values: ir.Value,
                 image_grid_thw: ir.Value) -> tuple[ir.Value, ir.Value]:
        nodes, inits, outputs = _detach(parts.vision, {"pixel_values": pixel_values,
                                                       "image_grid_thw": image_grid_thw})
        if set(outputs) != {"image_embeds", "deepstack_embeds"}:
            raise StitchError(f"the vision part's outputs are {sorted(outputs)}, not image_embeds/deepstack_embeds")
        for init in inits:  # weights live in the main graph; the branch refers to them by name
            graph.register_initializer(init)
        then_branch = ir.Graph([], [outputs["image_embeds"], outputs["deepstack_embeds"]], nodes=nodes,
                               name="vision")
        empty = [
            _const_node("vision/skipped/image_embeds", np.zeros((0, spec.hidden_size), np.float32)),
            _const_node("vision/skipped/deepstack_embeds",
                        np.zeros((spec.num_levels, 0, spec.hidden_size), np.float32)),
        ]
        else_branch = ir.Graph([], [n.outputs[0] for n in empty], nodes=empty, name="vision/skipped")

        shape = _node("Shape", [pixel_values], "vision/guard/num_patches", {"start": 0, "end": 1})
        zero = _const_node("vision/guard/zero", np.array([0], np.int64))
        has = _node("Greater", [shape.outputs[0], zero.outputs[0]], "vision/guard/has_patches")
        flag = _node("Squeeze", [has.outputs[0]], "vision/guard/condition")
        guard = ir.node("If", [flag.outputs[0]], {"then_branch": then_branch, "else_branch": else_branch},
                        num_outputs=2, name="vision/if_has_patches")
        image_embeds, deepstack = guard.outputs
        image_embeds.name, deepstack.name = "vision/image_embeds", "vision/deepstack_embeds"
        image_embeds.type = deepstack.type = ir.TensorType(ir.DataType.FLOAT)
        image_embeds.shape = ir.Shape([ir.SymbolicDim("num_image_tokens"), spec.hidden_size])
        deepstack.shape = ir.Shape([spec.num_levels, ir.SymbolicDim("num_image_tokens"), spec.hidden_size])
        graph.extend([shape, zero, has, flag, guard])
        return image_embeds, deepstack


class WireEmbeddings:
    """``inputs_embeds`` of the decoder now comes from the embedding merge subgraph."""

    def __call__(self, graph: ir.Graph, parts: Parts, spec: StitchSpec, input_ids: ir.Value,
                 image_embeds: ir.Value, deepstack: ir.Value) -> list[ir.Value]:
        decoder_embeds = next(v for v in graph.inputs if v.name == "inputs_embeds")
        feeds = {"input_ids": input_ids, "embed_tokens": parts.embed_tokens,
                 "image_embeds": image_embeds, "deepstack_embeds": deepstack}
        if parts.embed_scales is not None:
            feeds["embed_scales"] = parts.embed_scales
        for table in (parts.embed_tokens, parts.embed_scales):
            if table is not None and table.name not in graph.initializers:  # a tied head's are already there
                graph.register_initializer(table)
        nodes, inits, outputs = _detach(parts.embedding_merge, feeds)
        _absorb(graph, nodes, inits)
        ir.convenience.replace_all_uses_with(decoder_embeds, outputs["inputs_embeds"])
        graph.inputs.remove(decoder_embeds)
        return [outputs[f"deepstack_{k}"] for k in range(spec.num_levels)]


class InjectDeepStack:
    """Add DeepStack level k to the residual stream right after decoder layer k.

    Pattern: a decoder layer ends with its MLP down projection (MatMul or MatMulNBits fed by the SwiGLU
    product ``Mul``), whose output is the ``skip`` input of the next SkipSimplifiedLayerNormalization.
    Adding the level there equals HF's ``hidden_states[visual_mask] += deepstack[k]`` after layer k.
    """

    def mlp_outputs(self, graph: ir.Graph) -> list[tuple[ir.Node, ir.Value]]:
        found = []
        for node in graph:
            if node.op_type != "SkipSimplifiedLayerNormalization" or len(node.inputs) < 2:
                continue
            skip = node.inputs[1]
            producer = skip.producer() if skip is not None else None
            if producer is None or producer.op_type not in ("MatMul", "MatMulNBits"):
                continue
            if _producer_op(producer.inputs[0]) == "Mul":  # the SwiGLU product, not the attention output
                found.append((node, skip))
        return found

    def __call__(self, graph: ir.Graph, spec: StitchSpec, levels: list[ir.Value]) -> None:
        anchors = self.mlp_outputs(graph)
        if len(anchors) != spec.num_layers:
            raise StitchError(
                f"found {len(anchors)} decoder MLP outputs feeding a SkipSimplifiedLayerNormalization, expected "
                f"{spec.num_layers} (one per layer); the decoder's layout is not the one DeepStack injection knows"
            )
        if len(levels) > spec.num_layers:
            raise StitchError(f"{len(levels)} DeepStack levels but only {spec.num_layers} decoder layers")
        for k, level in enumerate(levels):
            consumer, skip = anchors[k]
            add = _node("Add", [skip, level], f"merge/deepstack/layers.{k}/add")
            graph.insert_after(skip.producer(), add)
            consumer.replace_input_with(1, add.outputs[0])


class WirePositions:
    """``position_ids`` of the decoder now come from the rope index subgraph; it returns rope_deltas."""

    def __call__(self, graph: ir.Graph, parts: Parts, feeds: dict[str, ir.Value]) -> ir.Value:
        decoder_positions = next(v for v in graph.inputs if v.name == "position_ids")
        nodes, inits, outputs = _detach(parts.rope_index, feeds)
        _absorb(graph, nodes, inits)
        ir.convenience.replace_all_uses_with(decoder_positions, outputs["position_ids"])
        graph.inputs.remove(decoder_positions)
        return outputs["rope_deltas_out"]


class PadLeftPadding:
    """Give every GroupQueryAttention a real key padding mask.

    As built, GQA takes each row's length from the mask and assumes its tokens start at position 0, which is
    wrong for left-padded rows. Here every row is treated as full length (``seqlens_k = total - 1``) and the
    padded key positions get a large negative ``attention_bias``; unpadded rows compute exactly as before.
    """

    SEQLENS_K, TOTAL_SEQUENCE_LENGTH, ATTENTION_BIAS = 5, 6, 10

    def __call__(self, graph: ir.Graph, attention_mask: ir.Value, input_ids: ir.Value) -> int:
        gqa = [n for n in graph if n.op_type == "GroupQueryAttention"]
        if not gqa:
            raise StitchError("the decoder has no GroupQueryAttention node; left padding cannot be handled")
        total = gqa[0].inputs[self.TOTAL_SEQUENCE_LENGTH]
        if total is None:
            raise StitchError("GroupQueryAttention has no total_sequence_length input")
        b = GraphBuilder("merge/padding")
        batch = b.op("Shape", [attention_mask], {"start": 0, "end": 1}, name="batch")
        last = b.op("Sub", [total, b.const(np.int32(1), "one")], name="last_position")
        seqlens = b.op("Expand", [last, batch], name="seqlens_k")
        # bias[b, 0, q, t] = (mask[b, t] - 1) * 1e9: 0 at tokens, -1e9 at padding
        mask = b.op("Cast", [attention_mask], {"to": ir.DataType.FLOAT}, name="mask_float")
        pads = b.op("Sub", [mask, b.const(np.float32(1), "one_f")], name="mask_minus_one")
        key_bias = b.op("Mul", [pads, b.const(np.float32(-NEG_LARGE), "large")], name="key_bias")
        key_bias = b.op("Unsqueeze", [key_bias, b.const([1, 2], "axes")], name="key_bias_4d")  # [B, 1, 1, T]
        shape = b.op("Concat", [batch, b.const([1], "one_head"),
                                b.op("Shape", [input_ids], {"start": 1, "end": 2}, name="sequence"),
                                b.op("Shape", [attention_mask], {"start": 1, "end": 2}, name="total")],
                     {"axis": 0}, name="bias_shape")
        bias = b.op("Expand", [key_bias, shape], name="attention_bias")  # [B, 1, S, T]
        graph.extend(b.nodes)
        for init in b.initializers.values():
            graph.register_initializer(init)
        for node in gqa:
            node.replace_input_with(self.SEQLENS_K, seqlens)
            while len(node.inputs) <= self.ATTENTION_BIAS:
                node.resize_inputs(len(node.inputs) + 1)
            node.replace_input_with(self.ATTENTION_BIAS, bias)
        return len(gqa)


class SetInterface:
    """Inputs and outputs in the contract's order; opsets and metadata of the combined model."""

    def __call__(self, graph: ir.Graph, new_inputs: dict[str, ir.Value], rope_deltas_out: ir.Value) -> None:
        past = [v for v in graph.inputs if v.name.startswith("past_key_values.")]
        others = [v.name for v in graph.inputs if v not in past and v.name != "attention_mask"]
        if others:
            raise StitchError(f"decoder inputs left unwired: {others}")
        attention_mask = next(v for v in graph.inputs if v.name == "attention_mask")
        ordered = [new_inputs["input_ids"], attention_mask, new_inputs["pixel_values"],
                   new_inputs["image_grid_thw"], new_inputs["rope_deltas"], *past]
        graph.inputs.clear()
        graph.inputs.extend(ordered)
        rope_deltas_out.name = ROPE_DELTAS_OUT
        rope_deltas_out.shape = ir.Shape([ir.SymbolicDim("batch_size"), 1])
        graph.outputs.append(rope_deltas_out)


def stitch(parts: Parts, spec: StitchSpec, patch_dim: int, metadata: dict[str, str]) -> ir.Model:
    """Run the passes in order and return the combined model (weights still lazy)."""
    graph = ImportDecoder()(parts, spec)
    attention_mask = next(v for v in graph.inputs if v.name == "attention_mask")
    new_inputs = {
        "input_ids": _value("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"]),
        "pixel_values": _value("pixel_values", ir.DataType.FLOAT, ["num_patches", patch_dim]),
        "image_grid_thw": _value("image_grid_thw", ir.DataType.INT64, ["num_images", 3]),
        "rope_deltas": _value("rope_deltas", ir.DataType.INT64, ["batch_size", 1]),
    }
    image_embeds, deepstack = GuardVision()(graph, parts, spec, new_inputs["pixel_values"],
                                            new_inputs["image_grid_thw"])
    levels = WireEmbeddings()(graph, parts, spec, new_inputs["input_ids"], image_embeds, deepstack)
    InjectDeepStack()(graph, spec, levels)
    rope_deltas_out = WirePositions()(graph, parts, {
        "input_ids": new_inputs["input_ids"], "attention_mask": attention_mask,
        "image_grid_thw": new_inputs["image_grid_thw"], "rope_deltas": new_inputs["rope_deltas"],
    })
    PadLeftPadding()(graph, attention_mask, new_inputs["input_ids"])
    SetInterface()(graph, new_inputs, rope_deltas_out)
    graph.name = "qwen3vl_combined"
    graph.opset_imports.clear()
    graph.opset_imports.update({"": OPSET, MS_DOMAIN: 1})
    model = ir.Model(graph, ir_version=10, producer_name="qwen3vl-merge",
                     producer_version=metadata.get("tool_version", ""))
    # What the rewiring left behind (the builder's per-row sequence lengths) goes; then a topological order.
    register_ort_default_domain_ops()  # lets the pass read SimplifiedLayerNormalization's optional outputs
    ir.passes.Sequential(
        common_passes.RemoveUnusedNodesPass(),
        common_passes.TopologicalSortPass(),
    )(model)
    model.metadata_props.update(metadata)
    return model
