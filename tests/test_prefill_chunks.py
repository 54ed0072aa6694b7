"""Chunked prefill (:meth:`CombinedModel.prefill`): a long prompt fed in calls of ``prefill_chunk`` positions, so no
call holds attention scores for the whole prompt, gives what the whole prompt in one call gives.

* where the calls end (:func:`prefill_bounds`): the first carries every image and video token and every row's first
  real token, the rest ``prefill_chunk`` each;
* on a prompt with images early and text after, in place and growing, every position's logits and the greedy tokens
  equal the one-call run's within the fp32 bound; so do continuous batching's answers (each request's first call
  alone). A batch of several prompts runs in one call (ONNX Runtime's attention takes several new positions over a
  past for one row only);
* twins: later calls without the first call's ``rope_deltas`` (text positions restarting) move the logits past the
  bound; a first call cut inside an image's tokens is refused by the model, naming its check.
"""

from __future__ import annotations

import numpy as np
import pytest

from merge.contract.names import ROPE_DELTAS
from merge.errors import MergeError
from merge.runtime import CombinedModel
from merge.runtime import model as model_module
from merge.runtime.engine import Engine
from merge.runtime.model import prefill_bounds
from merge.tools.compare import compare
from merge.tools.verify import default_images

CHUNK = 16
NEW_TOKENS = 6
IMAGE, VIDEO = 7, 8  # stand-in ids for the bounds' unit tests


@pytest.mark.parametrize("ids, mask, chunk, ends", [
    ([[1] * 10], [[1] * 10], 4, [4, 8, 10]),  # text: chunks of 4
    ([[1] * 10], [[1] * 10], 16, [10]),  # shorter than a chunk: one call
    ([[1, 1, 1, IMAGE, IMAGE, 1, 1, 1, 1, 1]], [[1] * 10], 2, [5, 7, 9, 10]),  # the image in the first call
    ([[1, 1, 1, 1, 1, 1, VIDEO, 1, 1, 1]], [[1] * 10], 3, [7, 10]),  # a video late: the first call reaches past it
    ([[1] * 6, [0, 0, 0, 0, 0, 1]], [[1] * 6, [0, 0, 0, 0, 0, 1]], 2, [6]),  # every row's first token in the first
    ([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]], [[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]], 2, [4, 6, 8]),
    ([[IMAGE, 1, 1, 1], [0, 0, 1, 1]], [[1, 1, 1, 1], [0, 0, 1, 1]], 1, [3, 4]),
])
def test_where_the_calls_end(ids, mask, chunk, ends):
    assert prefill_bounds(np.array(ids), np.array(mask), (IMAGE, VIDEO), chunk) == ends


def test_a_padded_image_token_does_not_count():
    ids, mask = np.array([[IMAGE, 1, 1, 1, 1, 1]]), np.array([[0, 1, 1, 1, 1, 1]])
    assert prefill_bounds(ids, mask, (IMAGE, VIDEO), 2) == [2, 4, 6]
    with pytest.raises(MergeError, match="prefill_chunk must be at least 1, got 0"):
        prefill_bounds(ids, mask, (IMAGE, VIDEO), 0)


@pytest.fixture(scope="module")
def models(combined):
    folder = combined("tiny")
    return CombinedModel(folder, prefill_chunk=CHUNK), CombinedModel(folder, prefill_chunk=None)


TEXT = "Describe both pictures, one after the other, in great detail: colours, shapes, and what they might be. " * 2


@pytest.fixture(scope="module")
def batch(models):
    """One prompt: two images early, a long text after."""
    return models[0].preprocessor.build_batch_inputs([TEXT], [default_images(2)])


def _generate(model, inputs, **kwargs):
    return model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                          inputs["image_grid_thw"], max_new_tokens=NEW_TOKENS, **kwargs)


def _close(a, b, real):
    results = [compare("prefill", a.prefill_logits[real], b.prefill_logits[real])]
    results += [compare(f"step {i}", x, y) for i, (x, y) in enumerate(zip(a.step_logits, b.step_logits, strict=True))]
    return results


@pytest.mark.parametrize("in_place", [True, False])
def test_chunked_equals_one_call(models, batch, in_place):
    chunked, whole = models
    ends = prefill_bounds(batch["input_ids"], batch["attention_mask"],
                          (chunked.config.image_token_id, chunked.config.video_token_id), CHUNK)
    assert len(ends) >= 3 and ends[0] < batch["input_ids"].shape[1]  # several calls, text after the first
    a, b = _generate(chunked, batch, in_place=in_place), _generate(whole, batch, in_place=in_place)
    real = batch["attention_mask"].astype(bool)
    assert all(r.passed for r in _close(a, b, real)), [r.line() for r in _close(a, b, real) if not r.passed]
    np.testing.assert_array_equal(a.tokens, b.tokens)
    kept = _generate(chunked, batch, in_place=in_place, all_logits=False)  # logits_to_keep fed to every call
    assert kept.prefill_logits.shape[1] == 1
    assert compare("last", kept.prefill_logits[:, -1], b.prefill_logits[:, -1]).passed
    np.testing.assert_array_equal(kept.tokens, b.tokens)


def test_a_batch_of_prompts_runs_in_one_call(models, monkeypatch):
    chunked, whole = models
    batch = chunked.preprocessor.build_batch_inputs([TEXT, "Hi, how are you today?"], [default_images(2), []])
    calls = []
    new_cache = chunked.new_cache

    def counting(rows, capacity):
        cache = new_cache(rows, capacity)
        run = cache.run
        cache.run = lambda feeds, options=None: calls.append(feeds["input_ids"].shape) or run(feeds, options)
        return cache

    monkeypatch.setattr(chunked, "new_cache", counting)
    a, b = _generate(chunked, batch), _generate(whole, batch)
    assert calls[0] == batch["input_ids"].shape and batch["input_ids"].shape[1] > CHUNK
    np.testing.assert_array_equal(a.prefill_logits, b.prefill_logits)


def test_twin_later_calls_without_rope_deltas_fail(models, batch, monkeypatch):
    chunked, whole = models
    run = chunked.prefill

    def restarting(run_call, feeds, options=None, **kwargs):
        def call(part, opts=None):
            if part is not feeds and ROPE_DELTAS in part:
                part = {**part, ROPE_DELTAS: np.zeros_like(part[ROPE_DELTAS])}
            return run_call(part, opts)
        return run(call, feeds, options, **kwargs)

    monkeypatch.setattr(chunked, "prefill", restarting)
    a, b = _generate(chunked, batch), _generate(whole, batch)
    assert not all(r.passed for r in _close(a, b, batch["attention_mask"].astype(bool)))


def test_twin_a_first_call_cut_inside_the_images_is_refused(models, batch, monkeypatch):
    chunked, _ = models
    monkeypatch.setattr(model_module, "prefill_bounds",
                        lambda ids, mask, vision, chunk: [*range(chunk, ids.shape[1], chunk), ids.shape[1]])
    with pytest.raises(Exception, match="image"):
        _generate(chunked, batch)


def test_continuous_batching_answers_as_one_call(models):
    chunked, whole = models
    text = "Tell me a long story about a red fox and a blue bird who meet in the forest one winter morning. " * 2
    requests = [(text, [], 7), ("Describe the image, please, in a few words.", default_images(1), 5), ("Hi", [], 4)]
    alone = [whole.complete(p, i, max_new_tokens=m).texts[0] for p, i, m in requests]
    with Engine(chunked, max_batch=2, max_queue=8) as engine:
        handles = [engine.submit(chunked.preprocessor.build_inputs(p, i), max_tokens=m) for p, i, m in requests]
        assert [h.result(timeout=120).text for h in handles] == alone


def test_a_bad_chunk_is_refused(combined):
    for bad in (0, -5, 2.5, True):
        with pytest.raises(MergeError, match="prefill_chunk must be a whole number of at least 1"):
            CombinedModel(combined("tiny"), prefill_chunk=bad)
