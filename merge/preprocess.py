"""Qwen3-VL preprocessing from a folder with numpy, Pillow, ``tokenizers`` and ``jinja2`` only.

A deployment of a combined folder installs onnxruntime, numpy and these; neither torch nor transformers.
The two classes here cover exactly the slice of transformers' ``Qwen2Tokenizer`` and
``Qwen2VLImageProcessorPil`` that :func:`merge.tokenizer_files.build_inputs` and
:func:`~merge.tokenizer_files.build_batch_inputs` use, so those functions run unchanged on either pair and the
prompt expansion (one image token per merged patch) has one implementation. ``tests/test_run.py`` holds them
equal to transformers: the same ``input_ids`` and grids, pixel values within 1e-6.

Image preprocessing, as transformers' PIL backend does it: RGB (transparency composited onto white), resize
with :func:`smart_resize` (sides multiples of patch * merge, pixel count within the configured bounds) using
the configured Pillow filter on uint8, rescale in float64 then float32, normalize in float32, then cut into
patches in merge-block order with each image repeated ``temporal_patch_size`` times.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MergeError
from .tokenizer_files import build_batch_inputs, build_inputs

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG = "config.json"

# Qwen2VLImageProcessor's defaults, used where preprocessor_config.json leaves a value out.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
DEFAULT_PATCH_SIZE = 14
DEFAULT_TEMPORAL_PATCH_SIZE = 2
DEFAULT_MERGE_SIZE = 2
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3
MAX_ASPECT_RATIO = 200


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MergeError(f"{path} is not valid JSON ({exc})") from exc


def _required(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise MergeError(f"{folder} has no {name}; it is not a combined (or checkpoint) folder")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Images.


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

    @classmethod
    def from_config(cls, config: dict) -> ImageProcessor:
        """From a ``preprocessor_config.json`` dictionary; ``min_pixels`` / ``max_pixels`` override ``size``
        (shortest_edge / longest_edge), as in transformers."""
        size = dict(config.get("size") or {})
        min_pixels = config.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels")
        max_pixels = config.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
        known = {k: config[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "do_convert_rgb",
                                         "do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize")
                 if config.get(k) is not None}
        for key in ("image_mean", "image_std"):
            if config.get(key) is not None:
                value = config[key]
                known[key] = tuple(float(v) for v in (value if isinstance(value, list | tuple) else [value] * 3))
        return cls(min_pixels=int(min_pixels or DEFAULT_MIN_PIXELS), max_pixels=int(max_pixels or DEFAULT_MAX_PIXELS),
                   **known)

    @classmethod
    def from_folder(cls, folder: Path | str) -> ImageProcessor:
        return cls.from_config(_read_json(_required(Path(folder), PREPROCESSOR_CONFIG)))

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        if not self.do_resize:
            return height, width
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)

    def pixels(self, image) -> np.ndarray:
        """One PIL image -> resized, rescaled, normalized [C, H, W] (float32 when rescaled or normalized)."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise MergeError(f"expected a PIL image, got {type(image).__name__}")
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


def load_image(path: Path | str):
    """A PIL image from a file, fully read; a missing or unreadable file is a :class:`MergeError` naming it."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise MergeError(f"image file not found: {path}")
    if not path.is_file():
        raise MergeError(f"{path} is not a file (expected an image)")
    try:
        with Image.open(path) as image:
            image.load()  # the pixels are in memory once the file closes
        return image
    except UnidentifiedImageError as exc:
        raise MergeError(f"{path} is not an image Pillow can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise MergeError(f"{path} is not a readable image ({exc})") from exc


# ----------------------------------------------------------------------------------------------------------------
# Text.


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dictionary."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _chat_template(folder: Path, tokenizer_config: dict) -> str:
    """``chat_template.jinja``, else tokenizer_config.json's ``chat_template``, else ``chat_template.json``."""
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if template is None and (folder / CHAT_TEMPLATE_JSON).is_file():
        template = _read_json(folder / CHAT_TEMPLATE_JSON).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        raise MergeError(
            f"{folder} has no chat template ({CHAT_TEMPLATE_FILE}, or chat_template in {TOKENIZER_CONFIG})"
        )
    return template


def compile_chat_template(source: str):
    """The template compiled the way transformers compiles chat templates: a sandboxed jinja2 environment with
    ``trim_blocks``, ``lstrip_blocks``, loop controls, a ``tojson`` that does not escape HTML, ``raise_exception``
    and ``strftime_now``."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise MergeError(f"the chat template does not compile: {exc}") from exc


class TextTokenizer:
    """``tokenizer.json`` (the ``tokenizers`` library) plus the chat template and special tokens of the folder.

    Offers the calls :func:`merge.tokenizer_files.build_inputs` makes on a transformers tokenizer
    (``apply_chat_template(..., tokenize=False)``, ``convert_tokens_to_ids``, ``__call__``, ``pad_token_id``)
    and ``decode``.
    """

    def __init__(self, folder: Path | str):
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = _required(folder, TOKENIZER_FILE)
        try:
            self.backend = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
            raise MergeError(f"{path} is not a tokenizer the tokenizers library can load ({exc})") from exc
        config = _read_json(folder / TOKENIZER_CONFIG) if (folder / TOKENIZER_CONFIG).is_file() else {}
        self.special_tokens = {
            name: _token_content(config.get(name))
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
            if _token_content(config.get(name)) is not None
        }
        self.additional_special_tokens = [_token_content(t) for t in config.get("additional_special_tokens") or []]
        self.template = compile_chat_template(_chat_template(folder, config))

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False,
                            **kwargs: Any) -> str:
        if tokenize:
            raise ValueError("TextTokenizer.apply_chat_template renders text only (tokenize=False)")
        context = {**self.special_tokens, "additional_special_tokens": self.additional_special_tokens, **kwargs}
        return self.template.render(messages=messages, tools=None, documents=None,
                                    add_generation_prompt=add_generation_prompt, **context)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        ids = self.encode(text, add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


class TextStream:
    """Incremental decoding: each new token gives the text it completes, never half a UTF-8 character.

    The byte-level decoder turns an unfinished character at the end into one U+FFFD; that last U+FFFD is held
    back until the next token shows whether it completes a character or stays invalid. The window decoded each
    step restarts, with a few tokens of context, whenever the text so far ends on a whole character.
    """

    CONTEXT_TOKENS = 4

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self.ids: list[int] = []
        self._start = 0  # window: ids[_start:]
        self._shown = 0  # characters of the window's text already emitted

    def step(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self._decode(self.ids[self._start :])
        complete = not text.endswith("\ufffd")
        stable = text if complete else text[:-1]
        piece = stable[self._shown :]
        self._shown = max(self._shown, len(stable))
        if complete:
            self._start = max(len(self.ids) - self.CONTEXT_TOKENS, 0)
            self._shown = len(self._decode(self.ids[self._start :]))
        return piece

    def flush(self) -> str:
        """What is held back (an unfinished character comes out as U+FFFD)."""
        text = self._decode(self.ids[self._start :])
        piece = text[self._shown :]
        self._start, self._shown = len(self.ids), 0
        return piece


# ----------------------------------------------------------------------------------------------------------------
# Both.


class Preprocessor:
    """Everything a combined folder needs to turn prompts and images into model inputs, and ids into text."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise MergeError(f"{self.folder} is not a folder")
        self.config = _read_json(_required(self.folder, MODEL_CONFIG))
        for key in ("image_token_id", "video_token_id", "vision_config"):
            if key not in self.config:
                raise MergeError(f"{self.folder / MODEL_CONFIG} has no {key}; is it a Qwen3-VL config?")
        self.tokenizer = TextTokenizer(self.folder)
        self.image_processor = ImageProcessor.from_folder(self.folder)
        generation = self.folder / GENERATION_CONFIG
        self.generation_config = _read_json(generation) if generation.is_file() else {}

    @property
    def eos_token_ids(self) -> list[int]:
        """generation_config.json's ``eos_token_id`` (int or list), else the tokenizer's eos token."""
        eos = self.generation_config.get("eos_token_id")
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return [int(i) for i in ids]

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.generation_config.get("pad_token_id")
        if pad is None:
            eos = self.eos_token_ids
            pad = eos[0] if eos else 0
        return int(pad)

    def build_inputs(self, prompt: str, images: Sequence = ()) -> dict[str, np.ndarray]:
        """Same as :func:`merge.tokenizer_files.build_inputs` with transformers' tokenizer and image processor."""
        return build_inputs(self.tokenizer, self.image_processor, prompt, list(images), self.config)

    def build_batch_inputs(self, prompts: Sequence[str], images: Sequence[Sequence]) -> dict[str, np.ndarray]:
        """Left-padded batch, as :func:`merge.tokenizer_files.build_batch_inputs`."""
        return build_batch_inputs(self.tokenizer, self.image_processor, list(prompts), [list(i) for i in images],
                                  self.config)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stream(self) -> TextStream:
        return TextStream(self.decode)
