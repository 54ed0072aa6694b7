"""``inspect --stitch``: a small weightless graph of the stitch region, for a quick look in Netron."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import onnx

from merge import __version__
from merge.contract.names import (
    DEEPSTACK_PREFIX,
    EMBEDDING_PREFIX,
    POSITION_PREFIX,
    VISION_DEEPSTACK_EMBEDS,
    VISION_IMAGE_EMBEDS,
)
from merge.errors import MergeError
from merge.stitch.ort_schemas import register_ort_default_domain_ops

from .walk import classify_initializers, elements, external_location, load_graph, reads, scope_of, unique

log = logging.getLogger(__name__)

# The vision If's outputs and every weight become graph inputs; constants of up to this many elements (token ids,
# axes, shapes) keep their values, so the file stays tiny whatever the model's size.
VISION_OUTPUTS = (VISION_IMAGE_EMBEDS, VISION_DEEPSTACK_EMBEDS)
STITCH_INLINE_MAX_ELEMENTS = 64


def write_stitch_view(folder: Path, out: Path) -> tuple[Path, int]:
    """Write a small weightless ONNX graph of the stitch region to ``out`` (for Netron) and return ``out``.

    It holds every ``merge/*`` node (embedding merge, DeepStack Adds, position subgraph, input checks), and as context
    the decoder nodes around them: the down projection feeding each DeepStack Add, the normalization reading
    it, and the nodes reading the merged embeddings. The vision ``If`` is cut off: its outputs are graph inputs.
    Every weight is a graph input; only constants of at most 64 elements (ids, axes, shapes) keep values.
    Returns ``out`` and the view's node count. ``out`` must not be one of the folder's own files.
    """
    from merge.contract.folder import CombinedFolder

    combined = folder if isinstance(folder, CombinedFolder) else CombinedFolder.open(folder)
    folder, out = combined.path, Path(out)
    if out.resolve().parent == folder.resolve():
        raise MergeError(f"--stitch {out}: will not write into the combined folder {folder} (it would replace or "
                         "add to the model's own files); choose a path outside it")
    view = build_stitch_view(load_graph(combined), str(folder))
    register_ort_default_domain_ops()
    try:
        onnx.checker.check_model(view)
    except onnx.checker.ValidationError as exc:
        raise MergeError(f"{folder}: the stitch view fails the ONNX checker: {exc}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(view, str(out))
    log.debug("stitch view: %s (%d nodes, %d bytes)", out, len(view.graph.node), out.stat().st_size)
    return out, len(view.graph.node)


def _select_stitch_nodes(graph: onnx.GraphProto, where: str) -> list[int]:
    """Indices (in graph order) of the merge nodes and their decoder context."""
    producers = {name: i for i, node in enumerate(graph.node) for name in node.output if name}
    consumers: dict[str, list[int]] = defaultdict(list)
    for i, node in enumerate(graph.node):
        for name in reads(node):
            consumers[name].append(i)

    merge = [i for i, node in enumerate(graph.node) if scope_of(node.name) == "merge"]
    names = [graph.node[i].name for i in merge]
    if not any(n.startswith(EMBEDDING_PREFIX) for n in names) or not any(n.startswith(POSITION_PREFIX) for n in names):
        raise MergeError(f"{where}: no {EMBEDDING_PREFIX}* or {POSITION_PREFIX}* nodes; "
                         "not a combined model written by `python -m merge build`")

    def decoder(indices: Iterable[int]) -> list[int]:
        return [i for i in indices if scope_of(graph.node[i].name) == "decoder"]

    context: list[int] = []
    for i in merge:
        node = graph.node[i]
        if node.name.startswith(DEEPSTACK_PREFIX):
            # the residual point: the down projection it adds to, the normalization that reads the sum
            context += decoder(producers[name] for name in node.input if name in producers)
            context += decoder(c for name in node.output for c in consumers[name])
        elif node.name.startswith(EMBEDDING_PREFIX):
            context += decoder(c for name in node.output for c in consumers[name])
    return sorted(set(merge) | set(context))


def _value_info(name: str, elem_type: int, dims: Iterable[int | str]) -> onnx.ValueInfoProto:
    value = onnx.ValueInfoProto(name=name)
    tensor_type = value.type.tensor_type
    tensor_type.elem_type = elem_type
    tensor_type.shape.SetInParent()
    for d in dims:
        dim = tensor_type.shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d
    return value


def build_stitch_view(model: onnx.ModelProto, where: str = "model") -> onnx.ModelProto:
    """The weightless stitch-region model (see :func:`write_stitch_view`); ``model`` is left untouched."""
    graph = model.graph
    keep = _select_stitch_nodes(graph, where)
    nodes = [graph.node[i] for i in keep]

    types = _value_types(model)
    initializers = {t.name: t for t in graph.initializer}
    kinds = classify_initializers(graph)

    produced = {name for node in nodes for name in node.output if name}
    view = onnx.ModelProto(ir_version=model.ir_version, producer_name="qwen3vl-merge inspect --stitch",
                           producer_version=__version__)
    view.opset_import.extend(model.opset_import)
    view.metadata_props.extend(model.metadata_props)
    view.doc_string = ("Stitch region of a qwen3vl-merge combined model, without weights: every weight and the "
                       "vision tower's outputs are graph inputs.")
    out_graph = view.graph
    out_graph.name = "stitch_view"
    out_graph.node.extend(nodes)

    for name in unique(name for node in nodes for name in reads(node) if name not in produced):
        tensor = initializers.get(name)
        if tensor is None:
            if not _has_shape(types.get(name)):
                raise MergeError(f"{where}: no type and shape for {name!r}, which the stitch region reads")
            out_graph.input.append(onnx.ValueInfoProto(name=name, type=types[name]))
        elif (kinds[name][0] == "constant" and elements(tensor) <= STITCH_INLINE_MAX_ELEMENTS
              and external_location(tensor) is None):
            out_graph.initializer.append(tensor)
        else:
            out_graph.input.append(_value_info(name, tensor.data_type, tensor.dims))

    # a config without DeepStack (no DeepStack additions) reads only the image features
    deepstack = any(node.name.startswith(DEEPSTACK_PREFIX) for node in nodes)
    required = VISION_OUTPUTS if deepstack else (VISION_IMAGE_EMBEDS,)
    missing = [name for name in required if name not in {v.name for v in out_graph.input}]
    if missing:
        raise MergeError(f"{where}: the stitch region does not read the vision outputs {', '.join(missing)}; "
                         "not a combined model written by `python -m merge build`")

    kept = set(keep)
    read_outside = {name for i, node in enumerate(graph.node) if i not in kept for name in reads(node)}
    read_outside |= {v.name for v in graph.output}
    for name in unique(name for node in nodes for name in node.output if name in read_outside):
        if _has_shape(types.get(name)):
            out_graph.output.append(onnx.ValueInfoProto(name=name, type=types[name]))
        else:
            log.debug("stitch view: %s has no known type and shape; left out of the outputs", name)
    outputs = {v.name for v in out_graph.output}
    out_graph.value_info.extend(onnx.ValueInfoProto(name=name, type=types[name]) for name in unique(
        name for node in nodes for name in node.output if name in types and name not in outputs))
    return view


def _has_shape(value_type: onnx.TypeProto | None) -> bool:
    """Graph inputs and outputs need an element type and a shape (the checker insists)."""
    return (value_type is not None and value_type.HasField("tensor_type")
            and value_type.tensor_type.elem_type != onnx.TensorProto.UNDEFINED
            and value_type.tensor_type.HasField("shape"))


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Types of the main graph's values: declared ones, completed by ONNX shape inference (the graph alone,
    no weights; ORT's own ops stay untyped there) and, for an If's outputs, by its then-branch."""
    types: dict[str, onnx.TypeProto] = {}
    for node in model.graph.node:
        if node.op_type == "If":
            branch = next(a.g for a in node.attribute if a.name == "then_branch")
            types.update({name: out.type for name, out in zip(node.output, branch.output, strict=False)})
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception as exc:  # inference is a bonus: declared types still describe most values
        log.debug("shape inference failed (%s); using the declared types only", exc)
        inferred = model.graph
    for value in (*inferred.value_info, *model.graph.value_info, *model.graph.input, *model.graph.output):
        if _has_shape(value.type) or value.name not in types:
            types[value.name] = value.type
    return types
