"""``merge build``: export the parts, stitch them, and write one self-contained folder."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from . import __version__
from .errors import MergeError
from .ort_schemas import register_ort_default_domain_ops
from .outdir import staged_output
from .progress import tensor_writing_bar
from .sources import ModelSource

log = logging.getLogger(__name__)

# Files copied from the checkpoint so that the same preprocessing loads from the output folder alone.
PREPROCESSING_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
)
MANIFEST = "merge.json"
COMBINED_MODEL = "model.onnx"
COMBINED_DATA = "model.onnx.data"
PRECISIONS = ("fp32", "int4")
INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4
TEXT_PREFIXES = ("model.language_model.", "model.", "language_model.model.")


@dataclass
class BuildResult:
    out: Path
    parts: dict[str, str]
    seconds: float = 0.0
    peak_rss_gib: float = 0.0  # this process: vision graph, stitch, quantization, writing
    export_peak_rss_gib: float = 0.0  # the decoder export's child process (the GenAI builder)
    check_peak_rss_gib: float = 0.0  # the final check's child process (ONNX Runtime loads every weight)


def peak_rss_gib() -> tuple[float, float]:
    """Peak resident memory of this process and of its finished children, in GiB (Linux: ru_maxrss in KiB)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return own / 1024**2, children / 1024**2


def build(source: ModelSource, out: Path, *, precision: str = "fp32", force: bool = False) -> BuildResult:
    """Build ``out``: one ``model.onnx`` (+ ``model.onnx.data``), preprocessing files and ``merge.json``."""
    if precision not in PRECISIONS:
        raise MergeError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    start = time.perf_counter()
    with staged_output(out, force) as stage:
        work = stage / ".work"
        model = assemble(source, precision, work)
        log.info("writing %s (weights streamed into %s)", COMBINED_MODEL, COMBINED_DATA)
        with tensor_writing_bar(f"writing {COMBINED_DATA}") as callback:
            ir.save(model, stage / COMBINED_MODEL, external_data=COMBINED_DATA, callback=callback)
        layout = model.metadata_props.get("embedding_table", "")
        del model
        shutil.rmtree(work)
        copied = copy_preprocessing(source.folder, stage)
        export_peak = peak_rss_gib()[1]  # only the builder's child has finished so far
        check_peak = check_onnx_in_child(stage / COMBINED_MODEL)
        parts = {"model": COMBINED_MODEL, "data": COMBINED_DATA}
        write_manifest(stage, source, precision, parts, copied, layout)
    return BuildResult(out=Path(out), parts=parts, seconds=time.perf_counter() - start,
                       peak_rss_gib=peak_rss_gib()[0], export_peak_rss_gib=export_peak, check_peak_rss_gib=check_peak)


def assemble(source: ModelSource, precision: str, work: Path) -> ir.Model:
    """Export the parts and stitch them; the returned model's weights are still lazy."""
    from export.text import export_decoder
    from export.vision import build_vision_model
    from export.vision_spec import VisionSpec
    from graphs.embedding_merge import build_embedding_merge
    from graphs.rope_index import build_rope_index

    from .stitch import OPSET, Parts, StitchSpec, stitch

    vision_spec = VisionSpec.from_config(source.vision_config)
    spec = StitchSpec.from_config(source.config)
    log.info("vision part: building the graph from %s", source.folder)
    vision = build_vision_model(source.folder, source.vision_config)
    log.info("decoder: running the ONNX Runtime GenAI model builder (fp32)")
    decoder_path = export_decoder(source.folder, work / "decoder", precision="fp32", cache_dir=work / "cache",
                                  isolated=True)
    decoder = ir.load(decoder_path)
    if precision == "int4":
        from .quantize import quantize_matmuls_int4

        count = quantize_matmuls_int4(decoder, block_size=INT4_BLOCK_SIZE, accuracy_level=INT4_ACCURACY_LEVEL,
                                      symmetric=True)
        log.info("decoder: %d MatMuls to int4 (MatMulNBits, block %d), quantized while writing", count,
                 INT4_BLOCK_SIZE)

    table, layout, scales = embedding_table(source, decoder, precision)
    parts = Parts(
        decoder=decoder,
        vision=vision,
        embedding_merge=build_embedding_merge(spec.image_token_id, spec.hidden_size, spec.num_levels,
                                              prefix="merge/embedding/", table_layout=layout,
                                              block_size=INT4_BLOCK_SIZE),
        rope_index=build_rope_index(spec.image_token_id, spec.spatial_merge_size, opset=OPSET,
                                    prefix="merge/position/"),
        embed_tokens=table,
        embed_scales=scales,
    )
    metadata = {
        "source_model": source.spec,
        "precision": precision,
        "tool": "qwen3vl-merge",
        "tool_version": __version__,
        "image_token_id": str(spec.image_token_id),
        "embedding_table": layout,
    }
    return stitch(parts, spec, vision_spec.patch_dim, metadata)


def embedding_table(source: ModelSource, decoder: ir.Model, precision: str) -> tuple[ir.Value, str, ir.Value | None]:
    """The token embedding table for the embedding merge: (table, layout, int4 scales or None).

    A tied model's head weight *is* the embedding table: in fp32 the merge gathers columns of the head's
    [hidden, vocab] weight; in int4 it reads the head's own 4-bit blocks with GatherBlockQuantized. Either way
    the table is not stored a second time. Otherwise (untied) it is read lazily from the checkpoint.
    """
    from export.checkpoint import Checkpoint
    from graphs.builder import FLOAT

    hidden = int(source.text_config["hidden_size"])
    if source.config.get("tie_word_embeddings"):
        if precision == "fp32" and (head := tied_head_weight(decoder, hidden)) is not None:
            return head, "hidden_major", None
        if precision == "int4" and (blocks := tied_head_int4_blocks(decoder, hidden)) is not None:
            data, scales = blocks
            return data, "int4_blocks", scales
        log.warning("tied embeddings, but the decoder's head weight was not found; storing the table twice")
    ckpt = Checkpoint(source.folder)
    name = ckpt.find_prefix(TEXT_PREFIXES, "embed_tokens.weight") + "embed_tokens.weight"
    shape = ir.Shape(list(ckpt.shape(name)))
    table = ir.Value(name="merge/embedding/embed_tokens", type=ir.TensorType(FLOAT), shape=shape)
    table.const_value = ir.LazyTensor(lambda: ir.tensor(ckpt.load(name), name=table.name), FLOAT, shape,
                                      name=table.name)
    return table, "vocab_major", None


def _head_node(decoder: ir.Model) -> ir.Node | None:
    """The node that produces the decoder's ``logits`` (the head)."""
    logits = next((v for v in decoder.graph.outputs if v.name == "logits"), None)
    return logits.producer() if logits is not None else None


def tied_head_int4_blocks(decoder: ir.Model, hidden: int) -> tuple[ir.Value, ir.Value] | None:
    """A tied int4 head's 4-bit blocks as GatherBlockQuantized reads them: (uint8 [vocab, hidden/2], scales
    [vocab, hidden/block]). Only for the symmetric layout without padding that merge build writes."""
    node = _head_node(decoder)
    if node is None or node.op_type != "MatMulNBits" or (len(node.inputs) > 3 and node.inputs[3] is not None):
        return None
    attrs = {k: a.value for k, a in node.attributes.items()}
    weight, scales = node.inputs[1], node.inputs[2]
    if attrs.get("bits") != 4 or attrs.get("K") != hidden or hidden % attrs.get("block_size", hidden + 1):
        return None
    vocab, blocks = int(attrs["N"]), hidden // int(attrs["block_size"])
    if scales.shape is None or list(scales.shape) != [vocab, blocks]:
        return None
    shape = ir.Shape([vocab, hidden // 2])
    data = ir.Value(name="merge/embedding/embed_tokens_q4", type=ir.TensorType(ir.DataType.UINT8), shape=shape)
    # The same bytes as the head's [vocab, blocks, block/2] weight, seen as rows of hidden/2 bytes.
    data.const_value = ir.LazyTensor(
        lambda: ir.tensor(weight.const_value.numpy().reshape(vocab, hidden // 2), name=data.name),
        ir.DataType.UINT8, shape, name=data.name,
    )
    return data, scales


def tied_head_weight(decoder: ir.Model, hidden: int) -> ir.Value | None:
    """The fp32 [hidden, vocab] initializer of the MatMul that produces ``logits``, if there is one."""
    node = _head_node(decoder)
    if node is None or node.op_type != "MatMul":
        return None
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or weight.shape is None or weight.shape[0] != hidden:
        return None
    return weight


def copy_preprocessing(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in PREPROCESSING_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "vocab.json" not in copied:
        log.warning("%s has no tokenizer files; the output folder cannot tokenize prompts", src)
    return copied


def check_onnx(path: Path) -> None:
    """Structural check by path (the checker cannot hold >2 GB models in memory) and session creation."""
    import onnx
    import onnxruntime as ort

    register_ort_default_domain_ops()
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as exc:
        raise MergeError(f"{path.name}: the ONNX checker refused the model: {exc}") from exc
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise MergeError(f"{path.name}: ONNX Runtime could not create a session: {exc}") from exc


def check_onnx_in_child(path: Path) -> float:
    """:func:`check_onnx` in a child process, so that the session's copy of every weight never adds to the
    merge's own memory; returns the child's peak resident memory in GiB."""
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    code = "import sys; from pathlib import Path; from merge.build import check_onnx; check_onnx(Path(sys.argv[1]))"
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], env=env, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    proc.stderr.close()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        message = lines[-1].removeprefix("merge.errors.MergeError: ") if lines else "no output"
        raise MergeError(f"the check of {path.name} failed: {message}")
    return usage.ru_maxrss / 1024**2


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, source: ModelSource, precision: str, parts: dict[str, str], copied: list[str],
                   embedding_layout: str) -> None:
    import onnx

    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".onnx", ".data"))
    graph = onnx.load(str(folder / COMBINED_MODEL), load_external_data=False).graph

    def describe(values) -> list[dict]:
        return [
            {
                "name": v.name,
                "type": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    manifest = {
        "tool": "qwen3vl-merge",
        "tool_version": __version__,
        "source_model": source.spec,
        "precision": precision,
        "parts": parts,
        "inputs": describe(graph.input),
        "outputs": describe(graph.output),
        "quantization": (
            {"bits": 4, "block_size": INT4_BLOCK_SIZE, "symmetric": True, "accuracy_level": INT4_ACCURACY_LEVEL,
             "scope": "decoder MatMuls incl. lm_head; vision fp32",
             "embedding_table": embedding_layout}
            if precision == "int4" else None
        ),
        "special_token_ids": {
            k: source.config[k]
            for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
            if k in source.config
        },
        "preprocessing_files": copied,
        "checksums": {p.name: file_sha256(p) for p in files},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
