"""Just enough of the protobuf wire format to list an ONNX model's tensors and their external data, without the
``onnx`` package (the runtime does not install it).

Every tensor ONNX Runtime would load is visited: graph initializers (sparse ones too) and tensors inside node
attributes, in the main graph, every subgraph (If branches, Loop bodies) and every model-local function. The
reader refuses malformed input (a length past the end, an unknown wire type) with :class:`WireError` instead of
reading out of bounds; it never allocates more than the bytes it is given.
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
FUNCTION_NODE = 7
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 1, 2, 8, 13, 14
ENTRY_KEY, ENTRY_VALUE = 1, 2
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
MAX_DEPTH = 64  # nested subgraphs; far beyond any real model

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
        """Bytes of the tensor's data from its type and shape (None for types without a fixed size)."""
        bits = ELEMENT_BITS.get(self.data_type)
        if bits is None or any(d < 0 for d in self.dims):
            return None
        count = 1
        for d in self.dims:
            count *= d
        return (count * bits + 7) // 8


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise WireError("a varint runs past the end")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("a varint is longer than 10 bytes")


def fields(data: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of one message: an int for varints and fixed, a view for length-delimited."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
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


def _tensor(data: memoryview) -> TensorInfo:
    info = TensorInfo()
    for number, wire, value in fields(data):
        if number == TENSOR_DIMS:
            if wire == 2:  # packed
                pos = 0
                while pos < len(value):
                    dim, pos = _varint(value, pos)
                    info.dims.append(_signed(dim))
            else:
                info.dims.append(_signed(value))
        elif number == TENSOR_DATA_TYPE and wire == 0:
            info.data_type = value
        elif number == TENSOR_NAME and wire == 2:
            info.name = bytes(value).decode("utf-8", "replace")
        elif number == TENSOR_DATA_LOCATION and wire == 0:
            info.data_location = value
        elif number == TENSOR_EXTERNAL_DATA and wire == 2:
            entry = {k: bytes(v).decode("utf-8", "replace") for k, w, v in fields(value) if w == 2}
            info.external[entry.get(ENTRY_KEY, "")] = entry.get(ENTRY_VALUE, "")
    return info


def _graph_tensors(data: memoryview, depth: int) -> Iterator[TensorInfo]:
    if depth > MAX_DEPTH:
        raise WireError(f"subgraphs nested more than {MAX_DEPTH} deep")
    for number, wire, value in fields(data):
        if wire != 2:
            continue
        if number == GRAPH_INITIALIZER:
            yield _tensor(value)
        elif number == GRAPH_SPARSE_INITIALIZER:
            yield from _sparse_tensors(value)
        elif number == GRAPH_NODE:
            yield from _node_tensors(value, depth)


def _sparse_tensors(data: memoryview) -> Iterator[TensorInfo]:
    for number, wire, value in fields(data):
        if wire == 2 and number in (SPARSE_VALUES, SPARSE_INDICES):
            yield _tensor(value)


def _node_tensors(data: memoryview, depth: int) -> Iterator[TensorInfo]:
    for number, wire, value in fields(data):
        if number != NODE_ATTRIBUTE or wire != 2:
            continue
        for attr_number, attr_wire, attr_value in fields(value):
            if attr_wire != 2:
                continue
            if attr_number in (ATTR_T, ATTR_TENSORS):
                yield _tensor(attr_value)
            elif attr_number in (ATTR_G, ATTR_GRAPHS):
                yield from _graph_tensors(attr_value, depth + 1)
            elif attr_number in (ATTR_SPARSE_TENSOR, ATTR_SPARSE_TENSORS):
                yield from _sparse_tensors(attr_value)


def model_tensors(model: bytes | memoryview) -> list[TensorInfo]:
    """Every tensor of a serialized ModelProto (see the module docstring); raises :class:`WireError`."""
    data = memoryview(model)
    tensors: list[TensorInfo] = []
    found_graph = False
    for number, wire, value in fields(data):
        if wire != 2:
            continue
        if number == MODEL_GRAPH:
            found_graph = True
            tensors.extend(_graph_tensors(value, 0))
        elif number == MODEL_FUNCTIONS:
            for f_number, f_wire, f_value in fields(value):
                if f_number == FUNCTION_NODE and f_wire == 2:
                    tensors.extend(_node_tensors(f_value, 1))
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
