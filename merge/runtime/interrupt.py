"""A long ONNX Runtime call that Ctrl-C and SIGTERM stop, and a watch that is told how long it will be.

Python runs signal handlers in the main thread only, between bytecodes; ``session.run`` holds the main thread in
C++ until the call returns, so Ctrl-C during a first call of minutes (a 12 MP photo through the vision tower) would
wait for its end. :func:`run_interruptibly` makes the call in a worker thread with its own
``onnxruntime.RunOptions``; the calling thread waits in short joins, which a signal interrupts at once, so the
handler runs (KeyboardInterrupt, the CLI's ``Terminated``). Whatever the waiting thread raises sets
``RunOptions.terminate``: ONNX Runtime stops before its next node (subgraphs included), the worker ends, and the
exception goes on to the caller.

ONNX Runtime does not stop inside a node, and one node can run for seconds (the vision attention over a whole
12 MP image: ~10 s on the tiny preset, a minute on 2B). The caller waits :data:`STOP_GRACE` for the worker, then
raises anyway; the worker, told to terminate, ends at that node's end (:func:`running_calls` lists it until then:
``python -m merge`` exits at once without waiting for it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from merge.contract.config import ModelConfig
from merge.contract.names import ATTENTION_MASK, IMAGE_GRID_THW, INPUT_IDS, VIDEO_GRID_THW

T = TypeVar("T")

# A first call is "long" from this many image and video tokens on (all prompts of a batch together): about 2 MP of
# images. On qwen3-vl-2b on 2 cores that is about a minute and a half (docs/benchmarks.md: 12 s for the vision tower
# on 784 tokens, 30 min on a 12 MP photo's 11,844; 32 s to prefill 2048 tokens), on the tiny preset a few seconds.
LONG_CALL_TOKENS = 2048
STOP_GRACE = 1.0  # seconds an interrupted call is waited for before the caller's exception goes on without it
TICK = 0.1  # seconds between the waiting thread's wake-ups (signals do not wait for them)

_running: set[threading.Thread] = set()  # calls told to terminate that had not ended within STOP_GRACE
_lock = threading.Lock()


@dataclass(frozen=True)
class FirstCall:
    """What a first call carries, known before it runs."""

    prompt_tokens: int  # real (unmasked) tokens over the batch, image and video tokens included
    image_tokens: int
    video_tokens: int
    num_images: int
    num_videos: int
    pixels_per_token: int  # (patch * spatial merge)^2: an image of N pixels makes about N / this tokens

    @property
    def long(self) -> bool:
        return self.image_tokens + self.video_tokens >= LONG_CALL_TOKENS

    @classmethod
    def of(cls, feeds: dict[str, np.ndarray], config: ModelConfig) -> FirstCall:
        """From a first call's feeds (:meth:`merge.runtime.model.CombinedModel.first_feeds`)."""
        ids, real = feeds[INPUT_IDS], feeds[ATTENTION_MASK] != 0
        side = config.vision.patch_size * config.vision.spatial_merge_size
        videos = feeds.get(VIDEO_GRID_THW)  # absent from folders built before videos
        return cls(prompt_tokens=int(real.sum()), image_tokens=int(((ids == config.image_token_id) & real).sum()),
                   video_tokens=int(((ids == config.video_token_id) & real).sum()),
                   num_images=len(feeds[IMAGE_GRID_THW]), num_videos=0 if videos is None else len(videos),
                   pixels_per_token=side * side)


class Watch:
    """Told about a first call by :func:`run_interruptibly`: :meth:`start` before it, :meth:`tick` while it runs,
    :meth:`stop` after (also when it fails or is interrupted). This one does nothing; ``python -m merge run``'s
    (:class:`merge.commands.run.TerminalWatch`) prints a notice before a long call and, on a terminal, the seconds
    elapsed."""

    def start(self, call: FirstCall | None) -> None:
        pass

    def tick(self, seconds: float) -> None:
        pass

    def stop(self) -> None:
        pass


def running_calls() -> list[threading.Thread]:
    """The interrupted calls still inside a node of ONNX Runtime (told to terminate; each ends at its node's end)."""
    with _lock:
        _running.difference_update([t for t in _running if not t.is_alive()])
        return list(_running)


def run_interruptibly(call: Callable[[Any], T], *, watch: Watch | None = None, about: FirstCall | None = None) -> T:
    """``call(run_options)`` in a worker thread, its result (or exception) returned (raised) here; an exception
    raised here while it runs (a signal's) terminates it first. ``watch`` is told ``start(about)``, the seconds
    elapsed, and ``stop()``."""
    import onnxruntime as ort

    watch = watch or Watch()
    watch.start(about)
    try:
        return _run(call, watch, ort.RunOptions())
    finally:
        watch.stop()


def _run(call: Callable[[Any], T], watch: Watch, options) -> T:
    options.log_severity_level = 4  # a terminated call is no error to log: the caller's exception says what happened
    outcome: dict[str, Any] = {}
    # Waited for on an Event, not with Thread.join: Python 3.11's join, interrupted by a signal's exception,
    # releases the running thread's own lock and marks it stopped (the process then aborts when the thread ends)
    done = threading.Event()

    def work() -> None:
        try:
            outcome["value"] = call(options)
        except BaseException as exc:  # handed to the waiting thread
            outcome["error"] = exc
        finally:
            done.set()

    worker = threading.Thread(target=work, name="onnxruntime-call", daemon=True)
    start = time.monotonic()
    worker.start()
    try:
        while not done.wait(TICK):  # a signal ends the wait at once: its handler runs here, in the main thread
            watch.tick(time.monotonic() - start)
    except BaseException:
        options.terminate = True
        if not done.wait(STOP_GRACE):
            with _lock:
                _running.add(worker)
        raise
    if "error" in outcome:
        error = outcome.pop("error")
        try:
            raise error
        finally:
            del error  # no cycle through the traceback
    return outcome["value"]
