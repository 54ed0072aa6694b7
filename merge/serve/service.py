"""The model behind the API: one :class:`~merge.runtime.model.CombinedModel`, its batching engine, and what turns a
checked request into the engine's input (media fetched and decoded, the folder's chat template, tokenizer, image
and video processors). No web framework here: the FastAPI app (:mod:`merge.serve.app`) and the Ray Serve deployment
(:mod:`merge.serve.ray_app`) both drive a :class:`Service`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from merge.errors import MergeError
from merge.runtime.engine import Engine, EngineClosed, Event, QueueFull, Request
from merge.runtime.model import CombinedModel

from .errors import ApiError, bad_request
from .limits import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_PROMPT_TOKENS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_TOKENS,
)
from .media import MediaPolicy, load_image, load_video
from .schema import ChatRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """What ``python -m merge serve`` takes besides the folder (its options, one to one)."""

    max_batch: int = DEFAULT_MAX_BATCH
    max_queue: int = DEFAULT_MAX_QUEUE
    max_tokens: int = DEFAULT_MAX_TOKENS  # the most a request may ask for, and what it gets when it does not ask
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS  # text, image and video tokens of one request
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    media: MediaPolicy = field(default_factory=MediaPolicy)
    model_name: str | None = None  # the id /v1/models lists (default: the folder's name)
    threads: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    fps: float | None = None
    max_frames: int | None = None
    check_checksums: bool = False

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_prompt_tokens", "max_request_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MergeError(f"{name} must be a whole number, 1 or more, got {value!r}")
        if self.media.max_bytes < 1 or not 0 < self.media.timeout <= 3600:
            raise MergeError("the media limits must be positive (bytes) and from above 0 to 3600 seconds")
        if self.media.local_root is not None and not Path(self.media.local_root).is_dir():
            raise MergeError(f"--allow-local-media {self.media.local_root} is not a folder")


class Service:
    """A combined folder served: :meth:`start` a request (blocking: media and preprocessing), :meth:`close`."""

    def __init__(self, folder: Path | str, options: ServeOptions | None = None):
        self.options = options = options or ServeOptions()
        model = CombinedModel(folder, threads=options.threads, min_pixels=options.min_pixels,
                              max_pixels=options.max_pixels, fps=options.fps, max_frames=options.max_frames,
                              check_checksums=options.check_checksums)
        self.model = model
        self.engine = Engine(model, max_batch=options.max_batch, max_queue=options.max_queue).start()
        self.name = options.model_name or Path(folder).resolve().name
        self.created = int(time.time())

    def check_room(self) -> None:
        """A 429 before any work when the queue is full already (the engine checks again when the request comes)."""
        stats = self.engine.stats()
        if stats["waiting"] >= self.engine.max_queue:
            raise _queue_full(self.engine.max_queue)

    def prepare(self, chat: ChatRequest) -> dict[str, np.ndarray]:
        """The request's model inputs: its images and videos fetched and decoded, the conversation rendered with the
        folder's chat template and tokenized."""
        policy = self.options.media
        pre = self.model.preprocessor
        images = [load_image(ref, policy) for ref in chat.media if ref.kind == "image"]
        videos = [load_video(ref, policy, pre) for ref in chat.media if ref.kind == "video"]
        try:
            inputs = pre.build_message_inputs(chat.messages, images, videos)
        except MergeError as exc:
            raise bad_request(f"messages: {exc}", "messages") from None
        tokens = int(inputs["attention_mask"].sum())
        if tokens > self.options.max_prompt_tokens:
            raise bad_request(f"messages: the prompt is {tokens} tokens (images and videos included), more than the "
                              f"{self.options.max_prompt_tokens} this server takes (--max-prompt-tokens)", "messages",
                              code="context_length_exceeded")
        return inputs

    def start(self, chat: ChatRequest, sink: Callable[[Event], None]) -> Request:
        """Prepare the request and queue it; ``sink`` gets its events from the engine's thread (never blocking)."""
        inputs = self.prepare(chat)
        try:
            return self.engine.submit(inputs, max_tokens=chat.max_tokens or self.options.max_tokens,
                                      sampling=chat.sampling, stop=chat.stop, sink=sink)
        except QueueFull:
            raise _queue_full(self.engine.max_queue) from None
        except EngineClosed:
            raise ApiError(503, "the server is shutting down", code="shutting_down") from None
        except MergeError as exc:
            raise bad_request(str(exc)) from None

    def close(self) -> None:
        self.engine.close()


def _queue_full(limit: int) -> ApiError:
    return ApiError(429, f"the server is busy: {limit} requests wait already (--max-queue); try again shortly",
                    code="queue_full")
