"""Everything a combined folder needs to turn prompts and images into model inputs, and ids into text.

numpy, Pillow, ``tokenizers`` and ``jinja2`` only: a deployment installs these and onnxruntime, neither torch
nor transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from merge.contract.config import ModelConfig
from merge.contract.folder import CombinedFolder
from merge.contract.names import GENERATION_CONFIG_FILE, PREPROCESSOR_CONFIG_FILE, VIDEO_PREPROCESSOR_CONFIG_FILE
from merge.errors import MergeError

from .files import Files
from .images import ImageProcessor
from .prompts import build_batch_inputs, build_inputs, build_message_inputs
from .text import TextStream, TextTokenizer
from .video import Video, VideoProcessor


class Preprocessor:
    """The folder's tokenizer, chat template, image and video processors and generation config."""

    def __init__(self, folder: Path | str | CombinedFolder, config: ModelConfig | None = None, *,
                 min_pixels: int | None = None, max_pixels: int | None = None, fps: float | None = None,
                 max_frames: int | None = None):
        """``folder``: a combined folder as its loader holds it (its files are read from there, not by path), or a
        checkpoint folder's path."""
        files = Files(folder)
        self.folder = files.folder
        if config is None:
            config = folder.config if isinstance(folder, CombinedFolder) else ModelConfig.from_folder(self.folder)
        self.config = config
        self.tokenizer = TextTokenizer(files)
        self.image_processor = ImageProcessor.from_folder(files, min_pixels=min_pixels, max_pixels=max_pixels)
        self.video_processor = VideoProcessor.from_folder(files, fps=fps, max_frames=max_frames)
        vision = self.config.vision
        for processor, file in ((self.image_processor, PREPROCESSOR_CONFIG_FILE),
                                (self.video_processor, VIDEO_PREPROCESSOR_CONFIG_FILE)):
            for key, theirs in (("patch_size", vision.patch_size), ("temporal_patch_size", vision.temporal_patch_size),
                                ("merge_size", vision.spatial_merge_size)):
                ours = getattr(processor, key)
                if ours != theirs:
                    raise MergeError(f"{self.folder / file}: {key} {ours} but the model's vision config says "
                                     f"{theirs}; the {'images' if processor is self.image_processor else 'videos'} "
                                     "would not fit the vision part")
        self.generation_config = files.json(GENERATION_CONFIG_FILE, required=False) or {}

    @property
    def eos_token_ids(self) -> list[int]:
        """generation_config.json's ``eos_token_id`` (int or list), else the tokenizer's eos token."""
        eos = self.generation_config.get("eos_token_id")
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        vocab = self.config.text.vocab_size
        for token in ids:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                raise MergeError(f"{self.folder / GENERATION_CONFIG_FILE}: eos_token_id {token!r} is not a token id "
                                 f"of this model (vocabulary of {vocab})")
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

    def load_video(self, video, source_fps: float | None = None) -> Video:
        """A :class:`Video` from a file, a folder of frames, a list of frames, or one already loaded."""
        return video if isinstance(video, Video) else self.video_processor.load(video, source_fps)

    def build_inputs(self, prompt: str, images: Sequence = (), videos: Sequence = ()) -> dict[str, np.ndarray]:
        """One user turn (see :func:`merge.runtime.prompts.build_inputs`); ``videos`` as :meth:`load_video` takes."""
        return build_inputs(self.tokenizer, self.image_processor, prompt, list(images), self.config,
                            self.video_processor, [self.load_video(v) for v in videos])

    def build_batch_inputs(self, prompts: Sequence[str], images: Sequence[Sequence],
                           videos: Sequence[Sequence] | None = None) -> dict[str, np.ndarray]:
        """A left-padded batch (see :func:`merge.runtime.prompts.build_batch_inputs`)."""
        videos = [[] for _ in prompts] if videos is None else videos
        return build_batch_inputs(self.tokenizer, self.image_processor, list(prompts), [list(i) for i in images],
                                  self.config, self.video_processor,
                                  [[self.load_video(v) for v in row] for row in videos])

    def build_message_inputs(self, messages: Sequence[dict], images: Sequence = (),
                             videos: Sequence = ()) -> dict[str, np.ndarray]:
        """A conversation's model inputs (see :func:`merge.runtime.prompts.build_message_inputs`): one row."""
        return build_message_inputs(self.tokenizer, self.image_processor, messages, list(images), self.config,
                                    self.video_processor, [self.load_video(v) for v in videos])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stream(self) -> TextStream:
        return TextStream(self.decode)
