"""Real photos, real clips, real folders: what phones and cutting tools write, and configs as people edit them.

- **EXIF orientation**: a photo read from a path or from bytes is turned upright as transformers' ``load_image``
  turns it (``ImageOps.exif_transpose``), held to it on all eight orientations (same pixels, same grid); a PIL
  image given from Python is used as it is, as transformers' processor uses it.
- **Edit lists and raw streams**: an MP4 cut by stream copy (an edit list hiding its first frames), raw
  elementary streams (.h264, .m4v) and a stream whose decoder drops frames read as PyAV decodes them; a raw stream
  that records no frame rate is refused in one true sentence.
- **Video rotation**: a clip whose container carries a display matrix (a portrait phone clip) is turned as the
  matrix says (libavutil's definition, and ffmpeg's own autorotate where ffmpeg is installed).
- **Processor configs typed**: a wrong type, an unknown resample filter, NaN or inf in preprocessor_config.json or
  video_preprocessor_config.json is refused in one line naming the file and the key.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from merge.errors import MergeError
from merge.runtime.images import ImageProcessor, load_image
from merge.runtime.video import VideoProcessor
from merge.tools.compare import compare
from tests.videos import frame, write_clip

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


# -- edit lists and raw elementary streams ------------------------------------------------------------------------

def _pyav_frames(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _cut_by_stream_copy(source: Path, target: Path, first_frame: int) -> Path:
    """What ``ffmpeg -ss T -i source -c copy target`` writes: every packet copied from the keyframe before the cut,
    the time shifted so the cut is at 0, the frames before it left in the file behind an edit list."""
    import av

    with av.open(str(source)) as src, av.open(str(target), "w") as out:
        stream = src.streams.video[0]
        copy = out.add_stream_from_template(stream)
        shift = round(first_frame / stream.average_rate / stream.time_base)
        for packet in src.demux(stream):
            if packet.dts is None:
                continue
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = copy
            out.mux(packet)
    return target


def _write_raw(path: Path, fmt: str, codec: str, frames: int = 24, fps: int = 10, options=None) -> Path:
    import av

    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame(i, 64, 48), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _check_reads_as_pyav_decodes(path: Path, frames: int, fps: float) -> None:
    decoded = _pyav_frames(path)
    assert len(decoded) == frames
    processor = VideoProcessor(do_resize=False)
    video = processor.load(path)
    assert video.total_frames == frames and video.source_fps == pytest.approx(fps)
    assert video.indices.tolist() == processor.indices(frames, fps).tolist()
    np.testing.assert_array_equal(video.frames, decoded[video.indices])


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_clip_cut_by_stream_copy_reads_as_pyav_decodes(codec, tmp_path):
    source = write_clip(tmp_path / "source.mp4", 40, 10, 96, 64, codec=codec)
    cut = _cut_by_stream_copy(source, tmp_path / "cut.mp4", 13)
    _check_reads_as_pyav_decodes(cut, 27, 10)


def test_clip_cut_by_ffmpeg_reads_as_pyav_decodes(tmp_path):
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        pytest.skip("ffmpeg is not installed (apt-get install ffmpeg): the cut made by ffmpeg -ss -c copy itself")
    source = write_clip(tmp_path / "source.mp4", 40, 10, 96, 64, codec="libx264")
    cut = tmp_path / "cut.mp4"
    subprocess.run([ffmpeg, "-v", "error", "-ss", "1.3", "-i", str(source), "-c", "copy", str(cut)], check=True)
    _check_reads_as_pyav_decodes(cut, 27, 10)


@pytest.mark.parametrize(("name", "fmt", "codec"), [("clip.h264", "h264", "libx264"), ("clip.m4v", "m4v", "mpeg4")])
def test_raw_elementary_stream_reads_as_pyav_decodes(name, fmt, codec, tmp_path):
    """A raw stream has no container: the frame count comes from its packets, the rate from the bitstream (10),
    not from the raw demuxer's default of 25."""
    _check_reads_as_pyav_decodes(_write_raw(tmp_path / name, fmt, codec), 24, 10)


def test_raw_stream_without_a_frame_rate_is_refused_in_one_true_sentence(tmp_path):
    clip = _write_raw(tmp_path / "clip.mjpeg", "mjpeg", "mjpeg")
    with pytest.raises(MergeError) as error:
        VideoProcessor().load(clip)
    message = str(error.value)
    assert "\n" not in message and str(clip) in message and "records no frame rate" in message


def test_a_file_cut_short_is_the_frames_it_holds(tmp_path):
    """A file cut short mid-stream: the frames that decode are the clip (as PyAV, and players, read it)."""
    import av

    source = write_clip(tmp_path / "source.mkv", 30, 10, 64, 48)
    with av.open(str(source)) as container:
        listed = container.streams.video[0].frames
    data = source.read_bytes()
    cut = tmp_path / "short.mkv"
    cut.write_bytes(data[: len(data) * 2 // 3])
    decoded = _pyav_frames(cut)
    assert 0 < len(decoded) < 30 and listed in (0, 30)
    video = VideoProcessor(do_resize=False).load(cut)
    assert video.total_frames == len(decoded)
    np.testing.assert_array_equal(video.frames, decoded[video.indices])


def test_a_stream_whose_decoder_drops_frames_is_read_as_decoded(tmp_path):
    """A capture joined mid-stream: its first frames reference a keyframe it lacks, and the decoder drops them
    (39 frames in the file, 30 decode). The clip is sampled again over the 30, as PyAV reads it."""
    import av

    whole = _write_raw(tmp_path / "whole.h264", "h264", "libx264", frames=40,
                       options={"x264-params": "keyint=10:scenecut=0:bframes=0"})
    with av.open(str(whole)) as container:
        units = [bytes(packet) for packet in container.demux(video=0) if packet.size]
    joined = tmp_path / "joined.h264"
    joined.write_bytes(b"".join(units[1:]))
    _check_reads_as_pyav_decodes(joined, 30, 10)


# -- video rotation -----------------------------------------------------------------------------------------------

ONE = 1 << 16  # 1.0 in a display matrix's 16.16 fixed point
W_ONE = 1 << 30  # 1.0 in its 2.30 third column

# Display matrices (a, b, u, c, d, v, x, y, w) as libavutil/display.h defines them: source pixel (p, q) goes to
# (a p + c q + x, b p + d q + y). "phone" is what a phone held upright writes: a quarter turn clockwise.
MATRICES = {
    "identity": (ONE, 0, 0, 0, ONE, 0, 0, 0, W_ONE),
    "phone": (0, ONE, 0, -ONE, 0, 0, 0, 0, W_ONE),
    "counter_clockwise": (0, -ONE, 0, ONE, 0, 0, 0, 0, W_ONE),
    "half_turn": (-ONE, 0, 0, 0, -ONE, 0, 0, 0, W_ONE),
    "mirror": (-ONE, 0, 0, 0, ONE, 0, 0, 0, W_ONE),
    "upside_down_mirror": (ONE, 0, 0, 0, -ONE, 0, 0, 0, W_ONE),
    "transpose": (0, ONE, 0, ONE, 0, 0, 0, 0, W_ONE),
    "transverse": (0, -ONE, 0, -ONE, 0, 0, 0, 0, W_ONE),
}
CLIP = (6, 10, 64, 32)  # frames, fps, width, height: landscape as coded


def _by_definition(frames: np.ndarray, matrix) -> np.ndarray:
    """[T, H, W, C] frames moved pixel by pixel as the display matrix says, then shifted into view."""
    a, b, c, d = (round(matrix[i] / ONE) for i in (0, 1, 3, 4))
    q, p = np.mgrid[0:frames.shape[1], 0:frames.shape[2]]
    to_p, to_q = a * p + c * q, b * p + d * q
    to_p, to_q = to_p - to_p.min(), to_q - to_q.min()
    out = np.zeros((frames.shape[0], to_q.max() + 1, to_p.max() + 1, frames.shape[3]), frames.dtype)
    out[:, to_q, to_p] = frames[:, q, p]
    return out


def _rotated_clip(path: Path, matrix) -> Path:
    import av

    if not hasattr(av.video.stream.VideoStream, "set_display_matrix"):
        pytest.skip(f"PyAV {av.__version__} cannot write a display matrix (Stream.set_display_matrix)")
    return write_clip(path, *CLIP, display_matrix=matrix)


def test_portrait_phone_clip_gives_portrait_frames(tmp_path):
    """The clip is coded 64x32 with a quarter turn clockwise in its matrix: the frames come out 32 wide, 64 high,
    equal to the coded frames turned by hand."""
    plain = VideoProcessor(do_resize=False).load(write_clip(tmp_path / "plain.mp4", *CLIP))
    clip = _rotated_clip(tmp_path / "portrait.mp4", MATRICES["phone"])
    video = VideoProcessor(do_resize=False).load(clip)
    assert video.frames.shape == (len(plain.frames), CLIP[2], CLIP[3], 3)  # 64 high, 32 wide
    np.testing.assert_array_equal(video.frames, np.rot90(plain.frames, k=-1, axes=(1, 2)))
    # resized, the grid is a portrait one too
    grid = VideoProcessor()(videos=[VideoProcessor().load(clip)])["video_grid_thw"].tolist()
    landscape = VideoProcessor()(videos=[VideoProcessor().load(write_clip(tmp_path / "p.mp4", *CLIP))])
    t, h, w = landscape["video_grid_thw"].tolist()[0]
    assert grid == [[t, w, h]] and w > h


@pytest.mark.parametrize("name", MATRICES)
def test_display_matrix_applied_as_defined(name, tmp_path):
    plain = VideoProcessor(do_resize=False).load(write_clip(tmp_path / "plain.mp4", *CLIP))
    video = VideoProcessor(do_resize=False).load(_rotated_clip(tmp_path / f"{name}.mp4", MATRICES[name]))
    np.testing.assert_array_equal(video.frames, _by_definition(plain.frames, MATRICES[name]))


@pytest.mark.parametrize("name", MATRICES)
def test_display_matrix_applied_as_ffmpeg_autorotates(name, tmp_path):
    """ffmpeg's command line turns a clip upright by default (autorotate): the same frames, decoded by it."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        pytest.skip("ffmpeg is not installed (apt-get install ffmpeg): the cross-check against its autorotate")
    clip = _rotated_clip(tmp_path / f"{name}.mp4", MATRICES[name])
    video = VideoProcessor(do_resize=False, do_sample_frames=False).load(clip)
    raw = subprocess.run([ffmpeg, "-v", "error", "-i", str(clip), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    np.testing.assert_array_equal(video.frames, np.frombuffer(raw, np.uint8).reshape(video.frames.shape))


def test_display_matrix_off_the_quarter_turns_is_refused(tmp_path):
    tilted = (46341, 46341, 0, -46341, 46341, 0, 0, 0, W_ONE)  # 45 degrees
    with pytest.raises(MergeError, match="display matrix turns the picture by 45 degrees clockwise"):
        VideoProcessor().load(_rotated_clip(tmp_path / "tilted.mp4", tilted))


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
    """Read from a folder, the refusal names the file in it (a NaN written as JSON's nonstandard NaN literal, which
    the folder's JSON reader refuses before the typed parse sees image_std; the typed parse's own NaN check is
    tested on values given directly)."""
    folder = tmp_path / "folder"
    shutil.copytree(sources("tiny").folder, folder)
    name = "video_preprocessor_config.json" if video else "preprocessor_config.json"
    config = json.loads((folder / name).read_text())
    config["image_std"] = [0.5, float("nan"), 0.5]
    (folder / name).write_text(json.dumps(config))
    with pytest.raises(MergeError) as error:
        (VideoProcessor if video else ImageProcessor).from_folder(folder)
    _one_line_naming(error, str(folder / name), "NaN")


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


# -- through the command line -------------------------------------------------------------------------------------

def test_real_inputs_through_run(combined, tmp_path, capsys):
    """``merge run`` on a sideways photo, a portrait clip, a clip cut by stream copy and a raw .h264 stream."""
    from merge.cli import main

    photo = _photo(tmp_path / "sideways.jpg", 6)
    portrait = _rotated_clip(tmp_path / "portrait.mp4", MATRICES["phone"])
    cut = _cut_by_stream_copy(write_clip(tmp_path / "source.mp4", 40, 10, 96, 64, codec="libx264"),
                              tmp_path / "cut.mp4", 13)
    raw = _write_raw(tmp_path / "clip.h264", "h264", "libx264")
    argv = ["run", str(combined("tiny")), "--image", str(photo), "--prompt", "Describe.", "--max-new-tokens", "2"]
    for clip in (portrait, cut, raw):
        argv += ["--video", str(clip)]
    assert main(argv) == 0, capsys.readouterr().err
