"""The rope-index subgraph against transformers' ``Qwen3VLModel.get_rope_index`` and its decode formula, with
images, videos (each frame group behind its own text timestamp, as Qwen3-VL's processor writes it) or both.

Same shape for every case: run the reference, run the ONNX subgraph in ONNX Runtime, check structure,
compare with exact integer equality. Broken twins (h and w swapped, a wrong merge size, 1-D positions, a video's
frames positioned as one block, videos read as images) must fail the same comparison.
"""

from __future__ import annotations

import dataclasses
import random
import types

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import transformers

from graphs import rope_index
from graphs.rope_index import INPUT_NAMES, OUTPUT_NAMES, build_rope_index
from merge.contract.names import OPSET
from merge.presets.shapes import preset_config
from tests.onnx_session import checked_session

PRESETS = ("tiny", "tiny-merge1")
TEXT_VOCAB = 900  # text ids below the tiny presets' special tokens
PAD_ID = 0

# A row is a list of segments: ("text", n), ("image", (t, llm_h, llm_w)) or ("video", (t, llm_h, llm_w)) in merged
# (LLM) units; a video is written as the processor writes it: per frame group a timestamp (a few text tokens),
# <|vision_start|>, h * w video tokens, <|vision_end|>.
Segment = tuple[str, "int | tuple[int, int, int]"]


@dataclasses.dataclass
class Prompt:
    input_ids: np.ndarray  # [batch, sequence]
    attention_mask: np.ndarray  # [batch, sequence]
    image_grid_thw: np.ndarray  # [num_images, 3], in patches
    video_grid_thw: np.ndarray  # [num_videos, 3], in patches


@dataclasses.dataclass
class Reference:
    model: transformers.Qwen3VLModel
    image_token_id: int
    merge: int
    session: ort.InferenceSession
    video_token_id: int
    vision_start_id: int
    vision_end_id: int


@pytest.fixture(scope="module", params=PRESETS)
def ref(request) -> Reference:
    config = transformers.Qwen3VLConfig(**preset_config(request.param))
    torch.manual_seed(0)
    model = transformers.Qwen3VLModel(config).eval()
    merge = config.vision_config.spatial_merge_size
    session = checked_session(build_rope_index(config.image_token_id, merge, video_token_id=config.video_token_id))
    return Reference(model, config.image_token_id, merge, session, config.video_token_id,
                     config.vision_start_token_id, config.vision_end_token_id)


def _make_prompt(rows: list[list[Segment]], ref: Reference, rng: random.Random, pad_id=PAD_ID):
    """Left-padded batch of rows; images and videos numbered in order of appearance, row-major."""
    ids_rows, grids, video_grids = [], [], []
    merge = ref.merge
    for segments in rows:
        ids: list[int] = []
        for kind, value in segments:
            if kind == "text":
                ids += [rng.randrange(1, TEXT_VOCAB) for _ in range(value)]
            elif kind == "image":
                t, h, w = value
                ids += [ref.image_token_id] * (t * h * w)
                grids.append([t, h * merge, w * merge])
            else:
                t, h, w = value
                for _ in range(t):
                    ids += [rng.randrange(1, TEXT_VOCAB) for _ in range(rng.randint(3, 6))]  # "<1.5 seconds>"
                    ids += [ref.vision_start_id, *[ref.video_token_id] * (h * w), ref.vision_end_id]
                video_grids.append([t, h * merge, w * merge])
        ids_rows.append(ids)
    length = max(len(r) for r in ids_rows)
    input_ids = np.full((len(rows), length), pad_id, np.int64)
    attention_mask = np.zeros((len(rows), length), np.int64)
    for b, ids in enumerate(ids_rows):
        input_ids[b, length - len(ids) :] = ids
        attention_mask[b, length - len(ids) :] = 1
    return Prompt(input_ids, attention_mask, np.asarray(grids, np.int64).reshape(-1, 3),
                  np.asarray(video_grids, np.int64).reshape(-1, 3))


def _hf_first_call(ref: Reference, p: Prompt) -> tuple[np.ndarray, np.ndarray]:
    input_ids = torch.from_numpy(p.input_ids)
    attention_mask = torch.from_numpy(p.attention_mask)
    mm_token_type_ids = (input_ids == ref.image_token_id).int() + 2 * (input_ids == ref.video_token_id).int()
    position_ids, deltas = ref.model.get_rope_index(
        input_ids,
        mm_token_type_ids=mm_token_type_ids,
        image_grid_thw=torch.from_numpy(p.image_grid_thw) if len(p.image_grid_thw) else None,
        video_grid_thw=torch.from_numpy(p.video_grid_thw.copy()) if len(p.video_grid_thw) else None,
        attention_mask=attention_mask,
    )
    return position_ids.numpy(), deltas.numpy().reshape(-1, 1)


def _hf_decode(ref: Reference, input_ids: np.ndarray, attention_mask: np.ndarray, rope_deltas: np.ndarray):
    """``compute_3d_position_ids`` with a cache of ``past`` tokens, cut to the new tokens."""
    batch, sequence = input_ids.shape
    past = attention_mask.shape[1] - sequence
    ref.model.rope_deltas = torch.from_numpy(rope_deltas)
    try:
        position_ids = ref.model.compute_3d_position_ids(
            input_ids=torch.from_numpy(input_ids),
            inputs_embeds=torch.zeros(batch, sequence, 1),
            attention_mask=torch.from_numpy(attention_mask),
            cache=types.SimpleNamespace(get_seq_length=lambda: past),
        )
    finally:
        ref.model.rope_deltas = None
    return position_ids[..., -sequence:].numpy()


NO_VIDEOS = np.zeros((0, 3), np.int64)


def _onnx(ref: Reference, input_ids, attention_mask, image_grid_thw, rope_deltas, session=None,
          video_grid_thw=NO_VIDEOS):
    feeds = dict(zip(INPUT_NAMES, (input_ids, attention_mask, image_grid_thw, video_grid_thw, rope_deltas),
                     strict=True))
    position_ids, deltas = (session or ref.session).run(list(OUTPUT_NAMES), feeds)
    return position_ids, deltas


def _mismatches(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> list[str]:
    """One line per output that differs (shape first, then values); empty when all are exactly equal."""
    lines = []
    for name, want in expected.items():
        got = actual[name]
        if want.shape != got.shape:
            lines.append(f"{name}: shape {got.shape} != expected {want.shape}")
        elif not np.array_equal(want, got):
            where = np.argwhere(want != got)
            first = tuple(int(i) for i in where[0])
            lines.append(
                f"{name}: {len(where)} of {want.size} differ; first at {first}: {got[first]} != expected {want[first]}"
            )
    return lines


def _check_first_call(ref: Reference, p: Prompt, image_grid_thw=None, session=None, flatten_to_1d=False,
                      video_grid_thw=None, input_ids=None):
    want_pos, want_delta = _hf_first_call(ref, p)
    batch = p.input_ids.shape[0]
    grid = p.image_grid_thw if image_grid_thw is None else image_grid_thw
    videos = p.video_grid_thw if video_grid_thw is None else video_grid_thw
    got_pos, got_delta = _onnx(
        ref, p.input_ids if input_ids is None else input_ids, p.attention_mask, grid,
        np.zeros((batch, 1), np.int64), session=session, video_grid_thw=videos,
    )
    if flatten_to_1d:
        got_pos = np.broadcast_to(got_pos[:1], got_pos.shape)
    return _mismatches(
        {"position_ids": want_pos, "rope_deltas": want_delta}, {"position_ids": got_pos, "rope_deltas": got_delta}
    )


def _check_decode(ref: Reference, p: Prompt, steps: list[int], rng: random.Random, grid_at_decode=False) -> list[str]:
    """After the first call, feed ``steps`` chunks of new text tokens with a growing attention mask."""
    _, deltas = _hf_first_call(ref, p)
    attention_mask = p.attention_mask
    problems = []
    for new in steps:
        batch = p.input_ids.shape[0]
        input_ids = np.asarray([[rng.randrange(1, TEXT_VOCAB) for _ in range(new)] for _ in range(batch)], np.int64)
        attention_mask = np.concatenate([attention_mask, np.ones((batch, new), np.int64)], axis=1)
        want = _hf_decode(ref, input_ids, attention_mask, deltas)
        grid = p.image_grid_thw if grid_at_decode else np.zeros((0, 3), np.int64)
        videos = p.video_grid_thw if grid_at_decode else NO_VIDEOS
        got_pos, got_delta = _onnx(ref, input_ids, attention_mask, grid, deltas, video_grid_thw=videos)
        problems += _mismatches(
            {"position_ids": want, "rope_deltas": deltas}, {"position_ids": got_pos, "rope_deltas": got_delta}
        )
    return problems


CASES: dict[str, list[list[Segment]]] = {
    "text_only": [[("text", 7)]],
    "one_image": [[("text", 3), ("image", (1, 2, 3)), ("text", 2)]],
    "three_images_mixed": [
        [
            ("text", 2),
            ("image", (1, 2, 3)),
            ("text", 1),
            ("image", (2, 3, 2)),
            ("text", 3),
            ("image", (1, 1, 4)),
            ("text", 2),
        ]
    ],
    "image_first_token": [[("image", (1, 3, 2)), ("text", 4)]],
    "image_last_token": [[("text", 3), ("image", (2, 2, 3))]],
    "image_only": [[("image", (2, 1, 3))]],
    "single_token_image": [[("text", 1), ("image", (1, 1, 1)), ("text", 1)]],
    "batch_padded_different_image_counts": [
        [("text", 2), ("image", (1, 2, 2)), ("text", 1), ("image", (1, 3, 1)), ("text", 2)],
        [("text", 4), ("image", (2, 2, 2)), ("text", 1)],
    ],
    "batch_text_row_and_image_row": [
        [("text", 5)],
        [("image", (1, 2, 3)), ("text", 2)],
    ],
    "batch_padded_image_first_and_no_padding": [
        [("image", (1, 2, 1)), ("text", 2)],
        [("text", 3), ("image", (2, 2, 3)), ("text", 2), ("image", (1, 1, 2)), ("text", 1)],
        [("text", 2)],
    ],
    "one_video": [[("text", 3), ("video", (3, 2, 3)), ("text", 2)]],
    "one_frame_group_video": [[("text", 2), ("video", (1, 2, 2)), ("text", 1)]],
    "video_first_and_last": [[("video", (2, 1, 3))], [("text", 1), ("video", (2, 2, 1))]],
    "video_between_two_images": [
        [("text", 2), ("image", (1, 2, 3)), ("text", 1), ("video", (3, 3, 2)), ("text", 2), ("image", (1, 3, 1)),
         ("text", 1)],
    ],
    "two_videos_and_an_image": [[("video", (2, 2, 2)), ("text", 1), ("image", (1, 1, 2)), ("text", 1),
                                 ("video", (1, 3, 1)), ("text", 2)]],
    "batch_video_in_one_row_only": [
        [("text", 2), ("image", (1, 2, 2)), ("text", 3)],
        [("text", 1), ("video", (2, 2, 3)), ("text", 2)],
        [("text", 4)],
    ],
}


def _random_rows(rng: random.Random) -> list[list[Segment]]:
    rows = []
    for _ in range(rng.randint(1, 3)):
        segments: list[Segment] = []
        for _ in range(rng.randint(0, 3)):
            if rng.random() < 0.6:
                segments.append(("text", rng.randint(1, 4)))
            kind = "video" if rng.random() < 0.35 else "image"
            segments.append((kind, (rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 4))))
            segments.append(("text", rng.randint(1, 3)))  # HF groups adjacent images into one run
        if not segments or rng.random() < 0.3:
            segments.append(("text", rng.randint(1, 5)))
        rows.append(segments)
    return rows


@pytest.mark.parametrize("case", list(CASES))
def test_first_call_matches_hf(ref: Reference, case: str):
    p = _make_prompt(CASES[case], ref, random.Random(case))
    assert _check_first_call(ref, p) == []


def test_padding_with_image_token_id_is_ignored(ref: Reference):
    rng = random.Random(7)
    p = _make_prompt(CASES["batch_padded_different_image_counts"], ref, rng, ref.image_token_id)
    assert (p.input_ids[p.attention_mask == 0] == ref.image_token_id).all()
    assert _check_first_call(ref, p) == []


@pytest.mark.parametrize("seed", range(40))
def test_first_call_random_matches_hf(ref: Reference, seed: int):
    rng = random.Random(seed)
    p = _make_prompt(_random_rows(rng), ref, rng)
    assert _check_first_call(ref, p) == []


@pytest.mark.parametrize("case", list(CASES))
def test_decode_matches_hf(ref: Reference, case: str):
    rng = random.Random(case)
    p = _make_prompt(CASES[case], ref, rng)
    assert _check_decode(ref, p, steps=[1, 1, 3, 1], rng=rng) == []


@pytest.mark.parametrize("seed", range(10))
def test_decode_random_matches_hf(ref: Reference, seed: int):
    rng = random.Random(1000 + seed)
    p = _make_prompt(_random_rows(rng), ref, rng)
    assert _check_decode(ref, p, steps=[rng.randint(1, 4) for _ in range(3)], rng=rng) == []


def test_decode_ignores_image_grid(ref: Reference):
    rng = random.Random(3)
    p = _make_prompt(CASES["three_images_mixed"], ref, rng)
    assert _check_decode(ref, p, steps=[1, 2], rng=rng, grid_at_decode=True) == []


def test_text_only_is_clamped_cumsum_with_zero_deltas(ref: Reference):
    p = _make_prompt(
        [*CASES["batch_text_row_and_image_row"][:1], [("text", 2)]], ref, random.Random(0)
    )
    got_pos, got_delta = _onnx(ref, p.input_ids, p.attention_mask, p.image_grid_thw, np.zeros((2, 1), np.int64))
    text = np.clip(np.cumsum(p.attention_mask, axis=1) - 1, 0, None)
    np.testing.assert_array_equal(got_pos, np.broadcast_to(text, (3, *text.shape)))
    np.testing.assert_array_equal(got_delta, np.zeros((2, 1), np.int64))


# -- broken twins: the same comparison must catch each mistake ------------------------------------------------


def test_twin_swapped_h_and_w_fails(ref: Reference):
    p = _make_prompt(CASES["three_images_mixed"], ref, random.Random(1))
    assert _check_first_call(ref, p) == []
    problems = _check_first_call(ref, p, image_grid_thw=p.image_grid_thw[:, [0, 2, 1]])
    assert any(line.startswith("position_ids:") for line in problems), problems


def test_twin_wrong_merge_size_fails(ref: Reference):
    # A wrong merge size changes every image's token count: the graph must refuse, not invent positions.
    p = _make_prompt(CASES["one_image"], ref, random.Random(2))
    wrong = checked_session(build_rope_index(ref.image_token_id, ref.merge + 1, video_token_id=ref.video_token_id))
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="out of data bounds"):
        _check_first_call(ref, p, session=wrong)


def test_twin_1d_positions_fail(ref: Reference):
    p = _make_prompt(CASES["three_images_mixed"], ref, random.Random(3))
    problems = _check_first_call(ref, p, flatten_to_1d=True)
    assert any(line.startswith("position_ids:") for line in problems), problems


def test_twin_video_as_one_block_fails(ref: Reference, monkeypatch):
    # transformers splits a video into t grids of one frame group each (Qwen3-VL puts a timestamp before every
    # group); a graph that positions the whole video as one t-frame block, Qwen2-VL's way, must be caught
    p = _make_prompt(CASES["video_between_two_images"], ref, random.Random(5))
    assert _check_first_call(ref, p) == []
    monkeypatch.setattr(rope_index, "_frames_of", lambda scope, video_grid_thw: video_grid_thw)
    one_block = checked_session(build_rope_index(ref.image_token_id, ref.merge, video_token_id=ref.video_token_id))
    problems = _check_first_call(ref, p, session=one_block)
    assert any(line.startswith("position_ids:") for line in problems), problems


def test_twin_videos_read_as_images_fail(ref: Reference):
    p = _make_prompt(CASES["video_between_two_images"], ref, random.Random(6))
    assert _check_first_call(ref, p) == []
    swapped = p.input_ids.copy()
    swapped[p.input_ids == ref.video_token_id] = ref.image_token_id
    swapped[p.input_ids == ref.image_token_id] = ref.video_token_id
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="out of data bounds"):
        _check_first_call(ref, p, input_ids=swapped)


def test_twin_decode_without_deltas_fails(ref: Reference):
    rng = random.Random(4)
    p = _make_prompt(CASES["one_image"], ref, rng)
    _, deltas = _hf_first_call(ref, p)
    assert deltas.any()
    input_ids = np.asarray([[rng.randrange(1, TEXT_VOCAB)]], np.int64)
    attention_mask = np.concatenate([p.attention_mask, np.ones((1, 1), np.int64)], axis=1)
    want = _hf_decode(ref, input_ids, attention_mask, deltas)
    got, _ = _onnx(ref, input_ids, attention_mask, np.zeros((0, 3), np.int64), np.zeros_like(deltas))
    assert _mismatches({"position_ids": want}, {"position_ids": got})


# -- structure -------------------------------------------------------------------------------------------------


def test_structure_names_and_domains():
    model = build_rope_index(1004, 2, prefix="rope/", video_token_id=1005)
    graph = model.graph
    assert [v.name for v in graph.inputs] == list(INPUT_NAMES)
    assert [v.name for v in graph.outputs] == list(OUTPUT_NAMES)
    assert all(v.dtype == ir.DataType.INT64 for v in [*graph.inputs, *graph.outputs])
    assert model.opset_imports == {"": OPSET}
    io_names = {v.name for v in [*graph.inputs, *graph.outputs]}
    nodes = list(ir.traversal.RecursiveGraphIterator(graph))
    assert len({n.name for n in nodes}) == len(nodes), "node names must be unique"
    for node in nodes:
        assert node.domain == "", node
        assert node.name.startswith("rope/"), node.name
        for out in node.outputs:
            assert out.name in io_names or out.name.startswith("rope/"), out.name
    (if_node,) = [n for n in graph if n.op_type == "If"]
    decode_ops = {n.op_type for n in if_node.attributes["else_branch"].as_graph()}
    assert decode_ops <= {
        "Constant",
        "Shape",
        "CumSum",
        "Neg",
        "Slice",
        "Sub",
        "Add",
        "Unsqueeze",
        "Expand",
        "Identity",
    }
    first_call_ops = {n.op_type for n in if_node.attributes["then_branch"].as_graph()}
    assert "Loop" not in first_call_ops and "MatMul" not in first_call_ops  # linear, vectorized


@pytest.mark.parametrize("opset", [18, 23])
def test_other_opsets_build_and_run(opset: int):
    session = checked_session(build_rope_index(1004, 2, opset=opset, video_token_id=1005))
    ids = np.array([[5, 1004, 1004, 6]], np.int64)
    feeds = dict(zip(INPUT_NAMES, (ids, np.ones_like(ids), np.array([[1, 2, 4]]), NO_VIDEOS,
                                   np.zeros((1, 1), np.int64)), strict=True))
    position_ids, deltas = session.run(None, feeds)
    np.testing.assert_array_equal(position_ids[:, 0], [[0, 1, 1, 3], [0, 1, 1, 3], [0, 1, 2, 3]])
    np.testing.assert_array_equal(deltas, [[0]])


def test_unsupported_opset_is_refused():
    with pytest.raises(ValueError, match="opset"):
        build_rope_index(1004, 2, opset=17, video_token_id=1005)
