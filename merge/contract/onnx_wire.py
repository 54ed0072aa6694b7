"""Just enough of the protobuf wire format to list an ONNX model's tensors and their external data, without the
``onnx`` package (the runtime does not install it).

Every tensor ONNX Runtime would load is visited: graph initializers (sparse ones too) and tensors inside node
attributes, in the main graph, every subgraph (If branches, Loop bodies) and every model-local function (its nodes
and its attributes' default values). The reader refuses malformed input (a length past the end, an unknown wire
type, field number 0, a shape of more elements than an int64 counts) with :class:`WireError` instead of reading out
of bounds; its memory and time grow with the bytes it is given, never with a length or a shape they claim.

Each tensor is read as protobuf (and so ONNX Runtime) reads it, since a check that sees a tensor otherwise checks
another tensor: a singular message field that occurs more than once (an attribute's ``t``, a sparse tensor's
``values``) is one message with the fields of all its occurrences; a varint keeps its low 64 bits, an int32 field its
low 32; an enum value the enum lacks (``data_location`` 7) leaves the field as it was; a field under a wire type its
type never has (a dimension as fixed32) is an unknown field. ``tests/test_onnx_wire_fuzz.py`` holds the reader to
protobuf's view.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

# field numbers (onnx.proto3)
MODEL_GRAPH, MODEL_FUNCTIONS = 7, 25
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER = 1, 5, 15
NODE_ATTRIBUTE = 5
ATTR_T, ATTR_G, ATTR_TENSORS, ATTR_GRAPHS, ATTR_SPARSE_TENSOR, ATTR_SPARSE_TENSORS = 5, 6, 10, 11, 22, 23
SPARSE_VALUES, SPARSE_INDICES = 1, 2
FUNCTION_NODE, FUNCTION_ATTRIBUTE_PROTO = 7, 11
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 1, 2, 8, 13, 14
ENTRY_KEY, ENTRY_VALUE = 1, 2
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
DATA_LOCATIONS = (0, EXTERNAL)  # the enum's values (onnx.proto is proto2: its enums are closed)
MAX_DEPTH = 64  # nested subgraphs; far beyond any real model
MAX_ELEMENTS = 2**63 - 1  # a shape counts its elements in an int64

# bits per element of each TensorProto.DataType (strings: none, they cannot be external)
ELEMENT_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 14: 64,
                15: 128, 16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4, 24: 8, 25: 2, 26: 2}


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


@dataclass
class TensorInfo:
    name: str = ""
    data_type: int = 0
    dims: list[int] = field(default_factory=list)
    external: dict[str, str] = field(default_factory=dict)
    data_location: int = 0

    @property
    def is_external(self) -> bool:
        return self.data_location == EXTERNAL

    def nbytes(self) -> int | None:
        """Bytes of the tensor's data from its type and shape (None for types without a fixed size, and for shapes
        no tensor has: a negative dimension, more elements than an int64 counts)."""
        bits = ELEMENT_BITS.get(self.data_type)
        count = _element_count(self.dims)
        if bits is None or count is None:
            return None
        return (count * bits + 7) // 8


def _element_count(dims: list[int]) -> int | None:
    """The product of ``dims``, or None (a negative dimension, or more than MAX_ELEMENTS). It stops as soon as the
    product is too large: a file full of dimensions costs time in proportion to its size, not to the digits of a
    product of a million factors."""
    if any(d < 0 for d in dims):
        return None
    if 0 in dims:
        return 0
    count = 1
    for d in dims:
        count *= d
        if count > MAX_ELEMENTS:
            return None
    return count


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise WireError("a varint runs past the end")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & 0xFFFF_FFFF_FFFF_FFFF, pos  # protobuf keeps the low 64 bits of a 10-byte varint
        shift += 7
        if shift > 63:
            raise WireError("a varint is longer than 10 bytes")


def fields(data: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of one message: an int for varints and fixed, a view for length-delimited."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError("a field has number 0, which protobuf does not allow")
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = int.from_bytes(data[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise WireError(f"field {number} claims {length} bytes, past the end of its message")
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = int.from_bytes(data[pos:pos + 4], "little"), pos + 4
        else:
            raise WireError(f"field {number} has wire type {wire}, which ONNX does not use")
        if pos > len(data):
            raise WireError(f"field {number} runs past the end of its message")
        yield number, wire, value


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _int32(value: int) -> int:
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _tensor(occurrences: list[memoryview]) -> TensorInfo:
    """One TensorProto from the bytes of every occurrence of its field (several only for a singular field, which
    protobuf merges: dims and external data entries add up; a later name, data_type or data_location replaces an
    earlier)."""
    info = TensorInfo()
    for data in occurrences:
        for number, wire, value in fields(data):
            if number == TENSOR_DIMS and wire == 2:  # packed
                pos = 0
                while pos < len(value):
                    dim, pos = _varint(value, pos)
                    info.dims.append(_signed(dim))
            elif number == TENSOR_DIMS and wire == 0:  # fixed wire types are not an int64's: an unknown field
                info.dims.append(_signed(value))
            elif number == TENSOR_DATA_TYPE and wire == 0:
                info.data_type = _int32(value)
            elif number == TENSOR_NAME and wire == 2:
                info.name = bytes(value).decode("utf-8", "replace")
            elif number == TENSOR_DATA_LOCATION and wire == 0 and _int32(value) in DATA_LOCATIONS:
                info.data_location = _int32(value)
            elif number == TENSOR_EXTERNAL_DATA and wire == 2:
                entry = {k: bytes(v).decode("utf-8", "replace") for k, w, v in fields(value) if w == 2}
                info.external[entry.get(ENTRY_KEY, "")] = entry.get(ENTRY_VALUE, "")
    if _element_count(info.dims) is None and all(d >= 0 for d in info.dims):
        raise WireError(f"tensor {info.name!r} has {len(info.dims)} dimensions whose product is more than "
                        f"{MAX_ELEMENTS} elements")
    return info


def _graph_tensors(data: memoryview, depth: int) -> Iterator[TensorInfo]:
    if depth > MAX_DEPTH:
        raise WireError(f"subgraphs nested more than {MAX_DEPTH} deep")
    for number, wire, value in fields(data):
        if wire != 2:
            continue
        if number == GRAPH_INITIALIZER:
            yield _tensor([value])
        elif number == GRAPH_SPARSE_INITIALIZER:
            yield from _sparse_tensors([value])
        elif number == GRAPH_NODE:
            yield from _node_tensors(value, depth)


def _sparse_tensors(occurrences: list[memoryview]) -> Iterator[TensorInfo]:
    """The values and indices of one SparseTensorProto (from every occurrence of a singular field, merged)."""
    values: list[memoryview] = []
    indices: list[memoryview] = []
    for data in occurrences:
        for number, wire, value in fields(data):
            if wire == 2 and number == SPARSE_VALUES:
                values.append(value)
            elif wire == 2 and number == SPARSE_INDICES:
                indices.append(value)
    for parts in (values, indices):
        if parts:
            yield _tensor(parts)


def _node_tensors(data: memoryview, depth: int) -> Iterator[TensorInfo]:
    for number, wire, value in fields(data):
        if number == NODE_ATTRIBUTE and wire == 2:
            yield from _attribute_tensors(value, depth)


def _attribute_tensors(data: memoryview, depth: int) -> Iterator[TensorInfo]:
    tensor: list[memoryview] = []  # t and sparse_tensor are singular: every occurrence is part of one message
    sparse: list[memoryview] = []
    for number, wire, value in fields(data):
        if wire != 2:
            continue
        if number == ATTR_T:
            tensor.append(value)
        elif number == ATTR_TENSORS:
            yield _tensor([value])
        elif number in (ATTR_G, ATTR_GRAPHS):  # a merged graph's tensors are those of its parts
            yield from _graph_tensors(value, depth + 1)
        elif number == ATTR_SPARSE_TENSOR:
            sparse.append(value)
        elif number == ATTR_SPARSE_TENSORS:
            yield from _sparse_tensors([value])
    if tensor:
        yield _tensor(tensor)
    if sparse:
        yield from _sparse_tensors(sparse)


def model_tensors(model: bytes | memoryview) -> list[TensorInfo]:
    """Every tensor of a serialized ModelProto (see the module docstring); raises :class:`WireError`."""
    data = memoryview(model)
    tensors: list[TensorInfo] = []
    found_graph = False
    for number, wire, value in fields(data):
        if wire != 2:
            continue
        if number == MODEL_GRAPH:  # a merged graph's tensors are those of its parts
            found_graph = True
            tensors.extend(_graph_tensors(value, 0))
        elif number == MODEL_FUNCTIONS:
            for f_number, f_wire, f_value in fields(value):
                if f_number == FUNCTION_NODE and f_wire == 2:
                    tensors.extend(_node_tensors(f_value, 1))
                elif f_number == FUNCTION_ATTRIBUTE_PROTO and f_wire == 2:  # default values of its attributes
                    tensors.extend(_attribute_tensors(f_value, 1))
    if not found_graph:
        raise WireError("no graph in the model")
    return tensors


# -- the model's interface and metadata (for checks against config.json) ---------------------------------------
MODEL_METADATA = 14
GRAPH_INPUT, GRAPH_OUTPUT = 11, 12
VALUE_NAME, VALUE_TYPE = 1, 2
TYPE_TENSOR, TENSOR_TYPE_SHAPE = 1, 2
SHAPE_DIM, DIM_VALUE, DIM_PARAM = 1, 1, 2


def _text(value: memoryview) -> str:
    return bytes(value).decode("utf-8", "replace")


def _shape(value_info: memoryview) -> tuple[str, list[int | str]]:
    """(name, dims) of a ValueInfoProto: an int per fixed dimension, the name of a symbolic one ("" if neither)."""
    name, dims = "", []
    for number, wire, value in fields(value_info):
        if number == VALUE_NAME and wire == 2:
            name = _text(value)
        elif number == VALUE_TYPE and wire == 2:
            for t_number, t_wire, t_value in fields(value):
                if t_number != TYPE_TENSOR or t_wire != 2:
                    continue
                for s_number, s_wire, s_value in fields(t_value):
                    if s_number != TENSOR_TYPE_SHAPE or s_wire != 2:
                        continue
                    for d_number, d_wire, d_value in fields(s_value):
                        if d_number != SHAPE_DIM or d_wire != 2:
                            continue
                        dim: int | str = ""
                        for x_number, x_wire, x_value in fields(d_value):
                            if x_number == DIM_VALUE and x_wire == 0:
                                dim = _signed(x_value)
                            elif x_number == DIM_PARAM and x_wire == 2:
                                dim = _text(x_value)
                        dims.append(dim)
    return name, dims


@dataclass
class Interface:
    """The main graph's inputs and outputs (name -> dims) and the model's metadata."""

    inputs: dict[str, list[int | str]] = field(default_factory=dict)
    outputs: dict[str, list[int | str]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def model_interface(model: bytes | memoryview) -> Interface:
    """The inputs, outputs and metadata of a serialized ModelProto; raises :class:`WireError`."""
    found = Interface()
    for number, wire, value in fields(memoryview(model)):
        if wire != 2:
            continue
        if number == MODEL_METADATA:
            entry = {k: _text(v) for k, w, v in fields(value) if w == 2}
            found.metadata[entry.get(ENTRY_KEY, "")] = entry.get(ENTRY_VALUE, "")
        elif number == MODEL_GRAPH:
            for g_number, g_wire, g_value in fields(value):
                if g_wire == 2 and g_number in (GRAPH_INPUT, GRAPH_OUTPUT):
                    name, dims = _shape(g_value)
                    (found.inputs if g_number == GRAPH_INPUT else found.outputs)[name] = dims
    return found
