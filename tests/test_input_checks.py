"""The values of the inputs are checked, for every client: token ids inside the vocabulary, a mask of 0s and 1s,
left-padded, no empty row. Through a plain ONNX Runtime session (the graph's own checks, merge/checks/*), through
the Python API (one line each, before anything runs; also float ids, NaN pixels, absurd threads) and through the
Node client (one line, no stack trace).

Each refusal has its twin: a valid left-padded batch with ids at 0 and vocab - 1 runs, and gives the numbers the
same graph gives with the value checks cut out."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxruntime as ort
import pytest

from merge.cli import main as cli_main
from merge.errors import MergeError
from merge.runtime import CombinedModel
from merge.runtime.model import thread_limit
from merge.stitch.passes.check_contract import VALUE_CHECKS
from merge.tools.verify import default_images

from .test_readme_and_cli import ROOT

CPU = ["CPUExecutionProvider"]
PAD = 992  # the tiny preset's pad token


def _feeds(model: CombinedModel, ids, mask) -> dict[str, np.ndarray]:
    ids, mask = np.asarray(ids, np.int64), np.asarray(mask, np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, **model.no_vision(),
             "rope_deltas": np.zeros((ids.shape[0], 1), np.int64)}
    empty = np.zeros((ids.shape[0], model.num_kv_heads, 0, model.head_dim), model.kv_dtype)
    feeds.update(dict.fromkeys(model.past_names, empty))
    return feeds


def _unchecked(folder, out) -> ort.InferenceSession:
    """The same graph with the value checks cut out: the lookups and the decoder read input_ids and the mask as
    fed (what every folder built before them did)."""
    model = ir.load(folder / "model.onnx")
    graph = model.graph
    for name in ("input_ids", "attention_mask"):
        checked = next(n for n in graph if n.name == f"merge/checks/{name}")
        raw = next(v for v in graph.inputs if v.name == name)
        ir.convenience.replace_all_uses_with(checked.outputs[0], raw)
    common_passes.RemoveUnusedNodesPass()(model)
    out.mkdir()
    ir.save(model, out / "model.onnx", external_data="model.onnx.data")
    return ort.InferenceSession(str(out / "model.onnx"), providers=CPU)


@pytest.fixture(scope="module")
def tiny(combined, tmp_path_factory):
    folder = combined("tiny")
    model = CombinedModel(folder)
    checked = ort.InferenceSession(str(folder / "model.onnx"), providers=CPU)
    return model, checked, _unchecked(folder, tmp_path_factory.mktemp("unchecked") / "combined")


def _valid(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Two rows, the first left-padded, holding the first and the last id of the vocabulary."""
    ids = np.array([[PAD, PAD, 0, 5, vocab - 1, 7], [0, 3, 4, 5, vocab - 1, 9]], np.int64)
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int64)
    return ids, mask


def _case(case: str, vocab: int) -> tuple[np.ndarray, np.ndarray, str]:
    ids, mask = _valid(vocab)
    if case == "id_minus_1":
        ids[1, 2] = -1
        return ids, mask, VALUE_CHECKS[0]
    if case == "id_vocab":
        ids[0, 3] = vocab
        return ids, mask, VALUE_CHECKS[0]
    if case == "id_huge":
        ids[0, 3] = np.iinfo(np.int64).max
        return ids, mask, VALUE_CHECKS[0]
    if case == "right_padded":
        mask[0] = [1, 1, 1, 1, 0, 0]
        return ids, mask, VALUE_CHECKS[2]
    if case == "mask_holds_2":
        mask[1, 3] = 2  # 1 1 1 2 1 1: also drops after the 2, yet fails as what it is
        return ids, mask, VALUE_CHECKS[1]
    if case == "mask_negative":
        mask[0, 0] = -1
        return ids, mask, VALUE_CHECKS[1]
    assert case == "empty_row"
    mask[0] = 0
    return ids, mask, VALUE_CHECKS[3]


CASES = ["id_minus_1", "id_vocab", "id_huge", "right_padded", "mask_holds_2", "mask_negative", "empty_row"]


@pytest.mark.parametrize("case", CASES)
def test_bad_values_fail_by_name(tiny, case):
    model, checked, unchecked = tiny
    ids, mask, check = _case(case, model.config.text.vocab_size)
    with pytest.raises(Exception, match=f"merge/checks/{check}") as info:
        checked.run(["logits"], _feeds(model, ids, mask))
    assert "Input shape:{" in str(info.value) and "requested shape:{0}" in str(info.value)  # how many, and none
    # without the checks the same call ran on with wrong numbers, or failed in a Gather that names no input
    try:
        unchecked.run(["logits"], _feeds(model, ids, mask))
    except Exception as error:  # any failure but a named check
        assert "merge/checks/" not in str(error) and "Gather" in str(error)


def test_valid_values_run_and_match_the_unchecked_graph(tiny):
    model, checked, unchecked = tiny
    ids, mask = _valid(model.config.text.vocab_size)
    names = [o.name for o in checked.get_outputs()]
    first = dict(zip(names, checked.run(None, _feeds(model, ids, mask)), strict=True))
    np.testing.assert_array_equal(first["logits"], unchecked.run(["logits"], _feeds(model, ids, mask))[0])
    # a decode step: the mask grows over past + new, still left-padded; ids at both ends of the vocabulary
    step = {"input_ids": np.array([[0], [model.config.text.vocab_size - 1]], np.int64),
            "attention_mask": np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1), **model.no_vision(),
            "rope_deltas": first["rope_deltas_out"]}
    step.update({p: first[p.replace("past_key_values.", "present.")] for p in model.past_names})
    np.testing.assert_array_equal(checked.run(["logits"], step)[0], unchecked.run(["logits"], step)[0])
    hole = dict(step, attention_mask=step["attention_mask"].copy())
    hole["attention_mask"][1, 2] = 0  # a decode step's mask with a hole in the past
    with pytest.raises(Exception, match=f"merge/checks/{VALUE_CHECKS[2]}"):
        checked.run(["logits"], hole)


def test_int4_folder_checks_ids(combined):
    """The int4 lookup (GatherBlockQuantized) read past the table without a word; now it fails by name."""
    folder = combined("tiny", "int4")
    model = CombinedModel(folder)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=CPU)
    ids, mask = _valid(model.config.text.vocab_size)
    session.run(["logits"], _feeds(model, ids, mask))  # twin
    ids[0, 3] = model.config.text.vocab_size
    with pytest.raises(Exception, match=f"merge/checks/{VALUE_CHECKS[0]}"):
        session.run(["logits"], _feeds(model, ids, mask))


# -- the Python API: one line each, before anything runs ------------------------------------------------------------

def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("case", CASES)
def test_python_api_refuses_bad_values(tiny, case):
    model = tiny[0]
    ids, mask, _ = _case(case, model.config.text.vocab_size)
    expected = {"id_minus_1": r"input_ids\[1, 2\] = -1 is not a token id", "id_vocab": "= 1024 is not a token id",
                "id_huge": "is not a token id", "right_padded": "row 0 has a 0 after a 1",
                "mask_holds_2": "row 1 holds 2", "mask_negative": "row 0 holds -1", "empty_row": "row 0 is all 0"}
    with pytest.raises(MergeError, match=expected[case]) as info:
        model.generate(ids, mask, max_new_tokens=1)
    _one_line(info)
    valid_ids, valid_mask = _valid(model.config.text.vocab_size)
    assert model.generate(valid_ids, valid_mask, max_new_tokens=2).tokens.shape == (2, 2)  # twin


@pytest.mark.parametrize("dtype", [np.float64, np.float32, bool])
def test_python_api_refuses_ids_that_are_not_integers(tiny, dtype):
    model = tiny[0]
    ids = np.array([[1, 2, 3]], dtype)
    with pytest.raises(MergeError, match=f"input_ids must hold integers, got dtype {np.dtype(dtype)}") as info:
        model.generate(ids, max_new_tokens=1)
    _one_line(info)
    with pytest.raises(MergeError, match="input_ids must hold integers"):
        model.first_feeds(ids, np.ones((1, 3), np.int64))
    with pytest.raises(MergeError, match="attention_mask must hold integers"):
        model.generate(np.array([[1, 2, 3]]), np.full((1, 3), 0.5), max_new_tokens=1)
    model.generate(np.array([[1, 2, 3]], np.int32), np.ones((1, 3), bool), max_new_tokens=1)  # twin


def test_python_api_refuses_other_ids(tiny):
    model = tiny[0]
    ids = np.array([[1, 2, 3]])
    with pytest.raises(MergeError, match="pad_token_id must be a token id from 0 to 1023, got 1024"):
        model.generate(ids, max_new_tokens=1, pad_token_id=1024)
    with pytest.raises(MergeError, match=r"forced_tokens\[0, 1\] = -1 is not a token id"):
        model.generate(ids, max_new_tokens=2, forced_tokens=np.array([[5, -1]]))
    model.generate(ids, max_new_tokens=2, forced_tokens=np.array([[5, 1023]]), pad_token_id=1023)  # twin


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_python_api_refuses_pixels_that_are_not_finite(tiny, bad):
    model = tiny[0]
    inputs = model.preprocessor.build_inputs("Describe.", default_images(1))
    pixels = inputs["pixel_values"].copy()
    pixels[7, 3] = bad
    with pytest.raises(MergeError, match="pixel_values row 7 holds NaN or inf") as info:
        model.generate(inputs["input_ids"], inputs["attention_mask"], pixels, inputs["image_grid_thw"],
                       max_new_tokens=1)
    _one_line(info)
    spec = model.config.vision
    videos = np.zeros((4, spec.patch_dim), np.float32)  # one 1x2x2 clip, no video tokens: refused for its inf first
    videos[2, 0] = bad
    with pytest.raises(MergeError, match="pixel_values_videos row 2 holds NaN or inf"):
        model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                       inputs["image_grid_thw"], max_new_tokens=1, pixel_values_videos=videos,
                       video_grid_thw=np.array([[1, 2, 2]]))
    model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"],
                   max_new_tokens=1)  # twin


@pytest.mark.parametrize("threads", [-1, 0, 1000, 2.5, True, "4"])
def test_python_api_refuses_bad_threads(combined, threads):
    folder = combined("tiny")
    with pytest.raises(MergeError, match="threads must be") as info:
        CombinedModel(folder, threads=threads)
    _one_line(info)
    CombinedModel(folder, threads=1)  # twin: 1 and the limit are fine
    CombinedModel(folder, threads=thread_limit())
    with pytest.raises(MergeError, match=f"from 1 to {thread_limit()}"):
        CombinedModel(folder, threads=thread_limit() + 1)


@pytest.mark.parametrize("threads", ["0", "-1", "1000"])
def test_run_refuses_bad_threads(combined, capsys, threads):
    rc = cli_main(["run", str(combined("tiny")), "--prompt", "Hi", "--max-new-tokens", "1", "--threads", threads])
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --threads must be from 1 to"), captured.err
    assert "Traceback" not in captured.err and captured.out == ""


# -- the Node client: one line, no stack trace ---------------------------------------------------------------------

CLIENT = ROOT / "clients" / "node"


@pytest.fixture(scope="module")
def node_client():
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("node and npm are not installed on this machine")
    if not (CLIENT / "node_modules" / "onnxruntime-node").is_dir():
        proc = subprocess.run(["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=CLIENT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return CLIENT / "generate.mjs"


def _inputs(path, ids, mask, **extra) -> str:
    path.write_text(json.dumps({"input_ids": ids, "attention_mask": mask, "pixel_values": [], "image_grid_thw": [],
                                **extra}))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no_folder", "no_inputs", "malformed", "not_an_object", "float_id", "ragged",
                                  "mask_rows", "inf_pixel", "tokens_zero", "tokens_word", "tokens_negative",
                                  "runtime", "too_few_arguments", "id_minus_1", "id_vocab", "right_padded",
                                  "empty_row"])
def test_node_client_refuses_in_one_line(node_client, combined, tmp_path, case):
    folder = str(combined("tiny"))
    good = _inputs(tmp_path / "good.json", [[1, 2, 3]], [[1, 1, 1]])
    argv, status = [folder, good, "2"], 2
    if case == "no_folder":
        argv[0], expected = str(tmp_path / "nowhere"), "nowhere: no such folder"
    elif case == "no_inputs":
        argv[1], expected = str(tmp_path / "missing.json"), "missing.json cannot be read (ENOENT)"
    elif case == "malformed":
        (tmp_path / "bad.json").write_text('{"input_ids": [[1, 2')
        argv[1], expected = str(tmp_path / "bad.json"), "bad.json is not valid JSON"
    elif case == "not_an_object":
        (tmp_path / "bad.json").write_text("[1, 2]")
        argv[1], expected = str(tmp_path / "bad.json"), "must hold a JSON object"
    elif case == "float_id":
        argv[1], expected = _inputs(tmp_path / "i.json", [[1, 2.5]], [[1, 1]]), "input_ids[0][1] = 2.5 is not an int"
    elif case == "ragged":
        argv[1], expected = _inputs(tmp_path / "i.json", [[1, 2], [3]], [[1, 1], [1]]), "input_ids row 1 must be"
    elif case == "mask_rows":
        argv[1], expected = _inputs(tmp_path / "i.json", [[1, 2]], [[1, 1], [1, 1]]), "attention_mask has 2 rows"
    elif case == "inf_pixel":
        (tmp_path / "i.json").write_text('{"input_ids": [[1]], "attention_mask": [[1]], "pixel_values": [[1e999]], '
                                         '"image_grid_thw": []}')
        argv[1], expected = str(tmp_path / "i.json"), "pixel_values[0][0] = Infinity is not a finite number"
    elif case.startswith("tokens_"):
        argv[2] = {"tokens_zero": "0", "tokens_word": "many", "tokens_negative": "-3"}[case]
        expected = f'NEW_TOKENS must be a whole number from 1 to 1048576, got "{argv[2]}"'
    elif case == "runtime":
        argv, expected = [*argv, "deno"], 'runtime "deno": choose node or web'
    elif case == "too_few_arguments":
        argv, expected = [folder], "usage: node generate.mjs"
    else:  # refused by the model's own checks: a model failure (1), one line naming the check
        vocab = CombinedModel(folder).config.text.vocab_size
        ids, mask = {"id_minus_1": ([[1, -1]], [[1, 1]]), "id_vocab": ([[1, vocab]], [[1, 1]]),
                     "right_padded": ([[1, 2]], [[1, 0]]), "empty_row": ([[1, 2]], [[0, 0]])}[case]
        argv[1], status = _inputs(tmp_path / "i.json", ids, mask), 1
        expected = "merge/checks/" + {"id_minus_1": VALUE_CHECKS[0], "id_vocab": VALUE_CHECKS[0],
                                      "right_padded": VALUE_CHECKS[2], "empty_row": VALUE_CHECKS[3]}[case]
    proc = subprocess.run(["node", str(node_client), *argv], capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == status, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert proc.stdout == "" and "    at " not in proc.stderr
    ok = subprocess.run(["node", str(node_client), folder, good, "2"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and len(json.loads(ok.stdout)["tokens"][0]) == 2, ok.stderr  # twin
