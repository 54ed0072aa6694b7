"""The stitch's contracts: each pass states what it needs and fails with a sentence when it is absent."""

from __future__ import annotations

import pytest

from merge.presets import preset_config
from merge.stitch import InjectDeepStack, StitchError, StitchSpec


@pytest.fixture(scope="module")
def decoder(sources, tmp_path_factory):
    import onnx_ir as ir

    from export.text import export_decoder

    path = export_decoder(sources("tiny").folder, tmp_path_factory.mktemp("decoder"), isolated=True)
    return lambda: ir.load(path)


def test_deepstack_anchors_found_by_pattern(decoder):
    graph = decoder().graph
    anchors = InjectDeepStack().mlp_outputs(graph)
    layers = preset_config("tiny")["text_config"]["num_hidden_layers"]
    assert len(anchors) == layers
    # found by structure, and they are indeed the down projections (the names only confirm it)
    assert all("down_proj" in skip.name for _, skip in anchors)


def test_deepstack_pattern_absent_is_a_sentence(decoder):
    model = decoder()
    graph = model.graph
    _, skip = InjectDeepStack().mlp_outputs(graph)[2]
    skip.producer().op_type = "Gemm"  # a layout the injection does not know
    spec = StitchSpec.from_config(preset_config("tiny"))
    with pytest.raises(StitchError, match=r"found 3 decoder MLP outputs .* expected 4"):
        InjectDeepStack()(graph, spec, [])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["vision_config"].update(out_hidden_size=32), "out_hidden_size 32 != text_config.hidden_size 64"),
        (lambda c: c["vision_config"].update(deepstack_visual_indexes=[0, 1, 2, 3, 3]), "5 DeepStack levels"),
        (lambda c: c.pop("image_token_id"), "no 'image_token_id'"),
    ],
)
def test_spec_contracts(change, message):
    config = preset_config("tiny")
    change(config)
    with pytest.raises(StitchError, match=message):
        StitchSpec.from_config(config)
