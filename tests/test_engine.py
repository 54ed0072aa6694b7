"""Continuous batching (:mod:`merge.runtime.engine`): requests that join a running batch and leave it give, token for
token, what each gives alone through ``CombinedModel.chat``.

* staggered requests (text, one and two images, a video) of different lengths and ``max_tokens``, more than
  ``max_batch``: every greedy answer equals the one alone, the streamed pieces join into it, finish reasons agree;
* seeded sampling and stop strings, alone and batched: the same texts;
* the batch's layout (:func:`relayout`) on numbers: right-aligned rows, a longer row moving the others right, common
  padding dropped; a broken twin (joining rows placed at the left) must change the answers;
* a cache that grows during decoding, cancellation (waiting and running), a full queue, a closed engine, bad inputs
  refused at submit, and a first call that fails while the engine goes on.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from merge.errors import MergeError
from merge.runtime import CombinedModel, Sampling
from merge.runtime import engine as engine_module
from merge.runtime.engine import Engine, EngineClosed, Failed, Finished, Piece, QueueFull, relayout
from merge.tools.verify import default_images

PROMPTS = ("Hello there.", "Describe the image.", "Tell me a long story about a red fox and a blue bird in the forest.",
           "Compare these two pictures, please.", "Hi")


@pytest.fixture(scope="module")
def model(combined) -> CombinedModel:
    return CombinedModel(combined("tiny"))


def _requests(count: int) -> list[tuple[str, list, list, int]]:
    """(prompt, images, videos, max_tokens): text, one image, a long text, two images, a short text; some a clip."""
    images = default_images(3)
    frames = [np.full((48, 64, 3), 40 * i, np.uint8) for i in range(4)]
    out = []
    for i in range(count):
        prompt = PROMPTS[i % len(PROMPTS)]
        pictures = {1: [images[0]], 3: [images[1], images[2]]}.get(i % len(PROMPTS), [])
        videos = [frames] if i % 7 == 6 else []
        out.append((prompt, pictures, videos, 3 + (i * 7) % 29))
    return out


def _submit_staggered(engine: Engine, model: CombinedModel, requests, pause: float = 0.003, **options):
    handles = []
    for prompt, images, videos, max_tokens in requests:
        inputs = model.preprocessor.build_inputs(prompt, images, videos)
        handles.append(engine.submit(inputs, max_tokens=max_tokens, **options))
        time.sleep(pause)  # they arrive while others decode
    return handles


def _drain(handle) -> tuple[str, Finished]:
    pieces, last = [], None
    for event in handle.events(timeout=120):
        if isinstance(event, Piece):
            pieces.append(event.text)
        else:
            last = event
    assert isinstance(last, Finished), last
    return "".join(pieces), last


def test_joined_rows_answer_as_alone(model):
    requests = _requests(21)
    alone = [model.complete(p, i, videos=v, max_new_tokens=m) for p, i, v, m in requests]
    with Engine(model, max_batch=5, max_queue=64) as engine:
        handles = _submit_staggered(engine, model, requests)
        results = [_drain(h) for h in handles]
        stats = engine.stats()
    for k, ((streamed, finished), single) in enumerate(zip(results, alone, strict=True)):
        assert finished.text == single.texts[0], k
        assert streamed == finished.text, k
        assert finished.finish_reason == single.finish_reasons[0]
        assert finished.prompt_tokens == single.prompt_tokens
        assert finished.completion_tokens == single.generation.tokens.shape[1]
    assert stats["finished"] == 21 and stats["running"] == 0 and stats["waiting"] == 0
    assert stats["steps"] < sum(m for *_, m in requests) / 2  # rows shared decode steps


def test_seeded_sampling_and_stop_strings_as_alone(model):
    requests = _requests(10)
    sampling = Sampling(temperature=1.5, top_p=0.95, top_k=50, seed=7)
    alone = [model.chat(p, i, videos=v, max_new_tokens=m + 10, sampling=sampling, stop=["ab", "H"])[0]
             for p, i, v, m in requests]
    with Engine(model, max_batch=4) as engine:
        handles = _submit_staggered(engine, model, [(p, i, v, m + 10) for p, i, v, m in requests],
                                    sampling=sampling, stop=["ab", "H"])
        results = [_drain(h) for h in handles]
    assert [f.text for _, f in results] == alone
    assert [s for s, _ in results] == alone
    assert len(set(alone)) > 1


def test_relayout_keeps_rows_right_aligned():
    rng = np.random.default_rng(0)
    # two rows of 5 columns: row 0 holds 3 positions, row 1 holds 5
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    old = rng.standard_normal((2, 1, 7, 2)).astype(np.float32)
    old[0, :, :2] = 0
    joining = {"k": rng.standard_normal((1, 1, 8, 2)).astype(np.float32)}
    arrays, new_mask = relayout({"k": old}, mask, [0, 1], [joining], spare=3)
    assert new_mask.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1], [1] * 8]
    new = arrays["k"]
    assert new.shape == (3, 1, 8 + 3 + 1, 2)
    np.testing.assert_array_equal(new[0, :, 5:8], old[0, :, 2:5])
    np.testing.assert_array_equal(new[1, :, 3:8], old[1, :, 0:5])
    np.testing.assert_array_equal(new[2, :, 0:8], joining["k"][0])
    assert not new[:, :, 8:].any() and not new[0, :, :5].any()
    # row 1 (the longest) leaves: the padding common to rows 0 and 2 goes... row 2 is as long as the batch, so the
    # batch keeps its length; then row 2 leaves too and only row 0's 3 positions remain
    arrays, trimmed = relayout(arrays, new_mask, [0, 2], [], spare=0)
    assert trimmed.shape == (2, 8)
    arrays, trimmed = relayout(arrays, trimmed, [0], [], spare=1)
    assert trimmed.tolist() == [[1, 1, 1]]
    np.testing.assert_array_equal(arrays["k"][0, :, :3], old[0, :, 2:5])
    assert arrays["k"].shape == (1, 1, 5, 2)
    empty, none = relayout(arrays, trimmed, [], [], spare=2)
    assert none.shape == (0, 0) and empty["k"].shape == (0, 1, 3, 2)


def test_twin_joining_rows_placed_left_change_the_answers(model, monkeypatch):
    """A relayout that puts a joining row at the left of the buffers (its mask still right-aligned) must fail the
    parity: the attention then reads padding as the row's past."""

    def left_aligned(arrays, mask, keep, joining, spare):
        out, new_mask = relayout(arrays, mask, keep, joining, spare)
        length = new_mask.shape[1]
        for j, kv in enumerate(joining):
            for name, array in out.items():
                rows = kv[name].shape[2]
                array[len(keep) + j, :, :length] = 0
                array[len(keep) + j, :, :rows] = kv[name][0]
        return out, new_mask

    requests = [(p, i, v, 12) for p, i, v, _ in _requests(5)]
    alone = [model.chat(p, i, videos=v, max_new_tokens=m)[0] for p, i, v, m in requests]
    monkeypatch.setattr(engine_module, "relayout", left_aligned)
    with Engine(model, max_batch=5) as engine:
        handles = _submit_staggered(engine, model, requests, pause=0)
        texts = [h.result(timeout=60).text for h in handles]
    assert texts != alone


def test_cache_grows_while_decoding(model, monkeypatch):
    """Little spare room (4 positions) after each relayout: the decode steps grow the buffers, answers unchanged."""
    monkeypatch.setattr(engine_module, "CACHE_STEP", 4)
    requests = [(p, i, v, 40) for p, i, v, _ in _requests(4)]
    alone = [model.chat(p, i, videos=v, max_new_tokens=m)[0] for p, i, v, m in requests]
    with Engine(model, max_batch=4) as engine:
        texts = [h.result(timeout=60).text for h in _submit_staggered(engine, model, requests)]
    assert texts == alone


def test_cancel_a_waiting_and_a_running_request(model):
    inputs = model.preprocessor.build_inputs("Tell me everything.", [])
    with Engine(model, max_batch=1, max_queue=4) as engine:
        running = engine.submit(inputs, max_tokens=100_000)
        waiting = engine.submit(inputs, max_tokens=5)
        first = next(running.events(timeout=30))
        assert isinstance(first, Piece | Finished)
        waiting.cancel()
        assert waiting.result(timeout=5).finish_reason == "cancelled"
        running.cancel()
        finished = running.result(timeout=30)
        assert finished.finish_reason == "cancelled" and finished.completion_tokens < 100_000
        after = engine.submit(inputs, max_tokens=3).result(timeout=30)
        assert after.completion_tokens == 3 and after.text == model.chat("Tell me everything.", max_new_tokens=3)[0]
        stats = engine.stats()
    assert stats["cancelled"] == 2 and stats["finished"] == 1


def test_queue_full_closed_and_bad_inputs(model):
    inputs = model.preprocessor.build_inputs("Hello.", [])
    engine = Engine(model, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    engine.submit(inputs, max_tokens=2)
    engine.submit(inputs, max_tokens=2)
    with pytest.raises(QueueFull, match="max_queue 2"):
        engine.submit(inputs, max_tokens=2)
    for bad, match in ((dict(max_tokens=0), "max_tokens"), (dict(max_tokens=2, stop=[""]), "stop"),
                       (dict(max_tokens=10**9), "max_position_embeddings"),
                       (dict(max_tokens=2, sampling="greedy"), "sampling")):
        with pytest.raises(MergeError, match=match):
            engine.submit(inputs, **bad)
    wrong = dict(inputs, input_ids=inputs["input_ids"] + 10**6)
    with pytest.raises(MergeError, match="is not a token id"):
        engine.submit(wrong, max_tokens=2)
    engine.close()
    with pytest.raises(EngineClosed):
        engine.submit(inputs, max_tokens=2)
    with pytest.raises(EngineClosed):
        engine.start()
    with pytest.raises(MergeError):
        Engine(model, max_batch=0)


def test_a_failing_first_call_fails_its_request_only(model, monkeypatch):
    inputs = model.preprocessor.build_inputs("Hello.", [])
    real = engine_module.Engine._first_call
    calls = []

    def flaky(self, request):
        calls.append(request.id)
        if len(calls) == 2:
            # a mask of 2s, which the model's own check refuses (merge/checks/attention_mask_values_are_0_or_1)
            request.feeds = {**request.feeds, "attention_mask": request.feeds["attention_mask"] * 2}
        return real(self, request)

    monkeypatch.setattr(engine_module.Engine, "_first_call", flaky)
    with Engine(model, max_batch=4) as engine:
        handles = [engine.submit(inputs, max_tokens=4) for _ in range(3)]
        outcomes = []
        for h in handles:
            events = list(h.events(timeout=30))
            outcomes.append(events[-1])
        stats = engine.stats()
    assert isinstance(outcomes[1], Failed) and outcomes[1].kind == "internal"
    assert "Traceback" not in outcomes[1].message and "\n" not in outcomes[1].message
    assert [o.text for o in (outcomes[0], outcomes[2])] == [model.chat("Hello.", max_new_tokens=4)[0]] * 2
    assert stats["failed"] == 1 and stats["finished"] == 2


def test_close_fails_what_is_left(model):
    inputs = model.preprocessor.build_inputs("Tell me everything.", [])
    engine = Engine(model, max_batch=1, max_queue=4).start()
    running = engine.submit(inputs, max_tokens=100_000)
    waiting = engine.submit(inputs, max_tokens=5)
    next(running.events(timeout=30))
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(30)
    for handle in (running, waiting):
        last = list(handle.events(timeout=10))[-1]
        assert isinstance(last, Failed) and last.kind == "unavailable"
