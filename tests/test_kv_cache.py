"""The KV cache written in place (past and present bound to the same buffers of a fixed capacity) gives exactly
what the growing cache gives (``present`` fed back each call), on a left-padded batch with images; a plain client
may also feed capacity buffers without IOBinding. Twin: a cache whose new keys never reach the past must fail."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from merge.contract.names import present_name
from merge.errors import MergeError
from merge.runtime import CombinedModel
from merge.runtime.cache import InPlaceCache
from merge.tools.verify import default_images

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model(combined):
    return CombinedModel(combined("tiny"))


@pytest.fixture(scope="module")
def batch(model):
    """Two rows, left padded, the images in the first row only."""
    return model.preprocessor.build_batch_inputs(
        ["Describe both pictures, one after the other, in detail.", "Hi"], [default_images(2), []])


def _generate(model, inputs, **kwargs):
    return model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                          inputs["image_grid_thw"], max_new_tokens=NEW_TOKENS, **kwargs)


def _same(a, b):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.prefill_logits, b.prefill_logits)
    for x, y in zip(a.step_logits, b.step_logits, strict=True):
        np.testing.assert_array_equal(x, y)


def test_folder_allows_it_and_generate_uses_it(model):
    assert model.cache_in_place
    gen = _generate(model, {"input_ids": np.array([[5, 6, 7]]), "attention_mask": None, "pixel_values": None,
                            "image_grid_thw": None})
    assert not any(name.startswith("present.") for name in gen.prefill_outputs)  # the cache stayed in place


@pytest.mark.parametrize("all_logits", [True, False])
def test_in_place_equals_growing_on_a_left_padded_batch(model, batch, all_logits):
    """``all_logits=False`` feeds logits_to_keep, an optional-typed input, bound as an OrtValue."""
    assert (batch["attention_mask"] == 0).any()  # the second row is padded
    _same(_generate(model, batch, in_place=True, all_logits=all_logits),
          _generate(model, batch, in_place=False, all_logits=all_logits))


class _PresentElsewhere(InPlaceCache):
    """Broken on purpose: ``present`` goes to buffers of its own, so the past buffers never get the new keys."""

    def _bind_present(self, binding, name, buffer):
        binding.bind_output(name)


def test_twin_new_keys_not_written_in_place_fails(model, batch, monkeypatch):
    growing = _generate(model, batch, in_place=False)
    monkeypatch.setattr(model, "new_cache", lambda b, c: _PresentElsewhere(
        model.session, model.past_names, b, model.num_kv_heads, model.head_dim, c))
    broken = _generate(model, batch, in_place=True)
    np.testing.assert_array_equal(broken.prefill_logits, growing.prefill_logits)  # the first call has no past
    assert not np.allclose(broken.step_logits[-1], growing.step_logits[-1], atol=1e-3)


class _Unbound:
    """A session whose ``run`` fails: only ``run_with_iobinding`` may be used."""

    def __init__(self, session):
        self.session = session

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, *args, **kwargs):
        raise AssertionError("session.run was called: present came back as a copy of the whole cache")


@pytest.mark.parametrize("keep", [None, 1, 3])
def test_calls_keeping_some_logits_write_in_place_too(model, keep):
    """A prefill that keeps the last positions' logits (``logits_to_keep``, an optional-typed input that
    ``bind_cpu_input`` refuses) still runs through the binding: ``present`` is the past's memory, never a second
    cache (run through ``session.run`` it came back as a fresh copy of the whole capacity: a transient the size of
    the cache on every such call, 3.5 GiB at 16k on 2B). Its logits equal the plain call's last positions."""
    ids = np.array([[5, 6, 7, 8, 9, 10]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), **model.no_vision(),
             "rope_deltas": np.zeros((1, 1), np.int64)}
    if keep is not None:
        feeds["logits_to_keep"] = np.array(keep, np.int64)
    cache = InPlaceCache(_Unbound(model.session), model.past_names, 1, model.num_kv_heads, model.head_dim, 16)
    before = {name: array.__array_interface__["data"][0] for name, array in cache.arrays.items()}
    out = cache.run(feeds)
    assert {name: array.__array_interface__["data"][0] for name, array in cache.arrays.items()} == before
    plain = model.forward({k: v for k, v in feeds.items() if k != "logits_to_keep"} | {
        p: np.zeros((1, model.num_kv_heads, 0, model.head_dim), np.float32) for p in model.past_names})
    np.testing.assert_array_equal(out["logits"], plain["logits"][:, -(keep or ids.shape[1]):])
    written = cache.arrays[model.past_names[0]][:, :, :ids.shape[1]]
    np.testing.assert_array_equal(written, plain[present_name(model.past_names[0])])


def test_plain_client_may_feed_capacity_buffers(model, batch):
    """No IOBinding: past tensors with room for 8 more positions than the call needs, as plain arrays; present
    comes back with that capacity."""
    session = ort.InferenceSession(str(model.folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    growing = _generate(model, batch, in_place=False)
    feeds = model.first_feeds(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                              batch["image_grid_thw"])
    rows, capacity = batch["input_ids"].shape[0], batch["input_ids"].shape[1] + 8
    for name in model.past_names:
        feeds[name] = np.zeros((rows, model.num_kv_heads, capacity, model.head_dim), np.float32)
    out = dict(zip(names, session.run(None, feeds), strict=True))
    np.testing.assert_array_equal(out["logits"], growing.prefill_logits)
    assert out[present_name(model.past_names[0])].shape[2] == capacity
    mask = batch["attention_mask"]
    for step in range(3):
        mask = np.concatenate([mask, np.ones((rows, 1), np.int64)], axis=1)
        feeds = {"input_ids": growing.tokens[:, step:step + 1], "attention_mask": mask, **model.no_vision(),
                 "rope_deltas": out["rope_deltas_out"]}
        feeds.update({p: out[present_name(p)] for p in model.past_names})
        out = dict(zip(names, session.run(None, feeds), strict=True))
        np.testing.assert_allclose(out["logits"][:, -1], growing.step_logits[step], rtol=0, atol=1e-5)


def test_a_full_cache_is_refused_by_name(model):
    cache = model.new_cache(1, 4)
    feeds = model.first_feeds(np.array([[5, 6, 7, 8, 9]]), np.ones((1, 5), np.int64))
    for name in model.past_names:
        del feeds[name]
    with pytest.raises(MergeError, match="needs 5 positions in the KV cache but it holds 4"):
        cache.run(feeds)


def test_a_folder_built_before_keeps_the_growing_cache(model, batch, monkeypatch):
    monkeypatch.setattr(model, "format_version", 0)  # as CombinedModel reads a merge.json without format_version
    monkeypatch.setattr(model, "cache_in_place", False)
    with pytest.raises(MergeError, match=r"is a format 0 folder .* but writing the KV cache in place needs format 1; "
                                         r"build it again"):
        model.new_cache(1, 8)
    _same(_generate(model, batch), _generate(model, batch, in_place=False))


def test_the_cache_grows_with_the_tokens_and_stays_exact(model, batch, monkeypatch):
    """Room for 2 new tokens at first, doubled as generation goes: the same tokens and logits as the growing cache,
    and a huge max_new_tokens costs no buffer up front."""
    import merge.runtime.model as runtime_model

    capacities = []
    new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda b, c: capacities.append(c) or new_cache(b, c))
    monkeypatch.setattr(runtime_model, "CACHE_STEP", 2)
    _same(_generate(model, batch, in_place=True), _generate(model, batch, in_place=False))
    assert capacities == [batch["input_ids"].shape[1] + 2]
    model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"],
                   max_new_tokens=100_000, eos_token_ids=range(200_000))  # every token ends the rows at once
    assert capacities[-1] == batch["input_ids"].shape[1] + 2


def test_feeding_the_cache_its_own_buffer_is_refused(model):
    cache = model.new_cache(1, 8)
    feeds = model.first_feeds(np.array([[5, 6, 7]]), np.ones((1, 3), np.int64))
    with pytest.raises(MergeError, match="is the in-place cache's own buffer"):
        cache.run(feeds)
