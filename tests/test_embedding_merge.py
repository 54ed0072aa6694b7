"""The embedding-merge subgraph against the PyTorch code it replaces.

Reference: a tiny ``Qwen3VLModel``'s own embedding, ``get_placeholder_mask``, the two ``masked_scatter`` calls of
its ``forward`` (images, then videos), its joint image/video DeepStack table and
``Qwen3VLTextModel._deepstack_process`` applied to zeros (the dense term the decoder adds).
Same shape for every case: run the reference, run the ONNX subgraph in ONNX Runtime, check structure, compare
bit for bit. Broken twins (image rows swapped, a graph that fills in reverse or one row late, DeepStack levels
swapped, video rows read before image rows) must fail the same comparison.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import transformers

from graphs.embedding_merge import INPUT_NAMES, build_embedding_merge, output_names
from merge.contract.names import OPSET
from merge.presets.shapes import preset_config
from merge.tools.compare import compare
from tests.onnx_session import checked_session

PRESETS = ("tiny", "tiny-merge1")
TEXT_VOCAB = 900  # text ids below the tiny presets' special tokens
PAD_ID = 0  # != image_token_id

# A row is a list of segments: ("text", n), ("image", n) or ("video", n) with n image or video tokens.
Segment = tuple[str, int]


@dataclasses.dataclass
class Reference:
    model: transformers.Qwen3VLModel
    image_token_id: int
    hidden_size: int
    num_levels: int
    embed_tokens: np.ndarray
    session: ort.InferenceSession
    video_token_id: int


@pytest.fixture(scope="module", params=PRESETS)
def ref(request) -> Reference:
    config = transformers.Qwen3VLConfig(**preset_config(request.param))
    torch.manual_seed(0)
    model = transformers.Qwen3VLModel(config).float().eval()  # the presets declare bfloat16
    hidden = config.text_config.hidden_size
    levels = len(config.vision_config.deepstack_visual_indexes)
    embed_tokens = model.get_input_embeddings().weight.detach().numpy().copy()
    session = checked_session(build_embedding_merge(config.image_token_id, hidden, levels,
                                                    video_token_id=config.video_token_id))
    return Reference(model, config.image_token_id, hidden, levels, embed_tokens, session, config.video_token_id)


@dataclasses.dataclass
class Inputs:
    input_ids: np.ndarray  # [batch, sequence]
    image_embeds: np.ndarray  # [image tokens + video tokens, hidden]: the images' rows, then the videos'
    deepstack_embeds: np.ndarray  # [levels, image tokens + video tokens, hidden]
    image_rows: int = -1  # how many rows are the images'; -1: every one

    def __post_init__(self) -> None:
        if self.image_rows < 0:
            self.image_rows = len(self.image_embeds)

    def feeds(self, embed_tokens: np.ndarray) -> dict[str, np.ndarray]:
        values = (self.input_ids, embed_tokens, self.image_embeds, self.deepstack_embeds,
                  np.array([self.image_rows], np.int64))
        return dict(zip(INPUT_NAMES, values, strict=True))


def _make_inputs(ref: Reference, rows: list[list[Segment]], rng: random.Random) -> Inputs:
    """Left-padded batch; one feature row per image token of the whole batch, row-major, then one per video
    token."""
    ids_rows = []
    for segments in rows:
        ids: list[int] = []
        for kind, n in segments:
            if kind == "text":
                ids += [rng.randrange(1, TEXT_VOCAB) for _ in range(n)]
            else:
                ids += [ref.image_token_id if kind == "image" else ref.video_token_id] * n
        ids_rows.append(ids)
    length = max(len(r) for r in ids_rows)
    input_ids = np.full((len(rows), length), PAD_ID, np.int64)
    for b, ids in enumerate(ids_rows):
        input_ids[b, length - len(ids) :] = ids
    images = int((input_ids == ref.image_token_id).sum())
    tokens = images + int((input_ids == ref.video_token_id).sum())
    # Features far from the embedding table's scale (std 0.02) and distinct per row, level and channel.
    np_rng = np.random.default_rng(rng.randrange(2**32))
    image = np_rng.standard_normal((tokens, ref.hidden_size)).astype(np.float32)
    deepstack = np_rng.standard_normal((ref.num_levels, tokens, ref.hidden_size)).astype(np.float32)
    return Inputs(input_ids, image, deepstack, images)


def _hf(ref: Reference, x: Inputs) -> dict[str, np.ndarray]:
    """What ``Qwen3VLModel.forward`` does with the vision outputs (images, then videos), and each level's
    DeepStack addition from its joint image/video table."""
    model = ref.model
    input_ids = torch.from_numpy(x.input_ids)
    rows = x.image_rows
    with torch.no_grad():
        inputs_embeds = model.get_input_embeddings()(input_ids)
        zeros = torch.zeros_like(inputs_embeds)
        image_mask = video_mask = None
        if rows:
            image_embeds = torch.from_numpy(x.image_embeds[:rows])
            image_mask, _ = model.get_placeholder_mask(
                input_ids, inputs_embeds=inputs_embeds, image_features=image_embeds
            )
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_embeds)
            image_mask = image_mask[..., 0]
        if len(x.image_embeds) > rows:
            video_embeds = torch.from_numpy(x.image_embeds[rows:])
            _, video_mask = model.get_placeholder_mask(
                input_ids, inputs_embeds=inputs_embeds, video_features=video_embeds
            )
            inputs_embeds = inputs_embeds.masked_scatter(video_mask, video_embeds)
            video_mask = video_mask[..., 0]
        if image_mask is None and video_mask is None:  # no pixels: HF merges nothing and adds no DeepStack
            visual_mask = (input_ids == ref.image_token_id) | (input_ids == ref.video_token_id)
            deepstack = [zeros] * ref.num_levels
        else:
            masks = [m for m in (image_mask, video_mask) if m is not None]
            visual_mask = masks[0] if len(masks) == 1 else masks[0] | masks[1]
            deepstack = []
            for level in x.deepstack_embeds:
                joint = torch.zeros(int(visual_mask.sum()), ref.hidden_size)
                if image_mask is not None:
                    joint[image_mask[visual_mask]] = torch.from_numpy(level[:rows])
                if video_mask is not None:
                    joint[video_mask[visual_mask]] = torch.from_numpy(level[rows:])
                deepstack.append(model.language_model._deepstack_process(zeros, visual_mask, joint))
    names = output_names(ref.num_levels)
    return dict(zip(names, [t.numpy() for t in (inputs_embeds, visual_mask, *deepstack)], strict=True))


def _onnx(ref: Reference, x: Inputs, session: ort.InferenceSession | None = None) -> dict[str, np.ndarray]:
    feeds = x.feeds(ref.embed_tokens)
    names = output_names(ref.num_levels)
    return dict(zip(names, (session or ref.session).run(list(names), feeds), strict=True))


def _failures(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> list[str]:
    """The comparator's FAILED lines at zero tolerance (exact equality); empty when all outputs agree."""
    results = [compare(name, actual[name], want, scale=0.0) for name, want in expected.items()]
    return [r.line() for r in results if not r.passed]


def _assert_bit_equal(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> None:
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
        line = compare(name, got, want, scale=0.0).line()
        np.testing.assert_array_equal(got, want, err_msg=line, strict=True)
        if want.dtype == np.float32:  # also the sign of zeros and NaN payloads
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=line, strict=True)


def _check(ref: Reference, x: Inputs) -> None:
    expected = _hf(ref, x)
    actual = _onnx(ref, x)
    _assert_bit_equal(expected, actual)
    assert _failures(expected, actual) == []


CASES: dict[str, list[list[Segment]]] = {
    "one_row_one_image": [[("text", 3), ("image", 6), ("text", 2)]],
    "one_row_three_images": [[("text", 2), ("image", 4), ("text", 1), ("image", 2), ("text", 3), ("image", 8)]],
    "batch_padded_different_image_counts": [
        [("text", 2), ("image", 4), ("text", 1), ("image", 3), ("text", 2)],
        [("text", 1), ("image", 2)],
    ],
    "image_at_first_position": [[("image", 5), ("text", 3)]],
    "batch_image_first_in_every_row": [[("image", 2), ("text", 4)], [("image", 4), ("text", 2)]],
    "image_rows_meet_across_batch_rows": [[("text", 2), ("image", 3)], [("image", 2), ("text", 3)]],
    "image_only": [[("image", 7)]],
    "single_image_token": [[("text", 1), ("image", 1), ("text", 1)]],
    "batch_with_a_text_only_row": [[("text", 5)], [("text", 1), ("image", 3), ("text", 1)], [("text", 2)]],
    "one_video": [[("text", 3), ("video", 4), ("text", 2), ("video", 4), ("text", 1)]],
    "video_between_images": [[("text", 1), ("image", 3), ("text", 2), ("video", 5), ("text", 1), ("image", 2)]],
    "video_before_image": [[("video", 6), ("text", 2), ("image", 3)]],
    "batch_video_in_one_row_only": [[("text", 2), ("image", 4), ("text", 1)], [("text", 1), ("video", 6)],
                                    [("text", 3)]],
}


def _random_rows(rng: random.Random) -> list[list[Segment]]:
    rows = []
    for _ in range(rng.randint(1, 4)):
        segments: list[Segment] = []
        for _ in range(rng.randint(0, 3)):
            if rng.random() < 0.6:
                segments.append(("text", rng.randint(1, 4)))
            segments.append(("video" if rng.random() < 0.35 else "image", rng.randint(1, 12)))
        if not segments or rng.random() < 0.5:
            segments.append(("text", rng.randint(1, 5)))
        rows.append(segments)
    return rows


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_hf(ref: Reference, case: str):
    x = _make_inputs(ref, CASES[case], random.Random(case))
    assert len(x.image_embeds) > 0
    if "padded" in case:
        assert (x.input_ids[:, 0] == PAD_ID).any(), "the case must be left-padded"
    _check(ref, x)


@pytest.mark.parametrize("seed", range(25))
def test_merge_random_matches_hf(ref: Reference, seed: int):
    rng = random.Random(seed)
    _check(ref, _make_inputs(ref, _random_rows(rng), rng))


@pytest.mark.parametrize("rows", [[[("text", 6)]], [[("text", 4)], [("text", 2)]]], ids=["one_row", "padded_batch"])
def test_zero_images_give_plain_embeddings(ref: Reference, rows):
    x = _make_inputs(ref, rows, random.Random(5))
    assert x.image_embeds.shape == (0, ref.hidden_size)
    assert x.deepstack_embeds.shape == (ref.num_levels, 0, ref.hidden_size)
    _check(ref, x)
    actual = _onnx(ref, x)
    np.testing.assert_array_equal(actual["inputs_embeds"], ref.embed_tokens[x.input_ids])
    for k in range(ref.num_levels):
        assert not actual[f"deepstack_{k}"].any()


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step(ref: Reference, batch: int):
    x = _make_inputs(ref, [[("text", 1)]] * batch, random.Random(batch))
    assert x.input_ids.shape == (batch, 1)
    _check(ref, x)


@pytest.mark.parametrize(("image_tokens", "video_tokens", "image_rows", "rows"),
                         [(3, 2, 3, 6), (2, 3, 3, 6), (0, 4, 0, 3)])
def test_video_tokens_must_match_video_rows(ref: Reference, image_tokens, video_tokens, image_rows, rows):
    """Video tokens against the video rows (all rows past the images'), image tokens against the image rows: a
    miscount of either fails with its check's name and both numbers."""
    segments = [("text", 1), ("video", video_tokens)] + ([("text", 1), ("image", image_tokens)] if image_tokens else [])
    x = _make_inputs(ref, [segments], random.Random(9))
    features = np.resize(x.image_embeds, (rows, ref.hidden_size))
    bad = Inputs(x.input_ids, features, np.resize(x.deepstack_embeds, (ref.num_levels, rows, ref.hidden_size)),
                 image_rows)
    check = "image_tokens_vs_image_features" if image_tokens != image_rows else "video_tokens_vs_video_features"
    want = (image_tokens, image_rows) if image_tokens != image_rows else (video_tokens, rows - image_rows)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.Fail,
                       match=rf"{check}.*\{{{want[0]}\}}.*\{{{want[1]}\}}"):
        _onnx(ref, bad)


@pytest.mark.parametrize(("tokens", "rows"), [(4, 3), (3, 4), (0, 2)])
def test_image_tokens_must_match_feature_rows(ref: Reference, tokens: int, rows: int):
    """The graph checks its own contract: any other count of image tokens than of feature rows (more, fewer, or
    pixels with no image tokens) fails with the check's name and both numbers, never a silent answer."""
    x = _make_inputs(ref, [[("text", 2), ("image", max(tokens, rows))]], random.Random(6))
    ids = x.input_ids.copy()
    if tokens < max(tokens, rows):
        ids[ids == ref.image_token_id] = PAD_ID  # no image token at all
        ids[0, 2:2 + tokens] = ref.image_token_id
    bad = Inputs(ids, x.image_embeds[:rows], x.deepstack_embeds[:, :rows])  # every row an image's
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.Fail,
                       match=rf"image_tokens_vs_image_features.*\{{{tokens}\}}.*\{{{rows}\}}"):
        _onnx(ref, bad)


# -- broken twins: the same comparison must catch each mistake ------------------------------------------------


def _twin_inputs(ref: Reference) -> Inputs:
    return _make_inputs(ref, CASES["batch_padded_different_image_counts"], random.Random(11))


def _failed_outputs(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> set[str]:
    return {line.split()[1] for line in _failures(expected, actual)}


def test_twin_swapped_image_rows_fail(ref: Reference):
    x = _twin_inputs(ref)
    expected = _hf(ref, x)
    _assert_bit_equal(expected, _onnx(ref, x))
    order = np.arange(len(x.image_embeds))
    order[[0, -1]] = order[[-1, 0]]
    swapped = Inputs(x.input_ids, x.image_embeds[order], x.deepstack_embeds[:, order], x.image_rows)
    failed = _failed_outputs(expected, _onnx(ref, swapped))
    assert failed == {"inputs_embeds", *(f"deepstack_{k}" for k in range(ref.num_levels))}, failed


def test_twin_videos_read_first_fail(ref: Reference):
    # the tower's rows are the images' then the videos': a merge that gives the video tokens the first rows fails
    x = _make_inputs(ref, CASES["video_between_images"], random.Random(12))
    expected = _hf(ref, x)
    _assert_bit_equal(expected, _onnx(ref, x))
    rows, total = x.image_rows, len(x.image_embeds)
    assert rows == total - rows  # as many image as video tokens: no count check can catch the mistake
    order = np.r_[np.arange(rows, total), np.arange(rows)]  # videos' rows first
    same_count = Inputs(x.input_ids, x.image_embeds[order], x.deepstack_embeds[:, order], rows)
    failed = _failed_outputs(expected, _onnx(ref, same_count))
    assert failed == {"inputs_embeds", *(f"deepstack_{k}" for k in range(ref.num_levels))}, failed


def test_twin_swapped_deepstack_levels_fail(ref: Reference):
    x = _twin_inputs(ref)
    expected = _hf(ref, x)
    swapped = Inputs(x.input_ids, x.image_embeds, x.deepstack_embeds[::-1], x.image_rows)
    failed = _failed_outputs(expected, _onnx(ref, swapped))
    assert {"deepstack_0", f"deepstack_{ref.num_levels - 1}"} <= failed, failed
    assert "inputs_embeds" not in failed


def _twin_graph(ref: Reference, **cumsum_attributes: int) -> ort.InferenceSession:
    """The same graph with the rank CumSum changed: ``reverse=1`` fills in reverse, ``exclusive=1`` a row late."""
    model = build_embedding_merge(ref.image_token_id, ref.hidden_size, ref.num_levels,
                                  video_token_id=ref.video_token_id)
    (cumsum,) = [n for n in model.graph if n.op_type == "CumSum" and "image" in n.name]
    for key, value in cumsum_attributes.items():
        cumsum.attributes[key] = ir.AttrInt64(key, value)
    return checked_session(model)


@pytest.mark.parametrize("attribute", ["reverse", "exclusive"])
def test_twin_graph_with_wrong_order_fails(ref: Reference, attribute: str):
    x = _twin_inputs(ref)
    expected = _hf(ref, x)
    failed = _failed_outputs(expected, _onnx(ref, x, session=_twin_graph(ref, **{attribute: 1})))
    assert failed == {"inputs_embeds", *(f"deepstack_{k}" for k in range(ref.num_levels))}, failed


# -- structure -------------------------------------------------------------------------------------------------

EXPECTED_OPS = {"Equal", "Or", "Cast", "Reshape", "CumSum", "Mul", "Shape", "Gather", "Pad", "Unsqueeze", "Where",
                "ReduceSum", "ConstantOfShape", "Add", "Sub"}  # the tokens vs features checks use the last four


@pytest.mark.parametrize("num_levels", [1, 3])
def test_structure(num_levels: int):
    hidden = 32
    model = build_embedding_merge(1004, hidden, num_levels, prefix="emb/", video_token_id=1005)
    graph = model.graph
    assert model.opset_imports == {"": OPSET}
    assert [v.name for v in graph.inputs] == list(INPUT_NAMES)
    assert [v.name for v in graph.outputs] == list(output_names(num_levels))
    assert [v.dtype for v in graph.inputs] == [ir.DataType.INT64] + [ir.DataType.FLOAT] * 3 + [ir.DataType.INT64]
    assert [v.dtype for v in graph.outputs] == [ir.DataType.FLOAT, ir.DataType.BOOL] + [ir.DataType.FLOAT] * num_levels
    assert graph.outputs[0].shape == ir.Shape(["batch", "sequence", hidden])
    assert graph.outputs[1].shape == ir.Shape(["batch", "sequence"])

    nodes = list(graph)
    ops = [n.op_type for n in nodes]
    assert set(ops) == EXPECTED_OPS, set(ops)
    assert ops.count("Where") == 1  # the only select: DeepStack terms gather zeros outside images
    assert ops.count("Gather") == 2 + 2 * num_levels
    for what in ("image_tokens_vs_image_features", "video_tokens_vs_video_features"):
        (check,) = [n for n in nodes if n.name.endswith(f"checks/{what}")]
        assert check.op_type == "Reshape"
    assert len({n.name for n in nodes}) == len(nodes), "node names must be unique"
    io_names = {v.name for v in [*graph.inputs, *graph.outputs]}
    for node in nodes:
        assert node.domain == "", node
        assert node.name.startswith("emb/"), node.name
        for out in node.outputs:
            assert out.name in io_names or out.name.startswith("emb/"), out.name

    for name, value in graph.initializers.items():
        assert name.startswith("emb/"), name
        assert value.const_value is not None and value.const_value.size <= 6, (name, value.shape)

    # The vocabulary table is only ever read by one Gather (never copied or concatenated per call).
    embed_tokens = graph.inputs[1]
    assert [(use.node.op_type, use.idx) for use in embed_tokens.uses()] == [("Gather", 0)]


def test_default_prefix():
    model = build_embedding_merge(7, 8, 2, video_token_id=8)
    assert all(n.name.startswith("merge/") for n in model.graph)


@pytest.mark.parametrize(("hidden", "levels"), [(0, 3), (8, -1)])  # 0 levels: a config without DeepStack
def test_bad_arguments_are_refused(hidden: int, levels: int):
    with pytest.raises(ValueError):
        build_embedding_merge(7, hidden, levels, video_token_id=8)


@pytest.mark.parametrize("case", ["one_row_three_images", "batch_padded_different_image_counts"])
def test_hidden_major_table_is_bit_equal(ref: Reference, case: str):
    """A tied model's head weight [hidden, vocab] serves as the table: same outputs, bit for bit."""
    session = checked_session(build_embedding_merge(ref.image_token_id, ref.hidden_size, ref.num_levels,
                                                    table_layout="hidden_major", video_token_id=ref.video_token_id))
    x = _make_inputs(ref, CASES[case], random.Random(3))
    feeds = x.feeds(np.ascontiguousarray(ref.embed_tokens.T))
    names = output_names(ref.num_levels)
    actual = dict(zip(names, session.run(list(names), feeds), strict=True))
    _assert_bit_equal(_hf(ref, x), actual)


def test_int4_blocks_table_matches_dequantized_rows(ref: Reference):
    """A tied int4 head's 4-bit blocks serve as the table (GatherBlockQuantized): rows equal the dequantized head."""
    from merge.contract.quant import dequantize_int4
    from merge.quantize import quantize_weight_int4

    block = 16 if ref.hidden_size % 32 else 32
    packed, scales, _ = quantize_weight_int4(np.ascontiguousarray(ref.embed_tokens.T), block, symmetric=True)
    vocab = ref.embed_tokens.shape[0]
    table = dequantize_int4(packed, scales, None, ref.hidden_size).T.astype(np.float32)
    session = checked_session(build_embedding_merge(ref.image_token_id, ref.hidden_size, ref.num_levels,
                                                    table_layout="int4_blocks", block_size=block,
                                                    video_token_id=ref.video_token_id))
    x = _make_inputs(ref, CASES["one_row_three_images"], random.Random(4))
    assert packed.shape[0] == vocab  # MatMulNBits' own [vocab, blocks, block / 2] bytes, as the head stores them
    feeds = {**x.feeds(packed), "embed_scales": scales}
    out = session.run(["inputs_embeds"], feeds)[0]
    mask = (x.input_ids != ref.image_token_id) & (x.input_ids != ref.video_token_id)
    np.testing.assert_allclose(out[mask], table[x.input_ids[mask]], rtol=0, atol=1e-6)
