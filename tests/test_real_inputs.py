"""Real photos, real clips, real folders: what phones and cutting tools write, and configs as people edit them.

- **Processor configs typed**: a wrong type, an unknown resample filter, NaN or inf in preprocessor_config.json or
  video_preprocessor_config.json is refused in one line naming the file and the key.
"""

from __future__ import annotations

import json
import shutil

import pytest

from merge.errors import MergeError
from merge.runtime.images import ImageProcessor
from merge.runtime.video import VideoProcessor

# -- processor configs typed --------------------------------------------------------------------------------------

BAD_IMAGE_CONFIGS = [
    ({"resample": 99}, "resample"),
    ({"resample": "bicubic"}, "resample"),
    ({"resample": 3.0}, "resample"),
    ({"image_mean": "0.5"}, "image_mean"),
    ({"image_mean": ["0.5", "0.5", "0.5"]}, "image_mean"),
    ({"image_std": float("nan")}, "image_std"),
    ({"image_std": [0.5, float("inf"), 0.5]}, "image_std"),
    ({"image_std": [0.5, 0.5]}, "image_std"),
    ({"image_std": [0.5, 0, 0.5]}, "image_std"),
    ({"image_mean": [True, 0.5, 0.5]}, "image_mean"),
    ({"rescale_factor": float("nan")}, "rescale_factor"),
    ({"rescale_factor": "1/255"}, "rescale_factor"),
    ({"rescale_factor": 0}, "rescale_factor"),
    ({"do_resize": "false"}, "do_resize"),
    ({"do_normalize": 1}, "do_normalize"),
    ({"patch_size": 16.0}, "patch_size"),
    ({"patch_size": "16"}, "patch_size"),
    ({"min_pixels": "3136"}, "min_pixels"),
    ({"max_pixels": float("inf")}, "max_pixels"),
    ({"size": [3136, 1000000]}, "size"),
    ({"size": {"shortest_edge": float("nan"), "longest_edge": 1000000}}, "shortest_edge"),
    ({"size": {"shortest_edge": 3136, "longest_edge": "1000000"}}, "longest_edge"),
]

BAD_VIDEO_CONFIGS = [
    ({"resample": 99}, "resample"),
    ({"image_mean": "0.5"}, "image_mean"),
    ({"image_std": float("nan")}, "image_std"),
    ({"image_std": [0.5, float("-inf"), 0.5]}, "image_std"),
    ({"fps": float("nan")}, "fps"),
    ({"fps": float("inf")}, "fps"),
    ({"fps": "2"}, "fps"),
    ({"rescale_factor": float("inf")}, "rescale_factor"),
    ({"cap_pixels_per_frame": "false"}, "cap_pixels_per_frame"),
    ({"do_sample_frames": "no"}, "do_sample_frames"),
    ({"max_frames": 768.5}, "max_frames"),
    ({"min_frames": "4"}, "min_frames"),
    ({"max_video_tokens": 2.5}, "max_video_tokens"),
    ({"size": "large"}, "size"),
    ({"size": {"shortest_edge": 4096, "longest_edge": float("nan")}}, "longest_edge"),
]


def _one_line_naming(error: pytest.ExceptionInfo, file: str, key: str) -> None:
    message = str(error.value)
    assert "\n" not in message and file in message and key in message, message


@pytest.mark.parametrize(("config", "key"), BAD_IMAGE_CONFIGS)
def test_image_config_values_are_typed(config, key):
    with pytest.raises(MergeError) as error:
        ImageProcessor.from_config(config)
    _one_line_naming(error, "preprocessor_config.json", key)


@pytest.mark.parametrize(("config", "key"), BAD_VIDEO_CONFIGS)
def test_video_config_values_are_typed(config, key):
    with pytest.raises(MergeError) as error:
        VideoProcessor.from_config(config)
    _one_line_naming(error, "video_preprocessor_config.json", key)


@pytest.mark.parametrize("video", [False, True])
def test_config_error_names_the_folder_file(video, sources, tmp_path):
    """Read from a folder, the refusal names the file in it (a NaN written as JSON's nonstandard NaN literal)."""
    folder = tmp_path / "folder"
    shutil.copytree(sources("tiny").folder, folder)
    name = "video_preprocessor_config.json" if video else "preprocessor_config.json"
    config = json.loads((folder / name).read_text())
    config["image_std"] = [0.5, float("nan"), 0.5]
    (folder / name).write_text(json.dumps(config))
    with pytest.raises(MergeError) as error:
        (VideoProcessor if video else ImageProcessor).from_folder(folder)
    _one_line_naming(error, str(folder / name), "image_std")


def test_video_config_falling_back_on_the_image_config_names_that_file(sources, tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(sources("tiny").folder, folder)
    (folder / "video_preprocessor_config.json").unlink()
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config["image_mean"] = "0.5"
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError) as error:
        VideoProcessor.from_folder(folder)
    _one_line_naming(error, str(folder / "preprocessor_config.json"), "image_mean")


def test_valid_configs_are_read_as_before(sources):
    """The published forms still parse: a scalar mean and std broadcast to three channels, integers for floats."""
    image = ImageProcessor.from_config({"image_mean": 0.5, "image_std": 1, "rescale_factor": 1, "resample": 2,
                                        "size": {"shortest_edge": 3136, "longest_edge": 12845056}})
    assert image.image_mean == (0.5, 0.5, 0.5) and image.image_std == (1.0, 1.0, 1.0)
    assert (image.rescale_factor, image.resample, image.min_pixels, image.max_pixels) == (1.0, 2, 3136, 12845056)
    video = VideoProcessor.from_config({"fps": 2, "image_mean": [0.5, 0.5, 0.5], "cap_pixels_per_frame": True})
    assert video.fps == 2.0 and video.cap_pixels_per_frame is True
    folder = sources("tiny").folder
    assert ImageProcessor.from_folder(folder).patch_size == VideoProcessor.from_folder(folder).patch_size == 16
