"""A copy of a model folder whose next-token distributions have a trained model's spread, for fidelity figures.

The random-weight presets give near one-hot outputs (embeddings of std 1: logits of std ~45 on 2B), on which every
4-bit scheme shows KL 0.000000 and 100% top-1 against its fp32 base: a comparison there measures nothing. The
logits are linear in the final text norm's weight, so scaling that one vector (by 1/15 by default) gives them a
trained model's spread. The copy is a new Hugging Face folder: the shard holding the norm is copied with that
tensor's bytes rewritten in its own dtype, every other file is a symbolic link to the original, and
``spread.json`` records the source, the tensor and the factor.

    python benchmarks/spread.py --model qwen3-vl-2b --out spread-2b/       # prints the outputs' spread, both ways
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_FACTOR = 1 / 15
# how checkpoints name the decoder's final norm (transformers 5 layout first, then older and text-only ones)
FINAL_NORM_NAMES = ("model.language_model.norm.weight", "model.norm.weight", "language_model.model.norm.weight")
RECORD = "spread.json"


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header and where its data starts."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


def find_final_norm(folder: Path) -> tuple[Path, str]:
    """(shard, tensor name) of the decoder's final norm weight."""
    for shard in sorted(Path(folder).glob("*.safetensors")):
        header, _ = _header(shard)
        for name in FINAL_NORM_NAMES:
            if name in header:
                return shard, name
    raise SystemExit(f"{folder}: no final text norm among {', '.join(FINAL_NORM_NAMES)} in its safetensors")


def scaled(raw: bytes, dtype: str, factor: float) -> bytes:
    """``raw`` values of a safetensors ``dtype`` (F32, F16, BF16) times ``factor``, in the same dtype (bf16 rounded
    to nearest even)."""
    if dtype == "F32":
        return (np.frombuffer(raw, "<f4") * np.float32(factor)).astype("<f4").tobytes()
    if dtype == "F16":
        return (np.frombuffer(raw, "<f2").astype(np.float32) * np.float32(factor)).astype("<f2").tobytes()
    if dtype == "BF16":
        values = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32) * np.float32(factor)
        bits = values.view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()
    raise SystemExit(f"the final norm is stored as {dtype}; only F32, F16 and BF16 are handled")


def spread_copy(source: Path, out: Path, factor: float = DEFAULT_FACTOR) -> Path:
    """``out``: ``source`` with the final text norm's weight times ``factor`` (made once; an existing copy of the same
    source and factor is reused)."""
    source, out = Path(source).resolve(), Path(out)
    shard, name = find_final_norm(source)
    record = {"source": str(source), "tensor": name, "factor": factor}
    if (out / RECORD).is_file():
        if json.loads((out / RECORD).read_text()) == record:
            return out
        raise SystemExit(f"{out} holds another spread copy ({out / RECORD}); give another --out")
    if out.exists():
        raise SystemExit(f"{out} exists and is not a spread copy")
    stage = out.with_name(out.name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for item in source.iterdir():
        if item.name.startswith(".") or item == shard:
            continue
        os.symlink(item.resolve(), stage / item.name)
    copy = stage / shard.name
    shutil.copyfile(shard, copy)
    header, start = _header(copy)
    entry = header[name]
    begin, end = entry["data_offsets"]
    with open(copy, "r+b") as f:
        f.seek(start + begin)
        raw = f.read(end - begin)
        f.seek(start + begin)
        f.write(scaled(raw, entry["dtype"], factor))
    (stage / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    stage.rename(out)
    return out


def output_spread(logits: np.ndarray) -> dict:
    """Mean entropy (nats) and mean top-1 probability of the next-token distributions ``logits`` [..., vocab]."""
    from merge.tools.fidelity import log_softmax

    rows = np.asarray(logits).reshape(-1, np.shape(logits)[-1])
    entropy, top1 = [], []
    for start in range(0, len(rows), 64):
        log_p = log_softmax(rows[start:start + 64])
        entropy.append(-(np.exp(log_p) * log_p).sum(-1))
        top1.append(np.exp(log_p.max(-1)))
    return {"entropy_mean": float(np.concatenate(entropy).mean()), "top1_prob_mean": float(np.concatenate(top1).mean())}


def factor_for(logits: np.ndarray, top1_prob: float = 0.5) -> float:
    """The factor that gives ``logits`` (the original's) a mean top-1 probability of ``top1_prob``: the logits are
    linear in the final norm's weight, and the largest probability grows with their scale, so bisection on the
    scale of the original's logits finds it without running the model again."""
    rows = np.asarray(logits).reshape(-1, np.shape(logits)[-1]).astype(np.float64)
    if not 0 < top1_prob < 1 or output_spread(rows)["top1_prob_mean"] <= top1_prob:
        return 1.0  # already as flat as asked (or an impossible target): the original's scale
    low, high = -12.0, 0.0  # log2 of the factor
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (middle, high) if output_spread(rows * 2.0 ** middle)["top1_prob_mean"] < top1_prob else (
            low, middle)
    return float(2.0 ** ((low + high) / 2))


def describe(spread: dict) -> str:
    return (f"mean entropy {spread['entropy_mean']:.2f} nats, mean top-1 probability {spread['top1_prob_mean']:.3f}"
            f"{' (near one-hot)' if spread['top1_prob_mean'] > 0.99 else ''}")


def torch_logits(folder: Path, input_ids: np.ndarray) -> np.ndarray:
    """PyTorch fp32 logits of ``input_ids`` [1, n] at every position."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(input_ids)).logits.numpy()


def corpus_ids(folder: Path, count: int) -> np.ndarray:
    """The first ``count`` tokens of the presets' corpus (repeated as needed), by ``folder``'s tokenizer."""
    from tokenizers import Tokenizer

    text = (ROOT / "merge" / "presets" / "corpus.txt").read_text(encoding="utf-8")
    ids = Tokenizer.from_file(str(Path(folder) / "tokenizer.json")).encode(text).ids
    return np.array([(ids * (count // len(ids) + 1))[:count]], np.int64)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="preset name or local Hugging Face folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--factor", default=str(DEFAULT_FACTOR),
                        help="the final norm's scale (default 1/15), or 'auto': the scale that gives the fp32 "
                             "outputs a mean top-1 probability of --top1-prob on the corpus")
    parser.add_argument("--top1-prob", type=float, default=0.5, help="--factor auto's target (default 0.5)")
    parser.add_argument("--tokens", type=int, default=128, help="corpus tokens the spread is measured on")
    args = parser.parse_args()
    from merge.sources.resolve import resolve_model

    source = resolve_model(args.model).folder
    ids = corpus_ids(source, args.tokens)
    original = torch_logits(source, ids)
    factor = factor_for(original, args.top1_prob) if args.factor == "auto" else float(args.factor)
    out = spread_copy(source, args.out, factor)
    print(f"{out}: {find_final_norm(source)[1]} x {factor:.4g} of {source}")
    print(f"  original: PyTorch fp32 over {args.tokens} corpus tokens: {describe(output_spread(original))}")
    print(f"  spread copy: {describe(output_spread(torch_logits(out, ids)))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
