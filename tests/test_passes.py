"""Each stitch pass on its own: what it builds, the contract it states (a sentence when it does not hold), and a
broken twin that must fail.

The passes run on the tiny preset's decoder as the build writes it (once per session) with freshly built parts;
what the decoder graph builds for the stitch (names under ``decoder/``, the key padding mask, ``logits_to_keep``,
the named DeepStack anchors) is checked here too, each with a twin built without it.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graphs.decoder import COMBINED, DecoderOptions
from merge.contract.config import ModelConfig
from merge.contract.names import (
    COMBINED_INPUTS,
    ROPE_DELTAS_OUT,
    VISION_IF,
    deepstack_add,
    deepstack_term,
    mlp_output,
)
from merge.contract.quant import QuantSpec
from merge.errors import MergeError
from merge.presets.shapes import preset_config
from merge.stitch.parts import make_parts
from merge.stitch.passes import StitchError, run_passes, stitch, stitch_passes
from merge.stitch.passes.check_contract import CheckContract
from merge.stitch.passes.guard_vision import GuardVision
from merge.stitch.passes.inject_deepstack import InjectDeepStack
from merge.stitch.passes.merge_embeddings import MergeEmbeddings
from merge.stitch.passes.quantize_int4 import QuantizeInt4
from merge.stitch.passes.set_interface import SetInterface
from merge.stitch.passes.share_tied_table import ShareTiedTable
from merge.stitch.passes.wire_positions import WirePositions
from merge.tools.compare import compare


@pytest.fixture(scope="session")
def decoder_paths(sources, tmp_path_factory):
    """``decoder_paths(preset, options)`` -> that preset's fp32 decoder.onnx as the build writes it with ``options``
    (default: the stitch's, :data:`graphs.decoder.COMBINED`), written once."""
    from merge.sources.checkpoint import Checkpoint
    from merge.stitch.decoder import write_decoder

    @functools.cache
    def get(name: str, options: DecoderOptions = COMBINED):
        path = tmp_path_factory.mktemp(f"decoder-{name}") / "decoder.onnx"
        ir.save(write_decoder(Checkpoint(sources(name).folder), sources(name).config, options), path,
                external_data="decoder.onnx.data")
        return path

    return get


@pytest.fixture()
def fresh(decoder_paths, sources):
    """``fresh(preset)`` -> (a freshly loaded decoder, new parts, config): passes change both in place."""

    def get(name: str = "tiny", options: DecoderOptions = COMBINED):
        source = sources(name)
        return ir.load(decoder_paths(name, options)), make_parts(source), source.config

    return get


def _run_until(model, config, parts, last: type, quant=None):
    passes = []
    for pass_ in stitch_passes(config, parts, quant):
        passes.append(pass_)
        if isinstance(pass_, last):
            break
    return run_passes(model, passes)


def _session(model: ir.Model, folder) -> ort.InferenceSession:
    path = folder / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# -- what the decoder builds for the stitch --------------------------------------------------------------------------

def test_decoder_for_the_stitch_names_everything_under_decoder(fresh):
    model, _, _ = fresh()
    assert all(n.name.startswith("decoder/") for n in model.graph)
    assert all(name.startswith("decoder/") for name in model.graph.initializers if name != "logits_to_keep")
    inputs = [v.name for v in model.graph.inputs]
    assert inputs[:3] == ["attention_mask", "position_ids", "inputs_embeds"] and inputs[-1] == "logits_to_keep"


def test_twin_the_stitch_refuses_a_bare_decoder(fresh):
    model, parts, config = fresh(options=DecoderOptions())
    with pytest.raises(StitchError, match=r"not built for the stitch .*'attention_mask/total' is outside decoder/"):
        stitch(model, config, parts, None)


def test_passes_report_modified_honestly(fresh):
    model, parts, config = fresh()
    assert not ShareTiedTable(tied=False, hidden_size=config.text.hidden_size)(model).modified  # nothing to share
    assert InjectDeepStack(config.text.num_layers, 0)(model).modified is False  # no level to add
    model = _run_until(model, config, parts, SetInterface)
    assert not SetInterface()(model).modified  # the interface is in order already


# -- GuardVision ----------------------------------------------------------------------------------------------------

def test_guard_vision_puts_the_tower_behind_an_if(fresh):
    model, parts, config = fresh()
    model = _run_until(model, config, parts, GuardVision)
    (guard,) = [n for n in model.graph if n.name == VISION_IF]
    then_ops = {n.op_type for n in ir.traversal.RecursiveGraphIterator(guard.attributes["then_branch"].value)}
    else_ops = {n.op_type for n in guard.attributes["else_branch"].value}
    assert "MultiHeadAttention" in then_ops and else_ops == {"Constant"}
    assert [v.name for v in guard.outputs] == ["vision/image_embeds", "vision/deepstack_embeds"]
    assert {"pixel_values", "image_grid_thw"} <= {v.name for v in model.graph.inputs}
    # the tower's weights live in the main graph; the branch reads them by name
    assert any(name.startswith("vision/blocks.0/") for name in model.graph.initializers)


def test_guard_vision_refuses_a_part_with_other_outputs(fresh):
    model, parts, config = fresh()
    parts.vision.graph.outputs[0].name = "features"
    with pytest.raises(StitchError, match=r"GuardVision: the vision part's outputs are \['features'"):
        _run_until(model, config, parts, GuardVision)


# -- MergeEmbeddings ------------------------------------------------------------------------------------------------

def test_merge_embeddings_replaces_the_decoder_input(fresh):
    model, parts, config = fresh()
    model = _run_until(model, config, parts, MergeEmbeddings)
    names = [v.name for v in model.graph.inputs]
    assert "inputs_embeds" not in names and "input_ids" in names
    levels = len(config.vision.deepstack_visual_indexes)
    produced = {v.name for n in model.graph for v in n.outputs}
    assert {deepstack_term(k) for k in range(levels)} <= produced and "inputs_embeds" in produced


def test_merge_embeddings_refuses_a_part_without_a_level(fresh):
    model, parts, config = fresh()
    parts.embedding_merge.graph.outputs.pop()  # the last DeepStack term
    with pytest.raises(StitchError, match=r"MergeEmbeddings: the embedding merge's outputs are"):
        _run_until(model, config, parts, MergeEmbeddings)


# -- InjectDeepStack ------------------------------------------------------------------------------------------------

def test_deepstack_anchors_are_named(fresh):
    model, _, config = fresh()
    values = ir.convenience.create_value_mapping(model.graph)
    for k in range(config.text.num_layers):
        anchor = values[mlp_output(k)]
        assert anchor.producer().name == f"decoder/layers.{k}/mlp/down_proj/MatMul"
        users = [(use.node.op_type, use.idx) for use in anchor.uses()]
        assert users == [("SkipSimplifiedLayerNormalization", 1)]  # the residual sum's skip: the layer's end


def test_inject_deepstack_adds_one_term_per_level_after_its_layer(fresh):
    model, parts, config = fresh()
    model = _run_until(model, config, parts, InjectDeepStack)
    values = ir.convenience.create_value_mapping(model.graph)
    levels = len(config.vision.deepstack_visual_indexes)
    for k in range(config.text.num_layers):
        users = [use.node for use in values[mlp_output(k)].uses()]
        if k < levels:
            (add,) = users
            assert add.name == deepstack_add(k) and add.inputs[1].name == deepstack_term(k)
            assert [(u.node.op_type, u.idx) for u in add.outputs[0].uses()] == [("SkipSimplifiedLayerNormalization", 1)]
        else:
            assert [u.op_type for u in users] == ["SkipSimplifiedLayerNormalization"]  # no level for this layer


def test_deepstack_anchor_absent_is_a_sentence(fresh):
    model, parts, config = fresh()
    values = ir.convenience.create_value_mapping(model.graph)
    values[mlp_output(2)].name = "decoder/layers.2/mlp/renamed"  # a decoder that does not name its anchors
    with pytest.raises(StitchError, match=r"InjectDeepStack: the model has no value 'decoder/layers.2/mlp/output'"):
        _run_until(model, config, parts, InjectDeepStack)


# -- WirePositions --------------------------------------------------------------------------------------------------

def test_wire_positions_computes_positions_in_the_graph(fresh):
    model, parts, config = fresh()
    model = _run_until(model, config, parts, WirePositions)
    names = [v.name for v in model.graph.inputs]
    assert "position_ids" not in names and "rope_deltas" in names
    assert model.graph.outputs[-1].name == ROPE_DELTAS_OUT
    rotary = [n for n in model.graph if n.op_type == "MRotaryEmbedding"]
    assert rotary and all(n.inputs[1].name == "position_ids" for n in rotary)
    assert rotary[0].inputs[1].producer().name == "merge/position/if_first_call"


def test_wire_positions_refuses_a_part_with_other_outputs(fresh):
    model, parts, config = fresh()
    parts.rope_index.graph.outputs[1].name = "deltas"
    with pytest.raises(StitchError, match=r"WirePositions: the rope index part's outputs"):
        _run_until(model, config, parts, WirePositions)


# -- the decoder's key padding mask: numbers, and the twin without it ------------------------------------------------

def _padded_row_error(model: ir.Model, config: ModelConfig, folder) -> tuple[float, float]:
    """Row 1 of a batch is left-padded by 3; its logits against the same tokens run alone. Returns (max error on
    the padded row's real tokens, the fp32 bound)."""
    session = _session(model, folder)
    kv = config.text
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 900, (2, 9))

    def run(input_ids, mask):
        feeds = {"input_ids": input_ids, "attention_mask": mask,
                 "pixel_values": np.zeros((0, config.vision.patch_dim), np.float32),
                 "image_grid_thw": np.zeros((0, 3), np.int64), "rope_deltas": np.zeros((len(input_ids), 1), np.int64),
                 "pixel_values_videos": np.zeros((0, config.vision.patch_dim), np.float32),
                 "video_grid_thw": np.zeros((0, 3), np.int64)}
        empty = np.zeros((len(input_ids), kv.num_kv_heads, 0, kv.head_dim), np.float32)
        feeds.update({v.name: empty for v in model.graph.inputs if v.name.startswith("past_key_values.")})
        return session.run(["logits"], feeds)[0]

    mask = np.ones((2, 9), np.int64)
    mask[1, :3] = 0
    batch = run(ids, mask)
    alone = run(ids[1:, 3:], np.ones((1, 6), np.int64))
    result = compare("padded row", batch[1, 3:], alone[0])
    return result.max_abs, result.bound


def test_key_padding_makes_left_padded_rows_exact(fresh, tmp_path):
    model, parts, config = fresh()
    model = _run_until(model, config, parts, SetInterface)
    error, bound = _padded_row_error(model, config, tmp_path)
    assert error <= bound, (error, bound)


def test_twin_decoder_without_key_padding_is_wrong_on_padded_rows(fresh, tmp_path):
    model, parts, config = fresh(options=DecoderOptions(scope="decoder", logits_to_keep=True))
    assert not [n for n in model.graph if n.name.endswith("attention_mask/attention_bias")]
    model = _run_until(model, config, parts, SetInterface)
    error, bound = _padded_row_error(model, config, tmp_path)
    assert error > 100 * bound, (error, bound)


# -- QuantizeInt4 ---------------------------------------------------------------------------------------------------

def test_quantize_int4_touches_the_decoder_only(fresh):
    model, parts, config = fresh()
    model = _run_until(model, config, parts, QuantizeInt4, quant=QuantSpec())
    main_ops = [(n.name, n.op_type) for n in model.graph]
    assert not [name for name, op in main_ops if op == "MatMul" and name.startswith("decoder/")]
    assert sum(op == "MatMulNBits" for _, op in main_ops) == 7 * config.text.num_layers + 1
    guard = next(n for n in model.graph if n.name == VISION_IF)
    vision_ops = {n.op_type for n in ir.traversal.RecursiveGraphIterator(guard.attributes["then_branch"].value)}
    assert "Gemm" in vision_ops and "MatMulNBits" not in vision_ops


def test_quantize_int4_refuses_another_scope(fresh):
    model, parts, config = fresh()
    with pytest.raises(StitchError, match=r"QuantizeInt4: quantization scope 'vision' is not supported"):
        _run_until(model, config, parts, QuantizeInt4, quant=QuantSpec(scope="vision"))


# -- ShareTiedTable -------------------------------------------------------------------------------------------------

def _token_lookup(model: ir.Model) -> ir.Node:
    """The lookup of the token embeddings: it reads input_ids once checked against the vocabulary."""
    return next(n for n in model.graph if n.name.startswith("merge/embedding/embeds/")
                and n.op_type in ("Gather", "GatherBlockQuantized") and n.inputs[1].producer() is not None
                and n.inputs[1].producer().name == "merge/checks/input_ids")


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_share_tied_table_reads_the_head(fresh, precision):
    model, parts, config = fresh("tiny")
    assert config.tie_word_embeddings
    model, layout = stitch(model, config, parts, QuantSpec() if precision == "int4" else None)
    head = next(v for v in model.graph.outputs if v.name == "logits").producer()
    lookup = _token_lookup(model)
    assert lookup.inputs[0] is head.inputs[1]  # the head's own weight (fp32) or 4-bit bytes: stored once
    assert layout == ("int4_blocks" if precision == "int4" else "hidden_major")
    assert "merge/embedding/embed_tokens" not in model.graph.initializers  # the checkpoint's table is gone


def test_untied_model_keeps_its_table(fresh):
    model, parts, config = fresh("tiny-merge1")
    assert not config.tie_word_embeddings
    model, layout = stitch(model, config, parts, None)
    assert layout == "vocab_major"
    assert _token_lookup(model).inputs[0].name == "merge/embedding/embed_tokens"


@pytest.mark.parametrize(("quant", "layout"), [
    (QuantSpec(symmetric=False), "int4_blocks"),
    (QuantSpec(symmetric=False, method="search", eight_bit=("head",)), "int8_blocks"),
    (QuantSpec(eight_bit=("head", "v_proj")), "int8_blocks"),
])
def test_share_tied_table_reads_quantized_heads(fresh, quant, layout):
    """A head with zero points or in 8 bits is read from its own blocks too: its bytes and scales, and its zero
    points through the unpacking ops (the lookup's numbers: test_embedding_merge and test_int4's verify)."""
    model, parts, config = fresh("tiny")
    model, got = stitch(model, config, parts, quant)
    head = next(v for v in model.graph.outputs if v.name == "logits").producer()
    lookup = _token_lookup(model)
    assert got == layout and lookup.inputs[0] is head.inputs[1]
    assert lookup.inputs[2].producer().inputs[0] is head.inputs[2]  # the head's scales, unsqueezed
    if quant.symmetric:
        assert len(lookup.inputs) == 3 and len(head.inputs) == 3
    else:  # the head's zero points, unpacked (4 bits) and unsqueezed: no second copy stored
        zero_points = lookup.inputs[3]
        reads = set()
        stack = [zero_points.producer()]
        while stack:
            node = stack.pop()
            reads.update(v.name for v in node.inputs if v is not None and v.is_initializer())
            stack.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
        assert head.inputs[3].name in reads
    assert "merge/embedding/embed_tokens" not in model.graph.initializers


def test_twin_head_with_a_bias_is_not_shared(fresh, caplog):
    """A head that is not a plain block table (here: a bias) is not a layout the lookup reads: the table stays."""
    model, parts, config = fresh("tiny")
    model = _run_until(model, config, parts, QuantizeInt4, quant=QuantSpec(symmetric=False))
    head = next(v for v in model.graph.outputs if v.name == "logits").producer()
    bias = ir.Value(name="head_bias", shape=ir.Shape([config.text.vocab_size]),
                    type=ir.TensorType(ir.DataType.FLOAT))
    bias.const_value = ir.tensor(np.zeros(config.text.vocab_size, np.float32), name="head_bias")
    model.graph.register_initializer(bias)
    head.resize_inputs(6)
    head.replace_input_with(5, bias)
    share = ShareTiedTable(True, config.text.hidden_size)
    run_passes(model, [share])
    assert share.layout == "vocab_major" and "stored twice" in caplog.text
    assert _token_lookup(model).inputs[0].name == "merge/embedding/embed_tokens"


# -- logits_to_keep ----------------------------------------------------------------------------------------------------

def test_keep_logits_runs_the_head_on_the_last_positions(fresh, tmp_path):
    model, parts, config = fresh()
    model = _run_until(model, config, parts, SetInterface)
    session = _session(model, tmp_path)
    ids = np.random.default_rng(1).integers(0, 900, (2, 7))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "pixel_values": np.zeros((0, config.vision.patch_dim), np.float32),
             "image_grid_thw": np.zeros((0, 3), np.int64), "rope_deltas": np.zeros((2, 1), np.int64),
             "pixel_values_videos": np.zeros((0, config.vision.patch_dim), np.float32),
             "video_grid_thw": np.zeros((0, 3), np.int64)}
    empty = np.zeros((2, config.text.num_kv_heads, 0, config.text.head_dim), np.float32)
    feeds.update({v.name: empty for v in model.graph.inputs if v.name.startswith("past_key_values.")})
    everything = session.run(["logits"], feeds)[0]  # not fed: the default keeps every position
    assert everything.shape[1] == 7
    for keep in (1, 3):
        kept = session.run(["logits"], {**feeds, "logits_to_keep": np.array(keep, np.int64)})[0]
        assert kept.shape[1] == keep
        np.testing.assert_array_equal(kept, everything[:, -keep:])
        assert not np.array_equal(kept[:, 0], everything[:, 0])  # twin: the first positions are not the kept ones


# -- SetInterface ---------------------------------------------------------------------------------------------------

def test_set_interface_orders_the_contract(fresh):
    model, parts, config = fresh()
    model = _run_until(model, config, parts, SetInterface)
    names = [v.name for v in model.graph.inputs]
    assert names[:len(COMBINED_INPUTS)] == list(COMBINED_INPUTS)
    past = names[len(COMBINED_INPUTS):-1]
    assert past and all(n.startswith("past_key_values.") for n in past) and names[-1] == "logits_to_keep"
    outputs = [v.name for v in model.graph.outputs]
    assert outputs[0] == "logits" and outputs[-1] == ROPE_DELTAS_OUT


def test_set_interface_refuses_unwired_inputs(fresh):
    model, parts, config = fresh()
    model = _run_until(model, config, parts, CheckContract)
    extra = ir.Value(name="token_type_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["b", "s"]))
    model.graph.inputs.append(extra)
    with pytest.raises(StitchError, match=r"SetInterface: decoder inputs left unwired: \['token_type_ids'\]"):
        run_passes(model, [SetInterface()])


# -- the config contracts the passes rely on ----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["vision_config"].update(out_hidden_size=32), "out_hidden_size 32 != text_config.hidden_size 64"),
        (lambda c: c["vision_config"].update(depth=5, deepstack_visual_indexes=[0, 1, 2, 3, 4]), "5 DeepStack levels"),
        (lambda c: c.pop("image_token_id"), "no 'image_token_id'"),
        (lambda c: c.update(image_token_id=5000), "image_token_id = 5000 must be between 0 and 1023"),
        (lambda c: c["text_config"].update(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
        (lambda c: c["vision_config"].update(patch_size=100000), "patch_size = 100000 must be between 1 and 256"),
    ],
)
def test_config_contracts(change, message):
    config = preset_config("tiny")
    change(config)
    with pytest.raises(MergeError, match=message):
        ModelConfig.from_dict(config)
