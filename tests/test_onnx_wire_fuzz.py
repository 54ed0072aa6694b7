"""Fuzzing the hand-written protobuf reader (:mod:`merge.contract.onnx_wire`), which parses untrusted model files
before ONNX Runtime does (hypothesis, bounded and seeded).

Inputs: random bytes; mutations of a small real model (bit flips, truncations, inserted varints, huge length
prefixes, duplicated slices, deep nesting); wire-format messages generated field by field. Properties:

- the reader returns tensors or raises :class:`WireError` with a one-line message: never another exception type;
- within a time limit (a hypothesis deadline, and an alarm against a true hang), ``nbytes()`` of what it returns
  included, and with memory bounded by the bytes it is given, never by a length they claim;
- where protobuf itself (the ``onnx`` package's parser, the same rules ONNX Runtime's parser follows) accepts the
  bytes and the reader does too, both see the same tensors: names, types, shapes, data locations and external
  data. The folder check refuses what the reader shows it; a tensor that ONNX Runtime sees differently is one the
  check never saw.

Every input the fuzzer found wrong is kept below as an explicit regression test.
"""

from __future__ import annotations

import contextlib
import signal
import tracemalloc
from collections import Counter
from datetime import timedelta
from functools import cache

import onnx
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from merge.contract.onnx_wire import MAX_DEPTH, WireError, model_tensors

TIME_LIMIT_S = 5  # an alarm: a hang fails the test instead of stalling the suite
MEMORY_FLOOR = 256 << 10  # bytes of bookkeeping any input may cost (the fuzzer's inputs peak under 20 KiB)
MEMORY_PER_BYTE = 512  # and per byte of input: objects for what it holds (2 bytes make an empty tensor of ~240)

SETTINGS = settings(max_examples=300, deadline=timedelta(seconds=1), derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- the wire format, written by hand ---------------------------------------------------------------------------
def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def vi(number: int, value: int) -> bytes:
    return tag(number, 0) + varint(value)


def ld(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


def entry(key: str, value: str) -> bytes:
    """A TensorProto.external_data entry."""
    return ld(13, ld(1, key.encode()) + ld(2, value.encode()))


def graph_model(graph: bytes) -> bytes:
    return vi(1, 10) + ld(7, graph)  # ir_version, graph


def constant_node(attribute: bytes) -> bytes:
    """A NodeProto: output "c", op_type Constant, one attribute."""
    return ld(2, b"c") + ld(4, b"Constant") + ld(5, attribute)


# -- a small real model: every place a tensor can be ------------------------------------------------------------
def _external(name: str, dims: list[int], offset: int) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    tensor.data_location = TensorProto.EXTERNAL
    count = 1
    for d in dims:
        count *= d
    for key, value in (("location", "model.onnx.data"), ("offset", str(offset)), ("length", str(4 * count))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def _constant(output: str, tensor: TensorProto) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], value=tensor)


@cache
def small_model() -> bytes:
    """Initializers (external and raw), a sparse initializer, a Constant, an If with a Constant in each branch, a
    Loop body, and a function with a Constant and a tensor-valued default attribute."""
    branch = lambda name: helper.make_graph(  # noqa: E731
        [_constant(f"{name}_out", helper.make_tensor(f"{name}_t", TensorProto.INT64, [2], [1, 2]))], name, [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.INT64, [2])])
    sparse = helper.make_sparse_tensor(helper.make_tensor("s_values", TensorProto.FLOAT, [2], [1.0, 2.0]),
                                       helper.make_tensor("s_indices", TensorProto.INT64, [2], [0, 3]), [4])
    nodes = [
        _constant("k", _external("k_external", [2, 2], 24)),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else")),
        helper.make_node("Loop", ["", "cond"], ["z"], body=branch("body")),
        helper.make_node("f", ["w"], ["fw"], domain="local"),
    ]
    graph = helper.make_graph(
        nodes, "small", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [2])],
        initializer=[_external("w", [2, 3], 0), helper.make_tensor("b", TensorProto.INT64, [3], [1, 2, 3])],
        sparse_initializer=[sparse])
    function = helper.make_function("local", "f", ["x"], ["fx"],
                                    [_constant("fx", helper.make_tensor("f_t", TensorProto.FLOAT, [1], [0.5]))],
                                    [helper.make_opsetid("", 22)])
    function.attribute_proto.append(helper.make_attribute("scale", helper.make_tensor("f_default", TensorProto.FLOAT,
                                                                                      [1], [2.0])))
    model = helper.make_model(graph, functions=[function], opset_imports=[helper.make_opsetid("", 22),
                                                                          helper.make_opsetid("local", 1)])
    return model.SerializeToString()


# -- what protobuf sees, as the reader reports it -----------------------------------------------------------------
def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value  # proto2: bytes if not UTF-8


def _view(name, data_type, dims, data_location, external) -> tuple:
    return _text(name), data_type, tuple(dims), data_location, tuple(sorted(external.items()))


def protobuf_tensors(data: bytes) -> Counter | None:
    """Every tensor ONNX Runtime would load, as protobuf parses ``data`` (None if it does not)."""
    try:
        model = onnx.ModelProto.FromString(data)
    except (DecodeError, RecursionError):
        return None
    seen: Counter = Counter()

    def tensor(t: TensorProto) -> None:
        external = {}
        for e in t.external_data:
            external[_text(e.key)] = _text(e.value)
        seen[_view(t.name, t.data_type, t.dims, t.data_location, external)] += 1

    def sparse(s) -> None:
        if s.HasField("values"):
            tensor(s.values)
        if s.HasField("indices"):
            tensor(s.indices)

    def attribute(a) -> None:
        if a.HasField("t"):
            tensor(a.t)
        for t in a.tensors:
            tensor(t)
        if a.HasField("g"):
            graph(a.g)
        for g in a.graphs:
            graph(g)
        if a.HasField("sparse_tensor"):
            sparse(a.sparse_tensor)
        for s in a.sparse_tensors:
            sparse(s)

    def graph(g) -> None:
        for t in g.initializer:
            tensor(t)
        for s in g.sparse_initializer:
            sparse(s)
        for n in g.node:
            for a in n.attribute:
                attribute(a)

    if not model.HasField("graph"):
        return None
    graph(model.graph)
    for f in model.functions:
        for n in f.node:
            for a in n.attribute:
                attribute(a)
        for a in f.attribute_proto:
            attribute(a)
    return seen


# -- the property -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(*_):
        raise TimeoutError(f"the reader ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def read(data: bytes):
    """``model_tensors(data)`` held to the contract: tensors or one WireError line (None), in bounded time and
    memory, ``nbytes()`` of every tensor included (the folder check calls it on every external one)."""
    tracemalloc.start()
    try:
        with time_limit(TIME_LIMIT_S):
            try:
                tensors = model_tensors(data)
                for t in tensors:
                    t.nbytes()
            except WireError as exc:
                message = str(exc)
                assert message and "\n" not in message, repr(message)
                tensors = None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= MEMORY_FLOOR + MEMORY_PER_BYTE * len(data), f"{peak} bytes for {len(data)} bytes of input"
    return tensors


def check(data: bytes) -> None:
    """The contract, and the same tensors as protobuf where both accept the bytes."""
    tensors = read(data)
    if tensors is None:
        return
    expected = protobuf_tensors(data)
    if expected is None:
        return
    ours = Counter(_view(t.name, t.data_type, t.dims, t.data_location, t.external) for t in tensors)
    assert ours == expected


# -- strategies ---------------------------------------------------------------------------------------------------
HUGE = st.one_of(st.integers(0, 2**70), st.sampled_from([2**31, 2**32, 2**32 + 1, 2**63, 2**64 - 1, 2**64 + 1,
                                                          2**64 + 5, 2**65 + 5, 2**70 - 1]))
VALUES = st.one_of(st.integers(0, 30), HUGE)
POSITION = st.integers(0, 2**31)  # taken modulo a length
# field numbers the reader looks at, anywhere in ModelProto, GraphProto, NodeProto, AttributeProto, TensorProto,
# SparseTensorProto, FunctionProto and their entries; and a few it does not
FIELD_NUMBERS = [0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 13, 14, 15, 22, 23, 25, 3, 9, 20, 2**29 - 1]
STRINGS = st.sampled_from([b"location", b"offset", b"length", b"model.onnx.data", b"../outside", b"0", b"4",
                           b"18446744073709551616", b"w", b"\xff\xfe", b""])
LEAF = st.one_of(
    st.tuples(st.sampled_from(FIELD_NUMBERS), st.just(0), VALUES),
    st.tuples(st.sampled_from(FIELD_NUMBERS), st.just(1), st.binary(min_size=8, max_size=8)),
    st.tuples(st.sampled_from(FIELD_NUMBERS), st.just(5), st.binary(min_size=4, max_size=4)),
    st.tuples(st.sampled_from(FIELD_NUMBERS), st.just(2), st.one_of(STRINGS, st.binary(max_size=12))),
)
LEAF = st.one_of(  # and now and then a wire type ONNX lacks, or field number 0: the whole message is refused
    LEAF, st.tuples(st.sampled_from(FIELD_NUMBERS), st.sampled_from([3, 4, 6, 7]), st.just(0)))
WELL_FORMED_LEAF = st.one_of(  # what a message may hold besides the fields its type has
    st.tuples(st.sampled_from(FIELD_NUMBERS[1:]), st.just(0), VALUES),
    st.tuples(st.sampled_from(FIELD_NUMBERS[1:]), st.just(2), st.one_of(STRINGS, st.binary(max_size=12))))


def encode(fields: list) -> bytes:
    """A message from (number, wire type, value) fields; a length-delimited value is bytes or a list of fields."""
    out = bytearray()
    for number, wire, value in fields:
        if wire == 0:
            out += vi(number, value)
        elif wire == 2:
            out += ld(number, encode(value) if isinstance(value, list) else value)
        elif wire in (1, 5):
            out += tag(number, wire) + value
        else:
            out += tag(number, wire)
    return bytes(out)


def decode(data: bytes, depth: int = 0) -> list | None:
    """The fields of a message (None if the bytes are not one); a length-delimited value that parses as a message
    is taken as one (a string may be too: re-encoding is the same bytes either way)."""
    fields, pos = [], 0

    def number_at(pos: int) -> tuple[int, int]:
        value = shift = 0
        while pos < len(data):
            value |= (data[pos] & 0x7F) << shift
            shift, pos = shift + 7, pos + 1
            if not data[pos - 1] & 0x80:
                return value, pos
        raise IndexError

    try:
        while pos < len(data):
            key, pos = number_at(pos)
            number, wire = key >> 3, key & 7
            if number == 0:
                return None
            if wire == 0:
                value, pos = number_at(pos)
            elif wire in (1, 5):
                size = 8 if wire == 1 else 4
                value, pos = data[pos:pos + size], pos + size
            elif wire == 2:
                length, pos = number_at(pos)
                value, pos = data[pos:pos + length], pos + length
                inner = decode(value, depth + 1) if value and depth < 40 else None
                value = value if inner is None else inner
            else:
                return None
            if pos > len(data):
                return None
            fields.append((number, wire, value))
    except IndexError:
        return None
    return fields


def messages(fields: list) -> list[list]:
    """Every message in a decoded tree, the top one first."""
    found = [fields]
    for _, wire, value in fields:
        if wire == 2 and isinstance(value, list):
            found += messages(value)
    return found


@st.composite
def mutated(draw) -> bytes:
    """The small model, changed byte by byte or field by field (the fields re-encoded with correct lengths)."""
    if draw(st.booleans()):
        return draw(field_mutated())
    data = bytearray(small_model())
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert_varint", "huge_length", "insert_field",
                                     "duplicate"]))
        at = draw(POSITION) % (len(data) + 1)
        if kind == "flip" and data:
            data[at % len(data)] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert_varint":
            data[at:at] = varint(draw(HUGE))
        elif kind == "huge_length":  # the varint starting here (a length, a tag, a value) becomes a huge one
            end = at
            while end < len(data) and data[end] & 0x80:
                end += 1
            data[at:end + 1] = varint(draw(HUGE))
        elif kind == "insert_field":  # a whole field claiming a huge length, with a few real bytes after it
            data[at:at] = tag(draw(st.sampled_from(FIELD_NUMBERS)), 2) + varint(draw(HUGE)) + draw(
                st.binary(max_size=8))
        elif kind == "duplicate":  # a slice copied elsewhere
            start = draw(POSITION) % (len(data) + 1)
            data[at:at] = data[start:start + draw(st.integers(1, 64))]
    return bytes(data)


@st.composite
def field_mutated(draw) -> bytes:
    tree = decode(small_model())
    for _ in range(draw(st.integers(1, 3))):
        found = messages(tree)
        message = found[draw(POSITION) % len(found)]
        kind = draw(st.sampled_from(["repeat", "split", "delete", "set_varint", "rewire", "move", "insert"]))
        if not message:
            message.append(draw(LEAF))
            continue
        i = draw(POSITION) % len(message)
        number, wire, value = message[i]
        if kind == "repeat":  # the field again, elsewhere in its message: a singular one is merged, or replaced
            message.insert(draw(POSITION) % (len(message) + 1), (number, wire, value))
        elif kind == "split" and wire == 2 and isinstance(value, list) and value:  # one message field as two
            cut = draw(POSITION) % (len(value) + 1)
            message[i:i + 1] = [(number, 2, value[:cut]), (number, 2, value[cut:])]
        elif kind == "delete":
            del message[i]
        elif kind == "set_varint" and wire == 0:
            message[i] = (number, 0, draw(VALUES))
        elif kind == "rewire":  # the same number under another wire type
            message[i] = (number, *draw(st.sampled_from([(0, 1), (1, b"\x01" * 8), (5, b"\x01" * 4), (2, b"\x01")])))
        elif kind == "move":  # a field into another message (an external_data entry into another tensor, ...)
            target = found[draw(POSITION) % len(found)]
            del message[i]
            target.insert(draw(POSITION) % (len(target) + 1), (number, wire, value))
        else:
            message.insert(i, draw(LEAF))
    return encode(tree)


# -- ONNX-shaped messages, generated field by field -----------------------------------------------------------------
def _shuffled(draw, fields: list) -> list:
    """The fields in a drawn order (a later occurrence of a field replaces or merges into an earlier one)."""
    if len(fields) > 1:
        draw(st.randoms(use_true_random=False)).shuffle(fields)
    return fields


def _noise(draw) -> list:
    if draw(st.integers(0, 3)):
        return []
    return draw(st.lists(LEAF if draw(st.integers(0, 9)) == 0 else WELL_FORMED_LEAF, max_size=2))


@st.composite
def tensor_fields(draw) -> list:
    fields = []
    for _ in range(draw(st.integers(0, 3))):  # dims: unpacked, packed, or under a wire type dims never have
        shape = draw(st.sampled_from(["varint", "packed", "fixed"]))
        dims = draw(st.lists(VALUES if draw(st.integers(0, 4)) == 0 else st.integers(0, 6), min_size=1, max_size=3))
        if shape == "varint":
            fields += [(1, 0, d) for d in dims]
        elif shape == "packed":
            fields.append((1, 2, b"".join(varint(d) for d in dims)))
        else:
            fields.append((1, 5, (dims[0] % 2**32).to_bytes(4, "little")))
    for _ in range(draw(st.integers(0, 2))):
        fields.append((2, 0, draw(st.one_of(st.sampled_from([0, 1, 7, 16, 21, 2**32 + 1, 2**64 + 1]), VALUES))))
    for _ in range(draw(st.integers(0, 2))):
        fields.append((8, 2, draw(STRINGS)))
    for _ in range(draw(st.integers(0, 2))):
        fields.append((14, 0, draw(st.sampled_from([0, 1, 2, 7, 2**31, 2**32 + 1, 2**64 + 1]))))
    for _ in range(draw(st.integers(0, 3))):
        key = [(1, 2, draw(st.sampled_from([b"location", b"offset", b"length", b"x"])))]
        value = [(2, 2, draw(STRINGS))]
        fields.append((13, 2, _shuffled(draw, key * draw(st.integers(0, 2)) + value * draw(st.integers(0, 2)))))
    return _shuffled(draw, fields + _noise(draw))


@st.composite
def sparse_fields(draw) -> list:
    fields = [(number, 2, draw(tensor_fields())) for number in (1, 2) for _ in range(draw(st.integers(0, 2)))]
    return _shuffled(draw, fields + _noise(draw))


@st.composite
def graph_fields(draw, depth: int) -> list:
    fields = [(5, 2, draw(tensor_fields())) for _ in range(draw(st.integers(0, 2)))]
    fields += [(15, 2, draw(sparse_fields())) for _ in range(draw(st.integers(0, 1)))]
    fields += [(1, 2, draw(node_fields(depth))) for _ in range(draw(st.integers(0, 1)))]
    return _shuffled(draw, fields + _noise(draw))


@st.composite
def attribute_fields(draw, depth: int) -> list:
    fields = [(1, 2, b"value")]
    fields += [(5, 2, draw(tensor_fields())) for _ in range(draw(st.integers(0, 2)))]  # t: merged when repeated
    fields += [(10, 2, draw(tensor_fields())) for _ in range(draw(st.integers(0, 1)))]  # tensors
    for number in (22, 23):  # sparse_tensor, sparse_tensors
        fields += [(number, 2, draw(sparse_fields())) for _ in range(draw(st.integers(0, 1)))]
    if depth < 1:  # one level of subgraphs here; test_deep_nesting goes deeper
        for number in (6, 11):  # g, graphs
            fields += [(number, 2, draw(graph_fields(depth + 1))) for _ in range(draw(st.integers(0, 1)))]
    return _shuffled(draw, fields + _noise(draw))


@st.composite
def node_fields(draw, depth: int) -> list:
    fields = [(4, 2, b"Constant")] + [(5, 2, draw(attribute_fields(depth))) for _ in range(draw(st.integers(0, 2)))]
    return _shuffled(draw, fields + _noise(draw))


@st.composite
def generated(draw) -> bytes:
    """A ModelProto: graphs (repeated, so merged), functions with nodes and default attributes, and noise."""
    fields = [(1, 0, 10)] + [(7, 2, draw(graph_fields(0))) for _ in range(draw(st.integers(1, 2)))]
    for _ in range(draw(st.integers(0, 1))):
        function = [(7, 2, draw(node_fields(1))) for _ in range(draw(st.integers(0, 2)))]
        function += [(11, 2, draw(attribute_fields(1))) for _ in range(draw(st.integers(0, 1)))]
        fields.append((25, 2, function))
    return encode(_shuffled(draw, fields + _noise(draw)))


# -- the properties -----------------------------------------------------------------------------------------------
def test_the_small_model_is_read_like_protobuf_reads_it():
    """The twin of every property below: the unmutated model parses, with all its tensors, as protobuf sees them."""
    tensors = read(small_model())
    names = {t.name for t in tensors}
    assert {"w", "b", "s_values", "s_indices", "k_external", "then_t", "else_t", "body_t", "f_t",
            "f_default"} <= names
    assert sorted(t.nbytes() for t in tensors if t.is_external) == [16, 24]
    check(small_model())


@seed(20261204)
@SETTINGS
@given(data=st.binary(max_size=2048))
def test_random_bytes(data):
    check(data)


@seed(20261204)
@SETTINGS
@given(data=mutated())
def test_mutations_of_a_real_model(data):
    check(data)


@seed(20261204)
@settings(SETTINGS, max_examples=150)  # each example is larger: the same few seconds as the others
@given(data=generated())
def test_generated_wire_format(data):
    check(data)


@seed(20261204)
@settings(SETTINGS, max_examples=50)
@given(depth=st.integers(MAX_DEPTH - 2, MAX_DEPTH + 3), wrap=st.sampled_from(["graph", "function"]))
def test_deep_nesting(depth, wrap):
    """Subgraphs inside subgraphs: refused past MAX_DEPTH, read below it, never a RecursionError."""
    graph = ld(5, ld(8, b"deep"))  # an initializer at the bottom
    for _ in range(depth):
        graph = ld(1, ld(5, ld(6, graph)))  # node { attribute { g { ... } } }
    data = graph_model(graph) if wrap == "graph" else graph_model(b"") + ld(25, ld(7, ld(5, ld(6, graph))))
    tensors = read(data)
    levels = depth + (2 if wrap == "function" else 0)  # a function's nodes are depth 1, their subgraphs 2
    assert (tensors is None) == (levels > MAX_DEPTH), (depth, wrap)


# -- what the fuzzer found, kept ----------------------------------------------------------------------------------
# -- what the fuzzer found, kept ----------------------------------------------------------------------------------
# Each was a tensor the reader saw otherwise than protobuf (and so ONNX Runtime) does: the folder check then
# checked a tensor ONNX Runtime never loads, and not the one it loads.
T_EXTERNAL = (ld(8, b"k") + vi(2, TensorProto.FLOAT) + vi(1, 1) + vi(14, TensorProto.EXTERNAL)
              + entry("location", "model.onnx.data") + entry("offset", "0") + entry("length", "4"))
OUTSIDE = entry("location", "../outside")


def attribute_model(*fields: bytes) -> bytes:
    """A model whose one node is a Constant with one attribute made of ``fields``."""
    return graph_model(ld(1, constant_node(ld(1, b"value") + vi(20, 4) + b"".join(fields))))


@pytest.mark.parametrize("layout", ["t", "sparse_tensor", "sparse_values"])
def test_a_singular_tensor_given_twice_is_one_tensor(layout):
    """Found by the fuzzer (the small model's Constant with its value tensor given twice): protobuf merges the
    occurrences of a singular message field, so ONNX Runtime sees one tensor, whose later location replaces the
    earlier; the reader saw two, checked the first and skipped the second (not external), so '../outside' went
    unchecked. The same for an attribute's sparse_tensor and a sparse tensor's values. Twin: given once."""
    twice = {"t": ld(5, T_EXTERNAL) + ld(5, OUTSIDE),
             "sparse_tensor": ld(22, ld(1, T_EXTERNAL)) + ld(22, ld(1, OUTSIDE)),
             "sparse_values": ld(22, ld(1, T_EXTERNAL) + ld(1, OUTSIDE))}[layout]
    (tensor,) = read(attribute_model(twice))
    assert tensor.is_external and tensor.external["location"] == "../outside" and tensor.nbytes() == 4
    check(attribute_model(twice))
    once = ld(5, T_EXTERNAL) if layout == "t" else ld(22, ld(1, T_EXTERNAL))
    (tensor,) = read(attribute_model(once))
    assert tensor.external["location"] == "model.onnx.data"


@pytest.mark.parametrize(("value", "seen"), [(7, TensorProto.EXTERNAL), (2**32 + TensorProto.DEFAULT, 0),
                                             (2**32 + TensorProto.EXTERNAL, TensorProto.EXTERNAL)])
def test_data_location_is_read_as_its_enum(value, seen):
    """Found by the fuzzer (data_location 2): onnx.proto's enums are closed, so protobuf leaves a value the enum
    lacks out of the field (EXTERNAL, set before, stays), and an enum is an int32 (2**32 + 1 is EXTERNAL). The reader
    took 7 and 2**32 + 1 as they were: not EXTERNAL, so the location was never checked."""
    data = graph_model(ld(5, T_EXTERNAL + vi(14, value)))
    (tensor,) = read(data)
    assert tensor.data_location == seen
    check(data)


@pytest.mark.parametrize(("field", "dims"), [(tag(1, 5) + b"\x07\x00\x00\x00", []), (vi(1, 2**64 + 5), [5]),
                                             (vi(1, 2**65 + 5), [5]), (vi(1, 2**64 - 1), [-1]), (vi(1, 7), [7])],
                         ids=["fixed32", "2**64+5", "2**65+5", "2**64-1", "plain"])
def test_dims_are_read_as_int64(field, dims):
    """Found by the fuzzer: a dimension under a fixed wire type is no int64 to protobuf (an unknown field), and a
    10-byte varint keeps its low 64 bits (2**64 + 5 is 5). The reader took both as dimensions, so the length it
    checked was not the one ONNX Runtime reads. Twin: a plain dimension."""
    data = graph_model(ld(5, ld(8, b"w") + vi(2, TensorProto.FLOAT) + field))
    (tensor,) = read(data)
    assert tensor.dims == dims
    check(data)


@pytest.mark.parametrize(("value", "seen"), [(2**32 + TensorProto.FLOAT, TensorProto.FLOAT), (2**31, -(2**31)),
                                             (TensorProto.FLOAT, TensorProto.FLOAT)])
def test_data_type_is_read_as_int32(value, seen):
    """Found by the fuzzer (data_type 2**31): protobuf keeps an int32's low 32 bits. The reader did not, and gave no
    size for a tensor ONNX Runtime reads as FLOAT. Twin: FLOAT itself."""
    data = graph_model(ld(5, ld(8, b"w") + vi(2, value) + vi(1, 3)))
    (tensor,) = read(data)
    assert tensor.data_type == seen and (tensor.nbytes() == 12) == (seen == TensorProto.FLOAT)
    check(data)


def test_a_function_default_attribute_tensor_is_read():
    """Found by the fuzzer (a function with a tensor in attribute_proto): default values of a function's attributes
    are tensors ONNX Runtime loads when it inlines the function; the reader skipped them."""
    function = ld(7, constant_node(ld(1, b"value"))) + ld(11, ld(1, b"scale") + vi(20, 4) + ld(5, T_EXTERNAL + OUTSIDE))
    data = graph_model(b"") + ld(25, function)
    (tensor,) = read(data)
    assert tensor.is_external and tensor.external["location"] == "../outside"
    check(data)


# the fuzzer's own failing examples, as it shrank them (each named by what the reader saw otherwise)
FOUND = {
    "attribute_tensor_given_twice": b"\x08\n:\x00\xca\x01\rZ\x0b\n\x05value*\x00*\x00",
    "fixed32_dimension": b"\x08\n:\x07*\x05\r\x00\x00\x00\x00",
    "varint_past_64_bits": b"\x08\n:\x0f*\r\x08\x00\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x03",
    "data_type_past_32_bits": b"\x08\n:\x0c*\n\x08\x00\x10\x00\x10\x80\x80\x80\x80\x08",
    "data_location_not_in_the_enum": b"\x08\n:\x18*\x16B\x08locationB\x08locationp\x02",
    "function_default_attribute": b"\x08\n:\x00\xca\x01\x0bZ\t\n\x05valueR\x00",
}


@pytest.mark.parametrize("name", list(FOUND))
def test_what_the_fuzzer_found(name):
    check(FOUND[name])


def test_many_dimensions_cost_time_in_proportion_to_the_file():
    """Found by review, not by the fuzzer (its inputs are small): nbytes() multiplied every dimension, so a tensor of
    a million dimensions of 2 (1 MB of packed varints) built a number of a million bits one factor at a time:
    quadratic, minutes for a few MB of model.onnx (2.4 s at 400 KB). A shape of more elements than an int64 counts is
    now refused as it is read, and the product stops there. Twin: the same dimensions and a 0 hold no element."""
    many = ld(8, b"w") + vi(2, TensorProto.FLOAT) + ld(1, b"\x02" * 1_000_000)
    with time_limit(TIME_LIMIT_S):  # without tracemalloc (read() has it): a million appends are slow under it
        with pytest.raises(WireError, match=r"tensor 'w' has 1000000 dimensions whose product is more than "
                                            r"9223372036854775807 elements"):
            model_tensors(graph_model(ld(5, many)))
        (tensor,) = model_tensors(graph_model(ld(5, many + vi(1, 0))))
        assert tensor.nbytes() == 0


def test_a_huge_claimed_length_allocates_nothing():
    """A field claiming 2**62 bytes in a file of a few: refused, within the memory floor (the property above bounds
    every input by its real size; this one says the claim itself costs nothing)."""
    for claim in (2**20, 2**31, 2**62, 2**64 - 1):
        data = graph_model(ld(5, tag(8, 2) + varint(claim) + b"w"))
        tracemalloc.start()
        try:
            with pytest.raises(WireError, match="past the end of its message"):
                model_tensors(data)
            assert tracemalloc.get_traced_memory()[1] < 64 << 10
        finally:
            tracemalloc.stop()
