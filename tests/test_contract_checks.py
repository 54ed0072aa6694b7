"""The raw contract, as a client in any language drives it (a bare ONNX Runtime session, no Python helper):
inputs that disagree fail with an error naming the check and both numbers; consistent inputs run (the twin)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from merge.runtime import CombinedModel
from merge.tools.verify import default_images


@pytest.fixture(scope="module")
def raw(combined):
    folder = combined("tiny")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    model = CombinedModel(folder)
    inputs = model.preprocessor.build_inputs("Describe.", default_images(2))
    feeds = model.first_feeds(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                              inputs["image_grid_thw"])
    return session, model, feeds


def _decode_feeds(raw):
    session, model, feeds = raw
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, feeds), strict=True))
    step = {"input_ids": np.array([[5]], np.int64),
            "attention_mask": np.ones((1, feeds["input_ids"].shape[1] + 1), np.int64),
            **model.no_vision(), "rope_deltas": out["rope_deltas_out"]}
    step.update({p: out[p.replace("past_key_values.", "present.")] for p in model.past_names})
    return step


def test_consistent_inputs_run(raw):
    session, model, feeds = raw
    session.run(None, feeds)
    session.run(None, _decode_feeds(raw))
    roomy = dict(feeds)  # past buffers with room for more than the whole call (a cache written in place)
    for name in model.past_names:
        roomy[name] = np.zeros((1, model.num_kv_heads, feeds["input_ids"].shape[1] + 1, model.head_dim), np.float32)
    session.run(None, roomy)


@pytest.mark.parametrize("case", ["fewer_image_tokens", "pixels_without_tokens", "mask_too_short",
                                  "past_buffer_too_small", "past_buffer_exactly_the_call", "mask_rows",
                                  "rope_deltas_rows", "patches_on_decode", "patch_rows_vs_grid", "grid_off_merge"])
def test_inconsistent_inputs_name_the_check(raw, case):
    session, model, first = raw
    feeds = dict(first)
    image = model.config.image_token_id
    if case == "fewer_image_tokens":  # 3 image tokens short of the features the pixels give
        ids = feeds["input_ids"].copy()
        ids[0, np.flatnonzero(ids[0] == image)[:3]] = 5
        feeds["input_ids"] = ids
        check, numbers = "image_tokens_vs_image_features", None
    elif case == "pixels_without_tokens":
        ids = feeds["input_ids"].copy()
        ids[ids == image] = 5
        feeds["input_ids"] = ids
        check, numbers = "image_tokens_vs_image_features", ("{0}", None)
    elif case == "mask_too_short":
        feeds = _decode_feeds(raw)
        feeds["attention_mask"] = feeds["attention_mask"][:, 1:]
        past = feeds["past_key_values.0.key"].shape[2]
        check, numbers = "attention_mask_length_vs_past_plus_sequence", (f"{{{past}}}", f"{{{past + 1}}}")
    elif case == "past_buffer_too_small":  # neither exactly the past (0) nor room for the whole call
        length = feeds["input_ids"].shape[1]
        for name in model.past_names:
            feeds[name] = np.zeros((1, model.num_kv_heads, length - 1, model.head_dim), np.float32)
        check, numbers = "attention_mask_length_vs_past_plus_sequence", (f"{{{length}}}", f"{{{2 * length - 1}}}")
    elif case == "past_buffer_exactly_the_call":  # a buffer must be longer than the mask (see mask_too_short)
        length = feeds["input_ids"].shape[1]
        for name in model.past_names:
            feeds[name] = np.zeros((1, model.num_kv_heads, length, model.head_dim), np.float32)
        check, numbers = "attention_mask_length_vs_past_plus_sequence", (f"{{{length}}}", f"{{{2 * length}}}")
    elif case == "mask_rows":
        feeds["attention_mask"] = np.concatenate([feeds["attention_mask"]] * 2)
        check, numbers = "attention_mask_rows_vs_input_ids_rows", ("{2}", "{1}")
    elif case == "rope_deltas_rows":
        feeds["rope_deltas"] = np.zeros((3, 1), np.int64)
        check, numbers = "rope_deltas_rows_vs_input_ids_rows", ("{3}", "{1}")
    elif case == "patches_on_decode":
        feeds = _decode_feeds(raw)
        feeds["pixel_values"], feeds["image_grid_thw"] = first["pixel_values"], first["image_grid_thw"]
        check, numbers = "patches_on_a_decode_call_vs_none", None
    elif case == "patch_rows_vs_grid":
        feeds["pixel_values"] = feeds["pixel_values"][:-4]
        check, numbers = "image_patches_vs_image_grid", None
    else:  # a grid whose h is not a multiple of the merge size, with matching pixel rows
        t, h, w = feeds["image_grid_thw"][0]
        grid = feeds["image_grid_thw"].copy()
        grid[0] = [t, h * w // 5 if (h * w) % 5 == 0 else 1, 5 if (h * w) % 5 == 0 else h * w]
        feeds["image_grid_thw"] = grid
        check, numbers = "grid_sides_off_merge_vs_zero", None
    with pytest.raises(Exception, match=check) as info:
        session.run(None, feeds)
    message = str(info.value)
    for number in numbers or ():
        if number is not None:
            assert number in message, message
