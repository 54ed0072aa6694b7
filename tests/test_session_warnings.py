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
from pathlib import Path

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


def test_an_onnx_runtime_without_the_folders_ops_is_named_with_the_version_needed(combined, monkeypatch, capsys):
    """ONNX Runtime 1.28 and older load no combined folder (``MRotaryEmbedding ... is not a registered function/op``,
    checked by hand for 1.22, 1.24, 1.26 and 1.28; 1.29 and 1.30 load and answer): the error says which version is
    needed, and pyproject.toml asks for the same one."""
    import tomllib

    import onnxruntime as ort

    from merge.cli import main as cli_main
    from merge.contract import folder as folder_module

    root = Path(__file__).resolve().parents[1]
    wanted = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"onnxruntime>={folder_module.MIN_ONNXRUNTIME}" in wanted

    def old_runtime(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Load model from model.onnx failed:Fatal error: "
                           "com.microsoft:MRotaryEmbedding(-1) is not a registered function/op")

    monkeypatch.setattr(ort, "InferenceSession", old_runtime)
    rc = cli_main(["run", str(combined("tiny")), "--prompt", "Hi", "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"needs onnxruntime>={folder_module.MIN_ONNXRUNTIME}" in err and ort.__version__ in err, err
