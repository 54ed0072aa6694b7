"""Qwen3-VL-MoE end to end: the combined model against HF ``Qwen3VLMoeForConditionalGeneration``.

fp32 (``com.microsoft.MoE``): prefill logits within the fp32 bound and 32 greedy tokens equal to HF ``generate`` on
text, an image, a video and a left-padded batch, on two MoE shapes (``tiny-moe``: 8 experts top-2, layer 1 dense;
``tiny-moe-6x3``: 6 experts top-3, every second layer sparse, one KV head, untied head). Broken twins that must
fail: the router without renormalisation, gpt-oss's SwiGLU constants, two experts swapped.

int4 (``QMoE``, 4-bit experts): against PyTorch carrying the same 4-bit weights. With fp32 activations (accuracy
level 0) it must meet the fp32 bound; its twin, the fp32 reference, must not. The default build (accuracy level 4,
int8 activations) is bounded loosely and its figures printed: int8 activations move router logits a little, and a
token whose top-k choice sits on a near tie then takes another expert (a discrete jump no bound on logits can
follow). ``verify`` therefore has PyTorch take the folder's expert choices (``export.reference.ForcedRouting``):
that forcing reproduces PyTorch exactly with its own choices and moves it far with others, and a folder with two
experts exchanged still fails.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from merge.errors import MergeError
from merge.runtime import CombinedModel
from merge.tools.compare import compare
from tests.test_combined_parity import NEW_TOKENS, _case_inputs, _masked, _reference
from tests.test_video import _video_inputs, clips  # noqa: F401  (clips: the module's video fixture)

MOE = "tiny-moe"
OTHER = "tiny-moe-6x3"


def _run(folder, inputs, new_tokens=NEW_TOKENS):
    return CombinedModel(folder).generate(
        inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"],
        pixel_values_videos=inputs.get("pixel_values_videos"), video_grid_thw=inputs.get("video_grid_thw"),
        max_new_tokens=new_tokens)


def _check(folder, model, inputs):
    ref_logits, ref_tokens = _reference(model, inputs)
    gen = _run(folder, inputs)
    mask = inputs["attention_mask"]
    result = compare("prefill_logits", _masked(gen.prefill_logits, mask), _masked(ref_logits, mask))
    assert result.passed, result.line()
    agree = (gen.tokens == ref_tokens).mean()
    assert agree == 1.0, f"greedy tokens agree on {agree:.1%}:\nonnx {gen.tokens}\nref  {ref_tokens}"
    return result


# -- structure ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", [MOE, OTHER])
def test_sparse_layers_are_router_and_moe(preset, combined, sources):
    config = sources(preset).config
    moe = config.text.moe
    sparse = moe.sparse_layers(config.text.num_layers)
    assert sparse == {MOE: (0, 2, 3), OTHER: (1, 3)}[preset]
    model = onnx.load(str(combined(preset) / "model.onnx"), load_external_data=False)
    nodes = {n.name: n for n in model.graph.node}
    experts = [n for n in model.graph.node if n.op_type == "MoE"]
    assert sorted(n.name for n in experts) == [f"decoder/layers.{i}/mlp/experts/MoE" for i in sparse]
    for node in experts:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"k": moe.num_experts_per_tok, "activation_type": b"swiglu", "swiglu_fusion": 1,
                         "activation_alpha": 1.0, "activation_beta": 0.0, "normalize_routing_weights": 1,
                         "use_sparse_mixer": 0}  # no swiglu_limit: no clamp
        assert node.output[0] == node.name.rsplit("/", 2)[0] + "/output"  # DeepStack's anchor
    for i in range(config.text.num_layers):
        router = f"decoder/layers.{i}/mlp/router/MatMul"
        assert (router in nodes) == (i in sparse)
        assert (f"decoder/layers.{i}/mlp/gate_proj/MatMul" in nodes) == (i not in sparse)
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    e, width, hidden = moe.num_experts, moe.moe_intermediate_size, config.text.hidden_size
    assert shapes[f"decoder/layers.{sparse[0]}/mlp/experts/gate_up_interleaved"] == [e, 2 * width, hidden]
    assert shapes[f"decoder/layers.{sparse[0]}/mlp/experts/down"] == [e, hidden, width]


# -- fp32 against HF generate ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["text", "one_image", "batch_left_padded"])
def test_moe_matches_generate(case, combined, hf_models, sources, prep):
    _check(combined(MOE), hf_models(MOE), _case_inputs(case, MOE, sources, prep))


@pytest.mark.parametrize("case", ["three_images", "batch_left_padded"])
def test_other_moe_matches_generate(case, combined, hf_models, sources, prep):
    _check(combined(OTHER), hf_models(OTHER), _case_inputs(case, OTHER, sources, prep))


def test_moe_video_matches_generate(combined, hf_models, sources, prep, clips):  # noqa: F811
    inputs = _video_inputs("clip_and_two_images", MOE, sources, prep, clips)
    assert len(inputs["video_grid_thw"]) == 1
    _check(combined(MOE), hf_models(MOE), inputs)


# -- broken twins ------------------------------------------------------------------------------------------------

def _moe_nodes(graph: ir.Graph) -> list[ir.Node]:
    nodes = [n for n in graph if n.op_type in ("MoE", "QMoE")]
    assert nodes, "no MoE node"
    return nodes


def _without_renormalisation(graph: ir.Graph) -> None:
    for node in _moe_nodes(graph):
        node.attributes["normalize_routing_weights"] = ir.AttrInt64("normalize_routing_weights", 0)


def _gpt_oss_swiglu(graph: ir.Graph) -> None:
    for node in _moe_nodes(graph):
        for attr in (ir.AttrFloat32("activation_alpha", 1.702), ir.AttrFloat32("activation_beta", 1.0),
                     ir.AttrFloat32("swiglu_limit", 7.0)):
            node.attributes[attr.name] = attr


def _experts_swapped(graph: ir.Graph) -> None:
    """Experts 0 and 1 exchange their weights (fc1 and fc2 both): the router's choice then reaches the wrong one."""
    for node in _moe_nodes(graph):
        for value in (node.inputs[2], node.inputs[4]):
            stack = value.const_value.numpy().copy()
            stack[[0, 1]] = stack[[1, 0]]
            value.const_value = ir.tensor(stack, name=value.name)


@pytest.mark.parametrize("mutate", [_without_renormalisation, _gpt_oss_swiglu, _experts_swapped],
                         ids=["no_renormalisation", "gpt_oss_swiglu", "experts_swapped"])
def test_twin_broken_moe_fails(mutate, combined, hf_models, sources, prep, tmp_path):
    from tests.sabotage import _copy_with

    inputs = _case_inputs("one_image", MOE, sources, prep)
    ref_logits, _ = _reference(hf_models(MOE), inputs)
    broken = _copy_with(combined(MOE), tmp_path / "broken", mutate)
    result = compare("prefill_logits", _run(broken, inputs, 1).prefill_logits, ref_logits)
    assert not result.passed, result.line()
    assert result.max_abs > 100 * result.bound, result.line()


# -- int4 --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def int4_fp32_activations(sources, tmp_path_factory):
    """tiny-moe in int4 with accuracy level 0: QMoE and MatMulNBits multiply fp32 activations by the dequantized
    4-bit weights, with an fp32 vision part and a float32 KV cache, so the graph can be held to the fp32 bound
    against PyTorch with the same weights."""
    import dataclasses

    from merge.contract.quant import DEFAULT_INT4
    from merge.stitch.pipeline import build

    out = tmp_path_factory.mktemp("moe-int4-level0") / "combined"
    build(sources(MOE), out, quant=dataclasses.replace(DEFAULT_INT4, accuracy_level=0), vision_precision="fp32",
          kv_cache="float32")
    return out


@pytest.fixture(scope="module")
def hf_int4(sources):
    import torch

    from export.classes import model_classes_of
    from export.reference import use_int4_weights_
    from merge.contract.quant import DEFAULT_INT4

    folder = sources(MOE).folder
    model = model_classes_of(folder)[1].from_pretrained(folder, dtype=torch.float32).eval()
    use_int4_weights_(model, DEFAULT_INT4, shared_table=True)  # the scheme combined(MOE, "int4") is built with
    return model


def test_int4_structure(combined, sources):
    from merge.contract.quant import DEFAULT_INT4

    model = onnx.load(str(combined(MOE, "int4") / "model.onnx"), load_external_data=False)
    sparse = sources(MOE).config.text.moe.sparse_layers(sources(MOE).config.text.num_layers)
    qmoe = [n for n in model.graph.node if n.op_type == "QMoE"]
    assert len(qmoe) == len(sparse) and not [n for n in model.graph.node if n.op_type == "MoE"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in qmoe[0].attribute}
    text = sources(MOE).config.text  # QMoE's one block divides the hidden size and the experts' width
    expected = DEFAULT_INT4.expert_block_size(text.hidden_size, text.moe.moe_intermediate_size)
    assert attrs["expert_weight_bits"] == 4 and attrs["block_size"] == expected == 64
    assert attrs["accuracy_level"] == 4
    assert attrs["activation_alpha"] == 1.0 and attrs["activation_beta"] == 0.0 and "swiglu_limit" not in attrs
    routers = [n for n in model.graph.node if n.name.endswith("/mlp/router/MatMul")]
    assert len(routers) == len(sparse) and all(n.op_type == "MatMul" for n in routers)  # the router stays fp32
    dense = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name.startswith("decoder/")]
    assert sorted(dense) == sorted(n.name for n in routers)


@pytest.mark.parametrize("case", ["text", "batch_left_padded"])
def test_int4_experts_match_the_same_4_bit_weights(case, int4_fp32_activations, hf_int4, hf_models, sources, prep):
    inputs = _case_inputs(case, MOE, sources, prep)
    _check(int4_fp32_activations, hf_int4, inputs)
    # twin: PyTorch with the fp32 weights is far from it (the experts really are 4-bit)
    ref_logits, _ = _reference(hf_models(MOE), inputs)
    mask = inputs["attention_mask"]
    gen = _run(int4_fp32_activations, inputs, 1)
    assert not compare("prefill_logits", _masked(gen.prefill_logits, mask), _masked(ref_logits, mask)).passed


def test_int4_default_close_to_the_same_4_bit_weights(combined, hf_int4, sources, prep, capsys):
    inputs = _case_inputs("one_image", MOE, sources, prep)
    ref_logits, ref_tokens = _reference(hf_int4, inputs)
    gen = _run(combined(MOE, "int4"), inputs)
    result = compare("prefill_logits", gen.prefill_logits, ref_logits)
    top1 = (gen.prefill_logits.argmax(-1) == ref_logits.argmax(-1)).mean()
    agree = (gen.tokens == ref_tokens).mean()
    with capsys.disabled():
        print(f"\nMoE int4 (accuracy level 4) vs the same 4-bit weights: cosine {result.cosine:.5f}, max_abs "
              f"{result.max_abs:.3f} (logits up to {result.reference_scale:.1f}), prefill top-1 {top1:.1%}, greedy "
              f"agreement {agree:.1%}")
    assert result.cosine > 0.999, result.line()
    assert top1 > 0.9 and agree > 0.9


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_verify_passes_and_its_twin_fails(precision, combined, tmp_path, capsys):
    """``merge verify`` on an MoE folder; for int4 (int8 activations) PyTorch takes the folder's expert choices and
    the router logits are a stage. Twin: gpt-oss's SwiGLU constants fail it (not the router without
    renormalisation: ONNX Runtime 1.32's CPU QMoE renormalises whatever normalize_routing_weights says); for int4
    the first layer's wrong output moves the next layers' router logits, the first stage to fail."""
    from merge.cli import main
    from tests.sabotage import _copy_with

    folder = combined(MOE, precision)
    ref = tmp_path / "ref.npz"
    assert main(["verify", str(folder), "--max-new-tokens", "4", "--save-reference", str(ref)]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("PASSED"), out
    assert ("router logits (3 layers)" in out) == (precision == "int4"), out
    # replayed: the folder chose as the saved reference took
    assert main(["verify", str(folder), "--reference", str(ref)]) == 0
    out = capsys.readouterr().out
    assert ("expert choices as the reference's" in out) == (precision == "int4"), out
    broken = _copy_with(folder, tmp_path / "broken", _gpt_oss_swiglu)
    assert main(["verify", str(broken), "--reference", str(ref)]) == 1
    first = "router logits (3 layers)" if precision == "int4" else "prefill logits"
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"FAILED: first failing stage: {first}"


def _qmoe_experts_swapped(graph: ir.Graph) -> None:
    """Experts 0 and 1 of every QMoE exchange their 4-bit weights, scales and zero points."""
    for node in _moe_nodes(graph):
        for index in (2, 3, 5, 6, 11, 12):
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is not None and value.const_value is not None:
                stack = value.const_value.numpy().copy()
                stack[[0, 1]] = stack[[1, 0]]
                value.const_value = ir.tensor(stack, name=value.name)


def test_verify_taking_the_folders_choices_still_fails_wrong_experts(combined, tmp_path, capsys):
    """PyTorch takes the int4 folder's expert choices, but computes those experts with its own weights: a folder
    whose experts 0 and 1 are exchanged fails (the choice is followed, not the computation)."""
    from merge.cli import main
    from tests.sabotage import _copy_with

    broken = _copy_with(combined(MOE, "int4"), tmp_path / "broken", _qmoe_experts_swapped)
    assert main(["verify", str(broken), "--max-new-tokens", "2"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: first failing stage: router logits (3 layers)" in out, out
    prefill = [line for line in out.splitlines() if line.startswith("prefill logits")]
    assert prefill and prefill[0].split()[-1] == "FAILED", out


def test_a_replayed_reference_must_have_the_folders_choices(combined, tmp_path, capsys):
    """A saved reference of an int4 MoE folder holds the expert choices PyTorch took: a run choosing otherwise
    fails on that stage (its logits were for other experts), and a reference without choices is refused."""
    from merge.cli import main

    folder = combined(MOE, "int4")
    ref = tmp_path / "ref.npz"
    assert main(["verify", str(folder), "--max-new-tokens", "2", "--save-reference", str(ref)]) == 0
    capsys.readouterr()
    with np.load(ref) as data:
        arrays = {k: data[k] for k in data.files}
    moved = dict(arrays)
    choices = moved["ref/expert_choices"].copy()
    choices[1, 0] = choices[1, 0][::-1] + 1  # one position's choice of layer 1 (a set no top-2 gives: unsorted)
    moved["ref/expert_choices"] = choices
    np.savez(tmp_path / "moved.npz", **moved)
    assert main(["verify", str(folder), "--reference", str(tmp_path / "moved.npz")]) == 1
    out = capsys.readouterr().out
    assert "FAILED: first failing stage: expert choices as the reference's" in out, out
    longer = dict(arrays, **{"ref/fed_tokens": np.repeat(arrays["ref/fed_tokens"], 2, axis=1)})
    np.savez(tmp_path / "longer.npz", **longer)
    assert main(["verify", str(folder), "--reference", str(tmp_path / "longer.npz")]) == 2
    assert "fed_tokens has the wrong shape or type" in capsys.readouterr().err
    old = {k: v for k, v in arrays.items() if "expert" not in k and "fed_tokens" not in k and "router" not in k}
    np.savez(tmp_path / "old.npz", **old)
    assert main(["verify", str(folder), "--reference", str(tmp_path / "old.npz")]) == 2
    assert "holds no expert choices" in capsys.readouterr().err


def test_a_saved_reference_replays_on_an_avx2_only_cpu(combined, tmp_path, capsys):
    """The expert choices a saved reference holds were made here; on an AVX2-only CPU (emulated: other MLAS kernels,
    no VNNI) the int4 MoE folder chooses the same and the replay passes. The router is an fp32 MatMul and the
    products feeding it are exact int8 (tests/test_int8_saturation.py); what differs between kernels is the fp32
    summation order, a tie at that level would flip a choice (then this stage fails, and verify against --model
    there passes)."""
    from merge.cli import main
    from tests.emulated_cpu import python_emulated, unavailable

    if (why := unavailable()) is not None:
        pytest.skip(why)
    folder, ref = combined(MOE, "int4"), tmp_path / "ref.npz"
    assert main(["verify", str(folder), "--max-new-tokens", "3", "--save-reference", str(ref)]) == 0
    capsys.readouterr()
    done = python_emulated(["-m", "merge", "verify", str(folder), "--reference", str(ref)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line.split()[-1] for line in done.stdout.splitlines()
            if line.startswith("expert choices as the reference's")] == ["PASSED"], done.stdout


def test_forced_routing_is_the_models_own_weighting(hf_models, sources, prep):
    """export.reference.ForcedRouting given PyTorch's own top-k reproduces the model exactly (the same experts,
    weighted as its router weights them); given other experts (each choice moved by one) the logits move far."""
    from export.reference import sparse_routers, torch_reference

    model = hf_models(MOE)
    inputs = _case_inputs("batch_left_padded", MOE, sources, prep)
    calls: list[list[np.ndarray]] = []
    routers = sparse_routers(model)
    assert len(routers) == 3

    def record(module, args, output):
        if module is routers[0]:
            calls.append([])
        calls[-1].append(output[2].numpy().copy())

    handles = [router.register_forward_hook(record) for router in routers]
    try:
        own = torch_reference(model, inputs, 3)
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == 3  # the prompt's call and two decode steps
    same = torch_reference(model, inputs, 3, forced_tokens=own["tokens"], routing=calls)
    np.testing.assert_array_equal(same["tokens"], own["tokens"])
    for key in ("prefill_logits", "step_logits"):
        np.testing.assert_allclose(same[key], own[key], rtol=0, atol=1e-5)
    rows = inputs["input_ids"].size
    assert same["router_logits"].shape == (3, rows, sources(MOE).config.text.moe.num_experts)
    # twin: every choice moved to the next expert
    e = sources(MOE).config.text.moe.num_experts
    other = torch_reference(model, inputs, 3, forced_tokens=own["tokens"],
                            routing=[[(c + 1) % e for c in call] for call in calls])
    np.testing.assert_allclose(other["router_logits"][0], same["router_logits"][0], rtol=0, atol=1e-5)  # layer 0
    mask = inputs["attention_mask"].astype(bool)
    result = compare("prefill_logits", other["prefill_logits"][mask], own["prefill_logits"][mask])
    assert not result.passed and result.max_abs > 100 * result.bound, result.line()


def test_eight_bit_kinds_leave_the_experts_4_bit(tmp_path, capsys):
    """--eight-bit down_proj: the dense layer's down_proj is 8-bit, the experts stay 4-bit (their stack is named
    down_proj too), and verify's reference requantizes them so."""
    from merge.cli import main

    out = tmp_path / "eight"
    assert main(["build", "--model", MOE, "--precision", "int4", "--eight-bit", "down_proj", "--out", str(out)]) == 0
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    bits = {n.name: {a.name: a.i for a in n.attribute} for n in model.graph.node
            if n.op_type in ("MatMulNBits", "QMoE")}
    assert bits["decoder/layers.1/mlp/down_proj/MatMul"]["bits"] == 8
    assert {v["expert_weight_bits"] for k, v in bits.items() if k.endswith("/experts/MoE")} == {4}
    capsys.readouterr()
    assert main(["verify", str(out), "--max-new-tokens", "2"]) == 0, capsys.readouterr().out


def test_experts_take_a_block_dividing_hidden_and_width(sources, tmp_path):
    """QMoE quantizes whole blocks along both of its K (hidden 96, width 64 here): at --block-size 64 the experts
    take 32, the largest power of two up to 64 dividing both, and so does every dense matrix with K = 96; the
    manifest keeps the block asked for (the rule gives the rest). A block no power of two >= 16 divides is refused
    (tests/test_quantize.py)."""
    from merge.contract.quant import QuantSpec
    from merge.stitch.pipeline import build

    out = tmp_path / "b64"
    build(sources(OTHER), out, quant=QuantSpec(block_size=64))
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    blocks = {n.name: {a.name: a.i for a in n.attribute} for n in model.graph.node
              if n.op_type in ("MatMulNBits", "QMoE")}
    assert {v["block_size"] for k, v in blocks.items() if k.endswith("/experts/MoE")} == {32}
    assert {v["block_size"] for v in blocks.values() if v.get("K") == 96} == {32}
    assert {v["block_size"] for v in blocks.values() if v.get("K", 0) % 64 == 0 and "K" in v} == {64}


# -- checkpoints and configs -------------------------------------------------------------------------------------

def test_transformers_saved_layout_builds_the_same_model(combined, hf_models, sources, prep, tmp_path):
    """transformers 5.x saves expert stacks in its in-memory layout ([E, out, in]), the published files in [E, in,
    out]: a folder saved by ``save_pretrained`` builds into the same model."""
    import shutil

    from merge.sources.checkpoint import Checkpoint
    from merge.sources.resolve import resolve_model
    from merge.stitch.pipeline import build

    folder = tmp_path / "saved"
    hf_models(MOE).save_pretrained(folder)
    for f in sources(MOE).folder.iterdir():
        if f.suffix != ".safetensors" and not (folder / f.name).exists() and f.is_file():
            shutil.copy2(f, folder / f.name)
    saved = Checkpoint(folder)
    name = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert saved.shape(name) == (8, 256, 64) and Checkpoint(sources(MOE).folder).shape(name) == (8, 64, 256)
    out = tmp_path / "combined"
    build(resolve_model(str(folder)), out)
    inputs = _case_inputs("text", MOE, sources, prep)
    got = _run(out, inputs, 2).prefill_logits
    np.testing.assert_array_equal(got, _run(combined(MOE), inputs, 2).prefill_logits)


@pytest.mark.parametrize(("change", "message"), [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok = 9 must be between 1 and 8"),
    ({"num_experts": 0}, "num_experts = 0 must be between 1"),
    ({"moe_intermediate_size": None}, "has no 'moe_intermediate_size'"),
    ({"mlp_only_layers": [0, 7]}, "mlp_only_layers [0, 7] is not a list of layer indexes in 0..3"),
    ({"mlp_only_layers": [0, 1, 2, 3]}, "no layer is sparse"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step = 0 must be between 1"),
    ({"norm_topk_prob": False}, "norm_topk_prob = False"),
    ({"model_type": "qwen3_vl_text"}, "text_config.model_type is 'qwen3_vl_text' in a qwen3_vl_moe config"),
])
def test_bad_moe_config_values_are_refused(change, message):
    from merge.contract.config import ModelConfig
    from merge.presets.shapes import preset_config

    config = preset_config(MOE)
    for key, value in change.items():
        if value is None:
            config["text_config"].pop(key)
        else:
            config["text_config"][key] = value
    with pytest.raises(MergeError) as info:
        ModelConfig.from_dict(config, "x/config.json")
    assert message in str(info.value) and str(info.value).startswith("x/config.json")


def test_expert_stack_of_the_wrong_shape_is_refused(sources, tmp_path):
    """A checkpoint whose expert stack disagrees with config.json: one sentence naming the tensor and both shapes."""
    import shutil

    from merge.sources.resolve import resolve_model
    from merge.stitch.pipeline import build

    folder = tmp_path / "wrong"
    shutil.copytree(sources(MOE).folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["moe_intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match=r"model.language_model.layers.0.mlp.experts.gate_up_proj has shape "
                                         r"\[8, 64, 256\], but config.json says \[8, 64, 192\]"):
        build(resolve_model(str(folder)), tmp_path / "out")


# -- inspect -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_inspect_counts_the_experts(precision, combined, sources, capsys):
    """Parameters per scope as the checkpoint has them (a 4-bit expert counts as its float matrix), the experts'
    share, and the parameters one token uses: all but the experts it is not routed to."""
    from safetensors import safe_open

    from merge.cli import main
    from merge.tools.inspect.report import inspect_folder

    sizes = {}
    for path in sources(MOE).folder.glob("*.safetensors"):
        with safe_open(str(path), "np") as f:
            sizes.update({key: int(np.prod(f.get_slice(key).get_shape())) for key in f.keys()})  # noqa: SIM118
    text = sum(n for key, n in sizes.items() if key.startswith("model.language_model."))
    experts = sum(n for key, n in sizes.items() if ".mlp.experts." in key)
    routers = sum(n for key, n in sizes.items() if key.endswith(".mlp.gate.weight"))
    moe = sources(MOE).config.text.moe
    data = inspect_folder(combined(MOE, precision))
    decoder = data["parameters"]["scopes"]["decoder"]["parameters"]
    assert decoder == text  # tied: the head is the embedding table, counted once, in the decoder
    found = data["experts"]
    assert found["sparse_layers"] == [f"decoder/layers.{i}" for i in (0, 2, 3)]
    assert found["experts_per_layer"] == [moe.num_experts] and found["experts_per_token"] == [moe.num_experts_per_tok]
    assert found["expert_parameters"] == experts and found["router_parameters"] == routers
    assert found["one_expert_parameters"] == 3 * moe.moe_intermediate_size * sources(MOE).config.text.hidden_size
    assert found["decoder_active_parameters"] == decoder - experts * (1 - moe.num_experts_per_tok / moe.num_experts)
    assert main(["inspect", str(combined(MOE, precision))]) == 0
    out = capsys.readouterr().out
    assert "mixture of experts: 3 sparse layers (0, 2, 3)" in out and f"{experts:,}" in out
    assert inspect_folder(combined("tiny"))["experts"] is None
