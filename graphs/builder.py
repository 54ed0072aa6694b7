"""The one graph builder on onnx_ir: scoped node names, named outputs, constants and lazy weights as initializers.

Every node gets a name made of the scopes it was built in (``vision/blocks.3/attn/qkv``), and so does its
output value, so the graph reads in Netron the way the PyTorch module tree reads. A name used twice in one scope
gets a numbered twin (``.../Add``, ``.../Add_1``): no caller makes names unique by hand. Constants are
initializers named by scope, one per scope, name and value; weights are ``ir.LazyTensor`` initializers:
nothing is loaded until the model is saved, one tensor at a time.

The same builder writes a whole part (:func:`make_model`), an ``If`` branch or a ``Loop`` body
(:meth:`GraphBuilder.subgraph`, then :meth:`GraphBuilder.graph`), or a few nodes into a graph that exists
already (:meth:`GraphBuilder.add_to`: what the stitch passes do)::

    b = GraphBuilder("merge/checks")
    rows = b.op("Shape", [input_ids], {"start": 0, "end": 1}, name="input_ids_rows")
    b.add_to(model.graph)            # nodes appended, constants registered as the graph's initializers
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx_ir as ir

from merge.contract.names import MIN_IR_VERSION, OPSET, TOOL_NAME

FLOAT = ir.DataType.FLOAT
FLOAT16 = ir.DataType.FLOAT16
INT64 = ir.DataType.INT64
INT32 = ir.DataType.INT32
BOOL = ir.DataType.BOOL


def tensor_input(name: str, dtype: ir.DataType, shape: Sequence[int | str | None], *,
                 optional: bool = False) -> ir.Value:
    """A graph's (or a subgraph's) input: strings and ``None`` in ``shape`` become symbolic (dynamic) dimensions.
    ``optional``: of ONNX's type ``optional(tensor(dtype))``, which a call may leave out."""
    dims = [ir.SymbolicDim(d) if isinstance(d, str) or d is None else d for d in shape]
    kind = ir.OptionalType(ir.TensorType(dtype)) if optional else ir.TensorType(dtype)
    return ir.Value(name=name, type=kind, shape=ir.Shape(dims))


def initializer(name: str, tensor: ir.TensorProtocol) -> ir.Value:
    """A value that holds ``tensor`` (an ``ir.LazyTensor`` too: nothing is read until the model is written), named
    ``name``, of the tensor's type and shape; register it in a graph to make it an initializer."""
    tensor.name = name
    return ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(list(tensor.shape)),
                    const_value=tensor)


class GraphBuilder:
    """Records nodes with scoped names, and the constants and weights they read (:attr:`initializers`)."""

    def __init__(self, root_scope: str = "") -> None:
        self._nodes: list[ir.Node] = []
        self._scopes: list[str] = [root_scope.strip("/")] if root_scope.strip("/") else []
        self._used: dict[str, int] = {}
        self._constants: dict[tuple, ir.Value] = {}
        self.initializers: dict[str, ir.Value] = {}
        self._is_subgraph = False

    # -- naming -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Names built inside start with ``name/`` (after the enclosing scopes)."""
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()

    def scoped(self, name: str) -> str:
        """A new unique name: the scopes, then ``name`` (``name_1``, ``name_2`` ... when taken)."""
        full = self._full(name)
        count = self._used.get(full, 0)
        self._used[full] = count + 1
        return full if count == 0 else f"{full}_{count}"

    def _full(self, name: str) -> str:
        return "/".join([*self._scopes, name])

    @contextlib.contextmanager
    def subgraph(self) -> Iterator[GraphBuilder]:
        """A builder for a subgraph (a Loop body, an If branch): its own nodes, this builder's scopes and names.
        Its constants and weights are this builder's initializers, which ONNX lets a subgraph read from the
        enclosing graph by name; :meth:`graph` makes the subgraph."""
        child = GraphBuilder.__new__(GraphBuilder)
        child._nodes = []
        child._scopes = self._scopes
        child._used = self._used
        child._constants = self._constants
        child.initializers = self.initializers
        child._is_subgraph = True
        yield child

    # -- nodes --------------------------------------------------------------------------------------
    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attributes: dict | None = None,
        *,
        name: str | None = None,
        domain: str = "",
    ) -> ir.Value:
        """One node with one output; node and output are both named ``scope/name`` (``name`` defaults to
        ``op_type``)."""
        return self.op_multi(op_type, inputs, attributes, num_outputs=1, name=name, domain=domain)[0]

    def op_multi(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attributes: dict | None = None,
        *,
        num_outputs: int,
        name: str | None = None,
        domain: str = "",
    ) -> Sequence[ir.Value]:
        """One node with ``num_outputs`` outputs, named ``scope/name:0``, ``scope/name:1`` ... (one output: the
        node's name)."""
        node = self.node(ir.node(op_type, list(inputs), attributes, domain=domain, num_outputs=num_outputs,
                                 name=name or op_type))
        if num_outputs == 1:
            node.outputs[0].name = node.name
        else:
            for i, out in enumerate(node.outputs):
                out.name = f"{node.name}:{i}"
        return node.outputs

    def node(self, node: ir.Node) -> ir.Node:
        """Record a node built by hand (one whose optional outputs stay absent: unnamed values, say). Its name
        (default its op type) is put in scope and made unique; its outputs keep theirs."""
        if node.graph is not None:
            raise ValueError(f"node {node.name!r} belongs to a graph already")
        node.name = self.scoped(node.name or node.op_type)
        self._nodes.append(node)
        return node

    def check_equal(self, what: str, a: ir.Value, b: ir.Value) -> ir.Value:
        """An int64 scalar 0 that exists only if ``a == b`` (int64 [1] each); otherwise the session fails, naming the
        node ``.../checks/{what}`` and both numbers ("Input shape:{a}, requested shape:{b}"): a contract check any
        ONNX Runtime client gets. Add the result to a value on the data path so that no optimizer drops it."""
        zeros = self.op("ConstantOfShape", [a], {"value": ir.tensor(np.zeros(1, np.int32))}, name=f"checks/{what}_a")
        checked = self.op("Reshape", [zeros, b], {"allowzero": 1}, name=f"checks/{what}")  # 0 means 0
        total = self.op("ReduceSum", [checked], {"keepdims": 0}, name=f"checks/{what}_passed")
        return self.op("Cast", [total], {"to": INT64}, name=f"checks/{what}_zero")

    @property
    def nodes(self) -> Sequence[ir.Node]:
        """The nodes recorded (and not yet moved by :meth:`add_to`), in order."""
        return tuple(self._nodes)

    # -- constants and weights ----------------------------------------------------------------------
    def const(self, value: np.ndarray | int | float | Sequence[int], name: str) -> ir.Value:
        """A constant as an initializer named ``scope/name``; the same name and value again in the same scope is
        the same initializer. Python ints are int64 (on every platform and NumPy), floats float32 (float64 arrays
        too); a NumPy value keeps its type otherwise."""
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        elif array.dtype.kind == "i" and not isinstance(value, np.ndarray | np.generic):
            array = array.astype(np.int64)
        key = (self._full(name), array.dtype.str, array.shape, array.tobytes())
        if key in self._constants:
            return self._constants[key]
        full = self.scoped(name)
        val = initializer(full, ir.tensor(array))
        self.initializers[full] = val
        self._constants[key] = val
        return val

    def weight(self, name: str, shape: Sequence[int], load: Callable[[], np.ndarray]) -> ir.Value:
        """A float32 weight loaded lazily by ``load`` when the model is written."""
        full = self.scoped(name)
        val = initializer(full, ir.LazyTensor(lambda: ir.tensor(_checked(load(), shape, full), name=full), FLOAT,
                                              ir.Shape(shape)))
        self.initializers[full] = val
        return val

    # -- out of the builder -------------------------------------------------------------------------
    def graph(self, name: str, outputs: Sequence[ir.Value], inputs: Sequence[ir.Value] = ()) -> ir.Graph:
        """The recorded nodes as a graph named ``scope/name``. A subgraph's (see :meth:`subgraph`) reads its
        constants from the enclosing graph; a top-level builder's graph holds them as its initializers."""
        return ir.Graph(
            list(inputs),
            list(outputs),
            nodes=self._nodes,
            initializers=[] if self._is_subgraph else list(self.initializers.values()),
            name=self.scoped(name),
        )

    def add_to(
        self,
        graph: ir.Graph,
        *,
        before: ir.Node | None = None,
        after: ir.Node | None = None,
        initializers_to: ir.Graph | None = None,
    ) -> None:
        """Move the recorded nodes into ``graph``: at its end, or just ``before`` or ``after`` one of its nodes. The
        constants and weights become initializers of ``initializers_to`` (default ``graph``; give the main graph
        when ``graph`` is a subgraph). The builder can record more nodes and add them later."""
        if before is not None and after is not None:
            raise ValueError("add_to takes before or after, not both")
        nodes, self._nodes = self._nodes, []
        if before is not None:
            graph.insert_before(before, nodes)
        elif after is not None:
            graph.insert_after(after, nodes)
        else:
            graph.extend(nodes)
        target = initializers_to if initializers_to is not None else graph
        for value in self.initializers.values():
            target.register_initializer(value)  # again for one registered before: a no-op


def _checked(array: np.ndarray, shape: Sequence[int], name: str) -> np.ndarray:
    array = np.ascontiguousarray(array, dtype=np.float32)
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"weight {name}: expected shape {tuple(shape)}, loaded {tuple(array.shape)}")
    return array


def make_model(
    builder: GraphBuilder,
    inputs: Sequence[ir.Value],
    outputs: Sequence[ir.Value],
    *,
    name: str,
    opset_imports: dict[str, int] | None = None,
    ir_version: int | None = None,
) -> ir.Model:
    """The builder's nodes and initializers as a model. ``opset_imports`` defaults to the contract's opset alone;
    ``ir_version`` to the smallest IR version that carries the default-domain opset."""
    opset_imports = dict(opset_imports or {"": OPSET})
    opset = opset_imports.get("", OPSET)
    if opset not in MIN_IR_VERSION:
        raise ValueError(f"no known IR version carries default-domain opset {opset} (known: {sorted(MIN_IR_VERSION)})")
    graph = ir.Graph(
        inputs,
        outputs,
        nodes=builder.nodes,
        initializers=list(builder.initializers.values()),
        opset_imports=opset_imports,
        name=name,
    )
    return ir.Model(graph, ir_version=ir_version or MIN_IR_VERSION[opset], producer_name=TOOL_NAME)
