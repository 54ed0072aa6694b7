"""Bad vision inputs and configs are refused before anything runs, with the numbers that disagree."""

from __future__ import annotations

import numpy as np
import pytest

from merge.contract.vision import VisionSpec, check_vision_inputs
from merge.errors import MergeError
from merge.presets.shapes import preset_config

SPEC = VisionSpec.from_config(preset_config("tiny")["vision_config"])


def _pixels(rows: int) -> np.ndarray:
    return np.zeros((rows, SPEC.patch_dim), np.float32)


def test_valid_inputs_pass():
    check_vision_inputs(_pixels(4 * 6 + 2 * 4 * 4), np.array([[1, 4, 6], [2, 4, 4]]), SPEC)
    check_vision_inputs(_pixels(0), np.zeros((0, 3), np.int64), SPEC)


@pytest.mark.parametrize(
    ("rows", "grid", "message"),
    [
        (25, [[1, 4, 6]], "pixel_values has 25 patch rows but image_grid_thw sums to 24"),
        (24, [[1, 4, 6], [1, 2, 2]], "sums to 28"),
        (15, [[1, 3, 5]], "divisible by the spatial merge size 2"),
        (24, [[1, 4, 6, 1]], "shape [num_images, 3]"),
        (0, [[0, 4, 6]], "must be positive"),
    ],
)
def test_bad_grid_is_refused(rows, grid, message):
    with pytest.raises(MergeError, match=None) as info:
        check_vision_inputs(_pixels(rows), np.array(grid, np.int64), SPEC)
    assert message in str(info.value)


def test_wrong_patch_width_is_refused():
    with pytest.raises(MergeError) as info:
        check_vision_inputs(np.zeros((24, 1176), np.float32), np.array([[1, 4, 6]]), SPEC)
    assert "1176 values per patch; this model expects 1536" in str(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_heads": 5}, "not divisible by num_heads 5"),
        ({"num_position_embeddings": 50}, "not a square"),
        ({"deepstack_visual_indexes": [0, 9]}, "[9] outside 0..3"),
        ({"deepstack_visual_indexes": [3, 1, 3]}, "[3, 1, 3] repeats layer(s) [3]"),
        ({"hidden_act": "relu6"}, "hidden_act 'relu6' unsupported"),
        ({"layer_norm_eps": 0}, "layer_norm_eps = 0.0, but transformers' Qwen3-VL vision tower ignores that key"),
        ({"layer_norm_eps": 1e-5}, "layer_norm_eps = 1e-05, but transformers' Qwen3-VL vision tower ignores"),
    ],
)
def test_bad_vision_config_is_refused(change, message):
    cfg = {**preset_config("tiny")["vision_config"], **change}
    with pytest.raises(MergeError) as info:
        VisionSpec.from_config(cfg)
    assert message in str(info.value)


def test_layer_norm_eps_is_transformers():
    """transformers' vision LayerNorms use eps 1e-6 and its config has no key for it: the spec carries it, and a
    config that names the same value is accepted (the twin, another value, is refused above)."""
    assert SPEC.layer_norm_eps == 1e-6
    cfg = {**preset_config("tiny")["vision_config"], "layer_norm_eps": 1e-6}
    assert VisionSpec.from_config(cfg).layer_norm_eps == 1e-6

