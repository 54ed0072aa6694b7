"""``merge inspect``: figures read from the graph alone agree with the checkpoint; the stitch view is small,
weightless and valid; no torch; clear errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import onnx
import pytest

from merge.cli import main as cli_main
from merge.commands.inspect import add_parser, run
from merge.contract.names import SCOPES
from merge.errors import MergeError
from merge.tools.inspect.report import format_report, inspect_folder
from merge.tools.inspect.stitch_view import STITCH_INLINE_MAX_ELEMENTS, write_stitch_view


def main(argv: list[str]) -> int:
    return cli_main(["inspect", *argv])

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "int4")
MB = 1 << 20


@pytest.fixture(scope="module")
def built(combined):
    """``built(precision)`` -> the session's tiny combined folder of that precision."""
    return lambda precision: combined("tiny", precision)


@pytest.fixture(scope="module")
def checkpoint_sizes(sources) -> dict[str, int]:
    """Element counts of the tiny preset's safetensors tensors (shapes only, no data read)."""
    from safetensors import safe_open

    sizes = {}
    for path in sorted(sources("tiny").folder.glob("*.safetensors")):
        with safe_open(str(path), "np") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sizes[key] = math.prod(f.get_slice(key).get_shape())
    return sizes


# ------------------------------------------------------------------------------------------ the figures


@pytest.mark.parametrize("precision", PRECISIONS)
def test_scopes_and_parameter_totals(precision, built):
    params = inspect_folder(built(precision))["parameters"]
    scopes, total = params["scopes"], params["total"]
    assert list(scopes) == list(SCOPES)
    for scope, row in scopes.items():
        assert row["bytes"] > 0 and row["tensors"] > 0, scope
        # a tied folder reads the embedding table from the decoder's head: merge then holds no weights
        assert row["parameters"] > 0 or scope == "merge", scope
        assert sum(row["bytes_by_kind"].values()) == row["bytes"], scope
    for key in ("tensors", "parameters", "bytes"):
        assert sum(row[key] for row in scopes.values()) == total[key], key


def test_parameters_match_the_checkpoint(built, checkpoint_sizes, sources):
    """Vision = model.visual.*; decoder = the text model without the embedding, with its head; merge = the
    embedding table, except in a tied folder, whose merge reads the head's weight (fp32 or 4-bit: stored once).
    Rotary tables and integer constants are not parameters."""
    config = sources("tiny").config
    visual = sum(n for key, n in checkpoint_sizes.items() if key.startswith("model.visual."))
    text = sum(n for key, n in checkpoint_sizes.items() if key.startswith("model.language_model."))
    embed = checkpoint_sizes["model.language_model.embed_tokens.weight"]
    head = embed if config.tie_word_embeddings else checkpoint_sizes["lm_head.weight"]
    for precision in PRECISIONS:
        scopes = inspect_folder(built(precision))["parameters"]["scopes"]
        assert scopes["vision"]["parameters"] == visual, precision
        assert scopes["merge"]["parameters"] == (0 if config.tie_word_embeddings else embed), precision
        assert scopes["decoder"]["parameters"] == text - embed + head, precision


def test_int4_bytes_as_stored(built):
    fp32 = inspect_folder(built("fp32"))["parameters"]["scopes"]
    int4 = inspect_folder(built("int4"))["parameters"]["scopes"]
    assert fp32["decoder"]["bytes_by_kind"]["weight"] == 4 * fp32["decoder"]["parameters"]
    assert fp32["decoder"]["bytes_by_kind"]["quantization"] == 0
    assert int4["decoder"]["bytes_by_kind"]["quantization"] > 0
    # 4-bit matrices: well under a quarter of the fp32 bytes (the fp32 norms keep it above an eighth)
    assert int4["decoder"]["bytes_by_kind"]["weight"] < fp32["decoder"]["bytes_by_kind"]["weight"] / 4
    assert int4["vision"] == fp32["vision"]
    # tied: both folders read the token table from the head's own weight (fp32 columns, or its 4-bit blocks)
    assert fp32["merge"]["parameters"] == 0 and int4["merge"]["parameters"] == 0
    assert int4["merge"]["bytes_by_kind"]["weight"] == 0


@pytest.mark.parametrize("precision", PRECISIONS)
def test_operator_counts_include_subgraphs(precision, built, sources):
    source = sources("tiny")
    ops = inspect_folder(built(precision))["operators"]
    depth = source.config.vision.depth
    layers = source.config.text.num_layers
    # inside the vision If's then-branch, per block: one MultiHeadAttention for a single run of equal-length
    # segments and one in the Loop over several runs
    assert ops["overall"]["com.microsoft.MultiHeadAttention"] == 2 * depth
    assert ops["per_scope"]["vision"]["com.microsoft.MultiHeadAttention"] == 2 * depth
    assert ops["per_scope"]["vision"]["Loop"] == depth
    assert ops["overall"]["com.microsoft.GroupQueryAttention"] == layers
    assert ops["per_scope"]["decoder"]["com.microsoft.GroupQueryAttention"] == layers
    # the vision guard, the position switch, a run switch per block, logits_to_keep fed or not
    assert ops["overall"]["If"] == 3 + depth
    assert ops["per_scope"]["decoder"]["If"] == 1
    assert ops["per_scope"]["merge"]["Add"] >= len(source.config.vision.deepstack_visual_indexes)
    if precision == "int4":
        assert ops["per_scope"]["decoder"]["com.microsoft.MatMulNBits"] == 7 * layers + 1
    else:
        assert "com.microsoft.MatMulNBits" not in ops["overall"]
    assert sum(ops["overall"].values()) == ops["nodes"]
    assert sum(sum(counts.values()) for counts in ops["per_scope"].values()) == ops["nodes"]

    main_graph_nodes = len(onnx.load(str(built(precision) / "model.onnx"), load_external_data=False).graph.node)
    assert ops["nodes"] > main_graph_nodes  # the branches are counted


@pytest.mark.parametrize("precision", PRECISIONS)
def test_external_data_listing(precision, built):
    folder = built(precision)
    data = inspect_folder(folder)
    ext = data["external_data"]
    assert [f["file"] for f in ext["files"]] == ["model.onnx.data"]
    (entry,) = ext["files"]
    assert entry["exists"] and entry["bytes"] == (folder / "model.onnx.data").stat().st_size
    assert entry["tensors"] > 0
    assert entry["tensors"] + ext["model_file"]["inline_tensors"] == data["parameters"]["total"]["tensors"]
    assert ext["model_file"]["bytes"] == (folder / "model.onnx").stat().st_size


def test_metadata_io_and_checksums(built):
    folder = built("int4")
    data = inspect_folder(folder, verify_checksums=True)
    meta = data["metadata"]
    assert meta["source_model"] == "tiny" and meta["precision"] == "int4" and meta["tool_version"]
    assert meta["opsets"]["com.microsoft"] >= 1 and meta["ir_version"] >= 7 and meta["producer"]
    assert meta["manifest"] == "merge.json" and meta["manifest_io_matches"] is True
    assert data["checksums"]["ok"] and {f["status"] for f in data["checksums"]["files"]} == {"ok"}
    inputs = {v["name"]: v for v in data["inputs"]}
    assert inputs["input_ids"] == {"name": "input_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]}
    assert inputs["pixel_values"]["shape"][1] == 1536
    assert data["outputs"][-1]["name"] == "rope_deltas_out"


def test_checksum_mismatch_fails(built, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(built("fp32"), folder)
    with open(folder / "model.onnx.data", "r+b") as f:  # one flipped byte in the weights
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    assert main([str(folder)]) == 0  # without --check-checksums nothing is hashed
    assert main([str(folder), "--check-checksums"]) == 1
    out = capsys.readouterr().out
    assert "model.onnx.data: MISMATCH" in out


def test_text_report_and_json(built, capsys):
    folder = built("fp32")
    assert main([str(folder)]) == 0
    text = capsys.readouterr().out
    for heading in ("source model", "inputs (", "outputs (", "parameters by scope", "operators", "data files"):
        assert heading in text, heading
    assert "com.microsoft.GroupQueryAttention" in text and "model.onnx.data" in text
    assert text.strip() == format_report(inspect_folder(folder)).strip()
    # tables are aligned: every row of the parameter table is as wide as its rule
    table = text.split("parameters by scope")[1].split("\n\n")[0].splitlines()[1:-1]
    assert len({len(line) for line in table}) == 1

    assert main([str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == inspect_folder(folder)


# -------------------------------------------------------------------------------------------- stitch view


@pytest.mark.parametrize("precision", PRECISIONS)
def test_stitch_view(precision, built, sources, tmp_path):
    from merge.stitch.ort_schemas import register_ort_default_domain_ops

    source = sources("tiny")
    levels = len(source.config.vision.deepstack_visual_indexes)
    hidden = source.config.text.hidden_size
    path, _ = write_stitch_view(built(precision), tmp_path / "stitch.onnx")
    assert path.stat().st_size < MB
    view = onnx.load(str(path))
    register_ort_default_domain_ops()
    onnx.checker.check_model(view)
    graph = view.graph

    # weightless: every weight is a graph input; only small constants keep values
    assert all(math.prod(t.dims) <= STITCH_INLINE_MAX_ELEMENTS for t in graph.initializer)
    assert all(t.data_type != onnx.TensorProto.FLOAT or not t.dims for t in graph.initializer)
    inputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert inputs["vision/image_embeds"] == ["num_visual_tokens", hidden]  # the images' rows, then the videos'
    assert inputs["vision/deepstack_embeds"] == [levels, "num_visual_tokens", hidden]
    table_readers = [n for n in graph.node if n.name.startswith("merge/embedding/embeds/")
                     and n.op_type in ("Gather", "GatherBlockQuantized") and n.name.endswith(("_columns", "_blocks",
                                                                                             "token_embeds"))]
    assert len(table_readers) == 1 and table_readers[0].input[0] in inputs  # the table is a weightless input
    assert not any(n.name.startswith("vision/") for n in graph.node)

    nodes = {n.name: n for n in graph.node}
    producers = {o: n for n in graph.node for o in n.output}
    adds = [nodes.get(f"merge/deepstack/layers.{k}/add") for k in range(levels)]
    assert all(add is not None and add.op_type == "Add" for add in adds)
    down_proj = "MatMulNBits" if precision == "int4" else "MatMul"
    for add in adds:
        assert any(producers.get(i) is not None and producers[i].op_type == down_proj for i in add.input), add.name
        readers = [n for n in graph.node if add.output[0] in n.input]
        assert [n.op_type for n in readers] == ["SkipSimplifiedLayerNormalization"], add.name
    position_if = nodes["merge/position/if_first_call"]
    assert position_if.op_type == "If" and {a.name for a in position_if.attribute} == {"then_branch", "else_branch"}
    assert any(name.startswith("merge/embedding/") for name in nodes)
    assert {"merge/checks/position_ids", "rope_deltas_out"} <= {v.name for v in graph.output}

    # structurally closed: every name read (subgraph references included) is made inside the view
    from merge.tools.inspect.walk import reads

    available = set(inputs) | {t.name for t in graph.initializer} | set(producers)
    for node in graph.node:
        assert set(reads(node)) <= available, node.name

    # ONNX Runtime accepts it as a model (its weights are inputs)
    import onnxruntime as ort

    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_stitch_view_from_the_command(built, tmp_path, capsys):
    out = tmp_path / "views" / "stitch.onnx"
    assert main([str(built("fp32")), "--stitch", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stitch_view"]["path"] == str(out) and out.is_file()
    assert data["stitch_view"]["bytes"] == out.stat().st_size


# -------------------------------------------------------------------------------------- interface, errors


def test_no_torch_no_transformers(built, tmp_path):
    """The command imports neither torch nor transformers (both made unimportable in a fresh interpreter)."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from merge.cli import main\n"
        f"folder, view = {str(built('int4'))!r}, {str(tmp_path / 's.onnx')!r}\n"
        "raise SystemExit(main(['inspect', folder, '--json', '--stitch', view]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["metadata"]["precision"] == "int4"


def test_missing_model_is_one_clear_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, tmp_path / "does-not-exist"):
        with pytest.raises(MergeError, match=r"no model\.onnx|no such folder"):
            inspect_folder(folder)
        assert main([str(folder)]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        (line,) = captured.err.strip().splitlines()
        assert line.startswith(f"error: {folder}") and ("no model.onnx" in line or "no such folder" in line)


def test_parser_help_is_the_docstring():
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    first_line = run.__doc__.strip().splitlines()[0]
    assert first_line in " ".join(parser.format_help().split())  # help wraps lines
    args = parser.parse_args(["inspect", "somewhere", "--port", "9000"])
    assert args.func is run and args.combined == Path("somewhere") and args.port == 9000
    assert not args.netron and not args.json and args.stitch is None


class _FakeNetron(types.ModuleType):
    def __init__(self):
        super().__init__("netron")
        self.started: list[tuple] = []
        self.waited = 0

    def start(self, file=None, address=None, browse=True):
        self.started.append((file, address, browse))
        return address

    def wait(self):
        self.waited += 1


def test_netron_serves_the_model_or_the_stitch_view(built, tmp_path, monkeypatch, capsys):
    fake = _FakeNetron()
    monkeypatch.setitem(sys.modules, "netron", fake)
    folder = built("fp32")
    assert main([str(folder), "--netron", "--port", "8123"]) == 0
    assert fake.started == [(str(folder / "model.onnx"), ("localhost", 8123), False)] and fake.waited == 1
    assert "http://localhost:8123" in capsys.readouterr().err

    view = tmp_path / "stitch.onnx"
    assert main([str(folder), "--netron", "--stitch", str(view)]) == 0
    assert fake.started[-1] == (str(view), ("localhost", 8080), False)


def test_netron_missing_is_a_clear_error(built, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "netron", None)  # import netron -> ImportError
    assert main([str(built("fp32")), "--netron"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before any work
    assert "pip install netron" in captured.err
