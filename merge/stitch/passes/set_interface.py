"""The combined model's inputs and outputs in the contract's order, its name and its opsets."""

from __future__ import annotations

import onnx_ir as ir

from merge.contract.names import (
    COMBINED_INPUTS,
    LOGITS,
    MS_DOMAIN,
    OPSET,
    OPTIONAL_INPUTS,
    PAST_PREFIX,
    PRESENT_PREFIX,
    ROPE_DELTAS_OUT,
)

from .base import StitchError, StitchPass

GRAPH_NAME = "qwen3vl_combined"


class SetInterface(StitchPass):
    summary = "inputs and outputs in the contract's order; opsets ai.onnx and com.microsoft"

    def requires(self, model: ir.Model) -> None:
        names = [v.name for v in model.graph.inputs]
        missing = [n for n in COMBINED_INPUTS if n not in names]
        if missing:
            raise StitchError(f"the model lacks the input(s) {missing}")
        unwired = [n for n in names if n not in COMBINED_INPUTS and n not in OPTIONAL_INPUTS
                   and not n.startswith(PAST_PREFIX)]
        if unwired:
            raise StitchError(f"decoder inputs left unwired: {unwired}")
        outputs = [v.name for v in model.graph.outputs]
        for needed in (LOGITS, ROPE_DELTAS_OUT):
            if needed not in outputs:
                raise StitchError(f"the model has no output {needed!r}")

    def apply(self, model: ir.Model) -> bool:
        graph = model.graph
        before = self._interface(model)
        by_name = {v.name: v for v in graph.inputs}
        past = [v for v in graph.inputs if v.name.startswith(PAST_PREFIX)]
        optional = [by_name[n] for n in OPTIONAL_INPUTS if n in by_name]
        ordered = [by_name[n] for n in COMBINED_INPUTS] + past + optional
        graph.inputs.clear()
        graph.inputs.extend(ordered)
        outputs = {v.name: v for v in graph.outputs}
        present = [v for v in graph.outputs if v.name.startswith(PRESENT_PREFIX)]
        graph.outputs.clear()
        graph.outputs.extend([outputs[LOGITS], *present, outputs[ROPE_DELTAS_OUT]])
        graph.name = GRAPH_NAME
        graph.opset_imports.clear()
        graph.opset_imports.update({"": OPSET, MS_DOMAIN: 1})
        model.opset_imports.clear()
        model.opset_imports.update({"": OPSET, MS_DOMAIN: 1})
        return self._interface(model) != before

    @staticmethod
    def _interface(model: ir.Model) -> tuple:
        graph = model.graph
        return ([id(v) for v in graph.inputs], [id(v) for v in graph.outputs], graph.name,
                dict(graph.opset_imports), dict(model.opset_imports))

    def ensures(self, model: ir.Model) -> None:
        names = [v.name for v in model.graph.inputs]
        if names[: len(COMBINED_INPUTS)] != list(COMBINED_INPUTS):
            raise StitchError(f"inputs are {names[:len(COMBINED_INPUTS)]}, not {list(COMBINED_INPUTS)}")
