"""Which decoder matrices are worth 8 bits: measured sensitivity of each matrix kind (a measurement, not a test).

PyTorch fp32 on a checkpoint (default: the ``qwen3-vl-2b`` preset), text only, on random token ids. As DESIGN.md
says, the random-weight presets give near one-hot outputs on which every scheme scores KL 0; the final norm is
therefore scaled so logits have a trained model's spread. DESIGN.md's 1/15 still left a mean top probability of
0.99 here (the 2B preset predicts its input token); 1/28 (the default) gives about 0.75 and 3 nats of entropy,
1/35 0.35 and 8 nats. Then, with the quantizers the build uses (:mod:`merge.quantize`,
through verify's :func:`export.reference.int4_weight`):

1. each matrix kind alone quantized (every layer's; the rest fp32), to 4 bits and to 8 bits: mean KL divergence
   of the next-token distributions from fp32's, and what sending that kind to 8 bits gains (KL 4-bit - KL 8-bit)
   per MB of extra weights (a tied head also serves as the token table: its blocks are the embeddings too);
2. everything 4-bit, then with a few 8-bit sets (llama.cpp's Q4_K_M gives v_proj, down_proj and the head more
   bits): KL, top-1 agreement and the decoder matrices' stored size (codes, scales, zero points).

    python benchmarks/quant_sensitivity.py                              # 2B preset, all 28 layers
    python benchmarks/quant_sensitivity.py --layers 8 --tokens 128      # quicker, smaller
    python benchmarks/quant_sensitivity.py --method search --zero-points --sets-only

Random weights make every layer alike, so this ranks kinds by their shapes and their place in a layer, not by what
training puts in them; on a trained checkpoint pass its folder to ``--model``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merge.contract.quant import MATRIX_KINDS, QuantSpec, matrix_kind  # noqa: E402

EIGHT_BIT_SETS = (("v_proj",), ("v_proj", "o_proj"), ("down_proj",), ("head",), ("v_proj", "head"),
                  ("v_proj", "o_proj", "head"), ("v_proj", "down_proj"), ("v_proj", "down_proj", "head"))


def load(folder: Path, layers: int | None, norm_scale: float):
    import torch
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    config = AutoConfig.from_pretrained(folder)
    if layers is not None:
        config.text_config.num_hidden_layers = layers
    model = Qwen3VLForConditionalGeneration.from_pretrained(folder, config=config, dtype=torch.float32).eval()
    model.model.visual = None  # text only: free the vision tower
    with torch.no_grad():
        model.model.language_model.norm.weight.mul_(norm_scale)
    return model


def matrices(model) -> dict[str, list[tuple[str, object]]]:
    """Kind -> [(name, the parameter)] of every decoder matrix (the head under ``head``)."""
    import torch

    out: dict[str, list] = {kind: [] for kind in MATRIX_KINDS}
    for name, module in model.model.language_model.named_modules():
        if isinstance(module, torch.nn.Linear):
            out[matrix_kind(name)].append((name, module.weight))
    out["head"].append(("lm_head", model.lm_head.weight))
    return out


def log_probs(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids)).logits
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def kl(ref: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Mean KL(ref || other) over positions, and top-1 agreement."""
    p = np.exp(ref)
    return float((p * (ref - other)).sum(-1).mean()), float((ref.argmax(-1) == other.argmax(-1)).mean())


def set_weights(params, values) -> None:
    import torch

    with torch.no_grad():
        for (_, param), value in zip(params, values, strict=True):
            param.copy_(torch.from_numpy(value) if isinstance(value, np.ndarray) else value)


def quantized(params, spec: QuantSpec) -> list[np.ndarray]:
    from export.reference import int4_weight

    return [int4_weight(param.detach().numpy(), spec, name) for name, param in params]


def stored_mb(kinds: dict[str, list], spec: QuantSpec) -> float:
    """The decoder matrices' stored size (codes, float32 scales, zero points), MB."""
    total = 0.0
    for kind, params in kinds.items():
        bits = 8 if kind in spec.eight_bit else 4
        per_weight = bits + 32 / spec.block_size + (0 if spec.symmetric else bits / spec.block_size)
        total += sum(p.numel() for _, p in params) * per_weight / 8
    return total / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-vl-2b", help="preset name or a Hugging Face folder")
    parser.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers (default: all)")
    parser.add_argument("--tokens", type=int, default=256, help="prompt length (random token ids), default 256")
    parser.add_argument("--norm-scale", type=float, default=1 / 28, help="final norm factor (default 1/28)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--method", default="rtn", choices=("rtn", "search"))
    parser.add_argument("--zero-points", action="store_true")
    parser.add_argument("--sets-only", action="store_true", help="skip part 1 (each kind alone)")
    args = parser.parse_args()

    import torch

    from merge.sources.resolve import resolve_model

    torch.manual_seed(0)
    folder = resolve_model(args.model).folder
    start = time.perf_counter()
    model = load(folder, args.layers, args.norm_scale)
    kinds = matrices(model)
    vocab = model.lm_head.weight.shape[0]
    ids = np.random.default_rng(0).integers(0, vocab, (1, args.tokens))
    base = dict(block_size=args.block_size, symmetric=not args.zero_points, method=args.method)
    ref = log_probs(model, ids)
    spread = float(np.exp(ref).max(-1).mean())
    entropy = float(-(np.exp(ref) * ref).sum(-1).mean())
    layers = len(kinds["q_proj"])
    blocks = "zero points" if args.zero_points else "symmetric"
    print(f"{args.model}: {layers} layers, {args.tokens} tokens, final norm x{args.norm_scale:.4g} (mean top "
          f"probability {spread:.3f}, entropy {entropy:.2f} nats); block {args.block_size}, {blocks}, "
          f"{args.method}; loaded and fp32 run in {time.perf_counter() - start:.0f} s", flush=True)

    if not args.sets_only:
        by_kind(model, kinds, ids, ref, base, args)
    every_matrix(model, kinds, ids, ref, base)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


def by_kind(model, kinds, ids, ref, base: dict, args) -> None:
    print(f"\n1. one kind quantized, the rest fp32\n{'kind':<10} {'weights':>9} {'KL 4-bit':>10} {'KL 8-bit':>10} "
          f"{'top-1 4b':>9} {'+MB at 8b':>10} {'KL gain / MB':>13}")
    for kind in MATRIX_KINDS:
        params = kinds[kind]
        original = [p.detach().clone() for _, p in params]
        row = []
        for spec in (QuantSpec(**base), QuantSpec(**base, eight_bit=(kind,))):
            set_weights(params, quantized(params, spec))
            row.append(kl(ref, log_probs(model, ids)))
            set_weights(params, original)
        numel = sum(p.numel() for _, p in params)
        extra = numel * (4 + (4 / args.block_size if args.zero_points else 0)) / 8e6  # 4 more bits a weight
        gain = row[0][0] - row[1][0]
        print(f"{kind:<10} {numel / 1e6:8.1f}M {row[0][0]:10.3e} {row[1][0]:10.3e} {row[0][1]:9.1%} {extra:10.1f} "
              f"{gain / extra:13.3e}", flush=True)
        del original


def every_matrix(model, kinds, ids, ref, base: dict) -> None:
    print(f"\n2. every matrix quantized\n{'8-bit kinds':<28} {'KL':>10} {'top-1':>7} {'MB':>8}")
    keep = {kind: [p.detach().clone() for _, p in kinds[kind]] for kind in {k for s in EIGHT_BIT_SETS for k in s}}
    all4 = QuantSpec(**base)
    for params in kinds.values():
        set_weights(params, quantized(params, all4))
    result = kl(ref, log_probs(model, ids))
    print(f"{'(none)':<28} {result[0]:10.3e} {result[1]:7.1%} {stored_mb(kinds, all4):8.1f}", flush=True)
    for chosen in EIGHT_BIT_SETS:
        spec = QuantSpec(**base, eight_bit=chosen)
        for kind in chosen:
            set_weights(kinds[kind], keep[kind])
            set_weights(kinds[kind], quantized(kinds[kind], spec))
        result = kl(ref, log_probs(model, ids))
        print(f"{','.join(chosen):<28} {result[0]:10.3e} {result[1]:7.1%} {stored_mb(kinds, spec):8.1f}", flush=True)
        for kind in chosen:  # back to 4 bits
            set_weights(kinds[kind], keep[kind])
            set_weights(kinds[kind], quantized(kinds[kind], all4))


if __name__ == "__main__":
    raise SystemExit(main())
