"""int4 combined model: structure, and how close it stays to PyTorch fp32 (cosine, greedy agreement).

4-bit weights cannot match fp32 to 1e-4; the test reports the figures and bounds them loosely, and its twin
(the fp32 bound) must fail, so the int4 path is known to really quantize.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from merge.contract.quant import DEFAULT_INT4
from merge.runtime import CombinedModel
from merge.tools.compare import compare
from tests.test_combined_parity import _case_inputs, _masked, _reference


@pytest.fixture(scope="module")
def int4_folder(combined):
    return combined("tiny", "int4")


def test_int4_structure(int4_folder, sources):
    model = onnx.load(str(int4_folder / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    layers = sources("tiny").config.text.num_layers
    # q, k, v, o, gate, up, down per layer, and the head; the vision part stays fp32
    assert ops.count("MatMulNBits") == 7 * layers + 1
    decoder_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.name.startswith("decoder/")]
    assert not decoder_matmuls
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["precision"] == "int4"
    # tiny is tied: its embeddings are read from the head's own blocks (8-bit in the default scheme), not from an
    # fp32 table
    assert meta["embedding_table"] == f"int{DEFAULT_INT4.bits_for('lm_head.weight')}_blocks" == "int8_blocks"
    (gather,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    (head,) = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits"]
    producers = {o: n for n in model.graph.node for o in n.output}
    assert gather.input[0] == head.input[1]  # the head's own bytes: stored once
    scales = producers[gather.input[2]]
    assert scales.op_type == "Unsqueeze" and scales.input[0] == head.input[2]  # and the same scales
    vocab = sources("tiny").config.text.vocab_size
    tables = [t.name for t in model.graph.initializer if vocab in t.dims]
    assert sorted(tables) == sorted(head.input[1:4]), tables  # no second copy of bytes, scales or zero points


@pytest.mark.parametrize("case", ["text", "one_image"])
def test_int4_close_to_fp32(case, int4_folder, hf_models, sources, prep, capsys):
    inputs = _case_inputs(case, "tiny", sources, prep)
    ref_logits, ref_tokens = _reference(hf_models("tiny"), inputs)
    gen = CombinedModel(int4_folder).generate(
        inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"],
        max_new_tokens=ref_tokens.shape[1],
    )
    mask = inputs["attention_mask"]
    result = compare("prefill_logits", _masked(gen.prefill_logits, mask), _masked(ref_logits, mask))
    top1 = (gen.prefill_logits.argmax(-1) == ref_logits.argmax(-1))[mask.astype(bool)].mean()
    agree = (gen.tokens == ref_tokens).mean()
    with capsys.disabled():
        print(f"\nint4 {case}: cosine {result.cosine:.4f}, max_abs {result.max_abs:.3f}, prefill top-1 "
              f"{top1:.1%}, greedy agreement {agree:.1%}")
    assert result.cosine > 0.95, result.line()
    assert top1 > 0.6
    assert not result.passed  # twin: int4 must not meet the fp32 bound (it really is quantized)
    assert np.isfinite(gen.prefill_logits).all()


def test_verify_int4_against_the_same_int4_weights(int4_folder, tmp_path, capsys):
    """verify rebuilds the reference with the folder's own 4-bit weights: it passes, and DeepStack removal fails."""
    from merge.cli import main
    from tests.sabotage import broken_copy

    ref, report = tmp_path / "ref.npz", tmp_path / "report.json"
    assert main(["verify", str(int4_folder), "--model", "tiny", "--max-new-tokens", "4",
                 "--save-reference", str(ref), "--json", str(report)]) == 0
    table = capsys.readouterr().out
    assert table.strip().splitlines()[-1].startswith("PASSED")
    # beside the judged stages, what 4 bits cost against the fp32 weights, reported: further from PyTorch than
    # the same-weights comparison (were the fp32 reference the 4-bit one, the two would be equal)
    stages = {s["name"]: s for s in json.loads(report.read_text())["stages"]}
    same, fp32 = stages["prefill logits"], stages["vs fp32: prefill logits"]
    assert fp32["status"] == "INFO" and stages["vs fp32: greedy tokens"]["status"] == "INFO"
    assert 0.9 < fp32["cosine"] < same["cosine"] and fp32["max_abs"] > same["max_abs"]
    broken = broken_copy(int4_folder, tmp_path / "broken", "no_deepstack")
    assert main(["verify", str(broken), "--reference", str(ref)]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == "FAILED: first failing stage: prefill logits"


def test_block_size_option_builds_and_verifies(tmp_path, capsys):
    """--block-size 64: fewer scales, the manifest says so, and verify (same 4-bit weights) passes; the option is
    refused where it means nothing."""
    import json

    from merge.cli import main

    out = tmp_path / "b64"
    assert main(["build", "--precision", "int4", "--block-size", "64", "--out", str(out)]) == 0
    assert json.loads((out / "merge.json").read_text())["quantization"]["block_size"] == 64
    assert main(["verify", str(out), "--model", "tiny", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("PASSED")
    assert main(["build", "--block-size", "64", "--out", str(tmp_path / "x")]) == 2
    assert "--block-size applies to --precision int4 only" in capsys.readouterr().err
    assert main(["build", "--precision", "int4", "--block-size", "48", "--out", str(tmp_path / "y")]) == 2
    assert "power of two" in capsys.readouterr().err


def _verify_last_line(folder, capsys, *extra) -> tuple[int, str]:
    from merge.cli import main

    code = main(["verify", str(folder), "--model", "tiny", "--max-new-tokens", "4", *extra])
    return code, capsys.readouterr().out.strip().splitlines()[-1]


def _with_quantization(folder, to, **changes):
    """A copy of ``folder`` whose merge.json says other quantization settings (and holds the same weights)."""
    import shutil

    shutil.copytree(folder, to)
    path = to / "merge.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data["quantization"].pop(key, None)
        else:
            data["quantization"][key] = value
    path.write_text(json.dumps(data, indent=2))
    return to


def test_searched_zero_point_blocks_build_and_verify(tmp_path, capsys):
    """--int4-method search --zero-points: the manifest says so, the tied table reads the head's blocks with their
    zero points, and verify (its reference requantized the same way) passes. Twin: the same folder with merge.json
    saying rtn makes verify requantize the reference by rtn, and it fails."""
    from merge.cli import main

    out = tmp_path / "search"
    assert main(["build", "--precision", "int4", "--int4-method", "search", "--zero-points", "--eight-bit", "none",
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "merge.json").read_text())
    assert manifest["quantization"]["method"] == "search" and manifest["quantization"]["symmetric"] is False
    assert manifest["embedding_table"] == "int4_blocks"
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    (gather,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gather.input) == 4  # the zero points too
    assert all(len(n.input) == 4 for n in model.graph.node if n.op_type == "MatMulNBits")
    capsys.readouterr()
    code, last = _verify_last_line(out, capsys)
    assert code == 0 and last.startswith("PASSED"), last
    twin = _with_quantization(out, tmp_path / "told-rtn", method="rtn")
    code, last = _verify_last_line(twin, capsys)
    assert code == 1 and last.startswith("FAILED"), last


def test_eight_bit_matrices_build_and_verify(tmp_path, capsys):
    """--eight-bit head,v_proj: those MatMulNBits are 8-bit (the tied table reads the head's 8-bit blocks), the
    rest 4-bit; verify passes. Twin: merge.json without eight_bit makes the reference all 4-bit, and it fails."""
    from merge.cli import main

    out = tmp_path / "eight"
    assert main(["build", "--precision", "int4", "--eight-bit", "head,v_proj", "--out", str(out)]) == 0
    manifest = json.loads((out / "merge.json").read_text())
    assert manifest["quantization"]["eight_bit"] == ["v_proj", "head"]
    assert manifest["embedding_table"] == "int8_blocks"
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node
            if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    eight = sorted(name for name, b in bits.items() if b == 8)
    assert eight == sorted(["decoder/lm_head", "merge/embedding/embeds/tied/token_blocks"]
                           + [f"decoder/layers.{i}/attn/v_proj/MatMul" for i in range(4)]), eight
    assert sum(b == 4 for b in bits.values()) == 6 * 4
    capsys.readouterr()
    code, last = _verify_last_line(out, capsys)
    assert code == 0 and last.startswith("PASSED"), last
    twin = _with_quantization(out, tmp_path / "told-4-bit", eight_bit=[])
    code, last = _verify_last_line(twin, capsys)
    assert code == 1 and last.startswith("FAILED"), last
    assert main(["build", "--precision", "int4", "--eight-bit", "lm_head", "--out", str(tmp_path / "x")]) == 2
    assert "eight_bit names 'lm_head', not one of the matrix kinds" in capsys.readouterr().err


@pytest.fixture(scope="module")
def older_scheme_folder(tmp_path_factory):
    """tiny built with the first int4 scheme (block 32, rtn, symmetric, every matrix in 4 bits)."""
    from merge.cli import main

    out = tmp_path_factory.mktemp("older") / "int4"
    assert main(["build", "--precision", "int4", "--block-size", "32", "--int4-method", "rtn", "--no-zero-points",
                 "--eight-bit", "none", "--out", str(out)]) == 0
    return out


def test_the_older_scheme_writes_only_the_fields_older_releases_read(int4_folder, older_scheme_folder):
    """The older scheme's merge.json holds no method or eight_bit (their absence means rtn, all 4-bit), so the
    releases before them, which refuse unknown fields, still read such a folder; the default scheme's names both."""
    quantization = json.loads((older_scheme_folder / "merge.json").read_text())["quantization"]
    assert set(quantization) == {"bits", "block_size", "symmetric", "accuracy_level", "scope"}
    assert quantization["symmetric"] is True
    default = json.loads((int4_folder / "merge.json").read_text())["quantization"]
    assert default["method"] == "search" and default["symmetric"] is False
    assert default["eight_bit"] == ["v_proj", "o_proj", "down_proj", "head"] and default["block_size"] == 128


def test_an_older_int4_manifest_verifies_as_rtn(older_scheme_folder, tmp_path, capsys):
    """A merge.json written before method and eight_bit existed reads as what it was (rtn, all 4-bit): verify
    requantizes its reference that way and passes."""
    old = _with_quantization(older_scheme_folder, tmp_path / "old", method=None, eight_bit=None)
    assert set(json.loads((old / "merge.json").read_text())["quantization"]) == {
        "bits", "block_size", "symmetric", "accuracy_level", "scope"}
    code, last = _verify_last_line(old, capsys)
    assert code == 0 and last.startswith("PASSED"), last
