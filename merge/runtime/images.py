"""Qwen2-VL / Qwen3-VL image preprocessing from ``preprocessor_config.json`` with numpy and Pillow only.

Images read from a path or from bytes are turned upright by their EXIF orientation, as transformers'
``load_image`` turns them (``ImageOps.exif_transpose``); a PIL image given from Python is used as it is, as
transformers' processor uses it. Then as transformers' PIL backend does it: RGB (transparency composited onto
white), resize with :func:`smart_resize` (sides multiples of patch * merge, pixel count within the configured
bounds) using the configured Pillow filter on uint8, rescale in float64 then float32, normalize in float32, then
cut into patches in merge-block order with each image repeated ``temporal_patch_size`` times.
``tests/test_run.py`` holds it equal to transformers' own image processor, ``tests/test_real_inputs.py`` the
orientation to its ``load_image``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from merge.contract.names import PREPROCESSOR_CONFIG_FILE
from merge.contract.reading import open_file
from merge.errors import MergeError

from .files import Files

# Qwen2VLImageProcessor's defaults, used where preprocessor_config.json leaves a value out.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
DEFAULT_PATCH_SIZE = 14
DEFAULT_TEMPORAL_PATCH_SIZE = 2
DEFAULT_MERGE_SIZE = 2
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3
# Pillow's resampling filters by number (NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING): transformers'
# PILImageResampling, which a config's "resample" names
PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
EXIF_ORIENTATION = 0x0112
MAX_ASPECT_RATIO = 200
# The largest pixel budget accepted for min_pixels / max_pixels (8192 x 8192; Qwen3-VL publishes 4096 x 4096):
# a bigger value in a folder's preprocessor_config.json is a corrupt or hostile file, refused before any image
# is touched, not an allocation that runs until the kernel kills the process.
MAX_PIXEL_BUDGET = 1 << 26
# The largest image decoded at all: Pillow's decompression-bomb limit, checked from the file's header first.
MAX_DECODED_PIXELS = 89_478_485


class ConfigValues:
    """The values of one processor config (``preprocessor_config.json``, ``video_preprocessor_config.json``), read
    typed: each getter returns None for a key left out (or null) and refuses a value of the wrong type, out of
    range, NaN or infinite in one line naming the file and the key."""

    def __init__(self, config: Any, where: str | Path, prefix: str = ""):
        if not isinstance(config, dict):
            raise MergeError(f"{where}: expected a JSON object, found {_shown(config)}")
        self.config, self.where, self.prefix = config, str(where), prefix

    def refuse(self, key: str, value: Any, expected: str) -> MergeError:
        return MergeError(f"{self.where}: {self.prefix}{key} = {_shown(value)} must be {expected}")

    def section(self, key: str) -> ConfigValues:
        """A nested object (``size``); an empty one when left out."""
        value = self.config.get(key)
        if value is not None and not isinstance(value, dict):
            raise self.refuse(key, value, "an object")
        return ConfigValues(value or {}, self.where, f"{self.prefix}{key}.")

    def integer(self, key: str, low: int, high: int) -> int | None:
        value = self.config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
            raise self.refuse(key, value, f"an integer from {low:,} to {high:,}")
        return value

    def boolean(self, key: str) -> bool | None:
        value = self.config.get(key)
        if value is not None and not isinstance(value, bool):
            raise self.refuse(key, value, "true or false")
        return value

    def number(self, key: str, above: float, high: float) -> float | None:
        """A finite number with ``above < value <= high``."""
        value = self.config.get(key)
        if value is None:
            return None
        if not _is_number(value) or not above < value <= high:
            raise self.refuse(key, value, f"a number above {above:g} and at most {high:g}")
        return float(value)

    def choice(self, key: str, allowed: dict[int, str]) -> int | None:
        value = self.config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value not in allowed):
            names = ", ".join(f"{k} ({name})" for k, name in allowed.items())
            raise self.refuse(key, value, f"one of {names}")
        return value

    def channels(self, key: str, positive: bool) -> tuple[float, float, float] | None:
        """Three finite numbers (one number stands for all three, as transformers takes it); above 0 if
        ``positive``."""
        value = self.config.get(key)
        if value is None:
            return None
        values = value if isinstance(value, list | tuple) else [value] * 3
        if len(values) != 3 or not all(_is_number(v) and (v > 0 or not positive) for v in values):
            raise self.refuse(key, value, f"3 finite numbers{' above 0' if positive else ''} (or one for all three)")
        return tuple(float(v) for v in values)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value: Any) -> str:
    """A config value as one short line, written as JSON writes it (NaN and Infinity as Python's json does)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):  # not a JSON value: given from Python
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of ``factor``, about the same aspect ratio, and
    ``min_pixels <= h * w <= max_pixels`` (the formula of transformers' ``smart_resize``, rounding included)."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise MergeError(
            f"an image of {width}x{height} pixels has an aspect ratio above {MAX_ASPECT_RATIO}, which Qwen-VL refuses"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image) -> np.ndarray:
    """[H, W, 3] uint8; an alpha channel (or a palette transparency) is composited onto white."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(image.convert("RGB"))


def patchify(image: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """[C, H, W] -> [grid_h * grid_w, C * T * P * P] rows in merge-block order.

    Rows run over merge blocks (block row, block column), then over the merge x merge patches inside a block;
    each row holds channel, then time (the one frame repeated T times), then the P x P pixels.
    """
    channels, height, width = image.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    if grid_h * patch_size != height or grid_w * patch_size != width or grid_h % merge_size or grid_w % merge_size:
        raise MergeError(
            f"an image of {width}x{height} pixels does not split into {patch_size}-pixel patches in "
            f"{merge_size}x{merge_size} blocks (preprocessor_config.json has do_resize false?)"
        )
    blocks = image.reshape(channels, grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size,
                           patch_size)
    blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)  # (bh, bw, mh, mw, C, ph, pw)
    frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], temporal_patch_size, *blocks.shape[5:]))
    return frames.reshape(grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)


@dataclass
class ImageProcessor:
    """Qwen2-VL / Qwen3-VL image preprocessing (``preprocessor_config.json``) without transformers.

    Called like transformers' image processor: ``processor(images=[...], return_tensors="np")`` gives
    ``pixel_values`` float32 [sum grid_h * grid_w, C * T * P * P] and ``image_grid_thw`` int64 [n, 3].
    """

    patch_size: int = DEFAULT_PATCH_SIZE
    temporal_patch_size: int = DEFAULT_TEMPORAL_PATCH_SIZE
    merge_size: int = DEFAULT_MERGE_SIZE
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    do_convert_rgb: bool = True
    do_resize: bool = True
    resample: int = PIL_BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    source: str = field(default=PREPROCESSOR_CONFIG_FILE, repr=False, compare=False)  # the file refusals name

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}
        self._typed(ConfigValues(values, self.source))
        check_pixel_budget(self.min_pixels, self.max_pixels, self.source)

    @staticmethod
    def _typed(values: ConfigValues) -> dict[str, Any]:
        """The processor's own keys, typed and in range (None where left out)."""
        return {
            "patch_size": values.integer("patch_size", 1, 256),
            "temporal_patch_size": values.integer("temporal_patch_size", 1, 64),
            "merge_size": values.integer("merge_size", 1, 16),
            **{key: values.boolean(key) for key in ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize")},
            "resample": values.choice("resample", PIL_FILTERS),
            "rescale_factor": values.number("rescale_factor", 0, 1),
            "image_mean": values.channels("image_mean", positive=False),
            "image_std": values.channels("image_std", positive=True),
        }

    @classmethod
    def from_config(cls, config: dict, where: str | Path = PREPROCESSOR_CONFIG_FILE) -> ImageProcessor:
        """From a ``preprocessor_config.json`` dictionary (``where``: the file, as refusals name it);
        ``min_pixels`` / ``max_pixels`` override ``size`` (shortest_edge / longest_edge), as in transformers. Every
        value is typed and range-checked: a wrong one is refused in one line naming the file and the key."""
        values = ConfigValues(config, where)
        size = values.section("size")
        pixels = {}
        for name, keys in (("min_pixels", ("shortest_edge", "min_pixels")), ("max_pixels", ("longest_edge",
                                                                                             "max_pixels"))):
            given = [values.integer(name, 1, MAX_PIXEL_BUDGET)] + [size.integer(k, 1, MAX_PIXEL_BUDGET) for k in keys]
            pixels[name] = next((v for v in given if v is not None), None)
        known = {k: v for k, v in {**cls._typed(values), **pixels}.items() if v is not None}
        return cls(source=str(where), **known)

    @classmethod
    def from_folder(cls, folder: Path | str | Files, *, min_pixels: int | None = None,
                    max_pixels: int | None = None) -> ImageProcessor:
        """The folder's ``preprocessor_config.json``; ``min_pixels`` / ``max_pixels`` given here override it."""
        files = folder if isinstance(folder, Files) else Files(folder)
        processor = cls.from_config(files.json(PREPROCESSOR_CONFIG_FILE), files.where(PREPROCESSOR_CONFIG_FILE))
        return processor.with_pixel_budget(min_pixels, max_pixels)

    def with_pixel_budget(self, min_pixels: int | None = None, max_pixels: int | None = None) -> ImageProcessor:
        """This processor with ``size`` overridden where given, as transformers applies
        ``size={"shortest_edge": min_pixels, "longest_edge": max_pixels}`` to a call. The bound not given keeps the
        folder's value, moved to the given one if it would contradict it (a ``max_pixels`` below the folder's
        ``min_pixels`` lowers that too: asking for fewer pixels than the default minimum is the point)."""
        if min_pixels is None and max_pixels is None:
            return self
        check_pixel_budget(1 if min_pixels is None else min_pixels, MAX_PIXEL_BUDGET if max_pixels is None
                           else max_pixels, "--min-pixels/--max-pixels")
        low = min(self.min_pixels, max_pixels) if min_pixels is None else min_pixels
        high = max(self.max_pixels, min_pixels) if max_pixels is None else max_pixels
        return replace(self, min_pixels=low, max_pixels=high)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        if not self.do_resize:
            return height, width
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)

    def pixels(self, image) -> np.ndarray:
        """One image -> resized, rescaled, normalized [C, H, W] (float32 when rescaled or normalized). A PIL image
        is taken as given; image bytes or a path are read as :func:`load_image` reads them (upright)."""
        from PIL import Image

        image = as_image(image)
        check_decodable(image, "an image")
        if self.do_convert_rgb:
            array = to_rgb(image)
        else:
            array = np.asarray(image)
            array = array[:, :, None] if array.ndim == 2 else array
        height, width = array.shape[:2]
        new_h, new_w = self.target_size(height, width)
        if (new_h, new_w) != (height, width):
            resized = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).resize(
                (new_w, new_h), resample=self.resample)
            array = np.asarray(resized)
            array = array[:, :, None] if array.ndim == 2 else array
        if self.do_rescale:
            array = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(array.dtype, np.floating):
                array = array.astype(np.float32)
            mean = np.asarray(self.image_mean, array.dtype)
            std = np.asarray(self.image_std, array.dtype)
            array = (array - mean) / std
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def __call__(self, images: Sequence, return_tensors: str | None = "np", **_: Any) -> dict[str, np.ndarray]:
        patches, grids = [], []
        for image in images:
            chw = self.pixels(image)
            rows = patchify(chw.astype(np.float32), self.patch_size, self.merge_size, self.temporal_patch_size)
            patches.append(rows)
            grids.append([1, chw.shape[1] // self.patch_size, chw.shape[2] // self.patch_size])
        if not patches:
            raise MergeError("no images to process")
        return {"pixel_values": np.concatenate(patches, axis=0), "image_grid_thw": np.asarray(grids, np.int64)}


def check_pixel_budget(min_pixels, max_pixels, where: str) -> None:
    """min_pixels and max_pixels are integers with 1 <= min_pixels <= max_pixels <= MAX_PIXEL_BUDGET."""
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PIXEL_BUDGET:
            raise MergeError(f"{where}: {name} = {value!r} must be an integer from 1 to {MAX_PIXEL_BUDGET:,} "
                             "(8192 x 8192 pixels)")
    if min_pixels > max_pixels:
        raise MergeError(f"{where}: min_pixels {min_pixels:,} is larger than max_pixels {max_pixels:,}")


def as_image(image):
    """A PIL image as given (as transformers' processor takes one: no EXIF rotation, the caller opened it), or the
    image that bytes or a path hold, read by :func:`load_image`."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, str | Path | bytes | bytearray | memoryview):
        return load_image(image)
    raise MergeError(f"expected a PIL image, image bytes or a path, got {type(image).__name__}")


def load_image(source: Path | str | bytes | bytearray | memoryview):
    """A PIL image from a file or from a file's bytes, fully read and turned upright by its EXIF orientation, as
    transformers' ``load_image`` turns it (``ImageOps.exif_transpose``). A missing, unreadable or oversized image is
    a :class:`MergeError` naming it; the size is checked from the file's header before any pixel is decoded."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, bytes | bytearray | memoryview):
        name, opened = f"an image of {len(source):,} bytes", contextlib.nullcontext(io.BytesIO(source))
    else:
        path = Path(source)
        # a regular file only: a FIFO, socket or device is refused in one line, never waited on
        name, opened = str(path), open_file(path, missing=f"image file not found: {path}")
    try:
        with opened as stream:
            with warnings.catch_warnings():  # our own check below says it in one line, Pillow's would add one
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(stream)
            with image:
                check_decodable(image, name)
                image.load()  # the pixels are in memory once the file closes
                with warnings.catch_warnings():  # corrupt EXIF: Pillow reads what it can (as for transformers)
                    warnings.simplefilter("ignore", UserWarning)  # and warns on many lines; the photo is used
                    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
                        image = ImageOps.exif_transpose(image)
        return image
    except UnidentifiedImageError as exc:
        raise MergeError(f"{name} is not an image Pillow can read") from exc
    except Image.DecompressionBombError as exc:
        raise MergeError(f"{name}: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MergeError(f"{name} is not a readable image ({exc})") from exc


def check_decodable(image, name: str) -> None:
    """Refuse an image whose pixel count is past :data:`MAX_DECODED_PIXELS` (from its header: nothing decoded)."""
    width, height = image.size
    if width * height > MAX_DECODED_PIXELS:
        raise MergeError(f"{name} is {width}x{height} = {width * height:,} pixels, more than the "
                         f"{MAX_DECODED_PIXELS:,} this tool decodes (Pillow's decompression-bomb limit); scale it down")
