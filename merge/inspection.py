"""``merge inspect``: what a combined folder holds, read from the graph alone.

The graph is loaded with ``onnx.load(..., load_external_data=False)``: weights are never read, so inspecting
an 8B model is as quick as a tiny one. Tensor sizes come from shapes and dtypes, data-file sizes from the
filesystem. No torch, no transformers.

Scopes are the first component of a node or initializer name (``vision/``, ``merge/``, ``decoder/``); what
sits inside a subgraph (the vision tower behind ``vision/if_has_patches``, the branches of the position
``If``) is counted too, and a name without a known scope takes the scope of the node that holds its subgraph.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from . import __version__
from .build import COMBINED_MODEL, MANIFEST, file_sha256
from .errors import MergeError
from .ort_schemas import register_ort_default_domain_ops

log = logging.getLogger(__name__)

SCOPES = ("vision", "merge", "decoder")
OTHER_SCOPE = "other"
from .inspect_cmd import DEFAULT_NETRON_PORT  # noqa: E402  (one definition, in the light module)

DEFAULT_DOMAINS = ("", "ai.onnx")

# com.microsoft MatMulNBits: inputs A, B (packed weight), scales, zero_points, g_idx, bias. B holds K*N
# parameters; scales, zero points and g_idx are quantization metadata (bytes, no parameters).
GATHER_BLOCK_QUANTIZED_OP = ("com.microsoft", "GatherBlockQuantized")
NBITS_OP = ("com.microsoft", "MatMulNBits")
NBITS_WEIGHT_INPUT = 1
NBITS_METADATA_INPUTS = slice(2, 5)
# Rotary tables are buffers, not parameters: the cos/sin cache inputs of ORT's rotary and attention ops, and
# tensors named like Hugging Face's non-persistent rotary buffer.
ROTARY_CACHE_INPUTS = {
    ("com.microsoft", "RotaryEmbedding"): (2, 3),
    ("com.microsoft", "MRotaryEmbedding"): (2, 3),
    ("com.microsoft", "GroupQueryAttention"): (7, 8),
}
DERIVED_BUFFER_SUFFIXES = ("inv_freq",)
TENSOR_KINDS = ("weight", "quantization", "constant")

# The stitch view: the vision If's outputs and every weight become graph inputs; constants of up to this many
# elements (token ids, axes, shapes) keep their values, so the file stays tiny whatever the model's size.
VISION_OUTPUTS = ("vision/image_embeds", "vision/deepstack_embeds")
STITCH_INLINE_MAX_ELEMENTS = 64
DEEPSTACK_PREFIX = "merge/deepstack/"
EMBEDDING_PREFIX = "merge/embedding/"
POSITION_PREFIX = "merge/position/"
DOWN_PROJ_OPS = {"MatMul", "MatMulNBits"}
RESIDUAL_NORM_OP = "SkipSimplifiedLayerNormalization"


# ----------------------------------------------------------------------------------------------- loading


def load_graph(folder: Path) -> onnx.ModelProto:
    """``folder/model.onnx`` without its weights (external data stays on disk)."""
    folder = Path(folder)
    path = folder / COMBINED_MODEL
    if not folder.is_dir():
        raise MergeError(f"{folder}: no {COMBINED_MODEL} (no such folder; expected the --out of `merge build`)")
    if not path.is_file():
        raise MergeError(f"{folder}: no {COMBINED_MODEL} (expected a folder written by `python -m merge build`)")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others; all mean "not a readable model"
        raise MergeError(f"{path}: not a readable ONNX model ({exc})") from exc


def _read_manifest(folder: Path) -> tuple[dict, str]:
    """The manifest and a word about it: "merge.json", "none" or "unreadable (...)"."""
    path = folder / MANIFEST
    if not path.is_file():
        return {}, "none"
    try:
        return json.loads(path.read_text()), MANIFEST
    except (OSError, json.JSONDecodeError) as exc:
        return {}, f"unreadable ({exc})"


# ------------------------------------------------------------------------------------------ graph walks


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def scope_of(name: str, inherited: str | None = None) -> str:
    """``vision``, ``merge`` or ``decoder`` from a name's first component; else the enclosing scope."""
    head = name.split("/", 1)[0]
    if "/" in name and head in SCOPES:
        return head
    return inherited or OTHER_SCOPE


def _walk_nodes(graph: onnx.GraphProto, scope: str | None = None) -> Iterator[tuple[onnx.NodeProto, str]]:
    """Every node with its scope, subgraphs included (depth first)."""
    for node in graph.node:
        node_scope = scope_of(node.name, scope)
        yield node, node_scope
        for sub in _subgraphs(node):
            yield from _walk_nodes(sub, node_scope)


def _walk_initializers(graph: onnx.GraphProto, scope: str | None = None) -> Iterator[tuple[onnx.TensorProto, str]]:
    """Every initializer with its scope, those of subgraphs included."""
    for tensor in graph.initializer:
        yield tensor, scope_of(tensor.name, scope)
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _walk_initializers(sub, scope_of(node.name, scope))


def _outer_references(graph: onnx.GraphProto) -> list[str]:
    """Names a subgraph reads from the scopes around it (nested subgraphs included)."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {name for node in graph.node for name in node.output}
    return _unique(name for node in graph.node for name in _reads(node) if name not in defined)


def _reads(node: onnx.NodeProto) -> list[str]:
    """The names a node reads: its inputs and what its subgraphs take from the enclosing graph."""
    names = [name for name in node.input if name]
    for sub in _subgraphs(node):
        names += _outer_references(sub)
    return _unique(names)


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------ descriptions


def _dtype_name(elem_type: int) -> str:
    dtype = ir.DataType(elem_type)
    if dtype == ir.DataType.UNDEFINED:
        return "?"
    try:
        return dtype.numpy().name
    except (TypeError, ValueError):
        return dtype.name.lower()


def _describe_value(value: onnx.ValueInfoProto) -> dict:
    tensor_type = value.type.tensor_type
    dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in tensor_type.shape.dim]
    return {"name": value.name, "dtype": _dtype_name(tensor_type.elem_type),
            "shape": dims if tensor_type.HasField("shape") else None}


def _elements(tensor: onnx.TensorProto) -> int:
    return math.prod(tensor.dims)


def _stored_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data as stored, from shape and dtype (strings: their bytes)."""
    dtype = ir.DataType(tensor.data_type)
    if dtype.is_string():
        return sum(len(s) for s in tensor.string_data)
    return math.ceil(_elements(tensor) * dtype.bitwidth / 8)


def _external_location(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {entry.key: entry.value for entry in tensor.external_data}.get("location")


# ------------------------------------------------------------------------------------------------ report


def inspect_folder(folder: Path, *, verify_checksums: bool = False) -> dict:
    """What the tables of ``merge inspect`` print, as plain data (JSON-ready)."""
    folder = Path(folder)
    model = load_graph(folder)
    manifest, manifest_status = _read_manifest(folder)
    inputs = [_describe_value(v) for v in model.graph.input]
    outputs = [_describe_value(v) for v in model.graph.output]
    return {
        "folder": str(folder),
        "metadata": _metadata(model, manifest, manifest_status, inputs, outputs),
        "checksums": _checksums(folder, manifest, verify_checksums),
        "inputs": inputs,
        "outputs": outputs,
        "parameters": count_parameters(model.graph),
        "operators": count_operators(model.graph),
        "external_data": _external_data(folder, model.graph),
    }


def _metadata(model: onnx.ModelProto, manifest: dict, manifest_status: str, inputs: list, outputs: list) -> dict:
    props = {p.key: p.value for p in model.metadata_props}

    def field(key: str) -> str | None:
        return manifest.get(key) or props.get(key)

    io_names = [v["name"] for v in (*inputs, *outputs)]
    manifest_names = [v["name"] for v in (*manifest.get("inputs", []), *manifest.get("outputs", []))]
    return {
        "source_model": field("source_model"),
        "precision": field("precision"),
        "tool": field("tool"),
        "tool_version": field("tool_version"),
        "producer": f"{model.producer_name} {model.producer_version}".strip() or None,
        "ir_version": model.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "manifest": manifest_status,
        "manifest_io_matches": (manifest_names == io_names) if manifest else None,
        "special_token_ids": manifest.get("special_token_ids", {}),
    }


def _checksums(folder: Path, manifest: dict, verify: bool) -> dict:
    """The manifest's SHA-256 list; with ``verify``, each file hashed (streamed) and compared."""
    listed = manifest.get("checksums", {})
    files = []
    for name, expected in sorted(listed.items()):
        path = folder / name
        if not path.is_file():
            status = "missing"
        elif not verify:
            status = "not verified"
        else:
            log.info("hashing %s", path)
            status = "ok" if file_sha256(path) == expected else "MISMATCH"
        files.append({"file": name, "sha256": expected, "status": status})
    model_files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in (".onnx", ".data"))
    return {
        "verified": verify,
        "files": files,
        "unlisted": [name for name in model_files if name not in listed],
        "ok": all(f["status"] in ("ok", "not verified") for f in files),
    }


def classify_initializers(graph: onnx.GraphProto) -> dict[str, tuple[str, int]]:
    """Each initializer's kind and parameter count: ``{name: (kind, parameters)}``.

    Kinds: ``weight`` (checkpoint weights: floating-point tensors, and int4 ``MatMulNBits`` weights, which
    count K*N, the matrix they stand for), ``quantization`` (their scales, zero points, g_idx: no parameters)
    and ``constant`` (no parameters, as PyTorch's buffers: rotary tables, whether read by ORT's rotary and
    attention ops as cos/sin caches or named ``inv_freq`` as in Hugging Face; scalars; integer tensors such
    as axes, shapes, token ids). Found by the ops that read them, except ``inv_freq``.
    """
    nbits_parameters: dict[str, int] = {}
    packed_tables: dict[str, int] = {}  # initializer name -> values per byte
    quant_metadata: set[str] = set()
    rotary_tables: set[str] = set()
    for node, _ in _walk_nodes(graph):
        key = (node.domain, node.op_type)
        if key == NBITS_OP:
            attrs = {a.name: a.i for a in node.attribute}
            nbits_parameters[node.input[NBITS_WEIGHT_INPUT]] = attrs["K"] * attrs["N"]
            quant_metadata.update(name for name in node.input[NBITS_METADATA_INPUTS] if name)
        elif key == GATHER_BLOCK_QUANTIZED_OP:  # a 4-bit table: [rows, cols / 2] bytes stand for rows x cols
            packed_tables[node.input[0]] = 8 // next((a.i for a in node.attribute if a.name == "bits"), 4)
            quant_metadata.update(name for name in node.input[2:] if name)
        elif key in ROTARY_CACHE_INPUTS:
            rotary_tables.update(node.input[i] for i in ROTARY_CACHE_INPUTS[key] if i < len(node.input))

    kinds: dict[str, tuple[str, int]] = {}
    for tensor, _ in _walk_initializers(graph):
        name = tensor.name
        if name in nbits_parameters:
            kinds[name] = ("weight", nbits_parameters[name])
        elif name in packed_tables:
            kinds[name] = ("weight", _elements(tensor) * packed_tables[name])
        elif name in quant_metadata:
            kinds[name] = ("quantization", 0)
        elif (name in rotary_tables or name.rsplit("/", 1)[-1].endswith(DERIVED_BUFFER_SUFFIXES)
              or not tensor.dims or not ir.DataType(tensor.data_type).is_floating_point()):
            kinds[name] = ("constant", 0)
        else:
            kinds[name] = ("weight", _elements(tensor))
    return kinds


def count_parameters(graph: onnx.GraphProto) -> dict:
    """Initializers per scope: tensors, parameters, and stored bytes by kind (see :func:`classify_initializers`),
    plus the total."""
    kinds = classify_initializers(graph)

    def empty() -> dict:
        return {"tensors": 0, "parameters": 0, "bytes": 0, "bytes_by_kind": dict.fromkeys(TENSOR_KINDS, 0)}

    rows = {scope: empty() for scope in (*SCOPES, OTHER_SCOPE)}
    for tensor, scope in _walk_initializers(graph):
        kind, parameters = kinds[tensor.name]
        size = _stored_bytes(tensor)
        row = rows[scope]
        row["tensors"] += 1
        row["parameters"] += parameters
        row["bytes"] += size
        row["bytes_by_kind"][kind] += size
    if not rows[OTHER_SCOPE]["tensors"]:
        del rows[OTHER_SCOPE]
    total = empty()
    for row in rows.values():
        for key in ("tensors", "parameters", "bytes"):
            total[key] += row[key]
        for kind in TENSOR_KINDS:
            total["bytes_by_kind"][kind] += row["bytes_by_kind"][kind]
    return {"scopes": rows, "total": total}


def _op_name(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"


def count_operators(graph: onnx.GraphProto) -> dict:
    """Node counts by operator (``domain.op`` outside the default domain), overall and per scope."""
    per_scope: dict[str, Counter] = defaultdict(Counter)
    for node, scope in _walk_nodes(graph):
        per_scope[scope][_op_name(node)] += 1
    overall: Counter = Counter()
    for counts in per_scope.values():
        overall.update(counts)

    def ordered(counts: Counter) -> dict[str, int]:
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    scopes = [s for s in (*SCOPES, OTHER_SCOPE) if s in per_scope]
    return {"overall": ordered(overall), "per_scope": {s: ordered(per_scope[s]) for s in scopes},
            "nodes": sum(overall.values())}


def _external_data(folder: Path, graph: onnx.GraphProto) -> dict:
    """Each external data file (size on disk, tensors referencing it) and what model.onnx holds inline."""
    referencing: Counter = Counter()
    inline = 0
    for tensor, _ in _walk_initializers(graph):
        location = _external_location(tensor)
        if location is None:
            inline += 1
        else:
            referencing[location] += 1
    files = []
    for location, count in sorted(referencing.items()):
        path = folder / location
        files.append({"file": location, "exists": path.is_file(),
                      "bytes": path.stat().st_size if path.is_file() else None, "tensors": count})
    model_path = folder / COMBINED_MODEL
    return {"files": files, "model_file": {"file": COMBINED_MODEL, "bytes": model_path.stat().st_size,
                                           "inline_tensors": inline}}


# ---------------------------------------------------------------------------------------------- tables


def _human_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _table(headers: list[str], rows: list[list[str]], right: Iterable[int] = ()) -> list[str]:
    right = set(right)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return ("  " + "  ".join(padded)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _shape_text(shape: list | None) -> str:
    return "?" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def format_report(data: dict) -> str:
    """The plain-text tables of ``merge inspect``."""
    meta, sums = data["metadata"], data["checksums"]
    lines = [f"combined model: {data['folder']}"]
    tool = " ".join(str(x) for x in (meta["tool"], meta["tool_version"]) if x) or "-"
    if sums["files"]:
        statuses = Counter(f["status"] for f in sums["files"])
        checksum_text = f"SHA-256 of {len(sums['files'])} files in the manifest: " + ", ".join(
            f"{n} {status}" for status, n in statuses.items())
        if not sums["verified"]:
            checksum_text += " (--check-checksums)"
    else:
        checksum_text = "none listed"
    if sums["unlisted"]:
        checksum_text += f"; not in the manifest: {', '.join(sums['unlisted'])}"
    fields = [
        ("source model", meta["source_model"]),
        ("precision", meta["precision"]),
        ("tool", tool),
        ("producer", meta["producer"]),
        ("IR version", meta["ir_version"]),
        ("opsets", ", ".join(f"{d} {v}" for d, v in meta["opsets"].items())),
        ("manifest", meta["manifest"] + ("" if meta["manifest_io_matches"] in (None, True)
                                         else " (its inputs/outputs differ from the graph's)")),
        ("checksums", checksum_text),
    ]
    lines += [f"  {key:13s} {value if value is not None else '-'}" for key, value in fields]
    for failed in (f for f in sums["files"] if f["status"] not in ("ok", "not verified")):
        lines.append(f"  {'':13s} {failed['file']}: {failed['status']}")

    for title, values in (("inputs", data["inputs"]), ("outputs", data["outputs"])):
        lines += ["", f"{title} ({len(values)})"]
        lines += _table(["name", "dtype", "shape"], [[v["name"], v["dtype"], _shape_text(v["shape"])] for v in values])

    params = data["parameters"]
    total = params["total"]

    def share(row: dict) -> str:
        return f"{100 * row['bytes'] / total['bytes']:.1f}%" if total["bytes"] else "-"

    def param_row(scope: str, row: dict) -> list[str]:
        kinds = row["bytes_by_kind"]
        return [scope, str(row["tensors"]), f"{row['parameters']:,}", _human_bytes(row["bytes"]), share(row),
                *(_human_bytes(kinds[kind]) for kind in TENSOR_KINDS)]

    rows = [param_row(scope, row) for scope, row in params["scopes"].items()]
    rows.append(param_row("total", total))
    lines += ["", "parameters by scope (bytes as stored)"]
    lines += _table(["scope", "tensors", "parameters", "bytes", "share", "weights", "quant.", "constants"], rows,
                    right=range(1, 8))
    lines.append("  (an int4 MatMulNBits weight counts K*N parameters; constants: rotary tables, scalars, integers)")

    ops = data["operators"]
    scopes = list(ops["per_scope"])
    rows = [[op, str(count), *(str(ops["per_scope"][s].get(op, "")) for s in scopes)]
            for op, count in ops["overall"].items()]
    rows.append(["total", str(ops["nodes"]), *(str(sum(ops["per_scope"][s].values())) for s in scopes)])
    lines += ["", "operators (nodes inside If branches included)"]
    lines += _table(["op", "all", *scopes], rows, right=range(1, 2 + len(scopes)))

    ext = data["external_data"]
    rows = [[f["file"], _human_bytes(f["bytes"]) if f["exists"] else "MISSING", str(f["tensors"])]
            for f in ext["files"]]
    model_file = ext["model_file"]
    rows.append([f"{model_file['file']} (inline)", _human_bytes(model_file["bytes"]),
                 str(model_file["inline_tensors"])])
    lines += ["", "data files"]
    lines += _table(["file", "size", "tensors"], rows, right=(1, 2))
    if "stitch_view" in data:
        view = data["stitch_view"]
        lines += ["", f"stitch view: {view['path']} ({view['nodes']} nodes, {_human_bytes(view['bytes'])})"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- stitch view


def write_stitch_view(folder: Path, out: Path) -> Path:
    """Write a small weightless ONNX graph of the stitch region to ``out`` (for Netron) and return ``out``.

    It holds every ``merge/*`` node (embedding merge, DeepStack Adds, position subgraph, padding), and as context
    the decoder nodes around them: the down projection feeding each DeepStack Add, the normalization reading
    it, and the nodes reading the merged embeddings. The vision ``If`` is cut off: its outputs are graph inputs.
    Every weight is a graph input; only constants of at most 64 elements (ids, axes, shapes) keep values.
    """
    folder, out = Path(folder), Path(out)
    view = build_stitch_view(load_graph(folder), str(folder))
    register_ort_default_domain_ops()
    try:
        onnx.checker.check_model(view)
    except onnx.checker.ValidationError as exc:
        raise MergeError(f"{folder}: the stitch view fails the ONNX checker: {exc}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(view, str(out))
    log.debug("stitch view: %s (%d nodes, %d bytes)", out, len(view.graph.node), out.stat().st_size)
    return out


def _select_stitch_nodes(graph: onnx.GraphProto, where: str) -> list[int]:
    """Indices (in graph order) of the merge nodes and their decoder context."""
    producers = {name: i for i, node in enumerate(graph.node) for name in node.output if name}
    consumers: dict[str, list[int]] = defaultdict(list)
    for i, node in enumerate(graph.node):
        for name in _reads(node):
            consumers[name].append(i)

    merge = [i for i, node in enumerate(graph.node) if scope_of(node.name) == "merge"]
    names = [graph.node[i].name for i in merge]
    if not any(n.startswith(EMBEDDING_PREFIX) for n in names) or not any(n.startswith(POSITION_PREFIX) for n in names):
        raise MergeError(f"{where}: no {EMBEDDING_PREFIX}* or {POSITION_PREFIX}* nodes; "
                         "not a combined model written by `python -m merge build`")

    def decoder(indices: Iterable[int]) -> list[int]:
        return [i for i in indices if scope_of(graph.node[i].name) == "decoder"]

    context: list[int] = []
    for i in merge:
        node = graph.node[i]
        if node.name.startswith(DEEPSTACK_PREFIX):
            # the residual point: the down projection it adds to, the normalization that reads the sum
            feeding = decoder(producers[name] for name in node.input if name in producers)
            reading = decoder(c for name in node.output for c in consumers[name])
            ops = {graph.node[j].op_type for j in (*feeding, *reading)}
            if not ops & DOWN_PROJ_OPS or RESIDUAL_NORM_OP not in ops:
                log.warning("%s: DeepStack %s is not between a down projection and a %s (found %s)", where,
                            node.name, RESIDUAL_NORM_OP, ", ".join(sorted(ops)) or "no decoder nodes")
            context += feeding + reading
        elif node.name.startswith(EMBEDDING_PREFIX):
            context += decoder(c for name in node.output for c in consumers[name])
    return sorted(set(merge) | set(context))


def _value_info(name: str, elem_type: int, dims: Iterable[int | str]) -> onnx.ValueInfoProto:
    value = onnx.ValueInfoProto(name=name)
    tensor_type = value.type.tensor_type
    tensor_type.elem_type = elem_type
    tensor_type.shape.SetInParent()
    for d in dims:
        dim = tensor_type.shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d
    return value


def build_stitch_view(model: onnx.ModelProto, where: str = "model") -> onnx.ModelProto:
    """The weightless stitch-region model (see :func:`write_stitch_view`); ``model`` is left untouched."""
    graph = model.graph
    keep = _select_stitch_nodes(graph, where)
    nodes = [graph.node[i] for i in keep]

    types = _value_types(model)
    initializers = {t.name: t for t in graph.initializer}
    kinds = classify_initializers(graph)

    produced = {name for node in nodes for name in node.output if name}
    view = onnx.ModelProto(ir_version=model.ir_version, producer_name="qwen3vl-merge inspect --stitch",
                           producer_version=__version__)
    view.opset_import.extend(model.opset_import)
    view.metadata_props.extend(model.metadata_props)
    view.doc_string = ("Stitch region of a qwen3vl-merge combined model, without weights: every weight and the "
                       "vision tower's outputs are graph inputs.")
    out_graph = view.graph
    out_graph.name = "stitch_view"
    out_graph.node.extend(nodes)

    for name in _unique(name for node in nodes for name in _reads(node) if name not in produced):
        tensor = initializers.get(name)
        if tensor is None:
            if not _has_shape(types.get(name)):
                raise MergeError(f"{where}: no type and shape for {name!r}, which the stitch region reads")
            out_graph.input.append(onnx.ValueInfoProto(name=name, type=types[name]))
        elif (kinds[name][0] == "constant" and _elements(tensor) <= STITCH_INLINE_MAX_ELEMENTS
              and _external_location(tensor) is None):
            out_graph.initializer.append(tensor)
        else:
            out_graph.input.append(_value_info(name, tensor.data_type, tensor.dims))

    missing = [name for name in VISION_OUTPUTS if name not in {v.name for v in out_graph.input}]
    if missing:
        raise MergeError(f"{where}: the stitch region does not read the vision outputs {', '.join(missing)}; "
                         "not a combined model written by `python -m merge build`")

    kept = set(keep)
    read_outside = {name for i, node in enumerate(graph.node) if i not in kept for name in _reads(node)}
    read_outside |= {v.name for v in graph.output}
    for name in _unique(name for node in nodes for name in node.output if name in read_outside):
        if _has_shape(types.get(name)):
            out_graph.output.append(onnx.ValueInfoProto(name=name, type=types[name]))
        else:
            log.debug("stitch view: %s has no known type and shape; left out of the outputs", name)
    outputs = {v.name for v in out_graph.output}
    out_graph.value_info.extend(onnx.ValueInfoProto(name=name, type=types[name]) for name in _unique(
        name for node in nodes for name in node.output if name in types and name not in outputs))
    return view


def _has_shape(value_type: onnx.TypeProto | None) -> bool:
    """Graph inputs and outputs need an element type and a shape (the checker insists)."""
    return (value_type is not None and value_type.HasField("tensor_type")
            and value_type.tensor_type.elem_type != onnx.TensorProto.UNDEFINED
            and value_type.tensor_type.HasField("shape"))


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Types of the main graph's values: declared ones, completed by ONNX shape inference (the graph alone,
    no weights; ORT's own ops stay untyped there) and, for an If's outputs, by its then-branch."""
    types: dict[str, onnx.TypeProto] = {}
    for node in model.graph.node:
        if node.op_type == "If":
            branch = next(a.g for a in node.attribute if a.name == "then_branch")
            types.update({name: out.type for name, out in zip(node.output, branch.output, strict=False)})
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception as exc:  # inference is a bonus: declared types still describe most values
        log.debug("shape inference failed (%s); using the declared types only", exc)
        inferred = model.graph
    for value in (*inferred.value_info, *model.graph.value_info, *model.graph.input, *model.graph.output):
        if _has_shape(value.type) or value.name not in types:
            types[value.name] = value.type
    return types


# ------------------------------------------------------------------------------------------------ netron


def _import_netron():
    try:
        import netron
    except ImportError as exc:
        raise MergeError("--netron needs the netron package, which is not installed: pip install netron") from exc
    return netron


def serve_netron(path: Path, port: int = DEFAULT_NETRON_PORT) -> tuple[str, int]:
    """Serve ``path`` with Netron on localhost:``port`` (no browser is opened); returns the address."""
    netron = _import_netron()
    address = netron.start(str(path), address=("localhost", port), browse=False)
    return tuple(address) if address else ("localhost", port)


def _wait_for_netron() -> None:
    """Block until Ctrl-C; Netron's own ``wait`` stops its servers then."""
    _import_netron().wait()


# ------------------------------------------------------------------------------------------------- CLI


def run(args: argparse.Namespace) -> int:
    """``merge inspect`` (see :mod:`merge.inspect_cmd` for the options)."""
    folder = Path(args.combined)
    if args.netron:
        _import_netron()  # a missing optional package is reported before any work
    data = inspect_folder(folder, verify_checksums=args.check_checksums)
    if args.stitch:
        path = write_stitch_view(folder, Path(args.stitch))
        view = onnx.load(str(path))
        data["stitch_view"] = {"path": str(path), "nodes": len(view.graph.node), "bytes": path.stat().st_size}
    print(json.dumps(data, indent=2) if args.json else format_report(data))
    if args.netron:
        served = Path(args.stitch) if args.stitch else folder / COMBINED_MODEL
        host, port = serve_netron(served, args.port)
        print(f"Netron: http://{host}:{port} serving {served} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        _wait_for_netron()
    return 1 if args.check_checksums and not data["checksums"]["ok"] else 0
