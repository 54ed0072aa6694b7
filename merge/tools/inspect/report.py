"""``merge inspect``'s report: metadata, I/O, parameters and bytes per scope, operators, data files.

Read from the graph alone (:mod:`.walk`): no weight is loaded, no torch, no transformers.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from pathlib import Path

import onnx

from merge.contract.folder import CombinedFolder
from merge.contract.names import DATA_FILE, MANIFEST_FILE, MODEL_FILE, MOE_OPS, SCOPES
from merge.errors import printable
from merge.tools.tables import format_table, human_bytes

from .walk import (
    DEFAULT_DOMAINS,
    OTHER_SCOPE,
    QMOE_WEIGHT_INPUTS,
    TENSOR_KINDS,
    classify_initializers,
    describe_value,
    external_location,
    load_graph,
    stored_bytes,
    walk_initializers,
    walk_nodes,
)

log = logging.getLogger(__name__)


def inspect_folder(folder: Path, *, verify_checksums: bool = False) -> dict:
    """What the tables of ``merge inspect`` print, as plain data (JSON-ready)."""
    combined = folder if isinstance(folder, CombinedFolder) else CombinedFolder.open(folder)
    model = load_graph(combined)
    manifest = combined.manifest.to_json()
    inputs = [describe_value(v) for v in model.graph.input]
    outputs = [describe_value(v) for v in model.graph.output]
    folder = combined.path
    return {
        "folder": str(folder),
        "metadata": _metadata(model, manifest, inputs, outputs),
        "checksums": _checksums(combined, verify_checksums),
        "inputs": inputs,
        "outputs": outputs,
        "parameters": count_parameters(model.graph),
        "experts": count_experts(model.graph),
        "operators": count_operators(model.graph),
        "external_data": _external_data(combined, model.graph),
    }


def _metadata(model: onnx.ModelProto, manifest: dict, inputs: list, outputs: list) -> dict:
    props = {p.key: p.value for p in model.metadata_props}

    def field(key: str) -> str | None:
        return manifest.get(key) or props.get(key)

    io_names = [v["name"] for v in (*inputs, *outputs)]
    manifest_names = [v["name"] for v in (*manifest.get("inputs", []), *manifest.get("outputs", []))]
    return {
        "source_model": field("source_model"),
        "precision": field("precision"),
        "kv_cache": manifest.get("kv_cache") or ("float32" if manifest else None),  # folders before it: float32
        "tool": field("tool"),
        "tool_version": field("tool_version"),
        "producer": f"{model.producer_name} {model.producer_version}".strip() or None,
        "ir_version": model.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "manifest": "merge.json",
        "manifest_io_matches": manifest_names == io_names,
        "special_token_ids": manifest.get("special_token_ids", {}),
    }


def _checksums(combined: CombinedFolder, verify: bool) -> dict:
    """The manifest's SHA-256 list; with ``verify``, the model files hashed (from what the loader holds) and
    compared, and any file the manifest does not list reported."""
    listed = combined.manifest.checksums
    held = {**combined.files, MODEL_FILE: combined.model_bytes,
            DATA_FILE: combined.data if combined.data is not None else b""}
    files = []
    for name, expected in sorted(listed.items()):
        if not verify:
            status = "not verified"
        else:
            log.info("hashing %s", combined.path / name)
            status = "ok" if name in held and hashlib.sha256(held[name]).hexdigest() == expected else "MISMATCH"
        files.append({"file": name, "sha256": expected, "status": status})
    if verify:  # files read that the manifest has no checksum for (a folder built before the preprocessing had them)
        files += [{"file": name, "sha256": None, "status": "NO CHECKSUM"} for name in sorted(set(held) - set(listed))]
    known = {MANIFEST_FILE, *combined.manifest.parts.values(), *combined.manifest.preprocessing_files}
    unlisted = sorted(p.name for p in combined.path.iterdir() if p.name not in known and not p.name.startswith("."))
    return {
        "verified": verify,
        "files": files,
        "unlisted": unlisted,
        "ok": all(f["status"] in ("ok", "not verified") for f in files) and not (verify and unlisted),
    }


def count_parameters(graph: onnx.GraphProto) -> dict:
    """Initializers per scope: tensors, parameters, and stored bytes by kind (see :func:`classify_initializers`),
    plus the total."""
    kinds = classify_initializers(graph)

    def empty() -> dict:
        return {"tensors": 0, "parameters": 0, "bytes": 0, "bytes_by_kind": dict.fromkeys(TENSOR_KINDS, 0)}

    rows = {scope: empty() for scope in (*SCOPES, OTHER_SCOPE)}
    for tensor, scope in walk_initializers(graph):
        kind, parameters = kinds[tensor.name]
        size = stored_bytes(tensor)
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


def count_experts(graph: onnx.GraphProto) -> dict | None:
    """Qwen3-VL-MoE's experts (``MoE`` / ``QMoE`` nodes), or None for a dense model: the sparse layers, experts per
    layer and per token, parameters of the experts (one expert's, all) and of the routers, and the decoder's
    parameters with those a token uses: every parameter but the experts it is not routed to
    (``decoder - experts * (1 - k / E)``)."""
    kinds = classify_initializers(graph)
    dims = {t.name: list(t.dims) for t, _ in walk_initializers(graph)}
    layers = []
    for node, scope in walk_nodes(graph):
        if (node.domain, node.op_type) not in MOE_OPS:
            continue
        attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
        stacks = [node.input[i] for i in QMOE_WEIGHT_INPUTS if i < len(node.input) and node.input[i]] \
            if node.op_type == "QMoE" else [name for name in node.input[2:] if name]
        experts = dims[stacks[0]][0]
        layer = node.name.rsplit("/mlp/", 1)[0]
        router = sum(parameters for name, (kind, parameters) in kinds.items()
                     if name.startswith(f"{layer}/mlp/router/") and kind == "weight")
        layers.append({"layer": layer, "scope": scope, "experts": int(experts), "top_k": attrs.get("k", 1),
                       "expert_parameters": sum(kinds[name][1] for name in stacks if name in kinds),
                       "router_parameters": router})
    if not layers:
        return None
    decoder = count_parameters(graph)["scopes"].get("decoder", {}).get("parameters", 0)
    experts = sum(row["expert_parameters"] for row in layers)
    inactive = sum(row["expert_parameters"] * (1 - row["top_k"] / row["experts"]) for row in layers)
    return {
        "sparse_layers": [row["layer"] for row in layers],
        "experts_per_layer": sorted({row["experts"] for row in layers}),
        "experts_per_token": sorted({row["top_k"] for row in layers}),
        "expert_parameters": experts,
        "one_expert_parameters": layers[0]["expert_parameters"] // layers[0]["experts"],
        "router_parameters": sum(row["router_parameters"] for row in layers),
        "decoder_parameters": decoder,
        "decoder_active_parameters": round(decoder - inactive),
    }


def _op_name(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"


def count_operators(graph: onnx.GraphProto) -> dict:
    """Node counts by operator (``domain.op`` outside the default domain), overall and per scope."""
    per_scope: dict[str, Counter] = defaultdict(Counter)
    for node, scope in walk_nodes(graph):
        per_scope[scope][_op_name(node)] += 1
    overall: Counter = Counter()
    for counts in per_scope.values():
        overall.update(counts)

    def ordered(counts: Counter) -> dict[str, int]:
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    scopes = [s for s in (*SCOPES, OTHER_SCOPE) if s in per_scope]
    return {"overall": ordered(overall), "per_scope": {s: ordered(per_scope[s]) for s in scopes},
            "nodes": sum(overall.values())}


def _external_data(combined: CombinedFolder, graph: onnx.GraphProto) -> dict:
    """Each external data file (size on disk, tensors referencing it) and what model.onnx holds inline."""
    referencing: Counter = Counter()
    inline = 0
    for tensor, _ in walk_initializers(graph):
        location = external_location(tensor)
        if location is None:
            inline += 1
        else:
            referencing[location] += 1
    # the loader admits one data file, inside the folder, and holds it: sizes come from what it holds
    data_size = len(combined.data) if combined.data is not None else 0
    files = [{"file": location, "exists": location == DATA_FILE, "bytes": data_size if location == DATA_FILE else None,
              "tensors": count} for location, count in sorted(referencing.items())]
    return {"files": files, "model_file": {"file": MODEL_FILE, "bytes": len(combined.model_bytes),
                                           "inline_tensors": inline}}


def _shape_text(shape: list | None) -> str:
    return "?" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def _printable(value):
    """Every string in ``value`` (keys too) with its control characters escaped: a folder's names and metadata are
    untrusted, and a terminal would act on an escape sequence in them."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    return value


def _experts_lines(moe: dict) -> list[str]:
    def listed(values: list) -> str:
        return "/".join(str(v) for v in values)

    layers = [name.rsplit("layers.", 1)[-1] for name in moe["sparse_layers"]]
    decoder, active = moe["decoder_parameters"], moe["decoder_active_parameters"]
    rows = [
        [f"experts ({listed(moe['experts_per_layer'])} per layer)", f"{moe['expert_parameters']:,}"],
        ["one expert", f"{moe['one_expert_parameters']:,}"],
        ["routers", f"{moe['router_parameters']:,}"],
        ["decoder", f"{decoder:,}"],
        [f"decoder, active per token ({listed(moe['experts_per_token'])} experts)",
         f"{active:,} ({100 * active / decoder:.1f}%)" if decoder else f"{active:,}"],
    ]
    return [f"mixture of experts: {len(layers)} sparse layers ({', '.join(layers)})",
            *format_table(["what", "parameters"], rows, right=(1,))]


def format_report(data: dict) -> str:
    """The plain-text tables of ``merge inspect`` (control characters in what the folder says escaped)."""
    data = _printable(data)
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
        ("KV cache", meta["kv_cache"]),
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
        rows = [[v["name"], v["dtype"], _shape_text(v["shape"])] for v in values]
        lines += format_table(["name", "dtype", "shape"], rows)

    params = data["parameters"]
    total = params["total"]

    def share(row: dict) -> str:
        return f"{100 * row['bytes'] / total['bytes']:.1f}%" if total["bytes"] else "-"

    def param_row(scope: str, row: dict) -> list[str]:
        kinds = row["bytes_by_kind"]
        return [scope, str(row["tensors"]), f"{row['parameters']:,}", human_bytes(row["bytes"]), share(row),
                *(human_bytes(kinds[kind]) for kind in TENSOR_KINDS)]

    rows = [param_row(scope, row) for scope, row in params["scopes"].items()]
    rows.append(param_row("total", total))
    lines += ["", "parameters by scope (bytes as stored)"]
    lines += format_table(["scope", "tensors", "parameters", "bytes", "share", "weights", "quant.", "constants"], rows,
                    right=range(1, 8))
    lines.append("  (an int4 MatMulNBits weight counts K*N parameters; constants: rotary tables, scalars, integers)")
    if data.get("experts"):
        lines += ["", *_experts_lines(data["experts"])]

    ops = data["operators"]
    scopes = list(ops["per_scope"])
    rows = [[op, str(count), *(str(ops["per_scope"][s].get(op, "")) for s in scopes)]
            for op, count in ops["overall"].items()]
    rows.append(["total", str(ops["nodes"]), *(str(sum(ops["per_scope"][s].values())) for s in scopes)])
    lines += ["", "operators (nodes inside If branches included)"]
    lines += format_table(["op", "all", *scopes], rows, right=range(1, 2 + len(scopes)))

    ext = data["external_data"]
    rows = [[f["file"], human_bytes(f["bytes"]) if f["exists"] else "MISSING", str(f["tensors"])]
            for f in ext["files"]]
    model_file = ext["model_file"]
    rows.append([f"{model_file['file']} (inline)", human_bytes(model_file["bytes"]),
                 str(model_file["inline_tensors"])])
    lines += ["", "data files"]
    lines += format_table(["file", "size", "tensors"], rows, right=(1, 2))
    if "stitch_view" in data:
        view = data["stitch_view"]
        lines += ["", f"stitch view: {view['path']} ({view['nodes']} nodes, {human_bytes(view['bytes'])})"]
    return "\n".join(lines)
