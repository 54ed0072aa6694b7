"""The decoder part and the check of its layout against what the stitch relies on.

The build writes the decoder from the checkpoint (:func:`write_decoder`, :mod:`graphs.decoder`); the ONNX
Runtime GenAI builder's own export (:func:`export_decoder`, in a child process, see :mod:`export.text`) writes the
same layout and stays as the reference a test compares with and as the benchmarks' bare decoder."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import onnx_ir as ir

from graphs.decoder import COMBINED, DecoderOptions, build_decoder_model
from merge.contract.config import ModelConfig, TextSpec
from merge.contract.names import (
    ATTENTION_MASK,
    DECODER_INPUTS_EMBEDS,
    DECODER_POSITION_IDS,
    LOGITS,
    LOGITS_TO_KEEP,
    mlp_output,
    past_name,
    present_name,
)
from merge.errors import MergeError

from .child import run_python

log = logging.getLogger(__name__)

DECODER_FILENAME = "decoder.onnx"  # export.text writes this name


class DecoderExportError(MergeError):
    """The builder failed, or its decoder lacks the inputs and outputs the stitching relies on."""


def write_decoder(checkpoint, config: ModelConfig, options: DecoderOptions = COMBINED) -> ir.Model:
    """The decoder graph of ``config`` with every weight read lazily from ``checkpoint``, checked: by default the
    one the stitch builds on (scoped ``decoder/``, left padding, ``logits_to_keep``); ``DecoderOptions()`` gives the
    bare GenAI-builder layout."""
    model = build_decoder_model(checkpoint, config, options)
    check_decoder(model, config.text, "the decoder graph", options)
    return model


def export_decoder(hf_folder: Path, out_dir: Path, text: TextSpec, *, precision: str = "fp32",
                   cache_dir: Path | None = None) -> tuple[ir.Model, float]:
    """Run the GenAI builder on ``hf_folder`` in a child process; return its checked decoder (weights lazy) and
    the child's peak memory in GiB.

    ``out_dir`` should be a folder of its own (the builder writes genai_config.json and more beside the model).
    On a terminal the builder's own progress shows as it works.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir else out_dir / "cache"
    tty = sys.stderr.isatty()
    result = run_python(["-m", "export.text", str(Path(hf_folder).resolve()), str(out_dir), precision,
                         str(cache_dir)], capture=not tty)
    for line in result.stderr.splitlines():
        log.debug("builder: %s", line)
    if result.returncode != 0:
        detail = "see above" if tty else result.last_line().removeprefix("error: ")
        raise DecoderExportError(f"the decoder export of {hf_folder} failed in its child process: {detail}")
    path = out_dir / DECODER_FILENAME
    data = path.with_name(path.name + ".data")
    if not path.is_file() or not data.is_file():
        raise DecoderExportError(f"the GenAI model builder did not write {path.name} and {data.name} in {out_dir}")
    model = ir.load(path)
    check_decoder(model, text, path.name)
    return model, result.peak_rss_gib


def check_decoder(model: ir.Model, text: TextSpec, where: str = "decoder",
                  options: DecoderOptions | None = None) -> None:
    """The decoder has the I/O the stitch relies on and, where ``options`` says how it was written (the build's
    own graph, not the builder's export), each layer's named MLP output, DeepStack's anchor; raise if not."""
    f32, i64 = ir.DataType.FLOAT, ir.DataType.INT64
    kv = options.kv_type if options is not None else f32
    expected_in = {DECODER_INPUTS_EMBEDS: (f32, 3, text.hidden_size), ATTENTION_MASK: (i64, 2, None),
                   DECODER_POSITION_IDS: (i64, 3, None)}
    if options is not None and options.logits_to_keep:
        expected_in[LOGITS_TO_KEEP] = (i64, 0, None)
    expected_out = {LOGITS: (f32, 3, text.vocab_size)}
    for i in range(text.num_layers):
        for kind in ("key", "value"):
            expected_in[past_name(i, kind)] = (kv, 4, None)  # the builder names the last dim kv_cache_dim
            expected_out[present_name(past_name(i, kind))] = (kv, 4, None)
    _check_io(where, "input", model.graph.inputs, expected_in)
    _check_io(where, "output", model.graph.outputs, expected_out)
    positions = next(v for v in model.graph.inputs if v.name == DECODER_POSITION_IDS)
    if positions.shape[0] != 3:
        raise DecoderExportError(f"{where}: position_ids is not [3, batch, sequence]; MRoPE positions are missing")
    if options is None:
        return
    values = ir.convenience.create_value_mapping(model.graph, include_subgraphs=False)
    missing = [name for name in (mlp_output(i, options.scope) for i in range(text.num_layers)) if name not in values]
    if missing:
        raise DecoderExportError(f"{where}: no value {missing[0]!r} ({len(missing)} of {text.num_layers} layers lack "
                                 "their named MLP output); DeepStack could not be added after those layers")


def _check_io(where: str, kind: str, values, expected: dict[str, tuple[ir.DataType, int, int | None]]) -> None:
    found = {v.name: v for v in values}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise DecoderExportError(f"{where} lacks the {kind}(s) {', '.join(missing)} (it has {', '.join(found)})")
    for name, (dtype, rank, last) in expected.items():
        value = found[name]
        shape = value.shape
        if value.dtype != dtype or shape is None or len(shape) != rank or (last is not None and shape[-1] != last):
            raise DecoderExportError(
                f"{where}: {kind} {name} has type {value.dtype} and shape {shape}, not {dtype}, rank {rank}"
                + (f", last dimension {last}" if last is not None else "")
            )
