"""The int8 vision part (--vision-precision int8): structure, verify against PyTorch with the same int8 (7-bit) weights
(and its twins), and how close it stays to the fp32 tower."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest

from merge.cli import main
from tests.sabotage import broken_copy


@pytest.fixture(scope="module")
def int8_folder(combined):
    return combined("tiny", "fp32", "int8")


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)


def test_int8_vision_structure(int8_folder, sources):
    model = onnx.load(str(int8_folder / "model.onnx"), load_external_data=False)
    vision = [n for n in _all_nodes(model.graph) if n.name.startswith("vision/")]
    quantized = [n for n in vision if n.op_type == "DynamicQuantizeMatMul"]
    depth = sources("tiny").config.vision.depth
    levels = len(sources("tiny").config.vision.deepstack_visual_indexes)
    # per block q, k, v, proj, fc1, fc2; two per merger; the patch embedding
    assert len(quantized) == 6 * depth + 2 * (levels + 1) + 1
    assert not [n for n in vision if n.op_type in ("Gemm", "MatMul")]
    int8 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    assert all(n.input[1] in int8 for n in quantized)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["vision_precision"] == "int8"
    decoder = [n for n in model.graph.node if n.name.startswith("decoder/") and n.op_type == "MatMul"]
    assert decoder  # the decoder stays as it was (fp32 here)


def test_verify_int8_vision_against_the_same_weights(int8_folder, tmp_path, capsys):
    import json

    ref, report = tmp_path / "ref.npz", tmp_path / "report.json"
    assert main(["verify", str(int8_folder), "--max-new-tokens", "3", "--save-reference", str(ref),
                 "--json", str(report)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("PASSED")
    stages = {s["name"]: s for s in json.loads(report.read_text())["stages"]}
    vision = stages["vision image_embeds"]
    assert vision["cosine"] > 0.999 and float(vision["tolerance"]) > 1e-2  # judged under the int8 bound
    assert stages["greedy tokens"]["status"] == "INFO"  # reported, not judged
    # twin: DeepStack removed must still fail under the int8 bounds
    broken = broken_copy(int8_folder, tmp_path / "broken", "no_deepstack")
    assert main(["verify", str(broken), "--reference", str(ref)]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == "FAILED: first failing stage: prefill logits"


def test_twin_fp32_bounds_fail_on_int8_vision(int8_folder, combined):
    """The int8 tower really is quantized: against the fp32 tower it misses the fp32 bound, yet stays close."""
    import numpy as np

    from merge.tools.compare import compare

    fp32_folder = combined("tiny")
    sessions = [ort.InferenceSession(str(f / "model.onnx"), providers=["CPUExecutionProvider"])
                for f in (fp32_folder, int8_folder)]
    from merge.runtime import CombinedModel

    model = CombinedModel(fp32_folder)
    from merge.tools.verify import default_images

    inputs = model.preprocessor.build_inputs("Describe.", default_images(2))
    feeds = model.first_feeds(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                              inputs["image_grid_thw"])
    fp32, int8 = (s.run(["logits"], feeds)[0] for s in sessions)
    result = compare("prefill logits", int8, fp32)
    assert not result.passed, result.line()
    assert result.cosine > 0.999 and np.isfinite(int8).all(), result.line()
