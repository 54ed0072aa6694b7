"""An optional input ``logits_to_keep`` (transformers' name): the head runs on the last ``logits_to_keep`` positions
only; 0, its default, keeps them all.

Generating needs the logits of the last position only, and the head is a large share of a prefill's work (the 2B
decoder's head is 311M of its 1.72B parameters). The default comes from an initializer of the same name, so a
client that does not feed the input gets every position, as before.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from merge.contract.names import LOGITS, LOGITS_TO_KEEP

from .base import StitchError, StitchPass, has_input, named_node

SEQUENCE_AXIS = 1


class KeepLogits(StitchPass):
    summary = "input logits_to_keep (default 0: all positions): the head runs on the last positions only"

    def requires(self, model: ir.Model) -> None:
        if has_input(model.graph, LOGITS_TO_KEEP):
            raise StitchError(f"the model already has an input {LOGITS_TO_KEEP!r}")
        logits = next((v for v in model.graph.outputs if v.name == LOGITS), None)
        head = logits.producer() if logits is not None else None
        if head is None or head.op_type not in ("MatMul", "MatMulNBits"):
            raise StitchError(f"no MatMul head produces {LOGITS!r}")

    def apply(self, model: ir.Model) -> None:
        graph = model.graph
        head = next(v for v in graph.outputs if v.name == LOGITS).producer()
        keep = ir.Value(name=LOGITS_TO_KEEP, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]),
                        const_value=ir.tensor(np.array(0, np.int64), name=LOGITS_TO_KEEP))
        graph.inputs.append(keep)
        graph.register_initializer(keep)  # the default: an initializer that a fed input overrides
        prefix = "merge/logits_to_keep/"
        nodes = [
            named_node("Neg", [keep], prefix + "start"),  # -k: the last k positions; -0 = 0: all of them
        ]
        nodes.append(named_node("Unsqueeze", [nodes[-1].outputs[0], _const(graph, prefix + "axes", [0])],
                                prefix + "starts"))
        nodes.append(named_node("Slice", [head.inputs[0], nodes[-1].outputs[0],
                                          _const(graph, prefix + "ends", [np.iinfo(np.int64).max]),
                                          _const(graph, prefix + "axis", [SEQUENCE_AXIS])], prefix + "hidden"))
        for node in nodes:
            graph.insert_before(head, node)
        head.replace_input_with(0, nodes[-1].outputs[0])
        logits = head.outputs[0]
        if logits.shape is not None and len(logits.shape) == 3:
            logits.shape = ir.Shape([logits.shape[0], ir.SymbolicDim("logits_sequence_length"), logits.shape[2]])


def _const(graph: ir.Graph, name: str, values) -> ir.Value:
    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([len(values)]),
                     const_value=ir.tensor(np.array(values, np.int64), name=name))
    graph.register_initializer(value)
    return value
