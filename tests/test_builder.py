"""The one graph builder: scoped unique names, one initializer per constant, hand-built nodes, subgraphs that read
the enclosing graph's constants, and nodes added to a graph that exists already (what the stitch passes do)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graphs.builder import FLOAT, INT64, GraphBuilder, make_model, tensor_input
from merge.contract.names import IR_VERSION, MIN_IR_VERSION, OPSET


def _run(model: ir.Model, **feeds: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_names_are_scoped_and_unique_and_constants_shared():
    b = GraphBuilder("part/")
    x = tensor_input("x", INT64, ["n"])
    with b.scope("inner"):
        one = b.const(1, "one")
        assert b.const(1, "one") is one  # same scope, name and value: the same initializer
        assert b.const([1], "one").name == "part/inner/one_1"  # another value: a numbered twin
        y = b.op("Add", [x, one])
        z = b.op("Add", [y, one])
    assert (y.name, z.name) == ("part/inner/Add", "part/inner/Add_1")
    assert b.const(1, "one").name == "part/one"  # another scope: another initializer
    assert one.dtype == INT64 and b.const(0.5, "half").dtype == FLOAT
    model = make_model(b, [x], [z], name="t")
    assert model.opset_imports == {"": OPSET} and model.ir_version == IR_VERSION
    np.testing.assert_array_equal(_run(model, x=np.array([3], np.int64))[0], [5])


def test_hand_built_node_and_multi_output_names():
    b = GraphBuilder("p")
    x = tensor_input("x", FLOAT, [4])
    node = b.node(ir.node("TopK", [x, b.const([2], "k")], num_outputs=2, name="top"))
    assert node.name == "p/top" and list(b.nodes) == [node]
    with pytest.raises(ValueError, match="belongs to a graph"):
        b.node(ir.Graph([], [], nodes=[ir.node("Identity", [x])]).node(0))
    values, indices = b.op_multi("TopK", [x, b.const([2], "k")], num_outputs=2, name="top")
    assert (values.name, indices.name) == ("p/top_1:0", "p/top_1:1")


def test_subgraph_reads_the_enclosing_graphs_constants():
    b = GraphBuilder("p")
    x = tensor_input("x", INT64, [1])
    with b.subgraph() as then_b:
        then_out = then_b.op("Add", [x, then_b.const([10], "ten")], name="plus_ten")
        then_branch = then_b.graph("then", [then_out])
    with b.subgraph() as else_b:
        else_branch = else_b.graph("else", [else_b.op("Identity", [x], name="same")])
    assert not then_branch.initializers and "p/ten" in b.initializers  # the constant stays in the main graph
    cond = b.op("Squeeze", [b.op("Greater", [x, b.const([0], "zero")])], name="positive")
    out = b.op("If", [cond], {"then_branch": then_branch, "else_branch": else_branch}, name="if")
    model = make_model(b, [x], [out], name="t")
    assert then_branch.name == "p/then"
    np.testing.assert_array_equal(_run(model, x=np.array([2], np.int64))[0], [12])
    np.testing.assert_array_equal(_run(model, x=np.array([-2], np.int64))[0], [-2])


def test_add_to_an_existing_graph_before_a_node():
    x = tensor_input("x", INT64, [1])
    last = ir.node("Neg", [x], name="neg")
    last.outputs[0].name = "y"
    graph = ir.Graph([x], [last.outputs[0]], nodes=[last], opset_imports={"": OPSET})
    b = GraphBuilder("pass")
    doubled = b.op("Mul", [x, b.const([2], "two")], name="double")
    b.add_to(graph, before=last)
    last.replace_input_with(0, doubled)
    assert [n.name for n in graph] == ["pass/double", "neg"] and not b.nodes
    assert graph.initializers["pass/two"].const_value is not None
    b.add_to(graph)  # nothing new: no node added, the constant registered again is a no-op
    np.testing.assert_array_equal(_run(ir.Model(graph, ir_version=IR_VERSION), x=np.array([3], np.int64))[0], [-6])


def test_add_to_a_subgraph_puts_the_constants_in_the_main_graph():
    main = ir.Graph([], [], nodes=[], opset_imports={"": OPSET})
    branch = ir.Graph([], [], nodes=[])
    b = GraphBuilder("p")
    b.op("Identity", [b.const([1.0], "one")])
    b.add_to(branch, initializers_to=main)
    assert len(branch) == 1 and not branch.initializers and list(main.initializers) == ["p/one"]


def test_make_model_takes_the_ir_version_of_its_opset():
    b = GraphBuilder()
    x = tensor_input("x", FLOAT, [1])
    model = make_model(b, [x], [b.op("Identity", [x])], name="t", opset_imports={"": 23})
    assert model.ir_version == MIN_IR_VERSION[23]
    with pytest.raises(ValueError, match="opset 17"):
        make_model(b, [x], [x], name="t", opset_imports={"": 17})
