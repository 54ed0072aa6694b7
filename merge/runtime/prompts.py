"""Prompt building: chat template, image and video placeholder expansion, tokenization, left-padded batches.

What ``Qwen3VLProcessor.__call__`` does for images and videos, written against small duck types so that it runs
on the runtime's own tokenizer, image and video processors (:mod:`merge.runtime.text`, :mod:`merge.runtime.images`,
:mod:`merge.runtime.video`) and equally on transformers' tokenizer and image processor (the tests hold them to
transformers' own processor):

- ``tokenizer``: ``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``,
  ``convert_tokens_to_ids(token)``, ``__call__(text, add_special_tokens=True)["input_ids"]``, ``pad_token_id``;
- ``image_processor``: ``__call__(images=[...], return_tensors="np")`` giving ``pixel_values`` and
  ``image_grid_thw``, and ``merge_size``;
- ``video_processor`` (:class:`merge.runtime.video.VideoProcessor`): ``__call__(videos)`` giving
  ``pixel_values_videos``, ``video_grid_thw`` and each video's frame-group ``timestamps``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from merge.contract.config import ModelConfig
from merge.contract.names import (
    IMAGE_GRID_THW,
    IMAGE_TOKEN,
    PIXEL_VALUES,
    PIXEL_VALUES_VIDEOS,
    VIDEO_GRID_THW,
    VIDEO_TOKEN,
    VISION_END_TOKEN,
    VISION_START_TOKEN,
)
from merge.errors import MergeError


def chat_messages(prompt: str, n_images: int, n_videos: int = 0) -> list[dict]:
    """One user turn as chat messages: ``n_images`` images, ``n_videos`` videos, then ``prompt``."""
    content: list[dict] = [{"type": "image"} for _ in range(n_images)]
    content += [{"type": "video"} for _ in range(n_videos)]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def chat_text(tokenizer: Any, prompt: str, n_images: int, n_videos: int = 0) -> str:
    """One user turn: ``n_images`` images, ``n_videos`` videos, then ``prompt``; then the assistant's turn begins."""
    return tokenizer.apply_chat_template(chat_messages(prompt, n_images, n_videos), tokenize=False,
                                         add_generation_prompt=True)


def process_images(image_processor: Any, images: Sequence, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    if not images:
        return np.zeros((0, config.vision.patch_dim), np.float32), np.zeros((0, 3), np.int64)
    out = image_processor(images=list(images), return_tensors="np")
    return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int64)


def expand_image_tokens(text: str, image_grid_thw: np.ndarray, merge_size: int, image_token: str = IMAGE_TOKEN) -> str:
    """The processor's placeholder expansion: the i-th image token becomes prod(grid_thw[i]) // merge**2 of them."""
    pieces = text.split(image_token)
    if len(pieces) - 1 != len(image_grid_thw):
        raise MergeError(f"the prompt holds {len(pieces) - 1} {image_token} placeholders but {len(image_grid_thw)} "
                         "images were given (a literal image token typed into a prompt is not allowed)")
    merge_length = merge_size**2
    out = [pieces[0]]
    for grid, piece in zip(image_grid_thw, pieces[1:], strict=True):
        out.append(image_token * (int(np.prod(grid)) // merge_length))
        out.append(piece)
    return "".join(out)


def process_videos(video_processor: Any, videos: Sequence, config: ModelConfig) -> dict[str, Any]:
    if not videos:
        return {PIXEL_VALUES_VIDEOS: np.zeros((0, config.vision.patch_dim), np.float32),
                VIDEO_GRID_THW: np.zeros((0, 3), np.int64), "timestamps": []}
    if video_processor is None:
        raise MergeError("videos were given but there is no video processor")
    out = video_processor(list(videos))
    return {PIXEL_VALUES_VIDEOS: np.asarray(out[PIXEL_VALUES_VIDEOS], np.float32),
            VIDEO_GRID_THW: np.asarray(out[VIDEO_GRID_THW], np.int64), "timestamps": out["timestamps"]}


def expand_video_tokens(text: str, video_grid_thw: np.ndarray, timestamps: Sequence[Sequence[float]],
                        merge_size: int) -> str:
    """The processor's placeholder expansion for videos: the i-th video token becomes, per frame group ``g``,
    ``<{t_g:.1f} seconds>`` + vision start + ``h * w // merge**2`` video tokens + vision end."""
    pieces = text.split(VIDEO_TOKEN)
    if len(pieces) - 1 != len(video_grid_thw):
        raise MergeError(f"the prompt holds {len(pieces) - 1} {VIDEO_TOKEN} placeholders but {len(video_grid_thw)} "
                         "videos were given")
    out = [pieces[0]]
    for grid, times, piece in zip(video_grid_thw, timestamps, pieces[1:], strict=True):
        frame_tokens = int(grid[1]) * int(grid[2]) // merge_size**2
        if len(times) != int(grid[0]):
            raise MergeError(f"a video of {int(grid[0])} frame groups came with {len(times)} timestamps")
        out += [f"<{t:.1f} seconds>{VISION_START_TOKEN}{VIDEO_TOKEN * frame_tokens}{VISION_END_TOKEN}" for t in times]
        out.append(piece)
    return "".join(out)


def check_text(text: str, what: str = "the prompt") -> None:
    """Text a user typed: valid Unicode, and no vision placeholder (those come from the images and videos given)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (from surrogateescape'd bytes, or written as "\\ud800")
        raise MergeError(f"{what} {text[:60]!r} holds {text[exc.start]!r} at character {exc.start}, a lone "
                         "surrogate that no text encoding can write; prompts must be valid Unicode (UTF-8)") from None
    typed = [t for t in (IMAGE_TOKEN, VIDEO_TOKEN, VISION_START_TOKEN, VISION_END_TOKEN) if t in text]
    if typed:
        raise MergeError(f"{what} contains {', '.join(typed)}: vision placeholders come from the images "
                         "given, not from the text")


def _message_texts(messages: Sequence[dict]) -> list[tuple[str, str]]:
    """(where, text) of every text in ``messages``, and refuses a message the chat template cannot take."""
    texts = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise MergeError(f"messages[{i}] must be an object with a role")
        content = message.get("content")
        if isinstance(content, str):
            texts.append((f"messages[{i}].content", content))
            continue
        if not isinstance(content, list | tuple):
            raise MergeError(f"messages[{i}].content must be a string or a list of parts")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append((f"messages[{i}].content[{j}].text", part["text"]))
            elif kind not in ("image", "video"):
                raise MergeError(f"messages[{i}].content[{j}] must be a text, image or video part")
    return texts


def _count_parts(messages: Sequence[dict], kind: str) -> int:
    return sum(1 for m in messages if isinstance(m.get("content"), list | tuple)
               for part in m["content"] if part.get("type") == kind)


def encode_prompt(tokenizer: Any, image_processor: Any, prompt: str, images: Sequence, config: ModelConfig,
                  video_processor: Any = None, videos: Sequence = ()) -> tuple[list[int], dict[str, np.ndarray]]:
    """(ids, {pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw}) of one user turn."""
    check_text(prompt)
    return encode_messages(tokenizer, image_processor, chat_messages(prompt, len(images), len(videos)), images,
                           config, video_processor, videos)


def encode_messages(tokenizer: Any, image_processor: Any, messages: Sequence[dict], images: Sequence,
                    config: ModelConfig, video_processor: Any = None,
                    videos: Sequence = ()) -> tuple[list[int], dict[str, np.ndarray]]:
    """:func:`encode_prompt` for a whole conversation, then the assistant's turn: ``messages`` as the chat template
    takes them (``{"role", "content"}``, the content a string or a list of ``{"type": "text", "text": ...}``,
    ``{"type": "image"}`` and ``{"type": "video"}`` parts); ``images`` and ``videos`` go with the image and video
    parts, in order."""
    for where, text in _message_texts(messages):
        check_text(text, where)
    for kind, given in (("image", images), ("video", videos)):
        parts = _count_parts(messages, kind)
        if parts != len(given):
            raise MergeError(f"the messages hold {parts} {kind} parts but {len(given)} {kind}s were given")
    found = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if found != config.image_token_id:
        raise MergeError(f"the tokenizer maps {IMAGE_TOKEN} to {found}, but config.json says image_token_id "
                         f"{config.image_token_id}")
    if videos and tokenizer.convert_tokens_to_ids(VIDEO_TOKEN) != config.video_token_id:
        raise MergeError(f"the tokenizer maps {VIDEO_TOKEN} to {tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)}, but "
                         f"config.json says video_token_id {config.video_token_id}")
    pixel_values, image_grid_thw = process_images(image_processor, images, config)
    video = process_videos(video_processor, videos, config)
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    text = expand_image_tokens(text, image_grid_thw, int(image_processor.merge_size))
    if videos:
        text = expand_video_tokens(text, video[VIDEO_GRID_THW], video["timestamps"], int(video_processor.merge_size))
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return list(ids), {PIXEL_VALUES: pixel_values, IMAGE_GRID_THW: image_grid_thw,
                       PIXEL_VALUES_VIDEOS: video[PIXEL_VALUES_VIDEOS], VIDEO_GRID_THW: video[VIDEO_GRID_THW]}


def mm_token_type_ids(input_ids: np.ndarray, config: ModelConfig) -> np.ndarray:
    """1 at image tokens, 2 at video tokens, 0 elsewhere (transformers' ``mm_token_type_ids``)."""
    types = np.zeros_like(input_ids)
    types[input_ids == config.image_token_id] = 1
    types[input_ids == config.video_token_id] = 2
    return types


def build_inputs(tokenizer: Any, image_processor: Any, prompt: str, images: Sequence, config: ModelConfig,
                 video_processor: Any = None, videos: Sequence = ()) -> dict[str, np.ndarray]:
    """Model inputs for one user turn: the images (in order), the videos, then ``prompt``, then the assistant
    prompt.

    Same result as ``Qwen3VLProcessor(text=chat_template(...), images=images, videos=videos)``: ``input_ids`` and
    ``attention_mask`` int64 [1, S], ``pixel_values`` float32 [sum t*h*w, C*T*P*P] (``[0, C*T*P*P]`` without
    images), ``image_grid_thw`` int64 [n_images, 3], ``pixel_values_videos`` and ``video_grid_thw`` likewise for
    the videos, and ``mm_token_type_ids`` int64 [1, S] (1 at image tokens, 2 at video tokens).
    """
    return build_batch_inputs(tokenizer, image_processor, [prompt], [images], config, video_processor, [videos])


def build_batch_inputs(tokenizer: Any, image_processor: Any, prompts: Sequence[str], images: Sequence[Sequence],
                       config: ModelConfig, video_processor: Any = None,
                       videos: Sequence[Sequence] | None = None) -> dict[str, np.ndarray]:
    """:func:`build_inputs` for several prompts (``images[i]`` and ``videos[i]`` go with ``prompts[i]``),
    left-padded with the pad id.

    ``pixel_values`` and ``image_grid_thw`` (and the videos') are the concatenation over the batch, in prompt order.
    """
    videos = [[] for _ in prompts] if videos is None else videos
    if len(prompts) != len(images) or len(prompts) != len(videos):
        raise MergeError(f"{len(prompts)} prompts but {len(images)} image lists and {len(videos)} video lists")
    if not prompts:
        raise MergeError("no prompt to encode")
    pad_id = tokenizer.pad_token_id
    if pad_id is None and len(prompts) > 1:  # as transformers' tokenizer refuses to pad (no eos stand-in)
        raise MergeError(f"{len(prompts)} prompts make a padded batch, but the tokenizer has no pad token (set "
                         "pad_token in tokenizer_config.json, or give one prompt at a time)")
    encoded = [encode_prompt(tokenizer, image_processor, p, imgs, config, video_processor, vids)
               for p, imgs, vids in zip(prompts, images, videos, strict=True)]
    return _padded(encoded, pad_id, config)


def build_message_inputs(tokenizer: Any, image_processor: Any, messages: Sequence[dict], images: Sequence,
                         config: ModelConfig, video_processor: Any = None,
                         videos: Sequence = ()) -> dict[str, np.ndarray]:
    """:func:`build_inputs` for a conversation (see :func:`encode_messages`): one row, whose input ids equal
    :func:`build_inputs`' when ``messages`` is one user turn of images, videos and text."""
    encoded = encode_messages(tokenizer, image_processor, messages, images, config, video_processor, videos)
    return _padded([encoded], tokenizer.pad_token_id, config)


def _padded(encoded: list[tuple[list[int], dict[str, np.ndarray]]], pad_id: int | None,
            config: ModelConfig) -> dict[str, np.ndarray]:
    """Encoded rows as one left-padded batch."""
    length = max(len(ids) for ids, _ in encoded)
    input_ids = np.full((len(encoded), length), int(pad_id or 0), np.int64)  # one prompt: nothing is padded
    attention_mask = np.zeros((len(encoded), length), np.int64)
    for row, (ids, _) in enumerate(encoded):
        if ids:
            input_ids[row, length - len(ids):] = ids
            attention_mask[row, length - len(ids):] = 1
    vision = {name: np.concatenate([v[name] for _, v in encoded], axis=0)
              for name in (PIXEL_VALUES, IMAGE_GRID_THW, PIXEL_VALUES_VIDEOS, VIDEO_GRID_THW)}
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        **vision,
        "mm_token_type_ids": mm_token_type_ids(input_ids, config) * attention_mask,
    }
