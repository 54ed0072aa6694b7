"""Text decoder export: the ONNX Runtime GenAI model builder run on a local Qwen3-VL folder with ``exclude_embeds``.

What the builder (onnxruntime-genai 0.18) produces here, measured on the tiny presets:

- inputs ``inputs_embeds`` [batch, sequence, hidden] (float), ``attention_mask`` [batch, total_sequence] (int64),
  ``position_ids`` [3, batch, sequence] (int64), ``past_key_values.{i}.key/value`` [batch, kv_heads, past, head_dim];
  outputs ``logits`` [batch, sequence, vocab] and ``present.{i}.key/value``. Opsets ai.onnx 22 and com.microsoft 1,
  IR version 10, one external data file ``<filename>.data`` beside the model.
- No embedding table (tied or not): the head is ``lm_head.MatMul.weight`` [hidden, vocab] in fp32, or
  ``lm_head.MatMul.weight_Q4`` / ``_scales`` (MatMulNBits) in int4.
- Layer i's MLP output ``/model/layers.{i}/mlp/down_proj/MatMul/output_0`` (same tensor name for MatMul and
  MatMulNBits) is input 1 (``skip``) of the next SkipSimplifiedLayerNormalization: layer i+1's input norm, or the
  final norm after the last layer. That is where DeepStack terms are added.
- GroupQueryAttention takes ``seqlens_k = ReduceSum(attention_mask) - 1`` and ``total_sequence_length =
  attention_mask.shape[1]``; it assumes each row's tokens start at position 0, so left-padded rows are wrong as built.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from merge.errors import MergeError

if TYPE_CHECKING:
    import onnx

log = logging.getLogger("export.text")  # the same name when run as a child (python -m export.text)

PRECISIONS = ("fp32", "int4")
DECODER_FILENAME = "decoder.onnx"
# MatMulNBits settings for int4. Note: builder 0.18 reads ``block_size`` / ``accuracy_level``; the ``int4_``-prefixed
# names its help text calls deprecated aliases are silently ignored. accuracy_level 4 (int8 activations) is the
# builder's CPU default and the fast path; 1 keeps fp32 activations.
INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4


class DecoderExportError(MergeError, RuntimeError):
    """The builder failed, or its decoder lacks the inputs and outputs the stitching relies on."""


class DecoderInputError(MergeError, ValueError):
    """The arguments cannot be exported: unknown precision, or not a Hugging Face Qwen3-VL folder."""


def down_proj_output(layer: int) -> str:
    """Name of layer ``layer``'s MLP output: the ``skip`` input of the next SkipSimplifiedLayerNormalization."""
    return f"/model/layers.{layer}/mlp/down_proj/MatMul/output_0"


def export_decoder(
    hf_folder: Path, out_dir: Path, precision: str = "fp32", cache_dir: Path | None = None, *, isolated: bool = False
) -> Path:
    """Run the GenAI builder on hf_folder; return the path of the decoder .onnx (external data beside it).

    ``out_dir`` should be a folder of its own: the builder also writes genai_config.json and tokenizer files there
    and replaces any earlier ``decoder.onnx`` / ``decoder.onnx.data``. ``cache_dir`` is the builder's scratch folder
    (it creates it and removes it again when empty); a temporary folder is used when none is given.
    ``isolated`` runs the builder in a child process: the builder loads the whole checkpoint with
    ``from_pretrained``, and that memory is returned to the system as soon as the export is done.
    """
    hf_folder, out_dir = Path(hf_folder).resolve(), Path(out_dir)
    if precision not in PRECISIONS:
        raise DecoderInputError(f"precision {precision!r} is not supported for the decoder; use one of {PRECISIONS}")
    text_config = _text_config(hf_folder)
    out_dir.mkdir(parents=True, exist_ok=True)

    options = {
        "exclude_embeds": "true",
        "filename": DECODER_FILENAME,
        "hf_token": "false",  # never look up a login token: the folder is local
        "hf_remote": "false",  # Qwen3-VL is native to transformers; no repository code runs
    }
    if precision == "int4":
        options |= {"block_size": str(INT4_BLOCK_SIZE), "accuracy_level": str(INT4_ACCURACY_LEVEL)}

    with contextlib.ExitStack() as stack:
        if cache_dir is None:
            cache_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="genai-builder-")))
        if isolated:
            _run_builder_in_child(hf_folder, out_dir, precision, Path(cache_dir))
        else:
            _run_builder(hf_folder, out_dir, precision, Path(cache_dir), options)

    path = out_dir / DECODER_FILENAME
    check_decoder(path, text_config)
    return path


def _run_builder_in_child(hf_folder: Path, out_dir: Path, precision: str, cache_dir: Path) -> None:
    cmd = [sys.executable, "-m", "export.text", str(hf_folder), str(out_dir), precision, str(cache_dir)]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    if sys.stderr.isatty():  # a person is watching: the builder's own progress bars show as it works
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, env=env)
        if proc.returncode != 0:
            raise DecoderExportError(f"the decoder export of {hf_folder} failed in its child process (see above)")
        return
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stderr.splitlines():
        log.debug("builder: %s", line)
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise DecoderExportError(f"the decoder export of {hf_folder} failed in its child process: {tail[0]}")


def _text_config(hf_folder: Path) -> dict:
    config_path = hf_folder / "config.json"
    if not config_path.is_file():
        raise DecoderInputError(f"{hf_folder}: no config.json; a local Hugging Face Qwen3-VL folder is expected")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "qwen3_vl" or "text_config" not in config:
        raise DecoderInputError(f"{hf_folder}: model_type is {config.get('model_type')!r}, not a Qwen3-VL checkpoint")
    return config["text_config"]


def _run_builder(hf_folder: Path, out_dir: Path, precision: str, cache_dir: Path, options: dict[str, str]) -> None:
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


def check_decoder(path: Path, text_config: dict) -> None:
    """Check the builder's decoder has the I/O and residual anchors the stitching relies on; raise if not."""
    import onnx

    data = path.with_name(path.name + ".data")
    if not path.is_file() or not data.is_file():
        raise DecoderExportError(f"the GenAI model builder did not write {path.name} and {data.name} in {path.parent}")
    graph = onnx.load(str(path), load_external_data=False).graph
    layers, hidden, vocab = (text_config[k] for k in ("num_hidden_layers", "hidden_size", "vocab_size"))
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64

    expected_in = {"inputs_embeds": (f32, 3, hidden), "attention_mask": (i64, 2, None), "position_ids": (i64, 3, None)}
    expected_out = {"logits": (f32, 3, vocab)}
    for i in range(layers):
        for kind in ("key", "value"):
            expected_in[f"past_key_values.{i}.{kind}"] = (f32, 4, None)
            expected_out[f"present.{i}.{kind}"] = (f32, 4, None)
    _check_io(path, "input", graph.input, expected_in)
    _check_io(path, "output", graph.output, expected_out)
    dims = graph.input[[v.name for v in graph.input].index("position_ids")].type.tensor_type.shape.dim
    if dims[0].dim_value != 3:
        raise DecoderExportError(f"{path.name}: position_ids is not [3, batch, sequence]; MRoPE positions are missing")

    skip_inputs = {n.input[1] for n in graph.node if n.op_type == "SkipSimplifiedLayerNormalization"}
    lost = [i for i in range(layers) if down_proj_output(i) not in skip_inputs]
    if lost:
        raise DecoderExportError(
            f"{path.name}: the MLP output of layer(s) {lost} does not feed a SkipSimplifiedLayerNormalization skip "
            "input; the builder's graph layout changed and DeepStack cannot be injected"
        )


def _check_io(
    path: Path, kind: str, values: Iterable[onnx.ValueInfoProto], expected: dict[str, tuple[int, int, int | None]]
) -> None:
    found = {v.name: v.type.tensor_type for v in values}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise DecoderExportError(f"{path.name} lacks the {kind}(s) {', '.join(missing)} (it has {', '.join(found)})")
    for name, (dtype, rank, last) in expected.items():
        t = found[name]
        dims = t.shape.dim
        if t.elem_type != dtype or len(dims) != rank or (last is not None and dims[-1].dim_value != last):
            raise DecoderExportError(
                f"{path.name}: {kind} {name} has element type {t.elem_type} and shape "
                f"{[d.dim_param or d.dim_value for d in dims]}, not type {dtype}, rank {rank}"
                + (f", last dimension {last}" if last is not None else "")
            )


def main(argv: list[str] | None = None) -> int:
    """``python -m export.text HF_FOLDER OUT_DIR PRECISION CACHE_DIR``: the builder in a process of its own."""
    hf_folder, out_dir, precision, cache_dir = argv or sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        export_decoder(Path(hf_folder), Path(out_dir), precision, Path(cache_dir))
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
