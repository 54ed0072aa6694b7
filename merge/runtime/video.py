"""Qwen3-VL video preprocessing with numpy and PyAV only (no torch, no torchvision).

What transformers' ``Qwen3VLVideoProcessor`` and ``Qwen3VLProcessor`` do with a video, step for step:

- **sampling**: a clip of ``total`` frames at ``source_fps`` keeps ``n = int(total / source_fps * fps)`` frames,
  clamped to ``[min_frames, max_frames]`` and to ``total``, at ``linspace(0, total - 1, n).round()``;
- **size**: one size for all frames, from the video ``smart_resize`` (sides multiples of patch * merge; the pixels
  of all frames, ``round(n / T) * T * h * w``, within ``size``'s bounds); optionally the per-frame cap of
  ``cap_pixels_per_frame``;
- **resize**: separable antialiased bicubic (a = -0.5) on the uint8 frames in fixed point, width then height,
  each pass rounded and clipped to uint8: the arithmetic of ``torch.nn.functional.interpolate(..., antialias=True)``
  on uint8, which torchvision's ``resize`` runs (bit-exact);
- **pixels**: ``(x - mean * 255) / (std * 255)`` in float32 (transformers' fused rescale and normalize), the last
  frame repeated up to a multiple of ``temporal_patch_size``, cut into patches in merge-block order;
- **prompt**: each frame group ``g`` becomes ``<{t_g:.1f} seconds><|vision_start|>`` + ``h * w / merge**2``
  ``<|video_pad|>`` + ``<|vision_end|>``, ``t_g`` the mean time of the group's first and last sampled frame.

Frames are decoded one at a time and only the sampled ones are kept, already resized: a long or large clip never
sits in memory whole. ``tests/test_video.py`` holds each step to transformers' own code.

Decoding, where real files part from what transformers' ``read_video_pyav`` assumes (``tests/test_real_inputs.py``):
a clip is the frames PyAV's decoder gives, counted from the packets less those an edit list hides (a cut by stream
copy), or again from decoding where the decoder drops some; a raw elementary stream takes its rate from its
bitstream; each frame is turned upright by its display matrix (a portrait phone clip), as FFmpeg's players do.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from merge.contract.names import PREPROCESSOR_CONFIG_FILE, VIDEO_PREPROCESSOR_CONFIG_FILE
from merge.contract.reading import open_file
from merge.errors import MergeError

from .files import Files
from .images import MAX_ASPECT_RATIO, MAX_DECODED_PIXELS, MAX_PIXEL_BUDGET, ConfigValues, load_image, to_rgb

log = logging.getLogger(__name__)

# Qwen3VLVideoProcessor's defaults, used where video_preprocessor_config.json leaves a value out.
DEFAULT_FPS = 2.0
DEFAULT_MIN_FRAMES = 4
DEFAULT_MAX_FRAMES = 768
DEFAULT_MIN_PIXELS = 128 * 32 * 32  # size["shortest_edge"]: all frames together
DEFAULT_MAX_PIXELS = 32 * 32 * 768  # size["longest_edge"]: all frames together
DEFAULT_MAX_VIDEO_TOKENS = 768
# transformers' frame rate for frames that come without one (a list of images): 24
UNKNOWN_SOURCE_FPS = 24.0
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MAX_FRAMES_LIMIT = 100_000  # a max_frames past this in a config is a corrupt or hostile file
# libavformat's AVFMT_NOTIMESTAMPS: the format (a raw elementary stream: .h264, .hevc, .m4v, .mjpeg) has no
# timestamps of its own, and its demuxer's frame rate is a default (25), not the clip's
AVFMT_NOTIMESTAMPS = 0x0080
# how far a normalized display matrix may stray from a quarter turn or mirror (about 1 degree, as FFmpeg's own
# autorotate allows) and still be taken for one
QUARTER_TURN_TOLERANCE = 0.0175


def sample_indices(total: int, source_fps: float, fps: float, min_frames: int, max_frames: int) -> np.ndarray:
    """Qwen3VLVideoProcessor.sample_frames: which of ``total`` frames at ``source_fps`` are kept."""
    n = int(total / source_fps * fps)
    n = min(max(n, min_frames), max_frames, total)
    return np.linspace(0, total - 1, n).round().astype(int)


def video_smart_resize(num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
                       min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The video processor's ``smart_resize``: one (height, width) for every frame of a clip."""
    if num_frames < temporal_factor:
        raise MergeError(f"a video of {num_frames} frame(s) is shorter than the vision tower's temporal patch "
                         f"({temporal_factor} frames); pass a single frame as an image instead")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise MergeError(f"a video of {width}x{height} pixels has an aspect ratio above {MAX_ASPECT_RATIO}, which "
                         "Qwen-VL refuses")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@dataclass(frozen=True)
class _Taps:
    """One axis of an antialiased bicubic resize in fixed point: output ``i`` sums ``weights[i, j] * x[first[i] + j]``,
    then rounds and shifts right by ``precision`` bits."""

    first: np.ndarray  # [out] int64
    weights: np.ndarray  # [out, taps] int16 values (in int32)
    precision: int

    @classmethod
    def build(cls, in_size: int, out_size: int) -> _Taps:
        # the filter of PyTorch's antialiased interpolation (support 2 * max(scale, 1), a = -0.5, taps summing to 1),
        # in double, then scaled to int16 with as many fraction bits as the largest weight allows
        scale = in_size / out_size
        support = 2.0 * scale if scale >= 1.0 else 2.0
        inv = 1.0 / scale if scale >= 1.0 else 1.0
        first = np.zeros(out_size, np.int64)
        rows = []
        for i in range(out_size):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            taps = _cubic((np.arange(lo, hi) - center + 0.5) * inv)
            total = taps.sum()
            rows.append(taps / total if total != 0 else taps)
            first[i] = lo
        weights = np.zeros((out_size, max(len(r) for r in rows)))
        for i, row in enumerate(rows):
            weights[i, :len(row)] = row
        largest = weights.max()
        precision = next((p for p in range(22) if int(0.5 + largest * (1 << (p + 1))) >= 1 << 15), 22)
        scaled = weights * (1 << precision)
        fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5))
        return cls(first, fixed.astype(np.int32), precision)

    def __call__(self, x: np.ndarray, axis: int) -> np.ndarray:
        """Resize uint8 ``x`` along ``axis``; the result is rounded and clipped to uint8."""
        rows = np.ascontiguousarray(np.moveaxis(x, axis, 0))
        count, taps = self.weights.shape
        wide = taps * 255 * (1 << 15) >= 1 << 31  # a sum could overflow int32 (a downscale past ~60x)
        kind = np.int64 if wide else np.int32
        rows = rows.astype(kind)
        acc = np.full((count, *rows.shape[1:]), 1 << (self.precision - 1), kind)
        shape = (count,) + (1,) * (rows.ndim - 1)
        for j in range(taps):
            acc += rows[np.minimum(self.first + j, len(rows) - 1)] * self.weights[:, j].astype(kind).reshape(shape)
        return np.moveaxis(np.clip(acc >> self.precision, 0, 255).astype(np.uint8), 0, axis)


class FrameResizer:
    """Resizes [H, W, C] uint8 frames of one size to (height, width) with torchvision's uint8 bicubic: PyTorch's
    antialiased interpolation in fixed point, width first, each pass rounded and clipped to uint8 (the arithmetic
    of ``torch.nn.functional.interpolate`` on uint8, which torchvision's ``resize`` calls)."""

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]):
        self.in_hw, self.out_hw = in_hw, out_hw
        self.rows = None if in_hw[0] == out_hw[0] else _Taps.build(in_hw[0], out_hw[0])
        self.cols = None if in_hw[1] == out_hw[1] else _Taps.build(in_hw[1], out_hw[1])

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if frame.shape[:2] != self.in_hw:
            raise MergeError(f"a video frame of {frame.shape[1]}x{frame.shape[0]} pixels among frames of "
                             f"{self.in_hw[1]}x{self.in_hw[0]}: every frame of a video must have the same size")
        if self.cols is not None:
            frame = self.cols(frame, 1)
        if self.rows is not None:
            frame = self.rows(frame, 0)
        return frame


def frame_timestamps(indices: Sequence[int], source_fps: float, temporal_patch_size: int) -> list[float]:
    """One time per frame group: the mean of its first and last frame's time (``_calculate_timestamps``)."""
    indices = [int(i) for i in indices]
    if len(indices) % temporal_patch_size:
        indices += [indices[-1]] * (temporal_patch_size - len(indices) % temporal_patch_size)
    times = [i / source_fps for i in indices]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


@dataclass
class Video:
    """A clip's sampled frames, already resized, and where they came from."""

    frames: np.ndarray  # [T, H, W, 3] uint8
    indices: np.ndarray  # source frame index of each sampled frame
    source_fps: float
    total_frames: int
    name: str = "a video"
    timestamps: list[float] = field(default_factory=list)  # one per frame group (filled by the processor)


@dataclass
class VideoProcessor:
    """Qwen3-VL video preprocessing (``video_preprocessor_config.json``) without transformers or torch.

    ``processor(videos=[...])`` takes videos as returned by :meth:`load` and gives ``pixel_values_videos`` float32
    [sum t*h*w, C * T * P * P], ``video_grid_thw`` int64 [n, 3], and each video's frame-group timestamps.
    """

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    fps: float = DEFAULT_FPS
    min_frames: int = DEFAULT_MIN_FRAMES
    max_frames: int = DEFAULT_MAX_FRAMES
    do_sample_frames: bool = True
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = DEFAULT_MAX_VIDEO_TOKENS
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    source: str = field(default=VIDEO_PREPROCESSOR_CONFIG_FILE, repr=False, compare=False)  # the file refusals name

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}
        size = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        self._typed(ConfigValues(values, self.source), ConfigValues(size, self.source, "size."))
        if self.min_pixels > self.max_pixels:
            raise MergeError(f"{self.source}: size.shortest_edge {self.min_pixels:,} is larger than "
                             f"size.longest_edge {self.max_pixels:,}")
        if self.min_frames > self.max_frames:
            raise MergeError(f"{self.source}: min_frames {self.min_frames} is larger than max_frames "
                             f"{self.max_frames}")

    @staticmethod
    def _typed(values: ConfigValues, size: ConfigValues) -> dict[str, Any]:
        """The processor's keys, typed and in range (None where left out); the pixel bounds from ``size``."""
        pixels = MAX_PIXEL_BUDGET * 64
        return {
            "patch_size": values.integer("patch_size", 1, 256),
            "temporal_patch_size": values.integer("temporal_patch_size", 1, 64),
            "merge_size": values.integer("merge_size", 1, 16),
            "min_pixels": size.integer("shortest_edge", 1, pixels),
            "max_pixels": size.integer("longest_edge", 1, pixels),
            "fps": values.number("fps", 0, 1000),
            "min_frames": values.integer("min_frames", 1, MAX_FRAMES_LIMIT),
            "max_frames": values.integer("max_frames", 1, MAX_FRAMES_LIMIT),
            "max_video_tokens": values.integer("max_video_tokens", 1, 1 << 20),
            **{key: values.boolean(key) for key in ("do_sample_frames", "cap_pixels_per_frame", "do_resize",
                                                    "do_rescale", "do_normalize")},
            "rescale_factor": values.number("rescale_factor", 0, 1),
            "image_mean": values.channels("image_mean", positive=False),
            "image_std": values.channels("image_std", positive=True),
        }

    @classmethod
    def from_folder(cls, folder: Path | str | Files, *, fps: float | None = None,
                    max_frames: int | None = None) -> VideoProcessor:
        """The folder's ``video_preprocessor_config.json`` (patch, merge, mean and std from
        ``preprocessor_config.json`` where it has none); ``fps`` / ``max_frames`` given here override it."""
        files = folder if isinstance(folder, Files) else Files(folder)
        config = files.json(VIDEO_PREPROCESSOR_CONFIG_FILE, required=False)
        where = files.where(VIDEO_PREPROCESSOR_CONFIG_FILE)
        if config is None:
            image = files.json(PREPROCESSOR_CONFIG_FILE)
            config = {k: image[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                            "image_std") if image.get(k) is not None}
            where = files.where(PREPROCESSOR_CONFIG_FILE)
        return cls.from_config(config, where).with_sampling(fps, max_frames)

    @classmethod
    def from_config(cls, config: dict, where: str | Path = VIDEO_PREPROCESSOR_CONFIG_FILE) -> VideoProcessor:
        """From a ``video_preprocessor_config.json`` dictionary (``where``: the file, as refusals name it). Every
        value is typed and range-checked: a wrong one is refused in one line naming the file and the key."""
        values = ConfigValues(config, where)
        values.choice("resample", {3: "bicubic, the only filter videos are resized with here"})
        known = {k: v for k, v in cls._typed(values, values.section("size")).items() if v is not None}
        return cls(source=str(where), **known)

    def with_sampling(self, fps: float | None = None, max_frames: int | None = None) -> VideoProcessor:
        """This processor with the sampling rate and the frame limit overridden where given (``--fps``,
        ``--max-frames``); the minimum number of frames drops to ``max_frames`` if it was above."""
        if fps is None and max_frames is None:
            return self
        changes: dict[str, Any] = {}
        if fps is not None:
            changes["fps"] = float(fps)
        if max_frames is not None:
            if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
                raise MergeError(f"--max-frames {max_frames!r} must be a positive integer")
            changes["max_frames"] = max_frames
            changes["min_frames"] = min(self.min_frames, max_frames)
        try:
            return replace(self, **changes)
        except MergeError as exc:
            raise MergeError(str(exc).replace(self.source, "--fps/--max-frames")) from None

    # -- decoding and sampling ---------------------------------------------------------------------------------
    def target_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        if not self.do_resize:
            return height, width
        factor = self.patch_size * self.merge_size
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:
            cap = self.max_video_tokens * factor * factor
            per_frame = max(min(cap, self.max_pixels // num_frames), int(self.min_pixels * 1.05))
            max_pixels = per_frame * num_frames
        return video_smart_resize(num_frames, height, width, self.temporal_patch_size, factor, self.min_pixels,
                                  max_pixels)

    def indices(self, total: int, source_fps: float) -> np.ndarray:
        if not self.do_sample_frames:
            return np.arange(total)
        return sample_indices(total, source_fps, self.fps, self.min_frames, self.max_frames)

    def load(self, source: str | Path | Sequence[Any], source_fps: float | None = None) -> Video:
        """A video file (PyAV), a folder of frames (sorted by name) or a list of PIL images / [H, W, 3] uint8
        arrays. Frames from a folder or a list are taken as a clip at ``source_fps`` (default: the sampling
        ``fps``, so every frame up to ``max_frames`` is kept; transformers assumes 24 when it is not told)."""
        if isinstance(source, str | Path):
            path = Path(source)
            if path.is_dir():
                frames = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file())
                if not frames:
                    raise MergeError(f"{path} holds no frames (image files named {', '.join(FRAME_SUFFIXES)})")
                return self._from_frames([_LazyFrame(p) for p in frames], source_fps or self.fps, str(path))
            return self._from_file(path)
        frames = list(source)
        if not frames:
            raise MergeError("a video given as a list of frames needs at least one frame")
        return self._from_frames(frames, source_fps or self.fps, f"a list of {len(frames)} frames")

    def _from_frames(self, frames: list, source_fps: float, name: str) -> Video:
        if not source_fps > 0:
            raise MergeError(f"{name}: the frame rate must be above 0, got {source_fps}")
        indices = self.indices(len(frames), source_fps)
        first = _frame_array(frames[int(indices[0])], name)
        resize = FrameResizer(first.shape[:2], self.target_size(len(indices), *first.shape[:2]))
        kept = [resize(first)] + [resize(_frame_array(frames[int(i)], name)) for i in indices[1:]]
        return Video(np.stack(kept), indices, float(source_fps), len(frames), name)

    def _from_file(self, path: Path) -> Video:
        """A video file as PyAV decodes it: the frames its decoder gives (an edit list's hidden frames are not
        among them), each turned upright by the container's display matrix, sampled and resized."""
        try:
            import av
        except ImportError:  # pragma: no cover - av is a dependency
            raise MergeError("reading a video file needs PyAV: pip install av") from None
        try:
            total, rate = _frames_and_rate(path)
            indices = self.indices(total, rate)
            kept, decoded = self._decode(path, indices)
            if decoded <= indices[-1]:
                # the decoder gave fewer frames than the file holds (frames it drops, a file damaged past its
                # index): the clip is the frames that decode, sampled again, as PyAV and players read it
                log.warning("%s: %d frames in the file but %d decode; the clip is those %d", path, total, decoded,
                            decoded)
                if decoded <= 0:
                    raise MergeError(f"{path}: none of the {total} frames in the file could be decoded")
                total = decoded
                indices = self.indices(total, rate)
                kept, decoded = self._decode(path, indices)
        except MergeError:
            raise
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise MergeError(f"{path} is not a video PyAV can read ({exc})") from None
        missing = [int(i) for i in indices if int(i) not in kept]
        if missing:  # pragma: no cover - the second pass decodes what the first counted
            raise MergeError(f"{path}: frame {missing[0]} of {total} decoded once but not a second time")
        return Video(np.stack([kept[int(i)] for i in indices]), indices, rate, total, str(path))

    def _decode(self, path: Path, indices: np.ndarray) -> tuple[dict[int, np.ndarray], int]:
        """The sampled frames of the file's first video stream, upright and resized, and how many frames were
        decoded (all of them when the stream ends before the last sampled index)."""
        import av

        wanted = {int(i) for i in indices}
        kept: dict[int, np.ndarray] = {}
        resize = None
        count = 0
        with open_file(path, missing=f"video file not found: {path}") as f, av.open(f) as container:
            for frame in container.decode(container.streams.video[0]):
                if count > indices[-1]:
                    break
                if count in wanted:
                    image = upright(frame.to_ndarray(format="rgb24"), display_matrix(frame), path)
                    if resize is None:  # the size once turned: a portrait clip is resized as a portrait one
                        resize = FrameResizer(image.shape[:2], self.target_size(len(indices), *image.shape[:2]))
                    kept[count] = resize(image)
                count += 1
        return kept, count

    # -- pixels ------------------------------------------------------------------------------------------------
    def pixels(self, video: Video) -> np.ndarray:
        """[T', C, H, W] float32, T' padded to a multiple of temporal_patch_size with the last frame."""
        x = video.frames.transpose(0, 3, 1, 2)
        pad = -len(x) % self.temporal_patch_size
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        if self.do_rescale and self.do_normalize:  # transformers' fused form: (x - mean / r) / (std / r)
            scale = np.float32(1.0 / self.rescale_factor)
            mean = (np.asarray(self.image_mean, np.float32) * scale)[:, None, None]
            std = (np.asarray(self.image_std, np.float32) * scale)[:, None, None]
            return (x.astype(np.float32) - mean) / std
        out = x.astype(np.float32)
        if self.do_rescale:
            out = out * np.float32(self.rescale_factor)
        if self.do_normalize:
            out = (out - np.asarray(self.image_mean, np.float32)[:, None, None]) / np.asarray(
                self.image_std, np.float32)[:, None, None]
        return out

    def patchify(self, frames: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """[T, C, H, W] -> ([t * h * w, C * T * P * P] rows in merge-block order, [t, h, w])."""
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        count, channels, height, width = frames.shape
        gt, gh, gw = count // tp, height // p, width // p
        if gh * p != height or gw * p != width or gh % m or gw % m:
            raise MergeError(f"video frames of {width}x{height} pixels do not split into {p}-pixel patches in "
                             f"{m}x{m} blocks ({VIDEO_PREPROCESSOR_CONFIG_FILE} has do_resize false?)")
        x = frames.reshape(gt, tp, channels, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, channels * tp * p * p), [gt, gh, gw]

    def __call__(self, videos: Sequence[Video]) -> dict[str, Any]:
        patches, grids = [], []
        for video in videos:
            rows, grid = self.patchify(self.pixels(video))
            patches.append(rows)
            grids.append(grid)
            video.timestamps = frame_timestamps(video.indices, video.source_fps, self.temporal_patch_size)
        if not patches:
            raise MergeError("no videos to process")
        return {"pixel_values_videos": np.concatenate(patches, axis=0),
                "video_grid_thw": np.asarray(grids, np.int64), "timestamps": [v.timestamps for v in videos]}


def _frames_and_rate(path: Path) -> tuple[int, float]:
    """(frames, frames per second) of the file's first video stream, as PyAV will decode it.

    Frames: its packets, less those the container marks to discard (the frames an edit list hides: what a cut by
    stream copy leaves before its start), so that a clip cut by ``ffmpeg -ss ... -c copy`` counts the frames it
    shows. Rate: the container's (transformers' ``average_rate``); a raw elementary stream (.h264, .hevc, .m4v)
    has no container timing, so the rate its bitstream records, and a refusal when it records none.
    """
    import av

    with open_file(path, missing=f"video file not found: {path}") as f, av.open(f) as container:
        if not container.streams.video:
            raise MergeError(f"{path} has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > MAX_DECODED_PIXELS or width < 1 or height < 1:
            raise MergeError(f"{path}: frames of {width}x{height} pixels, not between 1 and {MAX_DECODED_PIXELS:,} "
                             "pixels each")
        if int(container.format.flags) & AVFMT_NOTIMESTAMPS:
            rate = stream.codec_context.framerate
            if not rate:
                raise MergeError(f"{path}: a raw {container.format.name} stream records no frame rate (there is no "
                                 f"container and its bitstream has none); wrap it in a container that gives one, "
                                 f"e.g. ffmpeg -framerate 30 -i {path.name} -c copy {path.stem}.mkv")
        else:
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise MergeError(f"{path}: the video stream gives no frame rate")
        total = sum(1 for packet in container.demux(stream) if packet.size and not packet.is_discard)
    if total <= 0:
        raise MergeError(f"{path}: the video stream holds no frames")
    return total, float(rate)


def display_matrix(frame) -> np.ndarray | None:
    """The frame's display matrix (libavutil/display.h: nine int32, 16.16 fixed point but the third column),
    which FFmpeg's decoders attach from the container (an MP4's track matrix, a phone's rotation); None if none."""
    for side_data in frame.side_data:  # iterating gives the entries themselves (PyAV 14 to 18)
        if getattr(side_data.type, "name", "") == "DISPLAYMATRIX":
            matrix = np.frombuffer(bytes(side_data), np.int32)
            return matrix if matrix.size == 9 else None
    return None


def upright(image: np.ndarray, matrix: np.ndarray | None, name: Path | str) -> np.ndarray:
    """[H, W, C] ``image`` turned as its display matrix says, as FFmpeg's players and its command line do
    (autorotate): the matrix moves source pixel (p, q) to (a p + c q, b p + d q). Quarter turns and mirrors (the
    eight EXIF orientations) are applied exactly; another angle is refused; a singular matrix means nothing."""
    if matrix is None:
        return image
    a, b, c, d = (float(matrix[i]) for i in (0, 1, 3, 4))
    scale_p, scale_q = math.hypot(a, b), math.hypot(c, d)
    if scale_p == 0 or scale_q == 0:
        return image
    a, b, c, d = a / scale_p, b / scale_p, c / scale_q, d / scale_q
    turn = np.round([a, b, c, d])
    if np.abs(np.array([a, b, c, d]) - turn).max() > QUARTER_TURN_TOLERANCE or abs(turn[0] * turn[3] -
                                                                                   turn[1] * turn[2]) != 1:
        raise MergeError(f"{name}: its display matrix turns the picture by {math.degrees(math.atan2(b, a)):.0f} "
                         "degrees clockwise; only quarter turns and mirrors are applied here (re-encode it upright, "
                         "e.g. with ffmpeg -i IN OUT)")
    a, b, c, d = (int(v) for v in turn)
    if a == 0:  # a quarter turn: p' = c q, q' = b p, so the output's rows run along the source's columns
        image = image.transpose(1, 0, 2)
        return image[::b, ::c]
    return image[::d, ::a]


class _LazyFrame:
    """A frame file, read when sampled."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> np.ndarray:
        return to_rgb(load_image(self.path))


def _frame_array(frame: Any, name: str) -> np.ndarray:
    """[H, W, 3] uint8 from a frame file, a PIL image or an array."""
    if isinstance(frame, _LazyFrame):
        return frame.load()
    if isinstance(frame, np.ndarray):
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise MergeError(f"{name}: a frame array must be [height, width, 3] uint8, got {frame.dtype} "
                             f"{list(frame.shape)}")
        return frame
    from PIL import Image

    if isinstance(frame, Image.Image):
        return to_rgb(frame)
    raise MergeError(f"{name}: a frame must be a PIL image or an [H, W, 3] uint8 array, got {type(frame).__name__}")
