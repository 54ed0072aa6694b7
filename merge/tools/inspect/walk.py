"""Reading a combined model's graph without its weights: protobuf walks, scopes, tensor kinds and sizes.

The graph is loaded with ``onnx.load(..., load_external_data=False)``: weights are never read, so an 8B model
reads as quickly as a tiny one. Tensor sizes come from shapes and dtypes. Scopes are the first component of a
node or initializer name (``vision/``, ``merge/``, ``decoder/``); what sits inside a subgraph (the vision tower
behind ``vision/if_has_patches``, the branches of the position ``If``) is walked too, and a name without a known
scope takes the scope of the node that holds its subgraph.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import onnx
import onnx_ir as ir

from merge.contract.folder import CombinedFolder
from merge.contract.names import MOE_OPS, MS_DOMAIN, SCOPES
from merge.errors import MergeError

OTHER_SCOPE = "other"
DEFAULT_DOMAINS = ("", "ai.onnx")

# com.microsoft MatMulNBits: inputs A, B (packed weight), scales, zero_points, g_idx, bias. B holds K*N
# parameters; scales, zero points and g_idx are quantization metadata (bytes, no parameters).
GATHER_BLOCK_QUANTIZED_OP = (MS_DOMAIN, "GatherBlockQuantized")
NBITS_OP = (MS_DOMAIN, "MatMulNBits")
NBITS_WEIGHT_INPUT = 1
NBITS_METADATA_INPUTS = slice(2, 5)
# com.microsoft MoE / QMoE (Qwen3-VL-MoE's experts, MOE_OPS): fc1, fc2 (and fc3) expert stacks; QMoE packs them
# ``expert_weight_bits`` to the value (8 / bits per byte), with scales and zero points beside them.
QMOE_WEIGHT_INPUTS = (2, 5, 8)
QMOE_METADATA_INPUTS = (3, 6, 9, 11, 12, 13)
# Rotary tables are buffers, not parameters: the cos/sin cache inputs of ORT's rotary and attention ops, and
# tensors named like Hugging Face's non-persistent rotary buffer.
ROTARY_CACHE_INPUTS = {
    (MS_DOMAIN, "RotaryEmbedding"): (2, 3),
    (MS_DOMAIN, "MRotaryEmbedding"): (2, 3),
    (MS_DOMAIN, "GroupQueryAttention"): (7, 8),
}
DERIVED_BUFFER_SUFFIXES = ("inv_freq",)
TENSOR_KINDS = ("weight", "quantization", "constant")


def load_graph(folder: CombinedFolder) -> onnx.ModelProto:
    """The folder's graph, from the bytes its loader read and checked; weights stay in the data file."""
    try:
        return onnx.load_from_string(folder.model_bytes)
    except Exception as exc:  # protobuf raises DecodeError and others; all mean "not a readable model"
        raise MergeError(f"{folder.model_path}: not a readable ONNX model ({exc})") from exc


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def scope_of(name: str, inherited: str | None = None) -> str:
    """``vision``, ``merge`` or ``decoder`` from a name's first component; else the enclosing scope."""
    head = name.split("/", 1)[0]
    if "/" in name and head in SCOPES:
        return head
    return inherited or OTHER_SCOPE


def walk_nodes(graph: onnx.GraphProto, scope: str | None = None) -> Iterator[tuple[onnx.NodeProto, str]]:
    """Every node with its scope, subgraphs included (depth first)."""
    for node in graph.node:
        node_scope = scope_of(node.name, scope)
        yield node, node_scope
        for sub in subgraphs(node):
            yield from walk_nodes(sub, node_scope)


def walk_initializers(graph: onnx.GraphProto, scope: str | None = None) -> Iterator[tuple[onnx.TensorProto, str]]:
    """Every initializer with its scope, those of subgraphs included. An optional input's default (an initializer
    named as the input, so unscoped) takes the scope of the node that reads it."""
    readers: dict[str, str] = {}
    inputs = {v.name for v in graph.input}
    for node in graph.node:
        for name in node.input:
            if name in inputs:
                readers.setdefault(name, scope_of(node.name, scope))
    for tensor in graph.initializer:
        yield tensor, scope_of(tensor.name, readers.get(tensor.name, scope))
    for node in graph.node:
        for sub in subgraphs(node):
            yield from walk_initializers(sub, scope_of(node.name, scope))


def outer_references(graph: onnx.GraphProto) -> list[str]:
    """Names a subgraph reads from the scopes around it (nested subgraphs included)."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {name for node in graph.node for name in node.output}
    return unique(name for node in graph.node for name in reads(node) if name not in defined)


def reads(node: onnx.NodeProto) -> list[str]:
    """The names a node reads: its inputs and what its subgraphs take from the enclosing graph."""
    names = [name for name in node.input if name]
    for sub in subgraphs(node):
        names += outer_references(sub)
    return unique(names)


def unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def dtype_name(elem_type: int) -> str:
    dtype = ir.DataType(elem_type)
    if dtype == ir.DataType.UNDEFINED:
        return "?"
    try:
        return dtype.numpy().name
    except (TypeError, ValueError):
        return dtype.name.lower()


def describe_value(value: onnx.ValueInfoProto) -> dict:
    tensor_type = value.type.tensor_type
    dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in tensor_type.shape.dim]
    return {"name": value.name, "dtype": dtype_name(tensor_type.elem_type),
            "shape": dims if tensor_type.HasField("shape") else None}


def elements(tensor: onnx.TensorProto) -> int:
    return math.prod(tensor.dims)


def stored_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data as stored, from shape and dtype (strings: their bytes)."""
    dtype = ir.DataType(tensor.data_type)
    if dtype.is_string():
        return sum(len(s) for s in tensor.string_data)
    return math.ceil(elements(tensor) * dtype.bitwidth / 8)


def external_location(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {entry.key: entry.value for entry in tensor.external_data}.get("location")


def classify_initializers(graph: onnx.GraphProto) -> dict[str, tuple[str, int]]:
    """Each initializer's kind and parameter count: ``{name: (kind, parameters)}``.

    Kinds: ``weight`` (checkpoint weights: floating-point tensors, and int4 ``MatMulNBits`` weights, which
    count K*N, the matrix they stand for, and ``QMoE``'s packed expert stacks likewise), ``quantization`` (their
    scales, zero points, g_idx: no parameters)
    and ``constant`` (no parameters, as PyTorch's buffers: rotary tables, whether read by ORT's rotary and
    attention ops as cos/sin caches or named ``inv_freq`` as in Hugging Face; scalars; integer tensors such
    as axes, shapes, token ids). Found by the ops that read them, except ``inv_freq``.
    """
    nbits_parameters: dict[str, int] = {}
    packed_tables: dict[str, int] = {}  # initializer name -> values per byte
    quant_metadata: set[str] = set()
    rotary_tables: set[str] = set()
    for node, _ in walk_nodes(graph):
        key = (node.domain, node.op_type)
        if key == NBITS_OP:
            attrs = {a.name: a.i for a in node.attribute}
            nbits_parameters[node.input[NBITS_WEIGHT_INPUT]] = attrs["K"] * attrs["N"]
            quant_metadata.update(name for name in node.input[NBITS_METADATA_INPUTS] if name)
        elif key == GATHER_BLOCK_QUANTIZED_OP:  # a 4-bit table: [rows, cols / 2] bytes stand for rows x cols
            packed_tables[node.input[0]] = 8 // next((a.i for a in node.attribute if a.name == "bits"), 4)
            quant_metadata.update(name for name in node.input[2:] if name)
        elif key == MOE_OPS[1]:  # QMoE: packed expert stacks [E, N, K * bits / 8]
            bits = next((a.i for a in node.attribute if a.name == "expert_weight_bits"), 4)
            packed_tables.update((node.input[i], 8 // bits) for i in QMOE_WEIGHT_INPUTS
                                 if i < len(node.input) and node.input[i])
            quant_metadata.update(node.input[i] for i in QMOE_METADATA_INPUTS if i < len(node.input) and node.input[i])
        elif key in ROTARY_CACHE_INPUTS:
            rotary_tables.update(node.input[i] for i in ROTARY_CACHE_INPUTS[key] if i < len(node.input))

    kinds: dict[str, tuple[str, int]] = {}
    for tensor, _ in walk_initializers(graph):
        name = tensor.name
        if name in nbits_parameters:
            kinds[name] = ("weight", nbits_parameters[name])
        elif name in packed_tables:
            kinds[name] = ("weight", elements(tensor) * packed_tables[name])
        elif name in quant_metadata:
            kinds[name] = ("quantization", 0)
        elif (name in rotary_tables or name.rsplit("/", 1)[-1].endswith(DERIVED_BUFFER_SUFFIXES)
              or not tensor.dims or not ir.DataType(tensor.data_type).is_floating_point()):
            kinds[name] = ("constant", 0)
        else:
            kinds[name] = ("weight", elements(tensor))
    return kinds
