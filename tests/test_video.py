"""Videos: the runtime's preprocessing held to transformers' own video code, and the combined model held to HF
``generate`` on clips, a clip beside images, and a left-padded batch with a clip in one row only.

Preprocessing, step by step against transformers (no torchvision needed): frame sampling
(``Qwen3VLVideoProcessor.sample_frames``), the clip's size (its ``smart_resize``, with and without the per-frame
cap), timestamps and placeholder text (``Qwen3VLProcessor._calculate_timestamps`` / ``replace_video_token``),
patches (its ``patchify``), decoding (``read_video_pyav``), and the resize kernel against PyTorch's uint8
antialiased bicubic (what torchvision's resize runs), bit for bit. Where torchvision is installed, the whole chain
is also compared with ``Qwen3VLProcessor(videos=...)`` itself, bit for bit.

End to end (fp32, tiny presets): prefill logits within the fp32 bound and 32 greedy tokens equal. Broken twins that
must fail: timestamps dropped, the two frames of each group swapped, video positions made 1-D.
"""

from __future__ import annotations

import numpy as np
import pytest

from merge.errors import MergeError
from merge.runtime import CombinedModel
from merge.runtime.video import FrameResizer, VideoProcessor, frame_timestamps, sample_indices
from merge.tools.compare import compare
from tests.test_combined_parity import _reference
from tests.videos import frame, write_clip, write_frames

NEW_TOKENS = 32


# -- sampling, size, timestamps, placeholders, patches: transformers' own functions ---------------------------

@pytest.mark.parametrize(("total", "source_fps", "fps", "min_frames", "max_frames"), [
    (25, 10, 2, 4, 768), (1, 24, 2, 4, 768), (3, 30, 2, 4, 768), (301, 29.97, 2, 4, 768), (7, 7, 2, 4, 768),
    (900, 30, 2, 4, 16), (120, 24, 0.5, 4, 768), (10, 25, 6, 2, 5), (1000, 60, 3, 4, 768), (48, 24, 2, 1, 3),
])
def test_sampling_matches_transformers(total, source_fps, fps, min_frames, max_frames):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    hf = Qwen3VLVideoProcessor(min_frames=min_frames, max_frames=max_frames)
    want = hf.sample_frames(VideoMetadata(total_num_frames=total, fps=source_fps), fps=fps)
    np.testing.assert_array_equal(sample_indices(total, source_fps, fps, min_frames, max_frames), want)


SIZES = [(5, 64, 96), (4, 480, 640), (21, 1080, 1920), (2, 20, 600), (9, 33, 47), (768, 720, 1280), (3, 4000, 31)]


@pytest.mark.parametrize("cap", [False, True])
@pytest.mark.parametrize(("frames", "height", "width"), SIZES)
def test_clip_size_matches_transformers(frames, height, width, cap):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    ours = VideoProcessor(cap_pixels_per_frame=cap)
    hf = Qwen3VLVideoProcessor(cap_pixels_per_frame=cap)
    patches = hf.get_num_of_video_patches(frames, height, width)
    h, w = ours.target_size(frames, height, width)
    grid_t = -(-frames // ours.temporal_patch_size)
    assert grid_t * (h // ours.patch_size) * (w // ours.patch_size) == patches
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    max_pixels = ours.max_pixels
    if cap:
        factor = ours.patch_size * ours.merge_size
        max_pixels = max(min(ours.max_video_tokens * factor**2, ours.max_pixels // frames),
                         int(ours.min_pixels * 1.05)) * frames
    assert (h, w) == smart_resize(frames, height, width, 2, 32, ours.min_pixels, max_pixels)


def test_one_frame_clip_is_refused_like_transformers():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    with pytest.raises(ValueError, match="must be larger than temporal_factor"):
        smart_resize(1, 64, 64)
    with pytest.raises(MergeError, match="shorter than the vision tower's temporal patch"):
        VideoProcessor().target_size(1, 64, 64)


@pytest.mark.parametrize("indices", [[0, 6, 12, 18, 24], [0, 1], [3], list(range(0, 100, 7)), [0, 12, 24, 37]])
@pytest.mark.parametrize("source_fps", [10, 29.97, 2, 24])
def test_timestamps_match_transformers(indices, source_fps, sources):
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    want = Qwen3VLProcessor._calculate_timestamps(None, list(indices), source_fps, 2)
    assert frame_timestamps(indices, source_fps, 2) == want


def test_placeholders_match_transformers(sources):
    """The text each video becomes: transformers' ``replace_video_token`` with the same grid and metadata."""
    from transformers.video_utils import VideoMetadata

    from merge.contract.names import VIDEO_TOKEN
    from merge.runtime.prompts import expand_video_tokens
    from tests.hf import hf_processor

    processor = hf_processor(sources("tiny").folder, video=True)
    for grid, indices, source_fps in [([3, 10, 14], [0, 6, 12, 18, 24], 10.0), ([1, 4, 8], [0, 30], 30.0),
                                      ([4, 6, 2], [0, 5, 10, 15, 20, 25, 30, 35], 23.976)]:
        metadata = VideoMetadata(total_num_frames=indices[-1] + 1, fps=source_fps, frames_indices=list(indices))
        want = processor.replace_video_token({"video_grid_thw": [np.array(grid)], "video_metadata": [metadata]}, 0)
        times = frame_timestamps(indices, source_fps, 2)
        assert expand_video_tokens(f"a{VIDEO_TOKEN}b", np.array([grid]), [times], 2) == f"a{want}b"


@pytest.mark.parametrize("frames", [2, 3, 4, 5])
def test_patches_match_transformers(frames):
    import torch
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from merge.runtime.video import Video

    rng = np.random.default_rng(frames)
    clip = rng.integers(0, 256, (frames, 64, 96, 3), dtype=np.uint8)
    ours = VideoProcessor()
    pixels = ours.pixels(Video(clip, np.arange(frames), 2.0, frames))
    rows, grid = ours.patchify(pixels)
    normalized = (torch.from_numpy(clip).permute(0, 3, 1, 2).float() - 127.5) / 127.5  # mean = std = 0.5, fused
    want, *want_grid = Qwen3VLVideoProcessor().patchify(normalized[None], 16, 2, 2)
    assert grid == want_grid
    np.testing.assert_array_equal(rows, want[0].numpy())


RESIZES = [((480, 640), (224, 288)), ((64, 96), (160, 224)), ((37, 53), (64, 96)), ((300, 300), (300, 200)),
           ((720, 1280), (96, 160)), ((100, 100), (7, 9)), ((32, 32), (33, 31)), ((2000, 64), (64, 64))]


def _torch_uint8_resize(image, out_hw):
    """What torchvision's ``resize(uint8 video, bicubic, antialias=True)`` runs: PyTorch's interpolate on uint8."""
    import torch

    x = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
    return torch.nn.functional.interpolate(x, size=out_hw, mode="bicubic", antialias=True)[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize(("in_hw", "out_hw"), RESIZES)
def test_resize_matches_torch_uint8_bicubic_exactly(in_hw, out_hw):
    image = np.random.default_rng(in_hw[0]).integers(0, 256, (*in_hw, 3), dtype=np.uint8)
    np.testing.assert_array_equal(FrameResizer(in_hw, out_hw)(image), _torch_uint8_resize(image, out_hw))


@pytest.mark.parametrize("kernel", ["pillow_bicubic", "float_interpolate"])
def test_twin_other_resize_kernels_fail(kernel):
    """Pillow's bicubic (the image path's) and PyTorch's float interpolation are close, not equal: the same
    comparison must see the difference."""
    import torch
    from PIL import Image

    image = np.random.default_rng(1).integers(0, 256, (72, 120, 3), dtype=np.uint8)
    if kernel == "pillow_bicubic":
        other = np.asarray(Image.fromarray(image).resize((160, 96), resample=Image.BICUBIC))
    else:
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        other = torch.nn.functional.interpolate(x, size=(96, 160), mode="bicubic", antialias=True)
        other = other.clamp(0, 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert not np.array_equal(other, _torch_uint8_resize(image, (96, 160)))


@pytest.mark.parametrize(("frames", "fps", "width", "height"), [(25, 10, 96, 64), (7, 3, 80, 48), (61, 30, 64, 64),
                                                                (2, 24, 48, 32)])
def test_decoding_matches_transformers_pyav_reader(frames, fps, width, height, tmp_path):
    """The sampled frames of a file, before resizing: transformers' ``read_video_pyav`` with the same sampling."""
    from transformers.video_utils import read_video_pyav

    clip = write_clip(tmp_path / "clip.mp4", frames, fps, width, height)
    processor = VideoProcessor(do_resize=False)
    video = processor.load(clip)
    want, metadata = read_video_pyav(str(clip), sample_indices_fn=lambda metadata, **_: processor.indices(
        metadata.total_num_frames, metadata.fps))
    assert video.total_frames == metadata.total_num_frames == frames
    assert video.source_fps == pytest.approx(metadata.fps)
    np.testing.assert_array_equal(video.frames, want)


def test_folder_of_frames_is_a_clip_at_the_sampling_rate(tmp_path):
    folder = write_frames(tmp_path / "frames", 6, 64, 48)
    video = VideoProcessor(do_resize=False).load(folder)
    assert video.indices.tolist() == list(range(6)) and video.source_fps == 2.0
    np.testing.assert_array_equal(video.frames[3], frame(3, 64, 48))
    assert frame_timestamps(video.indices, video.source_fps, 2) == [0.25, 1.25, 2.25]
    listed = VideoProcessor(do_resize=False).load([frame(i, 64, 48) for i in range(6)])
    np.testing.assert_array_equal(listed.frames, video.frames)


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p / "missing.mp4", "video file not found"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "holds no frames"),
    (lambda p: (p / "text.mp4").write_text("not a video") and p / "text.mp4", "not a video PyAV can read"),
    (lambda p: write_clip(p / "one.mp4", 1, 10, 64, 64), "shorter than the vision tower's temporal patch"),
    (lambda p: write_frames(p / "mixed", 3, 64, 48) and _odd_frame(p / "mixed"), "every frame of a video must have"),
])
def test_bad_videos_are_refused_with_their_name(make, message, tmp_path):
    path = make(tmp_path)
    with pytest.raises(MergeError, match=message):
        VideoProcessor().load(path)


def _odd_frame(folder):
    from PIL import Image

    Image.fromarray(frame(9, 32, 32)).save(folder / "frame_0001.png")
    return folder


def test_config_values_are_checked(tmp_path):
    with pytest.raises(MergeError, match="min_frames 9 is larger than max_frames 3"):
        VideoProcessor.from_config({"min_frames": 9, "max_frames": 3})
    with pytest.raises(MergeError, match="fps"):
        VideoProcessor.from_config({"fps": -1})
    with pytest.raises(MergeError, match=r"size\.longest_edge = 1000000000000000000 must be an integer"):
        VideoProcessor.from_config({"size": {"longest_edge": 10**18}})
    with pytest.raises(MergeError, match="--max-frames 0"):
        VideoProcessor().with_sampling(max_frames=0)


# -- the whole chain against Qwen3VLProcessor, where torchvision is installed ---------------------------------

def test_whole_chain_matches_transformers_processor(sources, tmp_path):
    pytest.importorskip("torchvision", exc_type=ImportError)
    from transformers.video_utils import read_video_pyav

    from merge.runtime.preprocess import Preprocessor
    from tests.hf import hf_processor

    folder = sources("tiny").folder
    processor = hf_processor(folder, video=True)
    ours = Preprocessor(folder)
    clip = write_clip(tmp_path / "clip.mp4", 37, 12, 120, 72)
    frames, metadata = read_video_pyav(str(clip), sample_indices_fn=lambda metadata, **_: np.arange(
        metadata.total_num_frames))
    content = [{"type": "video"}, {"type": "text", "text": "What moves?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    want = processor(text=[text], videos=[frames], video_metadata=[metadata], do_sample_frames=True,
                     cap_pixels_per_frame=False, return_tensors="np")
    got = ours.build_inputs("What moves?", videos=[clip])
    np.testing.assert_array_equal(got["video_grid_thw"], want["video_grid_thw"])
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(got["pixel_values_videos"], want["pixel_values_videos"])


# -- end to end against HF generate -----------------------------------------------------------------------------

def _images(sizes, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return {"even": write_clip(folder / "even.mp4", 25, 10, 96, 64),   # 5 frames kept: 3 groups, the last padded
            "odd": write_clip(folder / "odd.mp4", 14, 4, 64, 96),      # 7 frames kept
            "short": write_clip(folder / "short.mp4", 8, 8, 80, 48)}   # 4 frames (min_frames): 2 groups


def _video_inputs(case, preset, sources, prep, clips):
    from merge.runtime.prompts import build_batch_inputs
    from merge.runtime.video import VideoProcessor

    config = sources(preset).config
    tok, proc = prep(preset)
    video_processor = VideoProcessor.from_folder(sources(preset).folder)
    load = video_processor.load
    rows = {
        "one_clip": (["What happens?"], [[]], [[load(clips["even"])]]),
        "odd_frames": (["Describe the motion."], [[]], [[load(clips["odd"])]]),
        "clip_and_two_images": (["Compare the pictures with the clip."], [_images([(64, 96), (120, 80)], 3)],
                                [[load(clips["short"])]]),
        "batch_clip_in_one_row": (["Describe the picture in a few words.", "And this clip?", "Hello there"],
                                  [_images([(64, 64)], 4), [], []], [[], [load(clips["odd"])], []]),
    }
    prompts, images, videos = rows[case]
    return build_batch_inputs(tok, proc, prompts, images, config, video_processor, videos)


def _run(folder, inputs, max_new_tokens=NEW_TOKENS):
    return CombinedModel(folder).generate(
        inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"],
        pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"],
        max_new_tokens=max_new_tokens,
    )


CASES = ["one_clip", "odd_frames", "clip_and_two_images", "batch_clip_in_one_row"]


@pytest.mark.parametrize("case", CASES)
def test_video_matches_generate_tiny(case, combined, hf_models, sources, prep, clips):
    _check("tiny", case, combined, hf_models, sources, prep, clips)


@pytest.mark.parametrize("case", ["clip_and_two_images"])
def test_video_matches_generate_merge1(case, combined, hf_models, sources, prep, clips):
    _check("tiny-merge1", case, combined, hf_models, sources, prep, clips)


def _check(preset, case, combined, hf_models, sources, prep, clips):
    inputs = _video_inputs(case, preset, sources, prep, clips)
    assert len(inputs["video_grid_thw"]) == 1
    ref_logits, ref_tokens = _reference(hf_models(preset), inputs)
    gen = _run(combined(preset), inputs)
    mask = inputs["attention_mask"].astype(bool)
    result = compare("prefill_logits", gen.prefill_logits[mask], ref_logits[mask])
    assert result.passed, result.line()
    agree = (gen.tokens == ref_tokens).mean()
    assert agree == 1.0, f"greedy tokens agree on {agree:.1%}:\nonnx {gen.tokens}\nref  {ref_tokens}"


# -- broken twins ------------------------------------------------------------------------------------------------

def _last_logits_check(gen, ref_logits):
    return compare("next_token_logits", gen.prefill_logits[:, -1], ref_logits[:, -1])


def test_twin_timestamps_dropped_fails(combined, hf_models, sources, prep, clips, monkeypatch):
    import re

    from merge.runtime import prompts

    inputs = _video_inputs("one_clip", "tiny", sources, prep, clips)
    ref_logits, _ = _reference(hf_models("tiny"), inputs)
    assert _last_logits_check(_run(combined("tiny"), inputs, 1), ref_logits).passed
    expand = prompts.expand_video_tokens
    monkeypatch.setattr(prompts, "expand_video_tokens",
                        lambda *args: re.sub(r"<[0-9.]+ seconds>", "", expand(*args)))
    bare = _video_inputs("one_clip", "tiny", sources, prep, clips)
    assert bare["input_ids"].shape[1] < inputs["input_ids"].shape[1]
    result = _last_logits_check(_run(combined("tiny"), bare, 1), ref_logits)
    assert not result.passed, result.line()


def test_twin_frames_of_a_group_swapped_fails(combined, hf_models, sources, prep, clips):
    inputs = _video_inputs("one_clip", "tiny", sources, prep, clips)
    ref_logits, _ = _reference(hf_models("tiny"), inputs)
    patch_dim = inputs["pixel_values_videos"].shape[1]
    per_frame = patch_dim // 3 // 2  # rows hold channel, then the group's 2 frames, then the patch's pixels
    rows = inputs["pixel_values_videos"].reshape(-1, 3, 2, per_frame)
    swapped = {**inputs, "pixel_values_videos": rows[:, :, ::-1].reshape(-1, patch_dim).copy()}
    result = _last_logits_check(_run(combined("tiny"), swapped, 1), ref_logits)
    assert not result.passed, result.line()


def test_twin_video_positions_1d_fails(combined, hf_models, sources, prep, clips, tmp_path):
    from tests.sabotage import broken_copy

    inputs = _video_inputs("one_clip", "tiny", sources, prep, clips)
    ref_logits, _ = _reference(hf_models("tiny"), inputs)
    broken = broken_copy(combined("tiny"), tmp_path / "one_d", "one_d_positions")
    result = compare("prefill_logits", _run(broken, inputs, 1).prefill_logits, ref_logits)
    assert not result.passed, result.line()


# -- the contract -------------------------------------------------------------------------------------------------

def test_video_tokens_must_match_the_video_grid(combined, sources, prep, clips):
    inputs = dict(_video_inputs("one_clip", "tiny", sources, prep, clips))
    ids = inputs["input_ids"].copy()
    ids[0, 0] = sources("tiny").config.video_token_id
    with pytest.raises(MergeError, match=r"video tokens .* video_grid_thw gives"):
        _run(combined("tiny"), {**inputs, "input_ids": ids}, 1)


def test_the_graph_checks_video_patches_against_the_video_grid(combined, sources, prep, clips):
    """A client in any language that sends video patches for a different grid gets the graph's own error."""
    import onnxruntime as ort

    inputs = _video_inputs("one_clip", "tiny", sources, prep, clips)
    model = CombinedModel(combined("tiny"))
    feeds = model.first_feeds(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                              inputs["image_grid_thw"], inputs["pixel_values_videos"], inputs["video_grid_thw"])
    feeds["pixel_values_videos"] = feeds["pixel_values_videos"][4:]
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.Fail, match="video_patches_vs_video_grid"):
        model.forward(feeds)


def test_chat_answers_about_a_clip(combined, clips):
    model = CombinedModel(combined("tiny"))
    completion = model.complete("What happens?", videos=[clips["even"]], max_new_tokens=4)
    assert completion.num_videos == 1 and completion.video_tokens == 3 * 35
    batch = model.complete(["What happens?", "Hi"], videos=[[clips["odd"]], []], max_new_tokens=3)
    assert len(batch.texts) == 2 and batch.num_videos == 1
