"""Decode and prefill cost of the combined model against the bare decoder, side by side in one run.

The combined model's decode steps carry no patches, so the vision part (behind an If) must not run: a decode
step should cost what the bare decoder (the build's decoder graph without the stitch) costs. The left-padding
fix (a key padding bias for every attention) must not slow a batch-1 step either. Prints figures, asserts nothing:

    python benchmarks/decode.py --combined combined/ --model tiny
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import machine
from merge.runtime import CombinedModel
from merge.sources.resolve import resolve_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--combined", type=Path, required=True, help="a combined folder built by merge build")
    parser.add_argument("--model", default="tiny", help="the model the folder was built from (for the bare decoder)")
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()

    import onnx_ir as ir
    import onnxruntime as ort

    from graphs.decoder import DecoderOptions
    from merge.sources.checkpoint import Checkpoint
    from merge.stitch.decoder import write_decoder

    combined = CombinedModel(args.combined)
    source = resolve_model(args.model)
    precision = combined.session.get_modelmeta().custom_metadata_map.get("precision", "fp32")
    scratch = tempfile.TemporaryDirectory(prefix="decode-bench-")  # the bare decoder is large: removed at exit
    work = Path(scratch.name)
    # the build's decoder graph, bare (no stitch options), weights lazy
    model = write_decoder(Checkpoint(source.folder), source.config, DecoderOptions())
    if precision == "int4":  # the same streaming quantization merge build uses
        from merge.contract.quant import QuantSpec
        from merge.stitch.passes.quantize_int4 import quantize_matmuls_int4

        spec = QuantSpec()
        quantize_matmuls_int4(model, block_size=spec.block_size, accuracy_level=spec.accuracy_level,
                              symmetric=spec.symmetric)
    bare_path = work / "decoder.onnx"
    ir.save(model, bare_path, external_data="decoder.onnx.data")
    del model
    bare = ort.InferenceSession(str(bare_path), providers=["CPUExecutionProvider"])
    hidden = source.config.text.hidden_size
    vocab = source.config.text.vocab_size

    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(vocab, 700), (1, args.prompt_tokens)).astype(np.int64)
    mask = np.ones_like(ids)

    # Combined: prefill then decode steps.
    feeds = combined.first_feeds(ids, mask)
    out = combined.forward(feeds)  # warm-up: the first call also pages the weights in
    combined_prefill = machine.median_step(lambda _: combined.forward(feeds), 3)
    state = {"out": out, "mask": mask}

    def combined_step(_):
        mask_now = np.concatenate([state["mask"], np.ones((1, 1), np.int64)], axis=1)
        f = {"input_ids": np.array([[5]], np.int64), "attention_mask": mask_now, **combined.no_vision(),
             "rope_deltas": state["out"]["rope_deltas_out"]}
        f.update({p: state["out"][p.replace("past_key_values.", "present.")] for p in combined.past_names})
        state["out"], state["mask"] = combined.forward(f), mask_now

    combined_decode = machine.median_step(combined_step, args.steps)

    # Bare decoder: the same shapes, inputs_embeds given directly.
    names = [o.name for o in bare.get_outputs()]
    past_names = [i.name for i in bare.get_inputs() if i.name.startswith("past_key_values.")]
    embeds = rng.standard_normal((1, args.prompt_tokens, hidden), dtype=np.float32)
    positions = np.broadcast_to(np.arange(args.prompt_tokens), (3, 1, args.prompt_tokens)).astype(np.int64)
    empty = np.zeros((1, combined.num_kv_heads, 0, combined.head_dim), np.float32)
    bfeeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
              **dict.fromkeys(past_names, empty)}
    bout = dict(zip(names, bare.run(names, bfeeds), strict=True))  # warm-up, as above
    bare_prefill = machine.median_step(lambda _: bare.run(names, bfeeds), 3)
    bstate = {"out": bout, "mask": mask}

    def bare_step(_):
        mask_now = np.concatenate([bstate["mask"], np.ones((1, 1), np.int64)], axis=1)
        t = mask_now.shape[1] - 1
        f = {"inputs_embeds": embeds[:, :1], "attention_mask": mask_now,
             "position_ids": np.full((3, 1, 1), t, np.int64)}
        f.update({p: bstate["out"][p.replace("past_key_values.", "present.")] for p in past_names})
        bstate["out"] = dict(zip(names, bare.run(names, f), strict=True))
        bstate["mask"] = mask_now

    bare_decode = machine.median_step(bare_step, args.steps)

    print(f"model {args.model} ({precision}), prompt {args.prompt_tokens} tokens, text only")
    print(f"  {'':22}{'combined':>12}{'bare decoder':>14}{'ratio':>8}")
    print(f"  {'prefill':22}{combined_prefill * 1e3:10.1f}ms{bare_prefill * 1e3:12.1f}ms"
          f"{combined_prefill / bare_prefill:8.2f}")
    print(f"  {'decode step (batch 1)':22}{combined_decode * 1e3:10.2f}ms{bare_decode * 1e3:12.2f}ms"
          f"{combined_decode / bare_decode:8.2f}")
    print(f"  {'decode tokens/s':22}{1 / combined_decode:12.1f}{1 / bare_decode:14.1f}")
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
