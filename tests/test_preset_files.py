"""Offline tokenizer / image-processor files of the random-weight presets (merge.presets.files), read by
transformers as a published folder is."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from merge.contract.config import ModelConfig
from merge.presets.files import write_tokenizer_and_processor
from merge.presets.shapes import PRESETS, SPECIAL_TOKENS, special_token_ids
from merge.runtime.prompts import build_batch_inputs, build_inputs
from tests.hf import hf_inputs, hf_processor, load_preprocessors

ROOT = pathlib.Path(__file__).resolve().parents[1]

FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)
PUBLISHED_FORMAT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this.<|im_end|>\n<|im_start|>assistant\n"
)
# PIL sizes are (width, height). Qwen3-VL's 65536-pixel minimum upscales both; the grids are (t, h, w) in patches.
IMAGE_SIZES = ((64, 96), (200, 120))
EXPECTED_GRIDS = {
    "tiny": [[1, 20, 14], [1, 14, 22]],  # patch 16, merge 2: factor 32
    "tiny-merge1": [[1, 23, 15], [1, 15, 24]],  # patch 14, merge 1: factor 14
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, pathlib.Path]:
    out = {}
    for name in ("tiny", "tiny-merge1", "qwen3-vl-2b"):
        folder = tmp_path_factory.mktemp(name.replace("-", "_"))
        write_tokenizer_and_processor(folder, PRESETS[name])
        out[name] = folder
    return out


def _images() -> list:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in IMAGE_SIZES]


def _base(config: dict) -> int:
    return config["image_token_id"] - SPECIAL_TOKENS.index("<|image_pad|>")


@pytest.mark.parametrize("name", ["tiny", "qwen3-vl-2b"])
def test_special_ids_match_config(folders, name):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    config = PRESETS[name]
    vocab_size = config["text_config"]["vocab_size"]
    expected = special_token_ids(_base(config))
    assert expected["<|image_pad|>"] == config["image_token_id"]
    assert expected["<|video_pad|>"] == config["video_token_id"]
    assert expected["<|vision_start|>"] == config["vision_start_token_id"]

    raw = Tokenizer.from_file(str(folders[name] / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(folders[name]))
    for token, token_id in expected.items():
        assert raw.token_to_id(token) == token_id, token
        assert hf.convert_tokens_to_ids(token) == token_id, token
        assert raw.decode([token_id], skip_special_tokens=False) == token
        assert hf.decode([token_id]) == token

    ids = hf("<|vision_start|><|image_pad|><|vision_end|>hello")["input_ids"]
    assert ids[:3] == [expected["<|vision_start|>"], config["image_token_id"], expected["<|vision_end|>"]]
    assert raw.encode("<|image_pad|>").ids == [config["image_token_id"]]

    # The BPE part sits strictly below the specials; everything fits the model's embedding table.
    bpe_ids = [i for tok, i in raw.get_vocab().items() if tok not in expected]
    assert max(bpe_ids) < _base(config)
    assert len(bpe_ids) >= 256 + 200  # byte alphabet plus a useful number of merges
    assert max(raw.get_vocab().values()) < vocab_size
    assert len(hf) < vocab_size
    assert max(hf.get_vocab().values()) == _base(config) + len(SPECIAL_TOKENS) - 1

    assert hf.eos_token == "<|im_end|>" and hf.eos_token_id == expected["<|im_end|>"]
    assert hf.pad_token == "<|endoftext|>" and hf.pad_token_id == expected["<|endoftext|>"]
    assert hf.bos_token is None
    special = set(hf.all_special_tokens)
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>"} <= special
    assert not {"<think>", "</think>", "<tool_call>", "<|fim_prefix|>"} & special
    assert hf.decode(ids, skip_special_tokens=True) == "hello"

    generation = json.loads((folders[name] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [expected["<|im_end|>"], expected["<|endoftext|>"]]
    assert generation["pad_token_id"] == expected["<|endoftext|>"]
    assert generation["do_sample"] is False


def test_english_prompts_are_compact(folders):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folders["tiny"]))
    assert len(hf("Describe this image.")["input_ids"]) <= 6
    text = "What is the color of the car in the picture?"
    ids = hf(text)["input_ids"]
    assert len(ids) <= 15
    assert hf.decode(ids) == text


@pytest.mark.parametrize("name", ["tiny", "qwen3-vl-2b"])
def test_chat_template(folders, name):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folders[name]))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this."}]}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == PUBLISHED_FORMAT
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert hf.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )


@pytest.mark.parametrize("name", ["tiny", "tiny-merge1"])
def test_image_processor_shapes(folders, name):
    from transformers import AutoImageProcessor

    vision = PRESETS[name]["vision_config"]
    patch_dim = 3 * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    processor = AutoImageProcessor.from_pretrained(str(folders[name]))
    assert processor.patch_size == vision["patch_size"]
    assert processor.merge_size == vision["spatial_merge_size"]
    assert processor.temporal_patch_size == vision["temporal_patch_size"]

    images = _images()
    for image, grid in zip(images, EXPECTED_GRIDS[name], strict=True):
        out = processor(images=[image], return_tensors="np")
        assert out["image_grid_thw"].tolist() == [grid]
        assert out["pixel_values"].shape == (int(np.prod(grid)), patch_dim)
    out = processor(images=images, return_tensors="np")
    assert out["image_grid_thw"].tolist() == EXPECTED_GRIDS[name]
    assert out["pixel_values"].shape == (sum(int(np.prod(g)) for g in EXPECTED_GRIDS[name]), patch_dim)
    assert out["pixel_values"].dtype == np.float32
    assert out["pixel_values"].min() >= -1.0 and out["pixel_values"].max() <= 1.0  # mean/std 0.5


@pytest.mark.parametrize("name", ["tiny", "tiny-merge1"])
def test_build_inputs(folders, name):
    config = PRESETS[name]
    merge = config["vision_config"]["spatial_merge_size"]
    tokenizer, image_processor = load_preprocessors(folders[name])
    images = _images()
    inputs = build_inputs(tokenizer, image_processor, "Describe this.", images, ModelConfig.from_dict(config))

    grid = inputs["image_grid_thw"]
    assert grid.tolist() == EXPECTED_GRIDS[name] and grid.dtype == np.int64
    n_image_tokens = int(grid.prod(-1).sum()) // merge**2
    input_ids = inputs["input_ids"]
    assert input_ids.dtype == np.int64 and input_ids.shape[0] == 1
    assert int((input_ids == config["image_token_id"]).sum()) == n_image_tokens
    assert inputs["attention_mask"].shape == input_ids.shape and inputs["attention_mask"].all()
    np.testing.assert_array_equal(inputs["mm_token_type_ids"], (input_ids == config["image_token_id"]).astype(np.int64))
    assert inputs["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    assert inputs["pixel_values"].dtype == np.float32
    # Each image is vision_start, its expanded pads, vision_end, in order.
    text = tokenizer.decode(input_ids[0])
    per_image = [int(np.prod(g)) // merge**2 for g in EXPECTED_GRIDS[name]]
    expected_text = PUBLISHED_FORMAT.replace(
        "<|vision_start|><|image_pad|><|vision_end|>",
        "".join(f"<|vision_start|>{'<|image_pad|>' * n}<|vision_end|>" for n in per_image),
    )
    assert text == expected_text

    empty = build_inputs(tokenizer, image_processor, "Describe this.", [], ModelConfig.from_dict(config))
    patch_dim = 3 * config["vision_config"]["temporal_patch_size"] * config["vision_config"]["patch_size"] ** 2
    assert empty["pixel_values"].shape == (0, patch_dim) and empty["pixel_values"].dtype == np.float32
    assert empty["image_grid_thw"].shape == (0, 3) and empty["image_grid_thw"].dtype == np.int64
    assert not empty["mm_token_type_ids"].any()
    no_image_text = "<|im_start|>user\nDescribe this.<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(empty["input_ids"][0]) == no_image_text


@pytest.mark.parametrize("count", [0, 1, 2])
def test_build_inputs_matches_qwen3vl_processor(folders, count):
    """Same arrays as transformers' own Qwen3VLProcessor (its chat template, expansion and mm_token_type_ids)."""
    config = ModelConfig.from_dict(PRESETS["tiny"])
    tokenizer, image_processor = load_preprocessors(folders["tiny"])
    images = _images()[:count]
    reference = hf_inputs(hf_processor(folders["tiny"]), "Describe this.", images)
    ours = build_inputs(tokenizer, image_processor, "Describe this.", images, config)
    assert ours["pixel_values_videos"].shape[0] == 0 and ours["video_grid_thw"].shape[0] == 0
    ours = {k: v for k, v in ours.items() if k not in ("pixel_values_videos", "video_grid_thw")}  # no video: left out
    if not images:  # the processor leaves out the image arrays when there are none
        assert ours["pixel_values"].shape[0] == 0 and ours["image_grid_thw"].shape[0] == 0
        ours = {k: v for k, v in ours.items() if k not in ("pixel_values", "image_grid_thw")}
    assert set(ours) == set(reference)
    for key, value in ours.items():
        np.testing.assert_array_equal(value, reference[key], err_msg=key)


def test_build_batch_inputs_left_pads(folders):
    config = ModelConfig.from_dict(PRESETS["tiny"])
    tokenizer, image_processor = load_preprocessors(folders["tiny"])
    images = _images()
    batch = build_batch_inputs(tokenizer, image_processor, ["Describe this.", "Hi"], [images[:1], []], config)
    single = [
        build_inputs(tokenizer, image_processor, "Describe this.", images[:1], config),
        build_inputs(tokenizer, image_processor, "Hi", [], config),
    ]
    length = max(s["input_ids"].shape[1] for s in single)
    assert batch["input_ids"].shape == (2, length)
    for row, s in enumerate(single):
        n = s["input_ids"].shape[1]
        np.testing.assert_array_equal(batch["input_ids"][row, length - n :], s["input_ids"][0])
        np.testing.assert_array_equal(batch["mm_token_type_ids"][row, length - n :], s["mm_token_type_ids"][0])
        assert batch["attention_mask"][row].sum() == n and batch["attention_mask"][row, length - n :].all()
        assert (batch["input_ids"][row, : length - n] == tokenizer.pad_token_id).all()
    np.testing.assert_array_equal(batch["pixel_values"], single[0]["pixel_values"])
    np.testing.assert_array_equal(batch["image_grid_thw"], single[0]["image_grid_thw"])


def _file_bytes(folder: pathlib.Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in FILES}


@pytest.mark.parametrize("name", ["tiny", "qwen3-vl-2b"])
def test_deterministic(tmp_path, folders, name):
    write_tokenizer_and_processor(tmp_path / "again", PRESETS[name])
    assert _file_bytes(tmp_path / "again") == _file_bytes(folders[name])
    # A fresh interpreter (other hash seeds, other Rust hash-map states) gives the same bytes.
    code = (
        "import pathlib, sys; sys.path.insert(0, sys.argv[1]); from merge.presets.shapes import PRESETS; "
        "from merge.presets.files import write_tokenizer_and_processor; "
        "write_tokenizer_and_processor(pathlib.Path(sys.argv[2]), PRESETS[sys.argv[3]])"
    )
    subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path / "fresh"), name], check=True, timeout=120)
    assert _file_bytes(tmp_path / "fresh") == _file_bytes(folders[name])
