"""Continuous batching: one model session answers many requests at once; each joins the running batch when it
arrives and leaves it when it is done.

A scheduler thread owns the session. Each turn of its loop:

1. admits waiting requests while the batch has room (``max_batch`` rows): each one's first call (its prompt, images
   and videos) runs alone, exactly as :meth:`CombinedModel.chat` runs it, and its first token is chosen;
2. lays the batch out anew when rows joined or left (:func:`relayout`): the model's attention writes every row's new
   key and value at the same slot (the mask's length minus the new tokens), so every row's cache is right-aligned
   and a shorter row is padded on its left with zeros that its mask hides; a joining row is placed right-aligned
   (the running rows move right when it is the longer), and columns that are padding in every row are dropped;
3. runs one decode step for every row: one token each, the cache written in place (:class:`InPlaceCache`),
   ``rope_deltas`` per row (its first call's), positions following the mask;
4. rows that ended (an end-of-sequence token, a stop string, ``max_tokens``, or cancelled) leave at the next turn.

Each request chooses its tokens with its own :class:`~merge.runtime.sampling.TokenChooser` (its own random
stream), detokenizes with its own stream and stop scanner, and hands what it produces to its ``sink`` without ever
waiting for a reader: a slow or gone client cannot stall the others. Greedy answers equal, token for token, those
of the same request run alone with :meth:`CombinedModel.chat` (the tests hold them to it). Memory is bounded by
``max_batch`` running rows, ``max_queue`` waiting requests (each holding its preprocessed pixels, at most the
folder's pixel budget per image) and each request's ``max_tokens``.

A first call blocks the loop while it runs: a large image delays the other rows' next tokens by its vision and
prefill time (chunked prefill is not done).
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from merge.contract.manifest import FORMAT_KV_CACHE_IN_PLACE
from merge.contract.names import (
    ATTENTION_MASK,
    IMAGE_GRID_THW,
    INPUT_IDS,
    LOGITS,
    LOGITS_TO_KEEP,
    PIXEL_VALUES,
    PIXEL_VALUES_VIDEOS,
    ROPE_DELTAS,
    ROPE_DELTAS_OUT,
    VIDEO_GRID_THW,
)
from merge.errors import MergeError

from .cache import InPlaceCache
from .model import CACHE_STEP, CombinedModel
from .sampling import GREEDY, Sampling, StopScanner, TokenChooser, check_stop, ending

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_QUEUE = 64
MAX_BATCH_LIMIT = 1024
MAX_QUEUE_LIMIT = 1_000_000


class QueueFull(MergeError):
    """The engine holds ``max_queue`` waiting requests already (a server answers 429)."""


class EngineClosed(MergeError):
    """The engine is stopped or stopping (a server answers 503)."""


@dataclass(frozen=True)
class Piece:
    """New text of a request (never half a UTF-8 character; what may still become a stop string is held back)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """A request's end: its whole text (the pieces joined), why it ended (OpenAI's ``stop`` or ``length``, or
    ``cancelled``) and its token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """A request that could not be answered: ``kind`` is ``bad_input`` (the request itself), ``unavailable``
    (the engine stopped) or ``internal``; ``message`` is one line."""

    message: str
    kind: str


Event = Piece | Finished | Failed


class Request:
    """One submitted request: :meth:`cancel` it, or read what it produces with :meth:`events` / :meth:`result`
    (when no ``sink`` was given to :meth:`Engine.submit`)."""

    def __init__(self, engine: Engine, number: int, feeds: dict[str, np.ndarray], max_tokens: int,
                 sampling: Sampling, stop: tuple[str, ...], sink: Callable[[Event], None] | None):
        self.engine = engine
        self.id = number
        self.feeds: dict[str, np.ndarray] | None = feeds  # dropped after the first call
        self.prompt_tokens = int(feeds[ATTENTION_MASK].sum())
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.stop = stop
        self.cancelled = threading.Event()
        self.outcome: Finished | Failed | None = None
        self.submitted = time.monotonic()
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._sink = sink or self._queue.put

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def cancel(self) -> None:
        """Stop this request: a waiting one never runs, a running one leaves the batch at the next step."""
        if not self.done:
            self.cancelled.set()
            self.engine._withdraw(self)

    def _emit(self, event: Event) -> None:
        if self.done:
            return
        if isinstance(event, Finished | Failed):
            self.outcome = event
            self.engine._count(self)  # counted before any reader sees the end: stats() never lags an outcome
        try:
            self._sink(event)
        except Exception:  # a sink that fails (its reader's loop closed) must not stop the engine
            log.warning("request %d: its reader failed to take an event; cancelling it", self.id, exc_info=True)
            self.cancelled.set()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The events as they come, up to the last (:class:`Finished` or :class:`Failed`); ``timeout`` seconds at most
        between two (``queue.Empty`` past it)."""
        while True:
            event = self._queue.get(timeout=timeout)
            yield event
            if isinstance(event, Finished | Failed):
                return

    def result(self, timeout: float | None = None) -> Finished:
        """Wait for the end; a :class:`Failed` request raises :class:`MergeError` with its message."""
        for event in self.events(timeout):
            if isinstance(event, Failed):
                raise MergeError(event.message)
            if isinstance(event, Finished):
                return event
        raise AssertionError("unreachable")  # pragma: no cover - events() ends with Finished or Failed


class _Row:
    """A running request: its token chooser, detokenizer and stop scanner, and the token it feeds next."""

    def __init__(self, request: Request, eos: frozenset[int], decode: Callable[[Sequence[int]], str], stream):
        self.request = request
        self.eos = eos
        self.decode = decode
        self.chooser = TokenChooser(request.sampling, 1)
        self.stream = stream
        self.scanner = StopScanner(request.stop)
        self.tokens: list[int] = []
        self.next_token = 0
        self.done = False

    def take(self, logits: np.ndarray) -> None:
        """Choose the next token from [1, vocab] logits, hand its text on, and finish when the request ends."""
        token = int(self.chooser(logits)[0])
        self.tokens.append(token)
        if token in self.eos:
            self.finish()
            return
        self.emit(self.stream.step(token))
        if self.scanner.stopped or len(self.tokens) >= self.request.max_tokens:
            self.finish()
            return
        self.next_token = token

    def emit(self, piece: str) -> None:
        piece = self.scanner.feed(piece) if self.request.stop else piece
        if piece:
            self.request._emit(Piece(piece))

    def finish(self) -> None:
        """As :meth:`CombinedModel.complete` ends a row: what the stream held back, then the whole text."""
        self.done = True
        self.emit(self.stream.flush())
        if self.request.stop and (rest := self.scanner.flush()):
            self.request._emit(Piece(rest))
        text, reason = ending(self.tokens, self.eos, self.decode, self.request.stop, self.scanner.stopped)
        self.request._emit(Finished(text, reason, self.request.prompt_tokens, len(self.tokens)))


def relayout(arrays: dict[str, np.ndarray], mask: np.ndarray, keep: Sequence[int],
             joining: Sequence[dict[str, np.ndarray]], spare: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A batch's KV buffers and attention mask with rows ``keep`` (indices, in order) of the old batch, then the
    ``joining`` rows' caches ([1, kv_heads, length, head_dim] each, all positions real), room for ``spare`` more
    positions.

    Every row stays right-aligned at the new length, the longest row's (a row's real positions are the mask's 1s,
    at its right end): the kept rows all move by the same number of columns (left when padding common to all of them
    is dropped, right when a joining row is longer), the joining rows sit at the right end with 0s on their left.
    ``arrays``: [batch, kv_heads, capacity + 1, head_dim] per past tensor; ``mask``: [batch, length].
    """
    keep = list(keep)
    length = mask.shape[1]
    starts = [int(np.argmax(mask[i] > 0)) for i in keep]
    lengths = [length - s for s in starts] + [next(iter(kv.values())).shape[2] for kv in joining]
    new_length = max(lengths, default=0)
    batch = len(keep) + len(joining)
    shift = new_length - length  # where the kept rows' columns go
    low = max(0, -shift)  # the first old column kept (never past a kept row's first real position)
    out = {}
    for name, old in arrays.items():
        new = np.zeros((batch, old.shape[1], new_length + spare + 1, old.shape[3]), old.dtype)
        if keep:
            new[:len(keep), :, low + shift:new_length] = old[keep, :, low:length]
        for j, kv in enumerate(joining):
            rows = kv[name].shape[2]
            new[len(keep) + j, :, new_length - rows:new_length] = kv[name][0]
        out[name] = new
    new_mask = np.zeros((batch, new_length), np.int64)
    if keep:
        new_mask[:len(keep), low + shift:] = mask[keep, low:]
    for j, row_length in enumerate(lengths[len(keep):]):
        new_mask[len(keep) + j, new_length - row_length:] = 1
    return out, new_mask


class Engine:
    """Continuous batching over one :class:`CombinedModel` (see the module's docstring). ``start()`` it (or use it
    as a context manager), :meth:`submit` requests from any thread, :meth:`close` it."""

    def __init__(self, model: CombinedModel, *, max_batch: int = DEFAULT_MAX_BATCH,
                 max_queue: int = DEFAULT_MAX_QUEUE):
        import onnxruntime as ort

        for name, value, limit in (("max_batch", max_batch, MAX_BATCH_LIMIT), ("max_queue", max_queue,
                                                                               MAX_QUEUE_LIMIT)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise MergeError(f"{name} must be a whole number from 1 to {limit}, got {value!r}")
        if model.format_version < FORMAT_KV_CACHE_IN_PLACE:
            raise MergeError(f"{model.folder} is a format {model.format_version} folder; serving batches needs the KV "
                             f"cache written in place (format {FORMAT_KV_CACHE_IN_PLACE}): build it again")
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        pre = model.preprocessor
        self.eos = frozenset(pre.eos_token_ids)
        self._decode = pre.decode
        self._new_stream = pre.stream
        self._lock = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._numbers = itertools.count(1)
        self._rows: list[_Row] = []
        self._mask = np.zeros((0, 0), np.int64)
        self._rope = np.zeros((0, 1), np.int64)
        self._cache = InPlaceCache(model.session, model.past_names, 0, model.num_kv_heads, model.head_dim, 1)
        self._options = ort.RunOptions()
        self._options.log_severity_level = 4  # a call terminated by close() is no error to log
        self._closed = False
        self._thread: threading.Thread | None = None
        self.counts = collections.Counter()  # submitted, finished, cancelled, failed, steps, joined, prefills
        self.busy_seconds = 0.0

    # -- the caller's side -------------------------------------------------------------------------------------------

    def start(self) -> Engine:
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="merge-engine", daemon=True)
                self._thread.start()
        return self

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def submit(self, inputs: dict[str, np.ndarray], *, max_tokens: int, sampling: Sampling | None = None,
               stop: str | Sequence[str] | None = None, sink: Callable[[Event], None] | None = None) -> Request:
        """Queue one prompt (one row of :meth:`merge.runtime.preprocess.Preprocessor.build_message_inputs` or
        ``build_inputs``); its first call's inputs are checked here, in the caller's thread. ``sink(event)`` is called
        from the engine's thread with each :class:`Piece` and the last :class:`Finished` or :class:`Failed`; it must
        not block. Raises :class:`QueueFull` when ``max_queue`` requests wait, :class:`EngineClosed` after
        :meth:`close`, and :class:`MergeError` for inputs or options the model cannot take."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise MergeError(f"max_tokens must be a whole number, 1 or more, got {max_tokens!r}")
        sampling = GREEDY if sampling is None else sampling
        if not isinstance(sampling, Sampling):
            raise MergeError(f"sampling must be a merge.runtime.Sampling, got {type(sampling).__name__}")
        stop = check_stop(stop)
        ids = inputs[INPUT_IDS]
        if np.ndim(ids) != 2 or np.shape(ids)[0] != 1:
            raise MergeError(f"a request is one prompt: input_ids [1, sequence], got shape {np.shape(ids)}")
        limit = self.model.config.text.max_position_embeddings
        if np.shape(ids)[1] + max_tokens > limit:
            raise MergeError(f"a prompt of {np.shape(ids)[1]} tokens and max_tokens {max_tokens} go past the model's "
                             f"max_position_embeddings {limit}")
        feeds = self.model.first_feeds(ids, inputs[ATTENTION_MASK], inputs.get(PIXEL_VALUES),
                                       inputs.get(IMAGE_GRID_THW), inputs.get(PIXEL_VALUES_VIDEOS),
                                       inputs.get(VIDEO_GRID_THW))
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests wait already (max_queue {self.max_queue}); try again "
                                "later")
            request = Request(self, next(self._numbers), feeds, max_tokens, sampling, stop, sink)
            self._waiting.append(request)
            self.counts["submitted"] += 1
            self._lock.notify_all()
        return request

    def _withdraw(self, request: Request) -> None:
        """A cancelled request that still waits leaves the queue at once (a running one leaves at the next step)."""
        with self._lock:
            if request in self._waiting:
                self._waiting.remove(request)
                self.counts["cancelled"] += 1
                request._emit(Finished("", "cancelled", request.prompt_tokens, 0))
            self._lock.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, int]:
        """Running rows, waiting requests, and the counts since the start."""
        with self._lock:
            # a row whose request has its last event stays in the batch until the next step's relayout: not running
            return {"running": sum(not row.done for row in self._rows), "waiting": len(self._waiting), **self.counts}

    def close(self, timeout: float = 10.0) -> None:
        """Stop: the call in progress is told to terminate; every request not yet done fails as ``unavailable``."""
        with self._lock:
            self._closed = True
            self._options.terminate = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if thread is None:
            self._fail_all("the server is shutting down")

    # -- the engine's thread -----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._closed and not self._waiting and not self._rows:
                        self._lock.wait()
                    if self._closed:
                        return
                    room = self.max_batch - len(self._rows)
                    admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                start = time.perf_counter()
                try:
                    self._turn(admitted)
                except Exception as exc:  # a bug of ours: the requests involved fail, the engine goes on
                    log.error("the engine's turn failed", exc_info=exc)
                    for request in admitted + [row.request for row in self._rows]:
                        if not request.done:
                            self._failed(request, exc)
                    self._relayout([], [])
                self.busy_seconds += time.perf_counter() - start
        finally:
            self._fail_all("the server is shutting down")

    def _turn(self, admitted: list[Request]) -> None:
        joining: list[tuple[_Row, dict[str, np.ndarray], np.ndarray]] = []
        for request in admitted:
            if request.cancelled.is_set():
                self._cancelled(request)
                continue
            started = self._first_call(request)
            if started is not None:
                joining.append(started)
        keep = []
        for i, row in enumerate(self._rows):
            if not row.done and row.request.cancelled.is_set():
                row.done = True
                self._cancelled(row.request, len(row.tokens))
            if not row.done:
                keep.append(i)
        if joining or len(keep) != len(self._rows):
            self._relayout(keep, joining)
        if self._rows:
            self._step()

    def _count(self, request: Request) -> None:
        outcome = request.outcome
        with self._lock:
            if isinstance(outcome, Finished) and outcome.finish_reason != "cancelled":
                self.counts["finished"] += 1
            elif isinstance(outcome, Failed):
                self.counts["failed"] += 1

    def _cancelled(self, request: Request, tokens: int = 0) -> None:
        with self._lock:
            self.counts["cancelled"] += 1
        request._emit(Finished("", "cancelled", request.prompt_tokens, tokens))

    def _first_call(self, request: Request) -> tuple[_Row, dict[str, np.ndarray], np.ndarray] | None:
        """The request's prompt, images and videos alone, as :meth:`CombinedModel.generate` runs a first call (its
        own in-place cache, the last position's logits); its first token chosen. None when it is already done."""
        model = self.model
        feeds = dict(request.feeds or {})
        request.feeds = None  # the pixels are not kept past the first call
        length = feeds[INPUT_IDS].shape[1]
        for name in model.past_names:
            feeds.pop(name, None)
        if model.keeps_logits:
            feeds[LOGITS_TO_KEEP] = np.array(1, np.int64)
        with self._lock:
            self.counts["prefills"] += 1
        try:
            cache = model.new_cache(1, length + min(request.max_tokens, CACHE_STEP))
            out = model.prefill(cache.run, feeds, self._options)  # a long prompt in calls of prefill_chunk
            row = _Row(request, self.eos, self._decode, self._new_stream())
            row.take(out[LOGITS][:, -1])
        except Exception as exc:
            self._failed(request, exc)
            return None
        if row.done:
            return None
        kv = {name: cache.arrays[name][:, :, :length] for name in model.past_names}
        return row, kv, out[ROPE_DELTAS_OUT].astype(np.int64).reshape(1, 1)

    def _failed(self, request: Request, exc: Exception) -> None:
        if self._closed:
            request._emit(Failed("the server is shutting down", "unavailable"))
        elif isinstance(exc, MergeError):
            request._emit(Failed(str(exc), "bad_input"))
        else:
            log.error("request %d failed", request.id, exc_info=exc)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            request._emit(Failed(f"the model failed on this request ({type(exc).__name__}: {first[:300]})",
                                 "internal"))

    def _relayout(self, keep: list[int], joining: list[tuple[_Row, dict[str, np.ndarray], np.ndarray]]) -> None:
        arrays, mask = relayout(self._cache.arrays, self._mask, keep, [kv for _, kv, _ in joining], CACHE_STEP)
        self._rows = [self._rows[i] for i in keep] + [row for row, _, _ in joining]
        self._rope = np.concatenate([self._rope[keep], *[rope for _, _, rope in joining]], axis=0)
        self._mask = mask
        self._cache.replace(arrays)
        with self._lock:
            self.counts["joined"] += len(joining)

    def _step(self) -> None:
        """One decode step for every running row."""
        model, rows = self.model, self._rows
        mask = np.concatenate([self._mask, np.ones((len(rows), 1), np.int64)], axis=1)
        if mask.shape[1] > self._cache.capacity:
            self._cache.reserve(max(2 * self._cache.capacity, mask.shape[1]))
        feeds = {INPUT_IDS: np.array([[row.next_token] for row in rows], np.int64), ATTENTION_MASK: mask,
                 **model.no_vision(), ROPE_DELTAS: self._rope}
        try:
            out = self._cache.run(feeds, self._options)
        except Exception as exc:  # the whole batch fails; the engine goes on with the next requests
            for row in rows:
                row.done = True
                self._failed(row.request, exc)
            self._relayout([], [])
            return
        self._mask = mask
        with self._lock:
            self.counts["steps"] += 1
        logits = out[LOGITS][:, -1]
        for i, row in enumerate(rows):
            row.take(logits[i:i + 1])

    def _fail_all(self, message: str) -> None:
        with self._lock:
            pending = list(self._waiting) + [row.request for row in self._rows]
            self._waiting.clear()
        for request in pending:
            request._emit(Failed(message, "unavailable"))
