"""Vision part: ONNX Runtime against PyTorch's Qwen3VLVisionModel on many grids, with broken twins.

The graph is built without any example input, so every grid here differs from "the export grid". Each
family has a twin that feeds a deliberate mistake and must FAIL through the same comparator.
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import pytest

from merge.contract.vision import VisionSpec
from merge.tools.compare import compare

PRESETS = ["tiny", "tiny-merge1"]


def _grids(m: int) -> dict[str, list[tuple[int, int, int]]]:
    """Grids in units of patches; every h and w is a multiple of the merge size m."""
    return {
        "square": [(1, 4 * m, 4 * m)],
        "non_square": [(1, 2 * m, 5 * m)],
        "transposed": [(1, 5 * m, 2 * m)],
        "odd_6x10": [(1, 6, 10)] if m in (1, 2) else [(1, 2 * m, 3 * m)],
        "odd_14x22": [(1, 14, 22)] if m in (1, 2) else [(1, 3 * m, 5 * m)],
        "smallest": [(1, m, m)],
        "video_t3": [(3, 2 * m, 3 * m)],
        "two_mixed": [(1, 4 * m, 2 * m), (1, 2 * m, 6 * m)],
        "eight_mixed": [(1 + (i % 2), m * (1 + i % 3), m * (1 + (i * 5) % 4)) for i in range(8)],
    }


@pytest.fixture(scope="module")
def vision(sources, tmp_path_factory):
    """``vision(name)`` -> (ONNX session, torch vision model, VisionSpec)."""
    import onnxruntime as ort

    from merge.stitch.parts import export_vision

    cache = {}

    def get(name: str, hf_models=None):
        if name not in cache:
            src = sources(name)
            path = export_vision(src.folder, src.config, tmp_path_factory.mktemp(name) / "vision.onnx")
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            cache[name] = (sess, path, src.config.vision)
        return cache[name]

    return get


def _inputs(spec: VisionSpec, grid: list[tuple[int, int, int]], seed: int):
    grid_thw = np.array(grid, dtype=np.int64).reshape(-1, 3)
    rows = int(grid_thw.prod(axis=1).sum())
    pixels = np.random.default_rng(seed).standard_normal((rows, spec.patch_dim), dtype=np.float32)
    return pixels, grid_thw


def _torch_vision(model, pixels, grid_thw):
    import torch

    with torch.no_grad():
        out = model.model.visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid_thw))
    deep = np.stack([d.numpy() for d in out.deepstack_features]) if out.deepstack_features else None
    return out.pooler_output.numpy(), deep


def _run(sess, pixels, grid_thw):
    embeds, deep = sess.run(None, {"pixel_values": pixels, "image_grid_thw": grid_thw})
    return embeds, deep


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("case", list(_grids(2)))
def test_vision_matches_pytorch(preset, case, vision, hf_models):
    sess, _, spec = vision(preset)
    grid = _grids(spec.spatial_merge_size)[case]
    pixels, grid_thw = _inputs(spec, grid, seed=zlib.crc32(case.encode()))  # the same inputs in every run
    ref_embeds, ref_deep = _torch_vision(hf_models(preset), pixels, grid_thw)
    embeds, deep = _run(sess, pixels, grid_thw)

    tokens = int(grid_thw.prod(axis=1).sum()) // spec.merge_unit
    assert embeds.shape == (tokens, spec.out_hidden_size)
    assert deep.shape == (len(spec.deepstack_visual_indexes), tokens, spec.out_hidden_size)
    results = [compare("image_embeds", embeds, ref_embeds), compare("deepstack_embeds", deep, ref_deep)]
    assert all(r.passed for r in results), "\n".join(r.line() for r in results)


@pytest.mark.parametrize("preset", PRESETS)
def test_zero_images_give_empty_outputs(preset, vision):
    sess, _, spec = vision(preset)
    embeds, deep = _run(sess, np.zeros((0, spec.patch_dim), np.float32), np.zeros((0, 3), np.int64))
    assert embeds.shape == (0, spec.out_hidden_size)
    assert deep.shape == (len(spec.deepstack_visual_indexes), 0, spec.out_hidden_size)


@pytest.mark.parametrize("preset", PRESETS)
def test_attention_stays_inside_each_image(preset, vision):
    """Changing image 2's pixels must leave image 1's outputs bit-identical (per-image attention)."""
    sess, _, spec = vision(preset)
    m = spec.spatial_merge_size
    pixels, grid_thw = _inputs(spec, [(1, 2 * m, 3 * m), (1, 4 * m, 2 * m)], seed=7)
    first = 6 * m * m
    changed = pixels.copy()
    changed[first:] += 1.0
    a, _ = _run(sess, pixels, grid_thw)
    b, _ = _run(sess, changed, grid_thw)
    n1 = first // spec.merge_unit
    np.testing.assert_array_equal(a[:n1], b[:n1])
    assert np.abs(a[n1:] - b[n1:]).max() > 1e-2


# -- broken twins: each feeds one deliberate mistake and must FAIL -------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
def test_twin_swapped_grid_fails(preset, vision, hf_models):
    sess, _, spec = vision(preset)
    m = spec.spatial_merge_size
    pixels, grid_thw = _inputs(spec, [(1, 2 * m, 5 * m)], seed=3)
    ref, _ = _torch_vision(hf_models(preset), pixels, grid_thw)
    swapped, _ = _run(sess, pixels, grid_thw[:, [0, 2, 1]])
    result = compare("image_embeds", swapped, ref)
    assert not result.passed, result.line()
    assert result.max_abs > 100 * result.bound, result.line()  # orders of magnitude, not a near miss


@pytest.mark.parametrize("preset", PRESETS)
def test_twin_images_in_wrong_order_fail(preset, vision, hf_models):
    sess, _, spec = vision(preset)
    m = spec.spatial_merge_size
    grid = [(1, 2 * m, 2 * m), (1, 2 * m, 2 * m)]
    pixels, grid_thw = _inputs(spec, grid, seed=5)
    ref, ref_deep = _torch_vision(hf_models(preset), pixels, grid_thw)
    half = len(pixels) // 2
    swapped = np.concatenate([pixels[half:], pixels[:half]])
    embeds, deep = _run(sess, swapped, grid_thw)
    assert not compare("image_embeds", embeds, ref).passed
    assert not compare("deepstack_embeds", deep, ref_deep).passed


@pytest.mark.parametrize("preset", PRESETS)
def test_twin_deepstack_levels_out_of_order_fail(preset, vision, hf_models):
    sess, _, spec = vision(preset)
    pixels, grid_thw = _inputs(spec, [(1, 4 * spec.spatial_merge_size, 2 * spec.spatial_merge_size)], seed=9)
    _, ref_deep = _torch_vision(hf_models(preset), pixels, grid_thw)
    _, deep = _run(sess, pixels, grid_thw)
    assert compare("deepstack_embeds", deep, ref_deep).passed
    assert not compare("deepstack_embeds", deep[::-1], ref_deep).passed
    assert not compare("deepstack_embeds", np.zeros_like(deep), ref_deep).passed


# -- structure -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
def test_vision_graph_structure(preset, vision):
    _, path, spec = vision(preset)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    assert [i.name for i in graph.input] == ["pixel_values", "image_grid_thw"]
    assert dims(graph.input[0]) == ["num_patches", spec.patch_dim]
    assert dims(graph.input[1]) == ["num_images", 3]
    assert graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [o.name for o in graph.output] == ["image_embeds", "deepstack_embeds"]
    assert dims(graph.output[0]) == ["num_image_tokens", spec.out_hidden_size]
    assert dims(graph.output[1]) == [len(spec.deepstack_visual_indexes), "num_image_tokens", spec.out_hidden_size]

    ops = [n.op_type for n in graph.node]
    # per block an If: one run of equal-length segments goes straight to MultiHeadAttention, several through a
    # Loop over the runs; either way attention has no mask and no bias (what lets ONNX Runtime tile it)
    def sub(node, name):
        return next(a.g for a in node.attribute if a.name == name)

    guards = [n for n in graph.node if n.op_type == "If"]
    assert len(guards) == spec.depth and "Loop" not in ops and "MultiHeadAttention" not in ops
    names = [n.name for n in graph.node]
    for guard in guards:
        (single,) = [n for n in sub(guard, "then_branch").node if n.op_type == "MultiHeadAttention"]
        (loop,) = [n for n in sub(guard, "else_branch").node if n.op_type == "Loop"]
        (looped,) = [n for n in sub(loop, "body").node if n.op_type == "MultiHeadAttention"]
        assert len(single.input) == 3 and len(looped.input) == 3
        names += [n.name for g in (sub(guard, "then_branch"), sub(guard, "else_branch"), sub(loop, "body"))
                  for n in g.node]
    rotary = [n for n in graph.node if n.op_type == "RotaryEmbedding"]
    assert len(rotary) == 2 * spec.depth  # q and k of every block
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]  # norm1, norm2 per block; the mergers'
    assert len(norms) == 2 * spec.depth + 1 + len(spec.deepstack_visual_indexes)
    eps = [onnx.helper.get_attribute_value(a) for n in norms for a in n.attribute if a.name == "epsilon"]
    assert eps == [pytest.approx(spec.layer_norm_eps)] * len(norms), eps  # the config's (float32 in the graph)
    assert all(name.startswith("vision/") for name in names)
    assert len(set(names)) == len(names)
    large = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {t.name for t in large} >= {"vision/patch_embed/weight", "vision/pos_embed/weight"}
    locations = {e.value for t in large for e in t.external_data if e.key == "location"}
    assert locations == {"vision.onnx.data"}


def test_unusual_vision_config_matches_pytorch(tmp_path):
    """Shapes no preset has: head dim 72 (as in the 8B tower), DeepStack indexes out of order, 2 taps on a
    5x5 learned grid, quick_gelu, merge 2 with odd block counts."""
    import onnxruntime as ort
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from export.random_weights import init_scaled_
    from merge.contract.config import ModelConfig
    from merge.presets.shapes import preset_config
    from merge.stitch.parts import export_vision

    config = preset_config("tiny")
    config["vision_config"].update(hidden_size=144, num_heads=2, intermediate_size=96, depth=3,
                                   deepstack_visual_indexes=[2, 0], num_position_embeddings=25,
                                   hidden_act="quick_gelu", out_hidden_size=64)
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**config)).float().eval()
    init_scaled_(model, seed=11)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    spec = VisionSpec.from_config(config["vision_config"])
    path = export_vision(folder, ModelConfig.from_dict(config), tmp_path / "vision.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixels, grid_thw = _inputs(spec, [(1, 6, 10), (2, 2, 2), (1, 14, 6)], seed=4)
    with torch.no_grad():
        out = model.model.visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid_thw))
    embeds, deep = _run(sess, pixels, grid_thw)
    ref_deep = np.stack([d.numpy() for d in out.deepstack_features])
    results = [compare("image_embeds", embeds, out.pooler_output.numpy()), compare("deepstack_embeds", deep, ref_deep)]
    assert all(r.passed for r in results), "\n".join(r.line() for r in results)
    assert not compare("deepstack_embeds", deep[::-1], ref_deep).passed  # levels come in the tower's layer order
