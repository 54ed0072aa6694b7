"""verify's PyTorch reference for models larger than memory (:mod:`export.streamed`): weights read from the
checkpoint as each module runs give the same numbers as the whole model in memory, bit for bit, for fp32 and
for the weights of a quantized folder; a twin that forgets the quantized weights must differ."""

from __future__ import annotations

import numpy as np
import pytest

from merge.contract.quant import QuantSpec
from merge.sources.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def inputs(combined):
    from merge.contract.folder import CombinedFolder
    from merge.tools.verify import default_images, prepare_inputs

    return prepare_inputs(CombinedFolder.open(combined("tiny")), "Describe both.", default_images(2), None, None, (),
                          None, None)


def _reference(model, inputs):
    from export.reference import torch_reference

    return torch_reference(model, inputs, 3)


@pytest.mark.parametrize(("int4", "vision_int8"), [(False, False), (True, True)])
def test_streamed_equals_in_memory(int4, vision_int8, sources, inputs):
    from export.reference import load_model, quantized_weights
    from export.streamed import streamed_model

    folder = sources("tiny").folder
    quant = QuantSpec() if int4 else None
    whole = _reference(load_model(folder, quant, shared_table=int4, vision_int8=vision_int8, stream=False), inputs)
    # every module with weights streams (the tiny model has none above the default size)
    model = streamed_model(folder, Checkpoint(folder), quantized_weights(quant, int4, vision_int8), resident_numel=1)
    assert model.streamed_modules > 50
    assert sum(p.device.type == "meta" for p in model.parameters()) > 50  # nothing held between calls
    streamed = _reference(model, inputs)
    for key, value in whole.items():
        assert np.array_equal(value, streamed[key]), key


@pytest.mark.parametrize("int4", [False, True])
def test_streamed_moe_reads_each_expert_alone_and_equals_in_memory(int4, sources, combined, monkeypatch):
    """Qwen3-VL-MoE: the experts a layer's tokens were routed to are read one by one (ExpertRows, several at a time),
    never a whole stack, with the same numbers as in memory; twin: an expert read as another's must differ."""
    from export.reference import load_model, quantized_weights
    from export.streamed import ExpertRows, streamed_model
    from merge.contract.folder import CombinedFolder
    from merge.contract.quant import DEFAULT_INT4
    from merge.tools.verify import default_images, prepare_inputs

    folder = sources("tiny-moe").folder
    moe_inputs = prepare_inputs(CombinedFolder.open(combined("tiny-moe")), "Describe it.", default_images(1), None,
                                None, (), None, None)
    quant = DEFAULT_INT4 if int4 else None
    whole = _reference(load_model(folder, quant, stream=False), moe_inputs)
    checkpoint = Checkpoint(folder)
    rows = []
    monkeypatch.setattr(checkpoint, "load", lambda name, load=checkpoint.load: (
        pytest.fail(f"the whole stack {name} was read") if ".mlp.experts." in name else load(name)))
    monkeypatch.setattr(checkpoint, "load_rows", lambda name, first, count, load=checkpoint.load_rows: (
        rows.append(count), load(name, first, count))[1])

    def model():
        return streamed_model(folder, checkpoint, quantized_weights(quant, False, False), resident_numel=1)

    streamed = _reference(model(), moe_inputs)
    assert rows and set(rows) == {1}
    for key, value in whole.items():
        assert np.array_equal(value, streamed[key]), key
    # twin: expert e read as expert e + 1
    monkeypatch.setattr(ExpertRows, "__getitem__", lambda self, i, get=ExpertRows.__getitem__:
                        get(self, (int(i) + 1) % self.shape[0]))
    monkeypatch.setattr(ExpertRows, "prefetch", lambda self, index: None)
    swapped = _reference(model(), moe_inputs)
    assert not np.allclose(whole["prefill_logits"], swapped["prefill_logits"], atol=1e-3)


def test_streamed_without_the_folders_weights_differs(sources, inputs):
    """The twin: streaming the checkpoint's fp32 weights for an int4 reference must not pass for it."""
    from export.reference import load_model
    from export.streamed import streamed_model

    folder = sources("tiny").folder
    whole = _reference(load_model(folder, QuantSpec(), shared_table=True, stream=False), inputs)
    streamed = _reference(streamed_model(folder, Checkpoint(folder), None, resident_numel=1), inputs)
    assert not np.allclose(whole["prefill_logits"], streamed["prefill_logits"], atol=1e-3)


def test_verify_streams_on_request(combined, capsys):
    from merge.cli import main

    assert main(["verify", str(combined("tiny", "int4")), "--model", "tiny", "--stream-weights",
                 "--max-new-tokens", "2", "--debug"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("PASSED: all")


def test_automatic_choice(sources, monkeypatch):
    """Streaming is chosen when the fp32 weights would take more than 80% of the memory available."""
    import export.streamed as streamed
    from export.reference import load_model

    folder = sources("tiny").folder
    need = streamed.fp32_bytes(Checkpoint(folder))
    monkeypatch.setattr(streamed, "available_bytes", lambda: int(need * 1.1))
    assert hasattr(load_model(folder, weights=Checkpoint(folder)), "streamed_modules")
    monkeypatch.setattr(streamed, "available_bytes", lambda: need * 10)
    assert not hasattr(load_model(folder, weights=Checkpoint(folder)), "streamed_modules")
