"""The decoder graph the build writes from the checkpoint (:mod:`graphs.decoder`).

Checked against the ONNX Runtime GenAI builder's export of the same folder (same inputs and outputs, same
numbers on prefill, chunked and decode calls), with a twin whose rotary layout is broken that must fail; and
for what makes it scale: nothing is read while the graph is built, every weight once while it is written.
The end-to-end parity against PyTorch (every config shape) is in ``test_combined_parity.py``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graphs.decoder import build_decoder_model
from merge.contract.config import ModelConfig
from merge.errors import MergeError
from merge.sources.checkpoint import Checkpoint
from merge.tools.compare import compare


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


CASES = [(1, 7, 5), (2, 1, 9), (3, 6, 0)]  # (batch, new tokens, past tokens): chunked prefill, decode, prefill


def _feeds(config: ModelConfig, batch: int, new: int, past: int, seed: int) -> dict[str, np.ndarray]:
    t = config.text
    rng = np.random.default_rng(seed)
    feeds = {
        "inputs_embeds": rng.standard_normal((batch, new, t.hidden_size)).astype(np.float32),
        "attention_mask": np.ones((batch, new + past), np.int64),
        "position_ids": rng.integers(0, 300, (3, batch, new)).astype(np.int64),
    }
    for i in range(t.num_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal(
                (batch, t.num_kv_heads, past, t.head_dim)).astype(np.float32)
    return feeds


@pytest.fixture(scope="module")
def written(sources, tmp_path_factory):
    """``written(preset)`` -> (ours, the builder's) decoder.onnx paths for that preset."""
    from merge.stitch.decoder import export_decoder

    paths = {}

    def get(name: str):
        if name not in paths:
            source = sources(name)
            out = tmp_path_factory.mktemp(f"decoders-{name}")
            ours = out / "ours.onnx"
            ir.save(build_decoder_model(Checkpoint(source.folder), source.config), ours,
                    external_data="ours.onnx.data")
            export_decoder(source.folder, out / "builder", source.config.text)
            paths[name] = ours, out / "builder" / "decoder.onnx"
        return paths[name]

    return get


@pytest.mark.slow  # the GenAI builder exports its own decoder for each preset
@pytest.mark.parametrize("preset", ["tiny", "tiny-merge1"])
def test_decoder_equals_the_builders(preset, sources, written):
    """Same interface as the GenAI builder's decoder, same outputs within the fp32 bound on every case."""
    ours, builders = written(preset)
    config = sources(preset).config
    a, b = session(ours), session(builders)
    assert [i.name for i in a.get_inputs()] == [i.name for i in b.get_inputs()]
    assert [o.name for o in a.get_outputs()] == [o.name for o in b.get_outputs()]
    names = [o.name for o in a.get_outputs()]
    for seed, case in enumerate(CASES):
        feeds = _feeds(config, *case, seed=seed)
        for name, got, expected in zip(names, a.run(None, feeds), b.run(None, feeds), strict=True):
            result = compare(f"{preset} {case} {name}", got, expected)
            assert result.passed, result.line()


@pytest.mark.slow  # the twin of the builder comparison: it needs the builder's decoder too
def test_broken_rotary_twin_fails(sources, written, tmp_path):
    """The twin: the same graph with MRoPE's sections laid out contiguously (Qwen2-VL's layout) must differ."""
    ours, builders = written("tiny")
    model = ir.load(ours)
    rotaries = [n for n in model.graph if n.op_type == "MRotaryEmbedding"]
    assert rotaries
    for node in rotaries:
        node.attributes["mrope_layout"] = ir.AttrInt64("mrope_layout", 0)
    broken = tmp_path / "broken.onnx"
    ir.save(model, broken, external_data="broken.onnx.data")
    feeds = _feeds(sources("tiny").config, *CASES[0], seed=0)
    result = compare("logits", session(broken).run(["logits"], feeds)[0], session(builders).run(["logits"], feeds)[0])
    assert not result.passed, result.line()


class CountingCheckpoint(Checkpoint):
    def __init__(self, folder) -> None:
        super().__init__(folder)
        self.loads: list[str] = []

    def load(self, name: str) -> np.ndarray:
        self.loads.append(name)
        return super().load(name)


def test_weights_read_once_and_only_when_written(sources, tmp_path):
    """Building the graph reads no weight; writing it reads each checkpoint tensor once (one at a time: the
    save streams them), so a build holds about one weight in memory, whatever the model's size."""
    source = sources("tiny")
    ckpt = CountingCheckpoint(source.folder)
    model = build_decoder_model(ckpt, source.config)
    assert ckpt.loads == []
    ir.save(model, tmp_path / "d.onnx", external_data="d.onnx.data")
    text_tensors = [n for n in ckpt.names() if "visual" not in n and not n.startswith("lm_head")]
    # the tied head is the token table, read once (the decoder has no table of its own: the merge reads it)
    assert sorted(set(ckpt.loads)) == sorted(text_tensors)
    assert len(ckpt.loads) == len(set(ckpt.loads)), "a weight was read twice"


def _tampered(source, tmp_path, change):
    import json
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(source.folder, folder)
    raw = json.loads((folder / "config.json").read_text())
    change(raw)
    (folder / "config.json").write_text(json.dumps(raw))
    return Checkpoint(folder), ModelConfig.from_dict(raw, str(folder / "config.json"))


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c["text_config"].update(num_key_value_heads=4),
     "layers.0.self_attn.k_proj.weight has shape [32, 64], but config.json says [64, 64]"),
    (lambda c: c.update(tie_word_embeddings=False), "tie_word_embeddings is false but the checkpoint has no head"),
    (lambda c: c["text_config"].update(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (lambda c: c["text_config"]["rope_parameters"].update(rope_type="yarn"), "rope_type 'yarn' is not supported"),
])
def test_config_and_checkpoint_that_disagree_are_refused(change, message, sources, tmp_path):
    with pytest.raises(MergeError) as info:  # the config parse refuses what no decoder can be written for
        ckpt, config = _tampered(sources("tiny"), tmp_path, change)
        build_decoder_model(ckpt, config)
    assert message in str(info.value)
