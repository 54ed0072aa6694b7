"""A checked in-memory session for subgraphs built with onnx_ir (shared by the subgraph tests)."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxruntime as ort


def checked_session(model: ir.Model) -> ort.InferenceSession:
    """Run the full ONNX checker on ``model``, then open it in ONNX Runtime (CPU)."""
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
