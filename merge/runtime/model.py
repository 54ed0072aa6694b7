"""Run a combined folder with ONNX Runtime alone: no torch, no transformers, no onnx.

A plain greedy loop drives the one model: the first call carries the prompt and all its images; later
calls carry one new token per row, no patches, the growing attention mask, the KV cache and the
``rope_deltas`` the previous call returned. :meth:`CombinedModel.chat` adds the folder's own preprocessing
(:mod:`merge.runtime.preprocess`: ``tokenizers``, ``jinja2``, Pillow, numpy) in front and decoding behind.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from merge.contract.folder import CombinedFolder
from merge.contract.manifest import FORMAT_KV_CACHE_IN_PLACE, FORMAT_LOGITS_TO_KEEP, FORMAT_VIDEOS
from merge.contract.names import (
    ATTENTION_MASK,
    IMAGE_GRID_THW,
    INPUT_IDS,
    LOGITS,
    LOGITS_TO_KEEP,
    MANIFEST_FILE,
    PAST_PREFIX,
    PIXEL_VALUES,
    PIXEL_VALUES_VIDEOS,
    ROPE_DELTAS,
    ROPE_DELTAS_OUT,
    VIDEO_GRID_THW,
    VISION_INT8_CODE_LIMIT,
    present_name,
)
from merge.contract.quant import INT8_CODE_LIMIT
from merge.contract.vision import check_vision_inputs
from merge.errors import MergeError

from .cache import METADATA_KEY as CACHE_METADATA_KEY
from .cache import InPlaceCache, kv_cache_dtype
from .interrupt import FirstCall, Watch, run_interruptibly
from .sampling import Sampling, StopScanner, TokenChooser, check_stop, ending

if TYPE_CHECKING:
    from .preprocess import Preprocessor

log = logging.getLogger(__name__)

DEFAULT_NEW_TOKENS = 128
CACHE_STEP = 256  # an in-place KV cache starts with room for this many new tokens, then doubles
# A long prompt is fed this many positions per call (chunked prefill): the attention of a call holds its scores for
# every head, new position and cached position (ONNX Runtime's CPU GroupQueryAttention over a float16 cache: heads x
# new x capacity float32 values), so a 16k prompt at once would need 16 GiB of them on 2B. Measured at a 16k context
# on 2B (int4, float16 cache): peak 7.73 GiB in calls of 2048, 5.80 in calls of 512. llama.cpp's micro-batches are
# 512 too
PREFILL_CHUNK = 512
THREADS_PER_CPU = 4  # threads beyond this many per CPU only oversubscribe (--threads 1000 ran 74 s instead of 1 s)


def thread_limit() -> int:
    """The most intra-op threads a session may be given: :data:`THREADS_PER_CPU` per CPU this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return THREADS_PER_CPU * (cpus or 1)


def check_threads(threads: Any, what: str = "threads") -> None:
    """``threads`` is None (ONNX Runtime's choice) or an int from 1 to :func:`thread_limit`; refused in one line."""
    if threads is None:
        return
    limit = thread_limit()
    if isinstance(threads, bool) or not isinstance(threads, int | np.integer):
        raise MergeError(f"{what} must be a whole number from 1 to {limit} (or None: ONNX Runtime's choice), got "
                         f"{threads!r}")
    if not 1 <= threads <= limit:
        raise MergeError(f"{what} must be from 1 to {limit} ({THREADS_PER_CPU} per CPU this process may use), got "
                         f"{threads}")


def integer_array(value: Any, name: str, *, booleans: bool = False) -> np.ndarray:
    """``value`` as an int64 array, refused in one line unless it holds integers (``booleans``: or bools): a float
    id would be truncated to another token without a word."""
    array = np.asarray(value)
    kinds = "iub" if booleans else "iu"
    if array.dtype.kind not in kinds:
        raise MergeError(f"{name} must hold integers{' (or bools)' if booleans else ''}, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


@dataclass
class Generation:
    tokens: np.ndarray  # [batch, new_tokens] int64: the model's own greedy choices
    prefill_logits: np.ndarray  # [batch, sequence, vocab]
    step_logits: list[np.ndarray] = field(default_factory=list)  # each [batch, vocab], for new tokens 1..n-1
    prefill_outputs: dict[str, np.ndarray] = field(default_factory=dict)  # every output of the first call
    step_outputs: list[dict[str, np.ndarray]] = field(default_factory=list)  # generate's keep_outputs, per decode call
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(self.tokens.shape[1] - 1, 0) * self.tokens.shape[0]
        return steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")


@dataclass
class Completion:
    """What :meth:`CombinedModel.complete` returns: one text per prompt, and what produced it."""

    texts: list[str]
    generation: Generation  # tokens [batch, new] (EOS included, then pad), logits, prefill and decode seconds
    inputs: dict[str, np.ndarray]  # the preprocessed batch (build_batch_inputs' keys)
    prompt_tokens: int  # real (unpadded) prompt tokens over the batch, image and video tokens included
    image_tokens: int
    num_images: int
    video_tokens: int = 0
    num_videos: int = 0
    # per prompt, as OpenAI names them: "stop" (an end-of-sequence token or a stop string), "length" (max_new_tokens)
    finish_reasons: list[str] = field(default_factory=list)


def _as_batch(prompt: str | Sequence[str], items: Sequence, kind: str = "images",
              nested: Callable[[Any], bool] = lambda i: isinstance(i, list | tuple)) -> tuple[list[str], list[list]]:
    """(prompts, one list of ``kind`` per prompt) from chat()'s ``prompt`` and ``images`` / ``videos`` arguments.
    ``nested`` tells a per-prompt list from one item (a video may itself be a list of frames)."""
    if isinstance(prompt, str):
        items = list(items)
        if kind == "images" and any(nested(i) for i in items):
            raise MergeError(f"with one prompt, {kind} is a flat list (nested lists are for several prompts)")
        return [prompt], [items]
    prompts = list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise MergeError("prompt must be a string or a non-empty list of strings")
    items = list(items)
    if not items:
        return prompts, [[] for _ in prompts]
    if len(items) != len(prompts) or not all(nested(i) for i in items):
        raise MergeError(f"with {len(prompts)} prompts, {kind} must hold one list of {kind} per prompt (got "
                         f"{len(items)} entries)")
    return prompts, [list(i) for i in items]


class CombinedModel:
    """One ``onnxruntime.InferenceSession`` over ``COMBINED/model.onnx``."""

    watch: Watch | None = None  # told before, during and after each first call (merge.runtime.interrupt)

    def __init__(self, folder: Path | str | CombinedFolder, *, threads: int | None = None,
                 providers: Sequence[str] | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
                 check_checksums: bool = False, model_bytes: bytes | None = None, fps: float | None = None,
                 max_frames: int | None = None, prefill_chunk: int | None = PREFILL_CHUNK):
        """``folder`` is checked first (:class:`merge.contract.folder.CombinedFolder`, or one already opened); the
        session and the preprocessing then read only what was checked. ``check_checksums`` also hashes the model
        files. ``model_bytes`` replaces the folder's graph (the same weights; verify adds debug outputs). ``min_pixels``
        / ``max_pixels`` bound the images' sizes, ``fps`` / ``max_frames`` the frames taken from videos.
        ``prefill_chunk``: positions per call of a long prompt (:meth:`prefill`; None: the whole prompt at once)."""
        import onnxruntime as ort

        check_threads(threads)
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise MergeError(f"prefill_chunk must be a whole number of at least 1 (or None), got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        self.combined = folder if isinstance(folder, CombinedFolder) else CombinedFolder.open(
            folder, check_checksums=check_checksums)
        self.folder = self.combined.path
        self.config = self.combined.config
        self._pixel_limits = {"min_pixels": min_pixels, "max_pixels": max_pixels, "fps": fps,
                              "max_frames": max_frames}
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        self.session = self.combined.session(options, providers, model_bytes=model_bytes)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith(PAST_PREFIX)]
        self.num_kv_heads = self.config.text.num_kv_heads
        self.head_dim = self.config.text.head_dim
        self.patch_dim = self.config.vision.patch_dim
        self.output_names = [o.name for o in self.session.get_outputs()]
        # what the folder can do is what its format (merge.json) says, never guessed from the graph
        self.format_version = self.combined.manifest.format_version
        self.keeps_logits = self.format_version >= FORMAT_LOGITS_TO_KEEP  # otherwise every position's logits
        self.takes_videos = self.format_version >= FORMAT_VIDEOS
        self.cache_in_place = self.format_version >= FORMAT_KV_CACHE_IN_PLACE  # otherwise the growing cache
        # what each call must feed follows the graph: a format 0 folder may have the video inputs all the same
        self.video_inputs = PIXEL_VALUES_VIDEOS in inputs
        self._check_format(set(inputs))
        # the keys and values kept between calls: float32, or float16 (merge.json kv_cache, the graph agreeing)
        self.kv_dtype = np.dtype(self.combined.manifest.kv_cache)
        held = kv_cache_dtype(self.session, self.past_names)
        if held != self.kv_dtype:
            raise MergeError(f"{self.folder}: {MANIFEST_FILE} says kv_cache {self.kv_dtype} but the model's "
                             f"{PAST_PREFIX}* inputs are {held}; the folder does not match its manifest (build it "
                             "again)")

    def _check_format(self, inputs: set[str]) -> None:
        """The model holds what its folder's format promises (a merge.json edited by hand may promise more)."""
        metadata = self.session.get_modelmeta().custom_metadata_map
        promises = [
            (FORMAT_LOGITS_TO_KEEP, f"the optional input {LOGITS_TO_KEEP}", LOGITS_TO_KEEP in inputs),
            (FORMAT_VIDEOS, f"the inputs {PIXEL_VALUES_VIDEOS} and {VIDEO_GRID_THW}",
             {PIXEL_VALUES_VIDEOS, VIDEO_GRID_THW} <= inputs),
            (FORMAT_KV_CACHE_IN_PLACE, f'the metadata {CACHE_METADATA_KEY} = "1"',
             metadata.get(CACHE_METADATA_KEY) == "1"),
        ]
        if self.combined.manifest.vision_precision == "int8" \
                and metadata.get(VISION_INT8_CODE_LIMIT) != str(INT8_CODE_LIMIT):
            log.warning("%s: its int8 vision weights were written with full-range 8-bit codes (before the 7-bit "
                        "codes, %s = %d); on x86 CPUs without VNNI (AVX2 only) ONNX Runtime's int8 products saturate "
                        "on them and the vision results are wrong: build the folder again", self.folder,
                        VISION_INT8_CODE_LIMIT, INT8_CODE_LIMIT)
        for needed, what, held in promises:
            if self.format_version >= needed and not held:
                raise MergeError(f"{self.folder}: {MANIFEST_FILE} says format {self.format_version}, whose models have "
                                 f"{what}, but its model has not; the folder does not match its manifest (build it "
                                 "again)")

    def _require_format(self, needed: int, feature: str) -> None:
        if self.format_version < needed:
            raise MergeError(f"{self.folder} is a format {self.format_version} folder ({MANIFEST_FILE} format_version, "
                             f"0 when absent) but {feature} needs format {needed}; build it again")

    def empty_images(self) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((0, self.patch_dim), np.float32), np.zeros((0, 3), np.int64)

    def no_vision(self) -> dict[str, np.ndarray]:
        """The vision inputs of a call without images or videos (every decode step): 0 rows each."""
        pv, grid = self.empty_images()
        feeds = {PIXEL_VALUES: pv, IMAGE_GRID_THW: grid}
        if self.video_inputs:
            feeds.update({PIXEL_VALUES_VIDEOS: pv, VIDEO_GRID_THW: grid})
        return feeds

    def forward(self, feeds: dict[str, np.ndarray], run_options=None) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds, run_options), strict=True))

    def new_cache(self, batch: int, capacity: int) -> InPlaceCache:
        """A KV cache of ``capacity`` positions that the model writes in place (see :mod:`merge.runtime.cache`)."""
        self._require_format(FORMAT_KV_CACHE_IN_PLACE, "writing the KV cache in place")
        return InPlaceCache(self.session, self.past_names, batch, self.num_kv_heads, self.head_dim, capacity)

    def prefill(self, run: Callable, feeds: dict[str, np.ndarray], run_options=None, *,
                growing: bool = False) -> dict[str, np.ndarray]:
        """A first call's ``feeds`` (:meth:`first_feeds`) run as one call, or for one prompt (a batch of 1: every
        request the server admits) longer than :attr:`prefill_chunk` as several (:func:`prefill_bounds`: the first
        with every image and video, then ``prefill_chunk`` positions each), through ``run`` (``self.forward``, or
        an in-place cache's ``run``; ``growing``: each call's ``present`` fed to the next). Returns the last call's
        outputs with ``logits`` of every call joined along the sequence (one position each when ``logits_to_keep`` is
        fed)."""
        ids, mask = feeds[INPUT_IDS], feeds[ATTENTION_MASK]
        # ONNX Runtime's CPU GroupQueryAttention takes several new positions over a past for one row only
        # ("batch_size must be 1 when sequence_length > 1 and past context is given"): a batch runs in one call
        if not self.prefill_chunk or ids.shape[0] != 1:
            return run(feeds, run_options)
        ends = prefill_bounds(ids, mask, (self.config.image_token_id, self.config.video_token_id),
                              self.prefill_chunk)
        if len(ends) == 1:
            return run(feeds, run_options)
        keep = LOGITS_TO_KEEP in feeds
        logits, out, start = [], None, 0
        for end in ends:
            if out is None:
                call = dict(feeds)
            else:  # a later call: text only, positions from the first call's rope_deltas
                call = {ROPE_DELTAS: out[ROPE_DELTAS_OUT], **self.no_vision()}
                if keep:
                    call[LOGITS_TO_KEEP] = feeds[LOGITS_TO_KEEP]
                if growing:
                    call.update({p: out[present_name(p)] for p in self.past_names})
            call[INPUT_IDS], call[ATTENTION_MASK] = ids[:, start:end], mask[:, :end]
            out = run(call, run_options)
            if not keep:
                logits.append(out[LOGITS])
            start = end
        if not keep:
            out[LOGITS] = np.concatenate(logits, axis=1)
        return out

    def check_inputs(self, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos=None,
                     video_grid_thw=None) -> None:
        """Refuse a first call the model cannot run right, before running anything (names the numbers). The model
        checks the ids and the mask itself too (merge/checks/*); here they are refused in one line first."""
        input_ids = integer_array(input_ids, INPUT_IDS)
        attention_mask = integer_array(attention_mask, ATTENTION_MASK, booleans=True)
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise MergeError(f"input_ids must be [batch, sequence] with sequence > 0, got shape {input_ids.shape}")
        if attention_mask.shape != input_ids.shape:
            raise MergeError(
                f"attention_mask has shape {attention_mask.shape} but input_ids {input_ids.shape}; on the first "
                "call they must match"
            )
        check_token_ids(input_ids, self.config.text.vocab_size)
        check_mask(attention_mask)
        spec = self.config.vision
        kinds = [("image", pixel_values, image_grid_thw, self.config.image_token_id)]
        if pixel_values_videos is not None:
            kinds.append(("video", pixel_values_videos, video_grid_thw, self.config.video_token_id))
        for kind, pixels, grid, token in kinds:
            check_vision_inputs(pixels, grid, spec)
            if pixels.dtype.kind not in "fiu":
                raise MergeError(f"{PIXEL_VALUES if kind == 'image' else PIXEL_VALUES_VIDEOS} must hold numbers, got "
                                 f"dtype {pixels.dtype}")
            finite = np.isfinite(pixels).all(axis=1) if pixels.dtype.kind == "f" else None
            if finite is not None and not finite.all():
                row = int(np.argmin(finite))
                raise MergeError(f"{PIXEL_VALUES if kind == 'image' else PIXEL_VALUES_VIDEOS} row {row} holds NaN or "
                                 "inf; patches must be finite numbers")
            tokens = int(((input_ids == token) & (attention_mask != 0)).sum())
            features = int(grid.prod(axis=1).sum()) // spec.merge_unit if len(grid) else 0
            if tokens != features:
                raise MergeError(
                    f"input_ids hold {tokens} {kind} tokens (id {token}) but {kind}_grid_thw gives {features} {kind} "
                    f"features (sum of t*h*w / {spec.merge_unit}); the prompt and the {kind}s do not belong together"
                )

    def first_feeds(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                    video_grid_thw=None) -> dict:
        input_ids = integer_array(input_ids, INPUT_IDS)
        attention_mask = integer_array(attention_mask, ATTENTION_MASK, booleans=True)
        batch = input_ids.shape[0]
        if pixel_values is None:
            pixel_values, image_grid_thw = self.empty_images()
        videos = pixel_values_videos is not None and len(pixel_values_videos) > 0
        if videos:
            self._require_format(FORMAT_VIDEOS, "taking videos")
        if pixel_values_videos is None:
            pixel_values_videos, video_grid_thw = self.empty_images()
        self.check_inputs(input_ids, attention_mask, np.asarray(pixel_values), np.asarray(image_grid_thw),
                          np.asarray(pixel_values_videos), np.asarray(video_grid_thw).reshape(-1, 3))
        feeds = {
            INPUT_IDS: np.ascontiguousarray(input_ids, np.int64),
            ATTENTION_MASK: np.ascontiguousarray(attention_mask, np.int64),
            PIXEL_VALUES: np.ascontiguousarray(pixel_values, np.float32),
            IMAGE_GRID_THW: np.ascontiguousarray(image_grid_thw, np.int64).reshape(-1, 3),
            ROPE_DELTAS: np.zeros((batch, 1), np.int64),
        }
        if self.video_inputs:
            feeds[PIXEL_VALUES_VIDEOS] = np.ascontiguousarray(pixel_values_videos, np.float32)
            feeds[VIDEO_GRID_THW] = np.ascontiguousarray(video_grid_thw, np.int64).reshape(-1, 3)
        empty = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), self.kv_dtype)
        feeds.update(dict.fromkeys(self.past_names, empty))
        return feeds

    def generate(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        pixel_values: np.ndarray | None = None,
        image_grid_thw: np.ndarray | None = None,
        *,
        max_new_tokens: int = 32,
        eos_token_ids: Sequence[int] = (),
        pad_token_id: int = 0,
        on_token=None,
        forced_tokens: np.ndarray | None = None,
        all_logits: bool = True,
        pixel_values_videos: np.ndarray | None = None,
        video_grid_thw: np.ndarray | None = None,
        in_place: bool | None = None,
        sampling: Sampling | Sequence[Sampling] | None = None,
        keep_outputs: Sequence[str] = (),
    ) -> Generation:
        """Greedy decoding, or sampled (``sampling``: one :class:`Sampling` for every row, or one per row; see
        :mod:`merge.runtime.sampling`). Rows that produced an EOS token continue with ``pad_token_id`` (as HF does).

        ``on_token(token)`` is called with each step's [batch] tokens; it may return the rows that are to stop
        there (a stop string appeared in their text), which then continue with ``pad_token_id`` too.
        ``forced_tokens`` [batch, n] (teacher forcing) feeds those tokens instead of the model's own choices,
        so each step's logits can be compared with a reference run; ``tokens`` still holds the model's choices.
        ``all_logits=False`` has the prefill compute the logits of the last position only (``logits_to_keep``:
        the head's work on every other prompt position is skipped); ``prefill_logits`` then holds that one.
        ``in_place`` (default: when the folder allows it) keeps the KV cache in buffers of the prompt's length plus
        ``max_new_tokens`` that the model writes in place, instead of feeding each call's ``present`` back;
        ``prefill_outputs`` then holds no ``present.*``.
        ``keep_outputs``: outputs of every decode call kept in ``step_outputs`` (the first call's are all in
        ``prefill_outputs``), e.g. a debug copy's intermediate values.
        """
        input_ids = integer_array(input_ids, INPUT_IDS)
        vocab = self.config.text.vocab_size
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int | np.integer) \
                or not 0 <= pad_token_id < vocab:
            raise MergeError(f"pad_token_id must be a token id from 0 to {vocab - 1}, got {pad_token_id!r}")
        if forced_tokens is not None:
            forced_tokens = integer_array(forced_tokens, "forced_tokens")
            check_token_ids(forced_tokens, vocab, "forced_tokens")
        limit = self.config.text.max_position_embeddings
        if input_ids.ndim == 2 and input_ids.shape[1] + max_new_tokens > limit:
            raise MergeError(f"a prompt of {input_ids.shape[1]} tokens and {max_new_tokens} new tokens go past the "
                             f"model's max_position_embeddings {limit}")
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        attention_mask = integer_array(attention_mask, ATTENTION_MASK, booleans=True)
        feeds = self.first_feeds(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                                 video_grid_thw)
        choose = TokenChooser(sampling, input_ids.shape[0])
        if not all_logits and self.keeps_logits:
            feeds[LOGITS_TO_KEEP] = np.array(1, np.int64)
        cache = None
        if self.cache_in_place if in_place is None else in_place:
            # room grows with what is generated (doubling), not allocated for max_new_tokens up front: a generous
            # max_new_tokens must not cost memory that the tokens never use
            cache = self.new_cache(input_ids.shape[0], input_ids.shape[1] + min(max_new_tokens, CACHE_STEP))
            for name in self.past_names:
                del feeds[name]
        run = self.forward if cache is None else cache.run
        start = time.perf_counter()
        # the first call (the vision tower, the prompt: minutes for a large photo on 2B) in a worker thread, which
        # Ctrl-C and SIGTERM stop; decode steps are short and stay in this thread
        out = run_interruptibly(lambda options: self.prefill(run, feeds, options, growing=cache is None),
                                watch=self.watch, about=FirstCall.of(feeds, self.config))
        prefill_seconds = time.perf_counter() - start
        result = Generation(tokens=np.zeros((input_ids.shape[0], 0), np.int64), prefill_logits=out[LOGITS],
                            prefill_seconds=prefill_seconds, prefill_outputs=out)
        finished = np.zeros(input_ids.shape[0], bool)
        tokens = []
        logits = out[LOGITS][:, -1]
        start = time.perf_counter()
        for step in range(max_new_tokens):
            if step:
                result.step_logits.append(logits)
            token = np.where(finished, pad_token_id, choose(logits)).astype(np.int64)
            tokens.append(token)
            if on_token is not None:
                for row in on_token(token) or ():
                    finished[row] = True
            if forced_tokens is not None:
                token = np.asarray(forced_tokens[:, step], np.int64)
            finished |= np.isin(token, list(eos_token_ids))
            if step == max_new_tokens - 1 or finished.all():
                break
            attention_mask = np.concatenate([attention_mask, np.ones((len(token), 1), np.int64)], axis=1)
            feeds = {INPUT_IDS: token[:, None], ATTENTION_MASK: attention_mask, **self.no_vision(),
                     ROPE_DELTAS: out[ROPE_DELTAS_OUT]}
            if cache is not None and attention_mask.shape[1] > cache.capacity:
                cache.reserve(max(2 * cache.capacity, attention_mask.shape[1]))
            if cache is None:
                feeds.update({p: out[present_name(p)] for p in self.past_names})
            out = run(feeds)
            logits = out[LOGITS][:, -1]
            if keep_outputs:
                result.step_outputs.append({name: out[name] for name in keep_outputs})
        result.decode_seconds = time.perf_counter() - start
        result.tokens = np.stack(tokens, axis=1)
        return result

    @cached_property
    def preprocessor(self) -> Preprocessor:
        """The folder's tokenizer, chat template and image processor (loaded on first use, without transformers)."""
        from .preprocess import Preprocessor

        return Preprocessor(self.combined, self.config, **self._pixel_limits)

    def chat(
        self,
        prompt: str | Sequence[str],
        images: Sequence[Any] = (),
        *,
        videos: Sequence[Any] = (),
        max_new_tokens: int = DEFAULT_NEW_TOKENS,
        stream: Callable[[int, str], None] | None = None,
        sampling: Sampling | Sequence[Sampling] | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> list[str]:
        """Answer one user turn per prompt; returns one text per prompt, EOS and padding removed.

        ``prompt``: a string, or a list of strings for a left-padded batch. ``images``: for one prompt, a list of
        PIL images or image paths shown before the text; for a list of prompts, one such list per prompt (or
        nothing). ``videos`` likewise, after the images: each a video file, a folder of frames, a list of frames
        (PIL images) or a :class:`merge.runtime.video.Video`. ``stream(row, piece)`` is called with each new piece
        of text as tokens arrive (pieces never split a UTF-8 character; row is the prompt's index). Greedy unless
        ``sampling`` (one :class:`Sampling` for all prompts, or one per prompt) says otherwise; ``stop``: strings
        that end a text where one first appears (neither returned nor streamed). See :meth:`complete` for timings
        and tokens.
        """
        return self.complete(prompt, images, videos=videos, max_new_tokens=max_new_tokens, stream=stream,
                             sampling=sampling, stop=stop).texts

    def complete(
        self,
        prompt: str | Sequence[str],
        images: Sequence[Any] = (),
        *,
        videos: Sequence[Any] = (),
        max_new_tokens: int = DEFAULT_NEW_TOKENS,
        stream: Callable[[int, str], None] | None = None,
        sampling: Sampling | Sequence[Sampling] | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> Completion:
        """:meth:`chat`, returning the texts with the generation (tokens, timings), the preprocessed inputs and
        why each text ended."""
        from .images import load_image

        if max_new_tokens < 1:
            raise MergeError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        stop = check_stop(stop)
        prompts, image_lists = _as_batch(prompt, images)
        _, video_lists = _as_batch(prompt, videos, "videos", _is_video_list)
        image_lists = [[load_image(i) if isinstance(i, str | Path) else i for i in row] for row in image_lists]
        pre = self.preprocessor
        inputs = pre.build_batch_inputs(prompts, image_lists, video_lists)
        eos = pre.eos_token_ids
        streams = [pre.stream() for _ in prompts]
        scanners = [StopScanner(stop) for _ in prompts]
        done = [False] * len(prompts)
        if sampling is not None and not isinstance(sampling, Sampling) and len(sampling) != len(prompts):
            raise MergeError(f"sampling: {len(sampling)} settings for {len(prompts)} prompts")

        def emit(row: int, piece: str) -> None:
            piece = scanners[row].feed(piece) if stop else piece
            if piece and stream is not None:
                stream(row, piece)

        def finish(row: int) -> None:
            done[row] = True
            emit(row, streams[row].flush())
            if stop and stream is not None and (rest := scanners[row].flush()):
                stream(row, rest)

        def on_token(token: np.ndarray) -> list[int]:
            stopped = []
            for row, token_id in enumerate(token.tolist()):
                if done[row]:
                    continue
                if token_id in eos:
                    finish(row)
                    continue
                emit(row, streams[row].step(token_id))
                if scanners[row].stopped:
                    done[row] = True
                    stopped.append(row)
            return stopped

        generation = self.generate(
            inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"],
            max_new_tokens=max_new_tokens, eos_token_ids=eos, pad_token_id=pre.pad_token_id, on_token=on_token,
            all_logits=False, pixel_values_videos=inputs[PIXEL_VALUES_VIDEOS], video_grid_thw=inputs[VIDEO_GRID_THW],
            sampling=sampling,
        )
        for row, finished in enumerate(done):
            if not finished:
                finish(row)
        texts, reasons = [], []
        for row, tokens in enumerate(generation.tokens.tolist()):
            text, reason = ending(tokens, eos, pre.decode, stop, scanners[row].stopped)
            texts.append(text)
            reasons.append(reason)
        mask = inputs["attention_mask"].astype(bool)
        image_tokens = int(((inputs["input_ids"] == self.config.image_token_id) & mask).sum())
        video_tokens = int(((inputs["input_ids"] == self.config.video_token_id) & mask).sum())
        return Completion(texts=texts, generation=generation, inputs=inputs, prompt_tokens=int(mask.sum()),
                          image_tokens=image_tokens, num_images=int(inputs["image_grid_thw"].shape[0]),
                          video_tokens=video_tokens, num_videos=int(inputs[VIDEO_GRID_THW].shape[0]),
                          finish_reasons=reasons)


def prefill_bounds(input_ids: np.ndarray, attention_mask: np.ndarray, vision_token_ids: Sequence[int],
                   chunk: int) -> list[int]:
    """Where the calls of a chunked prefill end (columns of the prompt; the last is its length). The first call
    carries every image and video token (the vision part runs once, on the first call, with all the patches; the
    3-D positions of what follows the last of them continue by one per token, which is what later calls compute
    from ``rope_deltas``) and every row's first real token (a row of padding only is refused); each later call
    ``chunk`` positions at most."""
    if chunk < 1:
        raise MergeError(f"prefill_chunk must be at least 1, got {chunk}")
    length = input_ids.shape[1]
    real = attention_mask != 0
    vision = np.isin(input_ids, list(vision_token_ids)) & real
    first = max(chunk, int(vision.any(axis=0).nonzero()[0].max()) + 1 if vision.any() else 0,
                int(real.argmax(axis=1).max()) + 1)
    return [*range(min(first, length), length, chunk), length]


def check_token_ids(ids: np.ndarray, vocab_size: int, name: str = INPUT_IDS) -> None:
    """Every id is a row of the token table (0 <= id < vocab_size); the model checks this too
    (merge/checks/input_ids_in_vocabulary), here it is one line naming the first id that is not."""
    outside = (ids < 0) | (ids >= vocab_size)
    if outside.any():
        where = tuple(int(i) for i in np.argwhere(outside)[0])
        raise MergeError(f"{name}{list(where)} = {int(ids[where])} is not a token id: ids go from 0 to "
                         f"{vocab_size - 1} (the vocabulary)")


def check_mask(mask: np.ndarray) -> None:
    """An attention mask holds 0 and 1 only, each row left-padded (0...0 1...1) with at least one 1 (the model
    checks this too: merge/checks/attention_mask_*); refused in one line naming the row."""
    if mask.ndim != 2:
        raise MergeError(f"attention_mask must be [batch, length], got shape {mask.shape}")
    for row, values in enumerate(mask):
        if not np.isin(values, (0, 1)).all():
            bad = int(values[~np.isin(values, (0, 1))][0])
            raise MergeError(f"attention_mask row {row} holds {bad}; a mask holds only 0 (padding) and 1")
        if (np.diff(values) < 0).any():
            raise MergeError(f"attention_mask row {row} has a 0 after a 1; rows are padded on the left only "
                             "(0...0 1...1)")
        if not values.any():
            raise MergeError(f"attention_mask row {row} is all 0: each row needs at least one token")


def _is_video_list(item: Any) -> bool:
    """With several prompts, ``videos`` holds one list of videos per prompt; a video may itself be a list of frames,
    so a per-prompt list is a list whose items are videos (paths, Video objects or lists of frames), or empty."""
    from .video import Video

    if not isinstance(item, list | tuple):
        return False
    return all(isinstance(v, str | Path | Video | list | tuple) for v in item)
