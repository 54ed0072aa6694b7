"""The text decoder through the ONNX Runtime GenAI model builder, with ``exclude_embeds``.

Run as a child process (``python -m export.text HF_FOLDER OUT_DIR PRECISION CACHE_DIR``) by the build: the
builder loads the whole checkpoint with ``from_pretrained`` (torch), and that memory returns to the system
when the child ends. The build then checks what came out (:mod:`merge.stitch.decoder`).

What the builder (onnxruntime-genai 0.18) produces here, measured on the tiny presets:

- inputs ``inputs_embeds`` [batch, sequence, hidden] (float), ``attention_mask`` [batch, total_sequence] (int64),
  ``position_ids`` [3, batch, sequence] (int64), ``past_key_values.{i}.key/value`` [batch, kv_heads, past, head_dim];
  outputs ``logits`` [batch, sequence, vocab] and ``present.{i}.key/value``. Opsets ai.onnx 22 and com.microsoft 1,
  IR version 10, one external data file ``<filename>.data`` beside the model.
- No embedding table (tied or not): the head is ``lm_head.MatMul.weight`` [hidden, vocab] in fp32, or
  ``lm_head.MatMul.weight_Q4`` / ``_scales`` (MatMulNBits) in int4.
- Layer i's MLP output (``/model/layers.{i}/mlp/down_proj/MatMul/output_0``) is input 1 (``skip``) of the next
  SkipSimplifiedLayerNormalization: layer i+1's input norm, or the final norm after the last layer.
- GroupQueryAttention takes ``seqlens_k = ReduceSum(attention_mask) - 1`` and ``total_sequence_length =
  attention_mask.shape[1]``; it assumes each row's tokens start at position 0, so left-padded rows are wrong as built.
- Builder options: 0.18 reads ``block_size`` / ``accuracy_level``; the ``int4_``-prefixed names its help text calls
  deprecated aliases are silently ignored.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
from pathlib import Path

from merge.contract.config import ModelConfig
from merge.contract.quant import QuantSpec, quant_spec_for
from merge.errors import MergeError

log = logging.getLogger("export.text")  # the same name when run as a child (python -m export.text)

DECODER_FILENAME = "decoder.onnx"


class DecoderExportError(MergeError, RuntimeError):
    """The builder failed."""


def builder_options(quant: QuantSpec | None) -> dict[str, str]:
    options = {
        "exclude_embeds": "true",
        "filename": DECODER_FILENAME,
        "hf_token": "false",  # never look up a login token: the folder is local
        "hf_remote": "false",  # Qwen3-VL is native to transformers; no repository code runs
    }
    if quant is not None:
        options |= {"block_size": str(quant.block_size), "accuracy_level": str(quant.accuracy_level)}
    return options


def run_builder(hf_folder: Path, out_dir: Path, precision: str, cache_dir: Path) -> Path:
    """Export ``hf_folder``'s decoder into ``out_dir`` (``decoder.onnx`` + ``decoder.onnx.data``); returns the path."""
    ModelConfig.from_folder(hf_folder)  # a sentence, not a builder traceback, for a folder that is not Qwen3-VL
    options = builder_options(quant_spec_for(precision))
    try:
        from onnxruntime_genai.models.builder import create_model, parse_extra_options
    except ImportError as exc:
        raise DecoderExportError(f"the ONNX Runtime GenAI model builder cannot be imported: {exc}") from exc

    log.info("exporting the %s text decoder of %s with the GenAI model builder", precision, hf_folder)
    start = time.perf_counter()
    printed = io.StringIO()  # the builder reports through print(); keep it for the log and for errors
    quantizer_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")  # one INFO line per node
    level = quantizer_log.level
    quantizer_log.setLevel(max(level, logging.WARNING))
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.redirect_stdout(printed):
            args = (None, str(hf_folder), str(out_dir), precision, "cpu", str(cache_dir))
            extra = parse_extra_options(*args, [f"{k}={v}" for k, v in options.items()])
            create_model(*args, **extra)
    except Exception as exc:
        tail = " | ".join(printed.getvalue().strip().splitlines()[-3:])
        raise DecoderExportError(
            f"the GenAI model builder failed to export the decoder of {hf_folder}: {type(exc).__name__}: {exc}"
            + (f" (last builder output: {tail})" if tail else "")
        ) from exc
    finally:
        quantizer_log.setLevel(level)
        for line in printed.getvalue().splitlines():
            log.debug("builder: %s", line)
    log.info("decoder exported in %.1f s", time.perf_counter() - start)
    return out_dir / DECODER_FILENAME


def main(argv: list[str] | None = None) -> int:
    """``python -m export.text HF_FOLDER OUT_DIR PRECISION CACHE_DIR``: the builder in a process of its own."""
    hf_folder, out_dir, precision, cache_dir = argv or sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_builder(Path(hf_folder).resolve(), Path(out_dir), precision, Path(cache_dir))
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
