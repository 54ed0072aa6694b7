"""Real photos, real clips, real folders: what phones and cutting tools write, and configs as people edit them.

- **EXIF orientation**: a photo read from a path or from bytes is turned upright as transformers' ``load_image``
  turns it (``ImageOps.exif_transpose``), held to it on all eight orientations (same pixels, same grid); a PIL
  image given from Python is used as it is, as transformers' processor uses it.
- **Processor configs typed**: a wrong type, an unknown resample filter, NaN or inf in preprocessor_config.json or
  video_preprocessor_config.json is refused in one line naming the file and the key.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from merge.errors import MergeError
from merge.runtime.images import ImageProcessor, load_image
from merge.runtime.video import VideoProcessor
from merge.tools.compare import compare

# -- EXIF orientation ---------------------------------------------------------------------------------------------

ORIENTATION = 0x0112  # the EXIF Orientation tag
PHOTO = (384, 192)  # PIL size (width, height): a 12 x 24 patch grid at patch 16, above Qwen3-VL's minimum pixels


def _pattern(width: int, height: int) -> np.ndarray:
    """No symmetry, so that each of the eight orientations gives other pixels."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x * 7 + y * 13) % 256], axis=-1).astype(np.uint8)


def _photo(path: Path, orientation: int | None, fmt: str = "JPEG") -> Path:
    image = Image.fromarray(_pattern(*PHOTO))
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    image.save(path, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_transformers_load_image(orientation, sources, tmp_path):
    """Same pixels and same grid as transformers' ``load_image`` then its image processor, on each orientation."""
    from transformers import AutoImageProcessor
    from transformers.image_utils import load_image as hf_load_image

    folder = sources("tiny").folder
    path = _photo(tmp_path / f"photo_{orientation}.jpg", orientation)
    ours = load_image(path)
    theirs = hf_load_image(str(path))
    assert ours.size == theirs.size
    np.testing.assert_array_equal(np.asarray(ours.convert("RGB")), np.asarray(theirs))
    # a quarter turn (5 to 8) makes the 384x192 landscape photo a portrait one
    grid = [1, 24, 12] if orientation >= 5 else [1, 12, 24]
    expected = AutoImageProcessor.from_pretrained(str(folder), backend="pil")(images=[theirs], return_tensors="np")
    actual = ImageProcessor.from_folder(folder)(images=[ours])
    assert actual["image_grid_thw"].tolist() == expected["image_grid_thw"].tolist() == [grid]
    result = compare("pixel_values", actual["pixel_values"], expected["pixel_values"], scale=1e-6)
    assert result.passed, result.line()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_exif_orientation_in_other_formats(fmt, tmp_path):
    from transformers.image_utils import load_image as hf_load_image

    path = _photo(tmp_path / f"photo.{fmt.lower()}", 6, fmt)
    np.testing.assert_array_equal(np.asarray(load_image(path).convert("RGB")), np.asarray(hf_load_image(str(path))))
    assert load_image(path).size == (PHOTO[1], PHOTO[0])


def test_image_bytes_are_read_like_the_file(sources, tmp_path):
    """The bytes of a photo (as a client sends them) are the photo read from its path: upright."""
    path = _photo(tmp_path / "photo.jpg", 6)
    processor = ImageProcessor.from_folder(sources("tiny").folder)
    from_path = processor(images=[load_image(path)])
    for given in (path.read_bytes(), bytearray(path.read_bytes())):
        from_bytes = processor(images=[given])
        assert from_bytes["image_grid_thw"].tolist() == [[1, 24, 12]]
        np.testing.assert_array_equal(from_bytes["pixel_values"], from_path["pixel_values"])
    assert np.asarray(load_image(path.read_bytes())).shape == (PHOTO[0], PHOTO[1], 3)
    with pytest.raises(MergeError, match="not an image Pillow can read"):
        processor(images=[b"not an image"])


def test_pil_image_from_python_is_taken_as_given_like_transformers_processor(sources, tmp_path):
    """transformers' processor passes a PIL image through without ``exif_transpose`` (only ``load_image`` applies
    it, on paths and URLs): a picture the caller opened is used as it is, here as there."""
    from transformers import AutoImageProcessor

    folder = sources("tiny").folder
    path = _photo(tmp_path / "photo.jpg", 6)
    opened = Image.open(path)
    expected = AutoImageProcessor.from_pretrained(str(folder), backend="pil")(images=[opened], return_tensors="np")
    actual = ImageProcessor.from_folder(folder)(images=[Image.open(path)])
    assert actual["image_grid_thw"].tolist() == expected["image_grid_thw"].tolist() == [[1, 12, 24]]
    np.testing.assert_array_equal(actual["pixel_values"], expected["pixel_values"])


def test_frames_folder_with_exif_orientation_is_upright(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(4):
        _photo(folder / f"frame_{i}.png", 6, "PNG")
    video = VideoProcessor(do_resize=False).load(folder)
    assert video.frames.shape == (4, PHOTO[0], PHOTO[1], 3)
    np.testing.assert_array_equal(video.frames[0], np.rot90(_pattern(*PHOTO), k=-1))


def test_image_bytes_io_is_not_mistaken_for_a_picture():
    with pytest.raises(MergeError, match="expected a PIL image, image bytes or a path"):
        ImageProcessor()(images=[io.BytesIO(b"x")])


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
