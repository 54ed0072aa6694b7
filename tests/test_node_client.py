"""Other ONNX Runtime bindings drive the combined model: Node.js with onnxruntime-node (native) and with
onnxruntime-web (the WebAssembly build browsers run), a plain greedy loop.

The JavaScript client has no glue beyond the loop: positions, the image and video merge and DeepStack are in the
graph.
Its prefill argmax at every position and its greedy tokens must equal the Python runtime's.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from merge.runtime import CombinedModel
from tests.test_combined_parity import _images

from .test_readme_and_cli import ROOT

pytestmark = pytest.mark.slow  # npm install on first use, then a Node.js process per case

CLIENT = ROOT / "clients" / "node"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def node_client():
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("node and npm are not installed on this machine")
    if not all((CLIENT / "node_modules" / package).is_dir() for package in ("onnxruntime-node", "onnxruntime-web")):
        # the CPU binaries ship inside the package; its postinstall only fetches GPU extras from elsewhere
        proc = subprocess.run(["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=CLIENT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return CLIENT / "generate.mjs"


@pytest.mark.parametrize("runtime", ["node", "web"])
@pytest.mark.parametrize("case", ["text", "two_images", "image_and_video", "int4"])
def test_node_matches_python(case, runtime, node_client, combined, sources, prep, tmp_path):
    # int4: an int4 folder with a float16 KV cache (the client feeds float16 pasts, as merge.json says)
    combined = combined("tiny", "int4", kv_cache="float16") if case == "int4" else combined("tiny")
    from merge.runtime.prompts import build_inputs
    from merge.runtime.video import VideoProcessor
    from tests.videos import write_clip

    tok, proc = prep("tiny")
    images = _images([(64, 96), (64, 96)], 9) if case == "two_images" else []
    videos, video_processor = [], VideoProcessor.from_folder(sources("tiny").folder)
    if case == "image_and_video":
        images = _images([(80, 64)], 10)
        videos = [video_processor.load(write_clip(tmp_path / "clip.mp4", 9, 6, 64, 48))]
    inputs = build_inputs(tok, proc, "Write a short poem about the sea and the sky.", images, sources("tiny").config,
                          video_processor, videos)
    keys = ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]
    keys += ["pixel_values_videos", "video_grid_thw"] if videos else []  # left out: the model's defaults
    feeds = {k: inputs[k].tolist() for k in keys}
    (tmp_path / "inputs.json").write_text(json.dumps(feeds))
    proc_ = subprocess.run(["node", str(node_client), str(combined), str(tmp_path / "inputs.json"), str(NEW_TOKENS),
                            runtime], capture_output=True, text=True, timeout=300)
    assert proc_.returncode == 0, proc_.stderr[-2000:]
    assert "appears in graph inputs" not in proc_.stderr  # loading the model warns of nothing (no initializer input)
    js = json.loads(proc_.stdout)

    gen = CombinedModel(combined).generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                           inputs["image_grid_thw"], max_new_tokens=NEW_TOKENS,
                                           pixel_values_videos=inputs["pixel_values_videos"],
                                           video_grid_thw=inputs["video_grid_thw"])
    if case == "int4" and runtime == "web":
        # the WebAssembly build's 4-bit kernel has no int8-activation path: its products round otherwise than the
        # native one's, and a near tie among the tiny preset's logits may go the other way (measured: 1 of 28
        # positions). The float16 pasts ran; most positions must agree
        agree = (np.array(js["prefill_argmax"]) == gen.prefill_logits.argmax(-1)).mean()
        assert agree >= 0.9, agree
        return
    np.testing.assert_array_equal(np.array(js["prefill_argmax"]), gen.prefill_logits.argmax(-1))
    np.testing.assert_array_equal(np.array(js["tokens"]), gen.tokens)
    if case == "two_images":  # twin: the comparison can fail - the two same-size images swapped give other argmaxes
        first, second = np.split(inputs["pixel_values"], 2)
        swapped = CombinedModel(combined).generate(inputs["input_ids"], inputs["attention_mask"],
                                                   np.concatenate([second, first]), inputs["image_grid_thw"],
                                                   max_new_tokens=1)
        assert (np.array(js["prefill_argmax"]) != swapped.prefill_logits.argmax(-1)).any()
