"""End to end: a greedy loop over the ONE combined model against HF ``generate`` on the same processor output.

fp32: prefill logits within 1e-4 * max(1, max |ref|) and the same 32 new tokens. Broken twins that must
FAIL: DeepStack removed, 1-D positions, images in swapped order.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from merge.runtime import CombinedModel
from merge.tools.compare import compare

NEW_TOKENS = 32


def _images(sizes, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _case_inputs(name, preset, sources, prep):
    from merge.runtime.prompts import build_batch_inputs, build_inputs

    cfg = sources(preset).config
    tok, proc = prep(preset)
    if name == "text":
        return build_inputs(tok, proc, "Tell me a story about a red fox.", [], cfg)
    if name == "one_image":
        return build_inputs(tok, proc, "Describe the image.", _images([(64, 96)]), cfg)
    if name == "three_images":
        return build_inputs(tok, proc, "Compare these.", _images([(64, 96), (200, 120), (90, 90)], 1), cfg)
    if name == "image_first":
        inputs = build_inputs(tok, proc, "What is it?", _images([(96, 64)], 2), cfg)
        ids = inputs["input_ids"][0]
        image = cfg.image_token_id
        first = int(np.argmax(ids == image))
        inputs["input_ids"] = ids[first:][None]  # the image tokens are now the very first tokens
        inputs["attention_mask"] = np.ones_like(inputs["input_ids"])
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == image).astype(inputs["mm_token_type_ids"].dtype)
        return inputs
    if name == "batch_left_padded":
        return build_batch_inputs(
            tok, proc, ["Describe the picture in detail please.", "Hi"], [_images([(64, 64)], 3), []], cfg
        )
    if name == "batch_images_in_both_rows":
        return build_batch_inputs(
            tok, proc, ["Compare.", "And what is this one about, in a few words?"],
            [_images([(64, 96), (96, 64)], 5), _images([(120, 80)], 6)], cfg,
        )
    raise KeyError(name)


def _reference(model, inputs):
    import torch

    from tests.hf import hf_kwargs

    kw = {k: torch.from_numpy(v) for k, v in hf_kwargs(inputs).items()}
    with torch.no_grad():
        logits = model(**kw).logits.numpy()
        generated = model.generate(**kw, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)
    return logits, generated[:, inputs["input_ids"].shape[1]:].numpy()


def _run(folder, inputs):
    return CombinedModel(folder).generate(
        inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"],
        max_new_tokens=NEW_TOKENS,
    )


def _masked(logits, mask):
    """Logits at real (non-padded) positions only: HF's values at padded positions are not meaningful."""
    return logits[mask.astype(bool)]


CASES = ["text", "one_image", "three_images", "image_first", "batch_left_padded", "batch_images_in_both_rows"]


@pytest.mark.parametrize("case", CASES)
def test_combined_matches_generate_tiny(case, combined, hf_models, sources, prep):
    _check_case("tiny", case, combined, hf_models, sources, prep)


@pytest.mark.parametrize("case", ["three_images", "batch_left_padded"])
def test_combined_matches_generate_merge1(case, combined, hf_models, sources, prep):
    _check_case("tiny-merge1", case, combined, hf_models, sources, prep)


def _check_case(preset, case, combined, hf_models, sources, prep):
    inputs = _case_inputs(case, preset, sources, prep)
    ref_logits, ref_tokens = _reference(hf_models(preset), inputs)
    gen = _run(combined(preset), inputs)
    mask = inputs["attention_mask"]
    result = compare("prefill_logits", _masked(gen.prefill_logits, mask), _masked(ref_logits, mask))
    assert result.passed, result.line()
    assert gen.tokens.shape == ref_tokens.shape
    agree = (gen.tokens == ref_tokens).mean()
    assert agree == 1.0, f"greedy tokens agree on {agree:.1%}:\nonnx {gen.tokens}\nref  {ref_tokens}"


def test_combined_interface(combined, sources):
    folder = combined("tiny")
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    layers = sources("tiny").config.text.num_layers
    assert inputs[:7] == ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                          "video_grid_thw", "rope_deltas"]
    assert sorted(inputs[7:-1]) == sorted(f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value"))
    assert inputs[-1] == "logits_to_keep"  # optional(tensor(int64)): a call may leave it out (every position)
    assert model.graph.input[-1].type.HasField("optional_type")
    assert not any(t.name == "logits_to_keep" for t in model.graph.initializer)  # no initializer input: no warning
    assert outputs[0] == "logits" and outputs[-1] == "rope_deltas_out"
    assert sorted(outputs[1:-1]) == sorted(f"present.{i}.{k}" for i in range(layers) for k in ("key", "value"))
    scopes = {n.name.split("/")[0] for n in model.graph.node}
    assert scopes <= {"vision", "merge", "decoder"}, scopes
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("If") == 3  # the vision guard, the first-call/decode position switch, logits_to_keep fed or not
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["source_model"] == "tiny" and meta["precision"] == "fp32"
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}


def test_combined_folder_is_relocatable(combined, tmp_path, monkeypatch):
    import shutil

    moved = tmp_path / "elsewhere" / "model-copy"
    shutil.copytree(combined("tiny"), moved)
    monkeypatch.chdir(tmp_path)
    gen = CombinedModel(moved).generate(np.array([[1, 2, 3]]), max_new_tokens=2)
    assert gen.tokens.shape == (1, 2)


# -- broken twins -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["no_deepstack", "one_d_positions"])
def test_twin_broken_model_fails(kind, combined, hf_models, sources, prep, tmp_path):
    from tests.sabotage import broken_copy

    inputs = _case_inputs("one_image", "tiny", sources, prep)
    ref_logits, _ = _reference(hf_models("tiny"), inputs)
    broken = broken_copy(combined("tiny"), tmp_path / kind, kind)
    gen = _run(broken, inputs)
    result = compare("prefill_logits", gen.prefill_logits, ref_logits)
    assert not result.passed, result.line()
    assert result.max_abs > 100 * result.bound, result.line()


def test_twin_images_swapped_fails(combined, hf_models, sources, prep):
    """Two images of the same size fed in swapped order: same tokens and grids, wrong answer."""
    from merge.runtime.prompts import build_inputs

    tok, proc = prep("tiny")
    inputs = build_inputs(tok, proc, "Which is brighter?", _images([(64, 96), (64, 96)], 4), sources("tiny").config)
    ref_logits, _ = _reference(hf_models("tiny"), inputs)
    assert compare("prefill_logits", _run(combined("tiny"), inputs).prefill_logits, ref_logits).passed
    first, second = np.split(inputs["pixel_values"], 2)
    swapped = {**inputs, "pixel_values": np.concatenate([second, first])}
    result = compare("prefill_logits", _run(combined("tiny"), swapped).prefill_logits, ref_logits)
    assert not result.passed, result.line()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("drop_patch_row", "patch rows but image_grid_thw sums to"),
        ("extra_image_token", "image tokens (id"),
        ("odd_grid", "divisible by the spatial merge size"),
        ("mask_shape", "attention_mask has shape"),
    ],
)
def test_bad_inputs_are_refused_before_running(change, message, combined, sources, prep):
    from merge.errors import MergeError

    inputs = dict(_case_inputs("one_image", "tiny", sources, prep))
    if change == "drop_patch_row":
        inputs["pixel_values"] = inputs["pixel_values"][1:]
    elif change == "extra_image_token":
        ids = inputs["input_ids"].copy()
        ids[0, 0] = sources("tiny").config.image_token_id
        inputs["input_ids"] = ids
    elif change == "odd_grid":
        t, h, w = inputs["image_grid_thw"][0]
        inputs["image_grid_thw"] = np.array([[t, h * w // 5, 5]]) if (h * w) % 5 == 0 else np.array([[t, 1, h * w]])
    elif change == "mask_shape":
        inputs["attention_mask"] = inputs["attention_mask"][:, 1:]
    with pytest.raises(MergeError) as info:
        _run(combined("tiny"), inputs)
    assert message in str(info.value)


UNUSUAL = {
    # text head_dim != hidden/heads with one KV head, MRoPE sections [6, 5, 5], untied head, DeepStack indexes out
    # of order, vision head dim 72
    "untied_one_kv_head": (
        {"tie_word_embeddings": False},
        {"hidden_size": 144, "num_heads": 2, "intermediate_size": 96, "depth": 3, "deepstack_visual_indexes": [2, 0],
         "out_hidden_size": 48},
        {"hidden_size": 48, "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 32,
         "num_hidden_layers": 3, "intermediate_size": 80},
        {"mrope_section": [6, 5, 5]},
    ),
    # attention projections with biases, as many KV heads as heads, another norm epsilon and rope theta, one
    # DeepStack level
    "attention_bias": (
        {},
        {"deepstack_visual_indexes": [1]},
        {"attention_bias": True, "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "num_hidden_layers": 2},
        {"rope_theta": 10000.0},
    ),
    # no DeepStack at all (an empty deepstack_visual_indexes), 14-pixel patches, a 3x3 spatial merge
    "no_deepstack": (
        {},
        {"deepstack_visual_indexes": [], "patch_size": 14, "spatial_merge_size": 3},
        {},
        {},
    ),
}


@pytest.mark.parametrize("variant", sorted(UNUSUAL))
def test_unusual_config_end_to_end(variant, tmp_path):
    """Shapes no preset has, end to end against PyTorch (see ``UNUSUAL``)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from export.random_weights import init_scaled_
    from merge.contract.config import ModelConfig
    from merge.presets.files import write_tokenizer_and_processor
    from merge.presets.shapes import preset_config
    from merge.runtime.prompts import build_inputs
    from merge.sources.resolve import resolve_model
    from merge.stitch.pipeline import build
    from tests.hf import load_preprocessors

    config = preset_config("tiny")
    top, vision, text, rope = UNUSUAL[variant]
    config.update(top)
    config["vision_config"].update(vision)
    config["text_config"].update(text)
    config["text_config"]["rope_parameters"].update(rope)
    folder = tmp_path / "hf"
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**config)).float().eval()
    init_scaled_(model, seed=5)
    if text.get("attention_bias"):
        assert model.model.language_model.layers[0].self_attn.q_proj.bias is not None
    model.save_pretrained(folder)
    write_tokenizer_and_processor(folder, config)
    out = tmp_path / "combined"
    build(resolve_model(str(folder)), out)

    tok, proc = load_preprocessors(folder)
    inputs = build_inputs(tok, proc, "Describe both.", _images([(64, 96), (120, 80)], 7),
                          ModelConfig.from_dict(config))
    ref_logits, ref_tokens = _reference(model, inputs)
    gen = _run(out, inputs)
    result = compare("prefill_logits", gen.prefill_logits, ref_logits)
    assert result.passed, result.line()
    assert (gen.tokens == ref_tokens).all()
    if text.get("attention_bias"):  # the twin: the same folder with the projections' bias additions dropped
        from tests.sabotage import _copy_with

        def drop_biases(graph):
            adds = [n for n in graph if n.name.startswith("decoder/layers.") and n.name.endswith("_proj/add_bias")]
            assert adds, "no bias additions found"
            for node in adds:
                ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
                graph.remove(node, safe=True)

        broken = _run(_copy_with(out, tmp_path / "no-bias", drop_biases), inputs)
        assert not compare("prefill_logits", broken.prefill_logits, ref_logits).passed
    if not vision.get("deepstack_visual_indexes", True):  # the twin: the vision tower's features must matter
        from tests.sabotage import broken_copy

        broken = _run(broken_copy(out, tmp_path / "vision-scaled", "vision_layer_weights"), inputs)
        assert not compare("prefill_logits", broken.prefill_logits, ref_logits).passed
        from merge.tools.verify import verify

        stages = verify(out, model_folder=folder, prompt="Describe.", images=_images([(64, 96)], 3), new_tokens=2)
        assert all(s.passed for s in stages) and not [s for s in stages if "deepstack" in s.name]
        from merge.tools.inspect.stitch_view import write_stitch_view

        view = onnx.load(write_stitch_view(out, tmp_path / "stitch.onnx")[0])
        assert "vision/image_embeds" in {v.name for v in view.graph.input}
        assert not [n.name for n in view.graph.node if "deepstack" in n.name]
