"""Stitch passes on graphs of a few nodes: what each one rewrites, checked by running the graph, with a twin that
must fail; and how the pass manager surfaces a pass's error. (tests/test_passes.py runs them on the tiny decoder.)"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from merge.contract.names import (
    COMBINED_INPUTS,
    IR_VERSION,
    LOGITS,
    OPSET,
    ROPE_DELTAS_OUT,
    deepstack_add,
    deepstack_term,
    mlp_output,
)
from merge.errors import MergeError
from merge.stitch.passes import StitchError, StitchPass, run_passes
from merge.stitch.passes.inject_deepstack import InjectDeepStack
from merge.stitch.passes.set_interface import SetInterface

FLOAT, INT64 = ir.DataType.FLOAT, ir.DataType.INT64


def _value(name: str, dtype: ir.DataType = FLOAT, shape=("n", 4)) -> ir.Value:
    dims = [ir.SymbolicDim(d) if isinstance(d, str) else d for d in shape]
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))


def _node(op: str, inputs, name: str) -> ir.Node:
    node = ir.node(op, list(inputs), name=name)
    node.outputs[0].name = name
    node.outputs[0].type, node.outputs[0].shape = inputs[0].type, inputs[0].shape
    return node


def _model(inputs, nodes, outputs) -> ir.Model:
    graph = ir.Graph(inputs, outputs, nodes=nodes, opset_imports={"": OPSET}, name="units")
    return ir.Model(graph, ir_version=IR_VERSION)


def _run(model: ir.Model, tmp_path, feeds: dict) -> list[np.ndarray]:
    path = tmp_path / "units.onnx"
    ir.save(model, path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


# -- InjectDeepStack -----------------------------------------------------------------------------------------------

def _two_layers() -> ir.Model:
    """x -> layer k's "MLP" (Neg, its output named as the decoder names it) -> the next layer's reader (Relu); the
    DeepStack terms are inputs here (the embedding merge makes them in the combined graph)."""
    x = _value("x")
    terms = [_value(deepstack_term(k)) for k in range(2)]
    nodes, hidden = [], x
    for k in range(2):
        mlp = _node("Neg", [hidden], f"decoder/layers.{k}/mlp/down_proj")
        mlp.outputs[0].name = mlp_output(k)
        reader = _node("Relu", [mlp.outputs[0]], f"decoder/layers.{k + 1}/input_norm")
        nodes += [mlp, reader]
        hidden = reader.outputs[0]
    return _model([x, *terms], nodes, [hidden])


def test_inject_deepstack_adds_each_level_after_its_layer(tmp_path):
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((3, 4)).astype(np.float32),
             **{deepstack_term(k): rng.standard_normal((3, 4)).astype(np.float32) for k in range(2)}}
    x, t0, t1 = feeds["x"], feeds[deepstack_term(0)], feeds[deepstack_term(1)]
    expected = np.maximum(-np.maximum(-x + t0, 0) + t1, 0)

    model = run_passes(_two_layers(), [InjectDeepStack(num_layers=2, num_levels=2)])
    assert [n.name for n in model.graph if n.op_type == "Add"] == [deepstack_add(0), deepstack_add(1)]
    np.testing.assert_allclose(_run(model, tmp_path, feeds)[0], expected, rtol=1e-6)

    twin = run_passes(_two_layers(), [InjectDeepStack(num_layers=2, num_levels=1)])  # level 1 left out
    assert np.abs(_run(twin, tmp_path, feeds)[0] - expected).max() > 1e-2


def test_inject_deepstack_refuses_an_anchor_that_feeds_nothing():
    model = _two_layers()
    reader = next(n for n in model.graph if n.name == "decoder/layers.1/input_norm")
    reader.replace_input_with(0, model.graph.inputs[0])  # layer 0's MLP output now feeds nothing
    with pytest.raises(StitchError, match=r"InjectDeepStack: 'decoder/layers.0/mlp/output' feeds nothing"):
        run_passes(model, [InjectDeepStack(num_layers=2, num_levels=2)])


def test_inject_deepstack_refuses_more_levels_than_layers():
    with pytest.raises(StitchError, match=r"3 DeepStack levels but only 2 decoder layers"):
        run_passes(_two_layers(), [InjectDeepStack(num_layers=2, num_levels=3)])


# -- SetInterface --------------------------------------------------------------------------------------------------

def _unordered_interface() -> ir.Model:
    inputs = [_value(name, INT64, ("b", "s")) for name in reversed(COMBINED_INPUTS)]
    inputs.insert(2, _value("past_key_values.0.key"))
    logits = _node("Identity", [inputs[0]], LOGITS)
    present = _node("Identity", [inputs[2]], "present.0.key")
    deltas = _node("Identity", [inputs[1]], ROPE_DELTAS_OUT)
    return _model(inputs, [logits, present, deltas], [deltas.outputs[0], present.outputs[0], logits.outputs[0]])


def test_set_interface_puts_the_contract_in_order():
    result = SetInterface()(_unordered_interface())
    assert result.modified
    graph = result.model.graph
    assert [v.name for v in graph.inputs] == [*COMBINED_INPUTS, "past_key_values.0.key"]
    assert [v.name for v in graph.outputs] == [LOGITS, "present.0.key", ROPE_DELTAS_OUT]
    assert not SetInterface()(result.model).modified  # twin: a second run finds nothing to change


def test_set_interface_refuses_a_missing_contract_input():
    model = _unordered_interface()
    model.graph.inputs.pop(0)  # the last contract input
    with pytest.raises(StitchError, match=rf"SetInterface: the model lacks the input\(s\) \['{COMBINED_INPUTS[-1]}'\]"):
        run_passes(model, [SetInterface()])


# -- the pass manager ------------------------------------------------------------------------------------------------

class _Raises(StitchPass):
    def __init__(self, error: Exception) -> None:
        self.error = error

    def apply(self, model: ir.Model) -> bool:
        raise self.error


def test_an_error_meant_for_the_user_surfaces_as_itself():
    error = MergeError("weights.safetensors: tensor x is truncated")
    with pytest.raises(MergeError) as info:
        run_passes(_two_layers(), [_Raises(error)])
    assert info.value is error


def test_twin_an_unexpected_error_names_the_pass():
    with pytest.raises(ir.passes.PassError, match=r"'_Raises' pass") as info:
        run_passes(_two_layers(), [_Raises(KeyError("x"))])
    assert not isinstance(info.value, MergeError)
