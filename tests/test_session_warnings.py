"""Loading a combined model prints nothing: a client that creates a plain ONNX Runtime session, at the default log
level, sees no warning (a warning on every load teaches users to ignore warnings).

ONNX Runtime warns "Initializer X appears in graph inputs and will not be treated as constant value/weight" on every
session creation, in every binding, for an initializer also listed in graph.input (IR >= 4; Graph::Graph in
onnxruntime/core/graph/graph.cc). ``logits_to_keep`` used to be such an input (an initializer as its default); it is
now ``optional(tensor(int64))`` with no initializer, read through OptionalHasElement and an If whose else branch is
the default 0 (every position). The twin puts the old form back and must warn.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import onnx

from merge.contract.names import LOGITS_TO_KEEP

LOAD = "import sys, onnxruntime as ort; ort.InferenceSession(sys.argv[1])"


def _load_prints(model_path) -> str:
    proc = subprocess.run([sys.executable, "-c", LOAD, str(model_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def test_session_creation_prints_nothing(combined):
    assert _load_prints(combined("tiny") / "model.onnx") == ""


def test_the_runtime_prints_nothing(combined):
    code = ("import sys; from merge.runtime import CombinedModel; m = CombinedModel(sys.argv[1]); "
            "m.generate(__import__('numpy').array([[1, 2, 3]]), max_new_tokens=2)")
    proc = subprocess.run([sys.executable, "-c", code, str(combined("tiny"))], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout + proc.stderr == ""


def test_twin_an_initializer_listed_as_an_input_warns(combined, tmp_path):
    """The old form of logits_to_keep (an int64 input whose default is an initializer of the same name) warns."""
    model = onnx.load(str(combined("tiny") / "model.onnx"), load_external_data=False)
    keep = next(i for i in model.graph.input if i.name == LOGITS_TO_KEEP)
    keep.type.CopyFrom(onnx.helper.make_tensor_type_proto(onnx.TensorProto.INT64, []))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0, np.int64), LOGITS_TO_KEEP))
    shutil.copy(combined("tiny") / "model.onnx.data", tmp_path / "model.onnx.data")  # its weights, beside it
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    assert "appears in graph inputs" in _load_prints(path)
