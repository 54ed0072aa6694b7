"""A real phone photo (4032x3024) through the first call of the combined model, at full size.

A small model with 16 vision heads and Qwen3-VL's published processor limits (longest_edge 16777216 pixels keeps
such a photo whole: 47,376 patches, 11,844 image tokens). The first call runs in a child process whose peak memory
is measured: at most 4 GiB (a padded, masked attention asked for tens of GB here). Its prefill logits must match
PyTorch within the fp32 bound; the twin (the photo's two halves swapped) must not.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from merge.stitch.child import run_python
from merge.tools.compare import compare

pytestmark = pytest.mark.slow  # a 12 MP photo through the first call and PyTorch: over a minute and a half

PHOTO = (4032, 3024)  # PIL size: width, height
PEAK_GIB = 4.0


def photo_config() -> dict:
    from merge.presets.shapes import preset_config

    config = preset_config("tiny")
    config["vision_config"].update(hidden_size=64, num_heads=16, intermediate_size=128, depth=1,
                                   deepstack_visual_indexes=[0], out_hidden_size=64)
    config["text_config"].update(num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2)
    return config


@pytest.fixture(scope="module")
def photo_model(tmp_path_factory):
    """(checkpoint folder, combined folder, PyTorch model, photo path)."""
    import torch
    from PIL import Image
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from export.random_weights import init_scaled_
    from merge.presets.files import write_tokenizer_and_processor
    from merge.sources.resolve import resolve_model
    from merge.stitch.pipeline import build

    work = tmp_path_factory.mktemp("photo")
    config = photo_config()
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**config)).float().eval()
    init_scaled_(model, seed=21)
    model.save_pretrained(work / "hf")
    write_tokenizer_and_processor(work / "hf", config)
    build(resolve_model(str(work / "hf")), work / "combined")

    # smooth colours across the frame, plus sensor-like noise
    width, height = PHOTO
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin((x + y) / 300)], axis=-1)
    noise = np.random.default_rng(3).normal(0, 12, base.shape)
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(work / "photo.jpg", quality=92)
    torch.set_num_threads(2)
    return work / "hf", work / "combined", model, work / "photo.jpg"


FIRST_CALL = textwrap.dedent("""
    import json, sys
    import numpy as np
    from merge.runtime import CombinedModel
    from merge.runtime.images import load_image

    folder, photo, out, swap = sys.argv[1:5]
    model = CombinedModel(folder, threads=2)
    inputs = model.preprocessor.build_inputs("Describe the photo.", [load_image(photo)])
    if swap == "1":  # the twin: the photo's two halves (whole merge blocks) exchanged
        first, second = np.split(inputs["pixel_values"], 2)
        inputs["pixel_values"] = np.concatenate([second, first])
    generation = model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                inputs["image_grid_thw"], max_new_tokens=1)
    np.savez(out, logits=generation.prefill_logits, **inputs)
    print(json.dumps({"grid": inputs["image_grid_thw"].tolist(), "seconds": generation.prefill_seconds}))
""")


def _first_call(combined, photo, out, swap=False):
    result = run_python(["-c", FIRST_CALL, str(combined), str(photo), str(out), "1" if swap else "0"])
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.peak_rss_gib


def _reference_logits(model, saved) -> np.ndarray:
    import torch

    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    with torch.no_grad():
        return model(**{k: torch.from_numpy(saved[k]) for k in keys}).logits.numpy()


def test_full_size_photo_in_bounded_memory_matches_pytorch(photo_model, tmp_path, capsys):
    _, combined, model, photo = photo_model
    report, peak = _first_call(combined, photo, tmp_path / "first.npz")
    saved = dict(np.load(tmp_path / "first.npz"))
    t, h, w = report["grid"][0]
    assert (t, h, w) == (1, 188, 252)  # kept at full size: 3008 x 4032 pixels, sides rounded to 32
    with capsys.disabled():
        print(f"\nphoto {PHOTO[0]}x{PHOTO[1]}: grid {h}x{w} = {h * w} patches, first call {report['seconds']:.1f} s, "
              f"peak {peak:.2f} GiB (bound {PEAK_GIB})")
    assert peak <= PEAK_GIB, f"the first call peaked at {peak:.2f} GiB"
    reference = _reference_logits(model, saved)
    result = compare("prefill logits", saved["logits"], reference)
    assert result.passed, result.line()

    # twin: the photo's halves exchanged must move the logits far past the bound
    _first_call(combined, photo, tmp_path / "swapped.npz", swap=True)
    swapped = np.load(tmp_path / "swapped.npz")["logits"]
    twin = compare("prefill logits (halves swapped)", swapped, reference)
    assert not twin.passed and twin.max_abs > 10 * twin.bound, twin.line()
