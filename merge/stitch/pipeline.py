"""``merge build``: export the parts, stitch them with the passes, write one self-contained folder.

Steps, each named in the log:

1. the decoder graph written op by op from the checkpoint (:mod:`graphs.decoder`, the layout of the ONNX
   Runtime GenAI builder's Qwen3-VL decoder and its fused ops; weights lazy: nothing is read yet);
2. the parts: the vision graph written the same way, the embedding merge and rope index subgraphs, the token
   table;
3. the stitch (:mod:`merge.stitch.passes`), int4 quantization and tied-table sharing among its passes;
4. writing ``model.onnx`` + ``model.onnx.data``, weights streamed one tensor at a time (int4 quantized then);
5. the preprocessing files, the check in a child process (ONNX checker, session), and ``merge.json`` last.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from graphs.decoder import COMBINED
from merge import __version__
from merge.contract.folder import file_sha256
from merge.contract.manifest import FORMAT_VERSION, Manifest, TensorInfo
from merge.contract.names import (
    DATA_FILE,
    KV_CACHE_IN_PLACE,
    MODEL_FILE,
    PREPROCESSING_FILES,
    TOOL_NAME,
    VISION_INT8_CODE_LIMIT,
)
from merge.contract.quant import (
    INT8_CODE_LIMIT,
    QuantSpec,
    check_kv_cache,
    check_vision_precision,
    default_kv_cache,
    default_vision_precision,
    fit_default_to,
    precision_of,
)
from merge.sources.checkpoint import Checkpoint
from merge.sources.source import ModelSource
from merge.space import naming_a_full_disk, require_free_space

from .check import check_onnx_in_child
from .decoder import write_decoder
from .outdir import staged_output
from .parts import make_parts
from .passes import stitch
from .progress import tensor_writing_bar

log = logging.getLogger(__name__)

@dataclass
class BuildResult:
    out: Path
    parts: dict[str, str] = field(default_factory=lambda: {"model": MODEL_FILE, "data": DATA_FILE})
    seconds: float = 0.0
    peak_rss_gib: float = 0.0  # this process: the graphs, stitch, quantization, writing
    check_peak_rss_gib: float = 0.0  # the final check's child process (ONNX Runtime loads every weight)


def peak_rss_gib() -> float:
    """Peak resident memory of this process, in GiB (Linux: ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def build(source: ModelSource, out: Path, *, quant: QuantSpec | None = None, vision_precision: str | None = None,
          force: bool = False, others: str | None = None, kv_cache: str | None = None) -> BuildResult:
    """Build ``out``: one ``model.onnx`` (+ ``model.onnx.data``), preprocessing files and ``merge.json``.
    ``vision_precision``: ``"fp32"`` or ``"int8"`` (default :func:`default_vision_precision` of the precision);
    ``kv_cache``: the type of the keys and values kept between calls (``"float32"`` or ``"float16"``; default
    :func:`default_kv_cache` of the precision)."""
    kv_cache = check_kv_cache(kv_cache if kv_cache is not None else default_kv_cache(quant))
    vision_precision = check_vision_precision(vision_precision if vision_precision is not None
                                              else default_vision_precision(quant))
    text = source.config.text
    quant = fit_default_to(quant, text.moe is None or len(text.moe.sparse_layers(text.num_layers)) < text.num_layers)
    start = time.perf_counter()
    result = BuildResult(out=Path(out))
    checkpoint = Checkpoint(source.folder)  # every shard's header checked against its file before any work
    with staged_output(out, force, others) as stage:
        log.info("decoder and parts: decoder and vision graphs from %s, embedding merge, rope index", source.folder)
        decoder = write_decoder(checkpoint, source.config, dataclasses.replace(COMBINED, kv_cache=kv_cache))
        parts = make_parts(source, checkpoint)
        log.info("stitch: %s", "passes (run with --debug to list them)")
        model, layout = stitch(decoder, source.config, parts, quant, check_vision_precision(vision_precision))
        model.producer_name, model.producer_version = TOOL_NAME, __version__
        model.metadata_props.update({"source_model": source.spec, "precision": precision_of(quant),
                                     "vision_precision": vision_precision,
                                     "tool": TOOL_NAME, "tool_version": __version__,
                                     "image_token_id": str(source.config.image_token_id),
                                   KV_CACHE_IN_PLACE: "1",
                                     "embedding_table": layout})
        if vision_precision == "int8":
            model.metadata_props[VISION_INT8_CODE_LIMIT] = str(INT8_CODE_LIMIT)
        log.info("writing %s (weights streamed into %s%s)", MODEL_FILE, DATA_FILE,
                 ", quantized one tensor at a time" if quant else "")
        replacing = " (the existing folder stays until the new one is complete)" if result.out.exists() else ""
        require_free_space(result.out.parent, weight_bytes(model), f"writing {DATA_FILE} of {result.out}{replacing}")
        with naming_a_full_disk(result.out / DATA_FILE), tensor_writing_bar(f"writing {DATA_FILE}") as callback:
            ir.save(model, stage / MODEL_FILE, external_data=DATA_FILE, callback=callback)
        manifest = describe(model, source, quant, layout, vision_precision, kv_cache)
        del model, decoder, parts
        copied = copy_preprocessing(source.folder, stage)
        log.info("checking %s (ONNX checker and a session, child process)", MODEL_FILE)
        result.check_peak_rss_gib = check_onnx_in_child(stage / MODEL_FILE)
        model_files = [stage / MODEL_FILE, stage / DATA_FILE]
        # every file written but the manifest itself: --check-checksums vouches for the preprocessing too
        manifest = Manifest(**{**manifest.__dict__, "preprocessing_files": copied,
                               "checksums": {p.name: file_sha256(p) for p in [*model_files,
                                                                              *(stage / n for n in copied)]},
                               "sizes": {p.name: p.stat().st_size for p in model_files}})
        manifest.write(stage)
    result.seconds = time.perf_counter() - start
    result.peak_rss_gib = peak_rss_gib()
    return result


def weight_bytes(model: ir.Model) -> int:
    """The bytes the model's initializers will take once written (lazy ones at their quantized size, unread)."""
    return sum(value.const_value.nbytes for graph in (model.graph, *model.graph.subgraphs())
               for value in graph.initializers.values() if value.const_value is not None)


def describe(model: ir.Model, source: ModelSource, quant: QuantSpec | None, layout: str,
             vision_precision: str, kv_cache: str = "float32") -> Manifest:
    """The manifest's description of the model (files and checksums are added once they are written)."""

    def info(value: ir.Value) -> TensorInfo:
        dims = [(d.value or "?") if isinstance(d, ir.SymbolicDim) else int(d) for d in value.shape]
        return TensorInfo(value.name, value.dtype.numpy().name, dims)

    return Manifest(
        format_version=FORMAT_VERSION,
        tool_version=__version__,
        source_model=source.spec,
        precision=precision_of(quant),
        quantization=quant,
        vision_precision=vision_precision,
        kv_cache=kv_cache,
        embedding_table=layout,
        inputs=[info(v) for v in model.graph.inputs],
        outputs=[info(v) for v in model.graph.outputs],
        special_token_ids=source.config.special_token_ids,
        preprocessing_files=[],
    )


def copy_preprocessing(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in PREPROCESSING_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "vocab.json" not in copied:
        log.warning("%s has no tokenizer files; the output folder cannot tokenize prompts", src)
    return copied
