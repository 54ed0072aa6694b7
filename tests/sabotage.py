"""Combined folders broken on purpose: each parity family's twin must FAIL against them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir

from merge.contract.folder import file_sha256

MODEL = "model.onnx"


def _copy_with(folder: Path, out: Path, mutate) -> Path:
    model = ir.load(folder / MODEL)
    mutate(model.graph)
    out.mkdir(parents=True, exist_ok=False)
    for f in folder.iterdir():
        if f.is_file() and not f.name.startswith(MODEL):
            shutil.copy2(f, out / f.name)
    ir.save(model, out / MODEL, external_data=MODEL + ".data")
    # a consistent folder (sizes and checksums re-recorded), so that what fails is the graph, not the loader
    manifest = json.loads((out / "merge.json").read_text())
    for name in (MODEL, MODEL + ".data"):
        manifest["sizes"][name] = (out / name).stat().st_size
        manifest["checksums"][name] = file_sha256(out / name)
    (out / "merge.json").write_text(json.dumps(manifest, indent=2))
    return out


def _drop_deepstack(graph: ir.Graph) -> None:
    adds = [n for n in graph if n.name.startswith("merge/deepstack/")]
    assert adds, "no DeepStack injection found to remove"
    for node in adds:
        ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
        graph.remove(node, safe=True)


def _one_d_positions(graph: ir.Graph) -> None:
    """Every MRoPE row replaced by the text (temporal) row: what 1-D position exports do."""
    rotary = [n for n in graph if n.op_type == "MRotaryEmbedding"]
    assert rotary, "no MRotaryEmbedding found"
    positions = rotary[0].inputs[1]
    index = ir.Value(name="broken/rows", const_value=ir.tensor(np.zeros(3, np.int64), name="broken/rows"),
                     type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([3]))
    graph.register_initializer(index)
    gather = ir.node("Gather", [positions, index], {"axis": 0}, name="broken/one_d_positions")
    for node in rotary:
        node.replace_input_with(1, gather.outputs[0])
    graph.insert_after(positions.producer(), gather)


def _positions_altered(graph: ir.Graph) -> None:
    """The position subgraph's output with its h and w rows exchanged (what a transposed grid does)."""
    positions = next(v for n in graph for v in n.outputs if v.name == "position_ids")
    positions.name = "broken/raw_position_ids"
    index = ir.Value(name="broken/hw_swap", const_value=ir.tensor(np.array([0, 2, 1], np.int64), name="broken/hw_swap"),
                     type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([3]))
    graph.register_initializer(index)
    gather = ir.node("Gather", [positions, index], {"axis": 0}, name="broken/positions_altered")
    ir.convenience.replace_all_uses_with(positions, gather.outputs[0])
    gather.replace_input_with(0, positions)
    gather.outputs[0].name = "position_ids"
    graph.insert_after(positions.producer(), gather)


def _scale_weight(name: str, factor: float = 1.5):
    def mutate(graph: ir.Graph) -> None:
        value = graph.initializers[name]
        scaled = value.const_value.numpy() * np.float32(factor)
        value.const_value = ir.tensor(scaled, name=name)

    return mutate


BREAKERS = {
    "no_deepstack": _drop_deepstack,
    "one_d_positions": _one_d_positions,
    "positions_altered": _positions_altered,
    "decoder_layer_weights": _scale_weight("decoder/layers.1/mlp/down_proj/weight"),
    "vision_layer_weights": _scale_weight("vision/blocks.1/mlp/linear_fc1/weight"),
}


def broken_copy(folder: Path, out: Path, kind: str) -> Path:
    return _copy_with(Path(folder), Path(out), BREAKERS[kind])
