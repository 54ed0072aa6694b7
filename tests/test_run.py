"""``merge run`` and ``CombinedModel.chat``: a combined folder runs with its own preprocessing and no torch.

* the CLI streams text and ends with a timing line (one prompt, and a batch);
* torch and transformers (and the build-time packages) made unimportable: ``run`` and ``chat`` still work, and
  nothing beyond onnxruntime, numpy, Pillow, tokenizers and jinja2 gets imported;
* :mod:`merge.preprocess` against transformers: the same input_ids and grids, pixel values within 1e-6, with
  broken twins (bilinear resampling, raster patch order) that must fail;
* bad input: exit 2 and one line naming the problem;
* ``chat()`` generates exactly what ``generate()`` does on transformers-preprocessed inputs.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from merge.cli import main as cli_main
from merge.runtime import CombinedModel
from merge.runtime.images import ImageProcessor
from merge.runtime.preprocess import Preprocessor
from merge.runtime.prompts import build_batch_inputs, build_inputs
from merge.runtime.text import TextStream
from merge.tools.compare import compare
from tests.hf import hf_inputs, hf_processor

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 12
TIMING = re.compile(
    r"^vision\+prefill [\d.]+ ms for (\d+) prompt tokens \((\d+) image tokens, (\d+) images?\): [\d.]+ tokens/s"
    r" \| decode( (\d+) steps( x (\d+) rows)?: [\d.]+ ms/(token|step), [\d.]+ tokens/s|: no steps .*)$"
)
# PIL sizes (width, height): non-square both ways and square.
IMAGE_SIZES = ((64, 96), (200, 120), (90, 90))


def run_main(argv: list[str]) -> int:
    return cli_main(["run", *argv])
# Packages a deployment of a combined folder does not install, and this project's rooms that need them.
BUILD_ONLY = ("torch", "torchvision", "transformers", "onnx", "onnx_ir", "onnxscript", "safetensors",
              "onnxruntime_genai", "huggingface_hub", "export", "graphs")
BUILD_ROOMS = ("merge.stitch", "merge.tools", "merge.presets", "merge.sources")  # merge.commands: argparse only
RUNTIME_DEPS = ("numpy", "PIL", "tokenizers", "jinja2", "markupsafe", "onnxruntime", "merge")


@pytest.fixture(scope="module")
def combined(combined) -> Path:
    """The session's tiny combined folder."""
    return combined("tiny")


@pytest.fixture(scope="module")
def model(combined) -> CombinedModel:
    return CombinedModel(combined)


def _images(sizes=IMAGE_SIZES, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    out = []
    for w, h in sizes:
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        out.append(Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode))
    return out


@pytest.fixture()
def png(tmp_path) -> Path:
    path = tmp_path / "picture.png"
    _images([(100, 70)], seed=5)[0].save(path)
    return path


def _split_output(stdout: str) -> tuple[str, re.Match]:
    body, _, last = stdout.rstrip("\n").rpartition("\n")
    timing = TIMING.match(last)
    assert timing, f"no timing line at the end of:\n{stdout}"
    return body, timing


# ---------------------------------------------------------------------------------------------------------------
# (a) the CLI


def test_cli_one_prompt_one_image(combined, model, png, capsys):
    rc = run_main([str(combined), "--image", str(png), "--prompt", "Describe the image.",
                   "--max-new-tokens", str(NEW_TOKENS), "--threads", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    text, timing = _split_output(out)
    grid = model.preprocessor.build_inputs("x", [Image.open(png)])["image_grid_thw"]
    merge = model.config.vision.spatial_merge_size
    assert int(timing.group(2)) == int(np.prod(grid)) // merge**2 and timing.group(3) == "1"
    # What was streamed is what chat() returns for the same prompt and image.
    (expected,) = model.chat("Describe the image.", [png], max_new_tokens=NEW_TOKENS)
    assert text in (expected, expected.removesuffix("\n"))


def test_cli_text_only_and_batch(combined, png, capsys):
    assert run_main([str(combined), "--prompt", "Tell me a story.", "--max-new-tokens", "4"]) == 0
    _, timing = _split_output(capsys.readouterr().out)
    assert timing.group(2) == "0" and timing.group(3) == "0"

    rc = run_main([str(combined), "--prompt", "Hi", "--prompt", "What is in this picture, in detail?",
                   "--image", f"1:{png}", "--image", f"1:{png}", "--max-new-tokens", str(NEW_TOKENS)])
    out = capsys.readouterr().out
    assert rc == 0
    body, timing = _split_output(out)
    assert body.startswith("--- [0] Hi\n") and "\n--- [1] What is in this picture, in detail?\n" in body
    assert timing.group(3) == "2"
    assert timing.group(7) in (None, "2")  # "x 2 rows" unless both rows stopped at the first token


def test_image_syntax_in_help():
    import argparse

    from merge.commands.run import add_parser

    sub = argparse.ArgumentParser().add_subparsers()
    parser = add_parser(sub)
    assert parser.get_default("func").__name__ == "run"
    assert "--image N:PATH" in parser.description and "[N:]PATH" in parser.format_help()


# ---------------------------------------------------------------------------------------------------------------
# (b) no torch, no transformers


def test_runs_without_torch_or_transformers(combined, png):
    script = textwrap.dedent(f"""
        import sys
        for name in {BUILD_ONLY!r}:
            sys.modules[name] = None  # import NAME now raises ImportError
        import onnxruntime  # its own dependencies are allowed
        allowed = set(sys.stdlib_module_names) | {{m.split(".")[0] for m in sys.modules}} | set({RUNTIME_DEPS!r})

        from merge.cli import main
        rc = main(["run", {str(combined)!r}, "--image", {str(png)!r}, "--prompt", "Describe it.",
                   "--max-new-tokens", "6"])
        assert rc == 0, rc
        from merge.runtime import CombinedModel
        texts = CombinedModel({str(combined)!r}).chat(["Hi", "Look:"], [[], [{str(png)!r}]], max_new_tokens=4)
        assert len(texts) == 2

        loaded = {{m.split(".")[0] for m, mod in sys.modules.items() if mod is not None}}
        assert not loaded & set({BUILD_ONLY!r}), loaded & set({BUILD_ONLY!r})
        rooms = [m for m in sys.modules if m.startswith({BUILD_ROOMS!r})]
        assert not rooms, f"the runtime imported build rooms: {{rooms}}"
        extra = sorted(loaded - allowed - {{"__main__", "_distutils_hack"}})
        assert not extra, f"imported beyond the runtime dependencies: {{extra}}"
        print("TORCH-FREE OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TORCH-FREE OK" in proc.stdout
    _split_output(proc.stdout.replace("TORCH-FREE OK\n", ""))


# ---------------------------------------------------------------------------------------------------------------
# (c) preprocessing parity with transformers


def _check_same_inputs(ours: dict, theirs: dict) -> None:
    assert ours["video_grid_thw"].shape == (0, 3)  # no video: the processor leaves the video arrays out
    ours = {k: v for k, v in ours.items() if k not in ("pixel_values_videos", "video_grid_thw")}
    assert set(ours) == set(theirs)
    for key in ("input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids"):
        assert ours[key].dtype == theirs[key].dtype and np.array_equal(ours[key], theirs[key]), key
    assert ours["pixel_values"].dtype == np.float32
    result = compare("pixel_values", ours["pixel_values"], theirs["pixel_values"], scale=1e-6)
    assert result.passed, result.line()


def _processor_inputs(processor, prompt: str, images: list, patch_dim: int) -> dict:
    """transformers' Qwen3VLProcessor for one turn, with the empty image arrays it leaves out when there are none."""
    out = hf_inputs(processor, prompt, images)
    out.setdefault("pixel_values", np.zeros((0, patch_dim), np.float32))
    out.setdefault("image_grid_thw", np.zeros((0, 3), np.int64))
    return out


@pytest.mark.parametrize("preset", ["tiny", "tiny-merge1"])
def test_preprocessing_matches_transformers(preset, sources, prep):
    """The runtime's preprocessing (no transformers) against transformers' own Qwen3VLProcessor: its chat template,
    its placeholder expansion, its image processor; no code shared between the two sides."""
    source = sources(preset)
    tok, _ = prep(preset)
    processor = hf_processor(source.folder)
    patch_dim = source.config.vision.patch_dim
    ours = Preprocessor(source.folder)
    prompt = "Compare these, please: héllo wörld 😀 日本\nsecond line."
    cases = [(prompt, _images([size])) for size in IMAGE_SIZES]
    cases += [(prompt, _images([(70, 50)], seed=1, mode=mode)) for mode in ("RGBA", "L")]  # alpha on white; grey
    cases += [(prompt, _images(seed=2)), ("text only", [])]
    for text, images in cases:
        _check_same_inputs(ours.build_inputs(text, images), _processor_inputs(processor, text, images, patch_dim))

    # a left-padded batch is each row's own inputs, padded on the left with the pad id
    prompts, per_prompt = ["Hi", "Describe both pictures in detail."], [[], _images(seed=2)[:2]]
    batch = ours.build_batch_inputs(prompts, per_prompt)
    rows = [_processor_inputs(processor, p, i, patch_dim) for p, i in zip(prompts, per_prompt, strict=True)]
    length = batch["input_ids"].shape[1]
    assert length == max(r["input_ids"].shape[1] for r in rows)
    for row, single in enumerate(rows):
        n = single["input_ids"].shape[1]
        np.testing.assert_array_equal(batch["input_ids"][row, length - n:], single["input_ids"][0])
        assert (batch["input_ids"][row, :length - n] == tok.pad_token_id).all()
        np.testing.assert_array_equal(batch["attention_mask"][row], np.r_[np.zeros(length - n), np.ones(n)])
    np.testing.assert_array_equal(batch["image_grid_thw"], rows[1]["image_grid_thw"])

    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}]
    for generation_prompt in (False, True):
        assert ours.tokenizer.apply_chat_template(conversation, add_generation_prompt=generation_prompt) == \
            processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
    ids = list(np.random.default_rng(0).integers(0, source.config.text.vocab_size, 300))
    ids = [int(i) for i in ids if tok.convert_ids_to_tokens(int(i)) is not None]
    assert ours.decode(ids) == tok.decode(ids, skip_special_tokens=True)
    assert ours.eos_token_ids == [tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id]
    assert ours.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("pixels", [
    {"size": {"shortest_edge": 4096, "longest_edge": 40000}},  # downscaling path
    {"min_pixels": 20000, "max_pixels": 30000, "size": {"shortest_edge": 65536, "longest_edge": 16777216}},
])
def test_image_processor_size_bounds_match_transformers(pixels, sources, tmp_path):
    """Images larger than max_pixels shrink; min_pixels / max_pixels override size, as in transformers."""
    from transformers import AutoImageProcessor

    config = json.loads((sources("tiny").folder / "preprocessor_config.json").read_text())
    config.update(pixels)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    theirs = AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil")
    ours = ImageProcessor.from_folder(tmp_path)
    images = _images([(400, 300), (97, 611), (1000, 1000)], seed=3)
    expected = theirs(images=images, return_tensors="np")
    actual = ours(images=images)
    assert np.array_equal(actual["image_grid_thw"], expected["image_grid_thw"])
    assert (np.prod(actual["image_grid_thw"], axis=1) * ours.patch_size**2 <= ours.max_pixels).all()
    result = compare("pixel_values", actual["pixel_values"], expected["pixel_values"], scale=1e-6)
    assert result.passed, result.line()


@pytest.mark.parametrize("twin", ["bilinear", "raster_order"])
def test_twin_broken_image_processor_fails(twin, sources, prep, monkeypatch):
    import merge.runtime.images as pre

    source = sources("tiny")
    _, proc = prep("tiny")
    ours = ImageProcessor.from_folder(source.folder)
    if twin == "bilinear":
        ours = dataclasses.replace(ours, resample=Image.Resampling.BILINEAR)
    else:
        def raster(image, patch_size, merge_size, temporal_patch_size):
            c, h, w = image.shape
            rows = image.reshape(c, h // patch_size, patch_size, w // patch_size, patch_size).transpose(1, 3, 0, 2, 4)
            rows = np.repeat(rows[:, :, :, None], temporal_patch_size, axis=3)
            return rows.reshape((h // patch_size) * (w // patch_size), -1)

        monkeypatch.setattr(pre, "patchify", raster)
    images = _images([(64, 96)])
    result = compare("pixel_values", ours(images=images)["pixel_values"],
                     proc(images=images, return_tensors="np")["pixel_values"], scale=1e-6)
    assert not result.passed, result.line()


def test_stream_never_splits_a_character(sources):
    pre = Preprocessor(sources("tiny").folder)
    text = "Héllo wörld 😀 日本 — done"
    ids = pre.tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(pre.decode)
    pieces = [stream.step(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len([p for p in pieces if p]) > 5  # it does stream
    rng = np.random.default_rng(1)  # arbitrary ids, invalid UTF-8 included: still the same text in the end
    for _ in range(50):
        ids = [int(i) for i in rng.integers(0, 900, rng.integers(1, 40))]
        stream = TextStream(pre.decode)
        assert "".join([stream.step(i) for i in ids] + [stream.flush()]) == pre.decode(ids)


# ---------------------------------------------------------------------------------------------------------------
# (d) bad input


@pytest.mark.parametrize("case", ["missing_image", "not_an_image", "no_model", "not_a_folder", "image_index",
                                  "zero_tokens"])
def test_bad_input_is_one_line_and_exit_2(case, combined, png, tmp_path, capsys):
    folder, image, expected = str(combined), str(png), None
    if case == "missing_image":
        image = str(tmp_path / "missing.png")
        expected = f"image file not found: {image}"
    elif case == "not_an_image":
        image = str(tmp_path / "notes.png")
        Path(image).write_text("not a picture")
        expected = f"{image} is not an image"
    elif case == "no_model":
        folder = str(tmp_path / "half")
        Path(folder).mkdir()
        for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
            (Path(folder) / name).write_bytes((combined / name).read_bytes())
        expected = f"{folder} is not a combined folder: no model.onnx"
    elif case == "not_a_folder":
        folder = str(tmp_path / "nowhere")
        expected = f"{folder}: no such folder"
    elif case == "image_index":
        image = f"1:{png}"
        expected = "names prompt 1, but there is 1 --prompt"
    extra = ["--max-new-tokens", "0"] if case == "zero_tokens" else []
    rc = run_main([folder, "--image", image, "--prompt", "Describe it.", *extra])
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert expected is None or expected in lines[0], lines[0]


def test_bad_image_arguments_in_the_api(model):
    from merge.errors import MergeError

    with pytest.raises(MergeError, match="one list of images per prompt"):
        model.chat(["a", "b"], _images([(64, 64)]))
    with pytest.raises(MergeError, match="flat list"):
        model.chat("a", [_images([(64, 64)])])


# ---------------------------------------------------------------------------------------------------------------
# (e) chat() against generate()


@pytest.mark.parametrize("case", ["one_image", "text", "batch"])
def test_chat_generates_what_generate_does(case, model, sources, prep):
    source = sources("tiny")
    tok, proc = prep("tiny")
    if case == "batch":
        prompts, images = ["Hi", "Describe both pictures."], [[], _images(IMAGE_SIZES[:2], seed=4)]
        inputs = build_batch_inputs(tok, proc, prompts, images, source.config)
    else:
        prompts, images = "Describe the image.", _images(IMAGE_SIZES[:1], seed=4) if case == "one_image" else []
        inputs = build_inputs(tok, proc, prompts, images, source.config)
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id]
    reference = model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                               inputs["image_grid_thw"], max_new_tokens=NEW_TOKENS, eos_token_ids=eos,
                               pad_token_id=tok.pad_token_id)

    streamed: dict[int, list[str]] = {}
    completion = model.complete(prompts, images, max_new_tokens=NEW_TOKENS,
                                stream=lambda row, piece: streamed.setdefault(row, []).append(piece))
    np.testing.assert_array_equal(completion.generation.tokens, reference.tokens)
    np.testing.assert_array_equal(completion.inputs["input_ids"], inputs["input_ids"])
    assert completion.image_tokens == int((inputs["input_ids"] == source.config.image_token_id).sum())
    for row, tokens in enumerate(reference.tokens.tolist()):
        end = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
        expected = tok.decode(tokens[:end], skip_special_tokens=True)
        assert completion.texts[row] == expected
        assert "".join(streamed.get(row, [])) == expected
    assert model.chat(prompts, images, max_new_tokens=NEW_TOKENS) == completion.texts
