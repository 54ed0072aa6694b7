"""A thin graph builder on onnx_ir: scoped node names, named outputs, lazy weights.

Every node gets a name made of the scopes it was built in (``vision/blocks.3/attn/qkv``), and so does its
output value, so the graph reads in Netron the way the PyTorch module tree reads. Weights are
``ir.LazyTensor`` initializers: nothing is loaded until the model is saved, one tensor at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

FLOAT = ir.DataType.FLOAT
INT64 = ir.DataType.INT64
INT32 = ir.DataType.INT32
BOOL = ir.DataType.BOOL


def tensor_input(name: str, dtype: ir.DataType, shape: Sequence[int | str | None]) -> ir.Value:
    """A graph input; strings in ``shape`` become symbolic (dynamic) dimensions."""
    dims = [ir.SymbolicDim(d) if isinstance(d, str) or d is None else d for d in shape]
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))


class GraphBuilder:
    """Records nodes with scoped names; owns the graph's initializers."""

    def __init__(self, root_scope: str = "") -> None:
        self._tape = tape.Tape()
        self._scopes: list[str] = [root_scope.strip("/")] if root_scope else []
        self._used: dict[str, int] = {}
        self.initializers: dict[str, ir.Value] = {}

    # -- naming -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()

    def scoped(self, name: str) -> str:
        full = "/".join([*self._scopes, name])
        count = self._used.get(full, 0)
        self._used[full] = count + 1
        return full if count == 0 else f"{full}_{count}"

    @contextlib.contextmanager
    def subgraph(self) -> Iterator[GraphBuilder]:
        """A builder for a subgraph (a Loop body, an If branch): its own nodes, this builder's scopes and names;
        its constants are this builder's initializers, which the subgraph reads from the enclosing graph."""
        child = GraphBuilder.__new__(GraphBuilder)
        child._tape = tape.Tape()
        child._scopes = self._scopes
        child._used = self._used
        child.initializers = self.initializers
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
        node_name = self.scoped(name or op_type)
        out = self._tape.op(op_type, inputs, attributes, domain=domain, name=node_name)
        out.name = node_name
        return out

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
        node_name = self.scoped(name or op_type)
        outs = self._tape.op_multi_out(
            op_type, inputs, attributes, num_outputs=num_outputs, domain=domain, name=node_name
        )
        for i, out in enumerate(outs):
            out.name = f"{node_name}:{i}"
        return outs

    def node(self, node: ir.Node) -> ir.Node:
        """Record a node built by hand (one whose optional outputs stay absent: unnamed values)."""
        node.name = self.scoped(node.name or node.op_type)
        self._tape._nodes.append(node)  # the tape has no public way to add a built node
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
        return self._tape.nodes

    # -- constants and weights ----------------------------------------------------------------------
    def const(self, value: np.ndarray | int | float | Sequence[int], name: str) -> ir.Value:
        """A small constant, stored as an initializer named by scope (deduplicated by name)."""
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        full = self.scoped(name)
        val = ir.Value(name=full, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape))
        val.const_value = ir.tensor(array, name=full)
        self.initializers[full] = val
        return val

    def weight(self, name: str, shape: Sequence[int], load: Callable[[], np.ndarray]) -> ir.Value:
        """A float32 weight loaded lazily by ``load`` when the model is written."""
        full = self.scoped(name)
        lazy = ir.LazyTensor(lambda: ir.tensor(_checked(load(), shape, full), name=full), FLOAT, ir.Shape(shape))
        lazy.name = full
        val = ir.Value(name=full, type=ir.TensorType(FLOAT), shape=ir.Shape(list(shape)))
        val.const_value = lazy
        self.initializers[full] = val
        return val


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
    opset_imports: dict[str, int],
    ir_version: int = 10,
) -> ir.Model:
    graph = ir.Graph(
        inputs,
        outputs,
        nodes=builder.nodes,
        initializers=list(builder.initializers.values()),
        opset_imports=opset_imports,
        name=name,
    )
    return ir.Model(graph, ir_version=ir_version, producer_name="qwen3vl-merge")
