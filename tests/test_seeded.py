"""Weights drawn from a seed when read (merge.sources.seeded): the 30B-A3B preset's source, checked on tiny shapes.

* a seeded folder *is* the bfloat16 checkpoint it materialises: same names and stored shapes as the preset's
  safetensors, every value bit for bit, any rows of a stack drawn alone equal to the whole tensor's rows;
* its laws are the random presets' (:func:`export.random_weights.parameter_law` against ``draw_parameter``);
* a build from it equals the build from its materialised safetensors byte for byte, and ``verify`` streams its
  reference from it (transformers cannot read it); twin: against another seed verify fails;
* an MoE model with no dense layer (as 30B-A3B) takes the default 8-bit kinds it has;
* a hostile seeded file is refused naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from merge.errors import MergeError
from merge.sources.checkpoint import Checkpoint
from merge.sources.seeded import CHUNK, SEEDED_FILE, SeededTensor, draw

MOE = "tiny-moe"


def _seeded_copy(sources, name: str, dst: Path, seed: int = 7, config_change: dict | None = None) -> Path:
    """The preset's config and preprocessing files with seeded weights instead of its safetensors."""
    from export.random_weights import write_seeded_weights

    dst.mkdir(parents=True)
    for f in sources(name).folder.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and not f.name.startswith(".") \
                and f.name != "model.safetensors.index.json":
            shutil.copy2(f, dst / f.name)
    config = json.loads((dst / "config.json").read_text())
    config["text_config"].update(config_change or {})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    write_seeded_weights(dst, config, seed)
    return dst


@pytest.fixture(scope="module")
def seeded(sources, tmp_path_factory) -> tuple[Path, Path]:
    """(seeded tiny-moe folder, the same folder with the weights written out as safetensors)."""
    from export.random_weights import write_safetensors

    root = tmp_path_factory.mktemp("seeded")
    folder = _seeded_copy(sources, MOE, root / "seeded")
    written = root / "written"
    shutil.copytree(folder, written)
    (written / SEEDED_FILE).unlink()
    write_safetensors(written, Checkpoint(folder))
    return folder, written


def test_a_seeded_folder_is_the_checkpoint_it_writes(seeded, sources):
    folder, written = seeded
    ckpt, disk, preset = Checkpoint(folder), Checkpoint(written), Checkpoint(sources(MOE).folder)
    assert ckpt.seeded and not disk.seeded
    assert {n: ckpt.shape(n) for n in ckpt.names()} == {n: preset.shape(n) for n in preset.names()}
    for name in ckpt.names():
        value = ckpt.load(name)
        np.testing.assert_array_equal(value, disk.load(name), err_msg=name)
        assert not (value.view(np.uint32) & 0xFFFF).any(), f"{name}: not bfloat16 values"
        if value.ndim == 3:  # an expert stack: one expert alone
            for ck in (ckpt, disk):
                np.testing.assert_array_equal(ck.load_rows(name, 3, 2), value[3:5], err_msg=name)
    # twin: the seed matters
    other = _seeded_copy(sources, MOE, folder.parent / "other", seed=8)
    name = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert not np.array_equal(Checkpoint(other).load(name), ckpt.load(name))


def test_any_range_is_drawn_alone_and_follows_its_law():
    tensor = SeededTensor("t", (5, CHUNK // 2), mean=0.5, std=0.25)  # 2.5 chunks
    whole = draw(11, tensor)
    rng = np.random.default_rng(0)
    for begin, end in [(0, 10), (CHUNK - 3, CHUNK + 5), (CHUNK, 2 * CHUNK), (7, tensor.numel),
                       *sorted(map(tuple, np.sort(rng.integers(0, tensor.numel, (4, 2)), axis=1)))]:
        np.testing.assert_array_equal(draw(11, tensor, int(begin), int(end)), whole[begin:end])
    assert abs(whole.mean() - 0.5) < 1e-3 and abs(whole.std() - 0.25) < 1e-3
    assert not np.array_equal(draw(12, tensor, 0, 100), whole[:100])
    with pytest.raises(ValueError, match="outside"):
        draw(11, tensor, 5, tensor.numel + 1)


def test_the_laws_are_the_random_presets_laws(sources):
    """draw_parameter(name, shape) is mean + std * randn for every parameter of an MoE and a dense preset."""
    import torch

    from export.random_weights import _parameters, draw_parameter, parameter_law

    for name in (MOE, "tiny-merge1"):
        config = json.loads((sources(name).folder / "config.json").read_text())
        for param, shape in _parameters(config):
            got = draw_parameter(param, shape, torch.Generator().manual_seed(5))
            mean, std = parameter_law(param, shape)
            expected = mean + std * torch.randn(shape, generator=torch.Generator().manual_seed(5))
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7, msg=param)


def test_a_seeded_build_is_its_checkpoints_build_and_verify_streams_it(seeded, tmp_path, capsys):
    from merge.cli import main

    folder, written = seeded
    outs = {}
    for key, source in (("seeded", folder), ("written", written)):
        outs[key] = tmp_path / key
        assert main(["build", "--model", str(source), "--out", str(outs[key])]) == 0
    a, b = (json.loads((outs[k] / "merge.json").read_text())["checksums"] for k in ("seeded", "written"))
    assert a["model.onnx.data"] == b["model.onnx.data"]
    capsys.readouterr()
    assert main(["verify", str(outs["seeded"]), "--model", str(folder), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("PASSED"), out
    # twin: the reference drawn from another seed
    other = folder.parent / "other-seed"
    if not other.exists():
        shutil.copytree(folder, other)
        data = json.loads((other / SEEDED_FILE).read_text())
        data["seed"] += 1
        (other / SEEDED_FILE).write_text(json.dumps(data))
    assert main(["verify", str(outs["seeded"]), "--model", str(other), "--max-new-tokens", "3"]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("FAILED")


def test_an_moe_model_without_dense_layers_takes_the_default_eight_bit_kinds_it_has(sources, tmp_path, capsys):
    """30B-A3B's layers are all sparse: no dense down_proj. The default 8-bit kinds drop it (the experts are QMoE's,
    4-bit); naming it with --eight-bit is still refused, naming the kind."""
    from merge.cli import main
    from merge.contract.quant import DEFAULT_EIGHT_BIT, fit_default_to, quant_spec_for

    assert fit_default_to(quant_spec_for("int4"), dense_mlp=True).eight_bit == DEFAULT_EIGHT_BIT
    assert fit_default_to(quant_spec_for("int4"), dense_mlp=False).eight_bit == ("v_proj", "o_proj", "head")
    assert fit_default_to(quant_spec_for("int4", eight_bit="down_proj"), dense_mlp=False).eight_bit == ("down_proj",)
    assert fit_default_to(None, dense_mlp=False) is None

    folder = _seeded_copy(sources, MOE, tmp_path / "all-sparse", config_change={"mlp_only_layers": []})
    out = tmp_path / "int4"
    assert main(["build", "--model", str(folder), "--precision", "int4", "--out", str(out)]) == 0
    quant = json.loads((out / "merge.json").read_text())["quantization"]
    assert quant["eight_bit"] == ["v_proj", "o_proj", "head"]
    capsys.readouterr()
    assert main(["verify", str(out), "--model", str(folder), "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    assert main(["build", "--model", str(folder), "--precision", "int4", "--eight-bit", "down_proj",
                 "--out", str(tmp_path / "refused")]) != 0
    assert "down_proj" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def _mutated(folder: Path, tmp_path: Path, change) -> Path:
    dst = tmp_path / "hostile"
    shutil.copytree(folder, dst)
    data = json.loads((dst / SEEDED_FILE).read_text())
    change(data)
    (dst / SEEDED_FILE).write_text(json.dumps(data))
    return dst


EXPERTS = "model.language_model.layers.0.mlp.experts.gate_up_proj"


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(format="something else"), "not a seeded-weights file"),
    (lambda d: d.update(version=2), "seeded-weights version 2"),
    (lambda d: d.update(seed=-1), "seed must be a non-negative integer"),
    (lambda d: d.update(seed=True), "seed must be a non-negative integer"),
    (lambda d: d.update(tensors={}), "must name at least one tensor"),
    (lambda d: d["tensors"][EXPERTS].update(shape=[8, -64, 256]), f"tensor '{EXPERTS}' has shape"),
    (lambda d: d["tensors"][EXPERTS].update(shape="8x64"), f"tensor '{EXPERTS}' has shape"),
    (lambda d: d["tensors"][EXPERTS].update(std=-0.1), f"tensor '{EXPERTS}' has std -0.1"),
    (lambda d: d["tensors"][EXPERTS].update(mean="0"), f"tensor '{EXPERTS}' has mean '0'"),
    (lambda d: d["tensors"][EXPERTS].update(std=1e300), "out of range"),
    (lambda d: d["tensors"].update({EXPERTS: [8, 64, 256]}), "must be an object"),
])
def test_a_hostile_seeded_file_is_refused(seeded, tmp_path, change, message):
    folder = _mutated(seeded[0], tmp_path, change)
    with pytest.raises(MergeError, match=message) as info:
        Checkpoint(folder)
    assert SEEDED_FILE in str(info.value)


def test_a_seeded_file_that_misses_a_tensor_or_changes_a_shape_is_refused_by_the_build(seeded, tmp_path, capsys):
    from merge.cli import main

    folder = _mutated(seeded[0], tmp_path, lambda d: d["tensors"].pop(EXPERTS))
    assert main(["build", "--model", str(folder), "--out", str(tmp_path / "a")]) != 0
    assert EXPERTS in capsys.readouterr().err and not (tmp_path / "a").exists()
    shutil.rmtree(folder)
    folder = _mutated(seeded[0], tmp_path, lambda d: d["tensors"][EXPERTS].update(shape=[8, 64, 255]))
    assert main(["build", "--model", str(folder), "--out", str(tmp_path / "b")]) != 0
    assert EXPERTS in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_safetensors_beside_a_seeded_file_are_the_weights(seeded):
    folder, written = seeded
    shutil.copy2(folder / SEEDED_FILE, written / SEEDED_FILE)
    try:
        assert not Checkpoint(written).seeded
    finally:
        (written / SEEDED_FILE).unlink()


def test_the_30b_a3b_preset_has_the_published_shapes(tmp_path):
    """Qwen3-VL-30B-A3B: 31.07 B parameters (28.99 B in experts), 3.3 B of them active per token; its preset is a
    seeded file of a few hundred kB, written without drawing anything."""
    from merge.presets.cache import write_preset
    from merge.presets.shapes import SEEDED_PRESETS

    assert "qwen3-vl-30b-a3b" in SEEDED_PRESETS
    write_preset(tmp_path, "qwen3-vl-30b-a3b")
    assert not list(tmp_path.glob("*.safetensors")) and (tmp_path / SEEDED_FILE).stat().st_size < 1 << 20
    ckpt = Checkpoint(tmp_path)
    text = json.loads((tmp_path / "config.json").read_text())["text_config"]
    assert (text["num_hidden_layers"], text["num_experts"], text["num_experts_per_tok"], text["moe_intermediate_size"],
            text["num_attention_heads"], text["num_key_value_heads"], text["hidden_size"]) == (48, 128, 8, 768, 32, 4,
                                                                                                 2048)
    sizes = {n: math.prod(ckpt.shape(n)) for n in ckpt.names()}
    experts = sum(v for n, v in sizes.items() if ".mlp.experts." in n)
    total = sum(sizes.values())
    assert round(total / 1e9, 2) == 31.07 and round(experts / 1e9, 2) == 28.99
    assert ckpt.shape("model.language_model.layers.47.mlp.experts.gate_up_proj") == (128, 2048, 1536)
    assert ckpt.shape("model.language_model.layers.47.mlp.experts.down_proj") == (128, 768, 2048)
    active = total - experts * (1 - 8 / 128) - sum(v for n, v in sizes.items() if n.startswith("model.visual"))
    assert 3.0e9 < active < 3.5e9
