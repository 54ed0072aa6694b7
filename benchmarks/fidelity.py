"""Fidelity side by side: how far each quantization scheme moves the next-token distributions from its own fp32
base, for our folders (PyTorch fp32 as the base) and llama.cpp (its f32 GGUF as the base, ``llama-perplexity
--kl-divergence-base`` / ``--kl-divergence``). Figures, not pass/fail.

Every system runs on the *spread copy* of the preset (``benchmarks/spread.py``: the final text norm scaled so that
the fp32 outputs have a trained model's spread; on the presets themselves they are near one-hot and every scheme
scores KL 0 and 100% top-1). Two prompts, teacher-forced (every position's next-token distribution):

- text: the presets' corpus in chunks of ``--ctx`` tokens (512), each chunk a fresh call, the second half of each
  chunk scored: what ``llama-perplexity`` does, on the same text file, so every system is scored on the same
  positions (the report says whether llama.cpp's tokens are ours);
- image: one photo-like picture and a question through the folder's chat template, every position scored; our
  folders and PyTorch only (``llama-mtmd-cli`` gives no per-token logits: llama.cpp is text only).

Per system and prompt: mean and 99th-percentile KL(base || system), top-1 agreement and the relative logits error
``||l - l_base|| / ||l_base||`` (n/a for llama.cpp, which prints the divergence but gives no logits). Schemes are
``merge build`` arguments (``--scheme LABEL="--precision int4 --block-size 128"``), so a new build option joins
without a change here. Each system runs in a child process of its own.

    python benchmarks/fidelity.py --model tiny --json benchmarks/results/fidelity-tiny.json
    python benchmarks/fidelity.py --model qwen3-vl-2b --json benchmarks/results/fidelity-2b.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import machine, spread  # noqa: E402

SCHEMES = {"fp32": "--precision fp32", "int4": "--precision int4"}  # our folders: label -> merge build arguments
LLAMA_KINDS = ("Q4_0", "Q4_K_M")
IMAGE_PROMPT = "Describe the picture in detail: the colours, the light and what might be shown."


# -- the child: one system's logits for both prompts ---------------------------------------------------------------

def child(args) -> int:
    data = dict(np.load(args.inputs))
    text, first, last = data.pop("text"), int(data.pop("first")), int(data.pop("last"))
    image = {k[6:]: v for k, v in data.items() if k.startswith("image/")}
    out: dict[str, np.ndarray] = {}
    if args.child == "torch":
        import torch
        from transformers import Qwen3VLForConditionalGeneration

        torch.set_num_threads(args.threads)
        model = Qwen3VLForConditionalGeneration.from_pretrained(args.path, dtype=torch.float32).eval()
        with torch.no_grad():
            out["text"] = np.stack([model(input_ids=torch.from_numpy(ids[None])).logits[0, first:last].numpy()
                                    for ids in text])
            if image:
                keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
                out["image"] = model(**{k: torch.from_numpy(image[k]) for k in keys}).logits[0].numpy()
    else:
        from merge.runtime import CombinedModel

        model = CombinedModel(args.path, threads=args.threads)
        out["text"] = np.stack([model.generate(ids[None], max_new_tokens=1).prefill_logits[0, first:last]
                                for ids in text])
        if image:
            out["image"] = model.generate(image["input_ids"], image["attention_mask"], image["pixel_values"],
                                          image["image_grid_thw"], max_new_tokens=1).prefill_logits[0]
    np.savez(args.out, **out)
    return 0


def run_child(kind: str, path: Path, inputs: Path, out: Path, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--path", str(path), "--inputs",
           str(inputs), "--out", str(out), "--threads", str(threads)]
    result = machine.measured_run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result["returncode"]:
        raise RuntimeError(f"{kind} {path}: {result['stderr'].strip().splitlines()[-3:]}")
    return {"seconds": round(result["seconds"], 1), "peak_gib": round(result["peak_gib"], 2)}


# -- the parent ----------------------------------------------------------------------------------------------------

def parse_schemes(extra: list[str]) -> dict[str, list[str]]:
    """The default schemes, then ``--scheme LABEL=ARGS`` (a default's label replaces it)."""
    schemes = dict(SCHEMES)
    for item in extra:
        label, sep, build_args = item.partition("=")
        if not sep or not label or "/" in label:
            raise SystemExit(f"--scheme {item!r}: expected LABEL=\"merge build arguments\"")
        schemes[label] = build_args
    return {label: shlex.split(a) for label, a in schemes.items()}


def build_scheme(label: str, build_args: list[str], spread_folder: Path, work: Path) -> Path:
    """Our folder for one scheme, built with ``merge build`` (reused when built with the same arguments)."""
    out = work / "schemes" / label
    record = work / "schemes" / f"{label}.args.json"
    wanted = {"model": str(spread_folder), "args": build_args}
    if (out / "model.onnx").is_file() and record.is_file() and json.loads(record.read_text()) == wanted:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "merge", "build", "--model", str(spread_folder), "--out", str(out), *build_args]
    if out.exists():
        cmd.append("--force")
    print(f"  building {label}: merge build {shlex.join(cmd[4:])}", flush=True)
    result = machine.measured_run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result["returncode"]:
        raise SystemExit(f"merge build for scheme {label} failed: {result['stderr'].strip().splitlines()[-3:]}")
    record.write_text(json.dumps(wanted) + "\n")
    return out


def text_file(work: Path, folder: Path, tokens_needed: int) -> tuple[Path, np.ndarray]:
    """The corpus, repeated until it holds ``tokens_needed`` tokens, as a file (for llama-perplexity) and as our
    tokenizer's ids."""
    from tokenizers import Tokenizer

    corpus = (ROOT / "merge" / "presets" / "corpus.txt").read_text(encoding="utf-8")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = corpus
    while len(tokenizer.encode(text).ids) < tokens_needed:
        text += "\n\n" + corpus
    path = work / "text.txt"
    path.write_text(text, encoding="utf-8")
    return path, np.array(tokenizer.encode(text).ids, np.int64)


def row(system: str, base: str, prompt: str, figures: dict) -> dict:
    keys = ("positions", "kl_mean", "kl_p99", "top1", "rel_error")
    return {"system": system, "base": base, "prompt": prompt, **{k: figures.get(k) for k in keys}}


def ours_rows(label: str, logits: dict, reference: dict) -> list[dict]:
    from dataclasses import asdict

    from merge.tools.fidelity import fidelity

    return [row(f"ours-{label}", "torch-fp32", prompt, asdict(fidelity(logits[prompt], reference[prompt])))
            for prompt in ("text", "image") if prompt in reference]


def llama_rows(args, work: Path, spread_folder: Path, name: str, text: Path, reference: dict,
               our_ids: np.ndarray) -> tuple[list[dict], dict]:
    """llama.cpp's rows. First what ``llama-perplexity --kl-divergence`` prints for each kind against the f32 GGUF
    (its own base; f32 against itself is the floor of the base file's 16-bit log-probabilities). Then the same
    pairs through our KL (float64, the whole vocabulary) from each kind's stored log-probabilities (llama.cpp's
    prints 6 decimals and leaves out base probabilities under e^-16), and the f32 GGUF against PyTorch fp32 on the
    same tokens, both in the stored format (a check that the GGUF is the same model)."""
    from benchmarks import llama_cpp
    from merge.tools.fidelity import kl_divergence

    root = args.llama_dir or llama_cpp.default_dir()
    bin_dir = llama_cpp.ensure_built(root)
    kinds = ("f32", *args.llama_kinds)
    files = llama_cpp.convert(root, spread_folder, name, kinds, projector=False)
    stored = {}
    for kind in kinds:  # each kind's log-probabilities over the same chunks (the f32 one is the base)
        stored[kind] = work / f"llama-{kind}.kld"
        stored[kind].unlink(missing_ok=True)
        llama_cpp.kl_base(bin_dir, files[kind], text, stored[kind], args.ctx, args.chunks, args.threads)
    rows = []
    for kind in kinds:
        start = time.perf_counter()
        figures = llama_cpp.kl_divergence(bin_dir, files[kind], stored["f32"], args.ctx, args.threads)
        print(f"  llama-{kind}: {time.perf_counter() - start:.0f} s", flush=True)
        rows.append(row(f"llama-{kind}", "llama-f32", "text", figures))
    tokens, base = llama_cpp.read_kl_base(stored["f32"])

    def ours(log_probs: np.ndarray, reference: np.ndarray) -> dict:
        kl = kl_divergence(log_probs, reference)
        return {"positions": len(kl), "kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
                "top1": float((log_probs.argmax(-1) == reference.argmax(-1)).mean())}

    for kind in args.llama_kinds:
        rows.append(row(f"llama-{kind}", "llama-f32, stored log-probs", "text",
                        ours(llama_cpp.read_kl_base(stored[kind])[1], base)))
    same_tokens = tokens.shape == our_ids.shape and bool(np.array_equal(tokens, our_ids))
    if same_tokens:  # the same positions: the f32 GGUF's stored log-probabilities against PyTorch's in that format
        torch_rows = reference["text"].reshape(-1, reference["text"].shape[-1])
        stored_torch = np.concatenate([llama_cpp.stored_format(torch_rows[i:i + 64])
                                       for i in range(0, len(torch_rows), 64)])
        rows.append(row("llama-f32", "torch-fp32, stored log-probs", "text", ours(base, stored_torch)))
    sizes = {kind: files[kind].stat().st_size for kind in kinds}
    return rows, {"same_tokens": same_tokens, "gguf_bytes": sizes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="preset name or local Hugging Face folder (default tiny)")
    parser.add_argument("--scheme", action="append", default=[], metavar="LABEL=ARGS",
                        help="another of our folders, built with these merge build arguments (quoted), beside "
                             f"{', '.join(f'{k} ({v})' for k, v in SCHEMES.items())}; repeatable")
    parser.add_argument("--llama-kinds", nargs="*", default=list(LLAMA_KINDS), choices=LLAMA_KINDS,
                        help="llama.cpp quantizations, each against its f32 GGUF (none: skip llama.cpp)")
    parser.add_argument("--factor", default="auto", help="the spread copy's final-norm scale, or 'auto' (default): "
                        "the scale giving PyTorch fp32 a mean top-1 probability of --top1-prob on the corpus")
    parser.add_argument("--top1-prob", type=float, default=0.5)
    parser.add_argument("--ctx", type=int, default=512, help="tokens per text chunk (the second half scored)")
    parser.add_argument("--chunks", type=int, default=2, help="text chunks")
    parser.add_argument("--image-size", type=int, default=448, help="side of the picture in the image prompt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="spread copy, folders and logits (default: the cache's fidelity/MODEL; reused)")
    parser.add_argument("--llama-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.ctx < 8 or args.ctx % 2 or args.chunks < 1:
        parser.error("--ctx must be an even number of at least 8 tokens and --chunks at least 1")
    schemes = parse_schemes(args.scheme)

    from merge.presets.cache import cache_root
    from merge.runtime.preprocess import Preprocessor
    from merge.sources.resolve import resolve_model

    info = machine.describe(args.threads)
    print(machine.header(info), flush=True)
    source = resolve_model(args.model)
    work = args.workdir or cache_root() / "fidelity" / Path(args.model).name
    work.mkdir(parents=True, exist_ok=True)

    # the spread copy: the factor from the original's PyTorch fp32 logits on the corpus when 'auto'
    if args.factor == "auto":
        probe = work / "probe.npz"
        ids = spread.corpus_ids(source.folder, 128)
        np.savez(work / "probe-inputs.npz", text=ids, first=0, last=ids.shape[1])
        run_child("torch", source.folder, work / "probe-inputs.npz", probe, args.threads)
        with np.load(probe) as data:
            original = data["text"]
        factor = round(spread.factor_for(original, args.top1_prob), 4)
        print(f"original {args.model}, PyTorch fp32: {spread.describe(spread.output_spread(original))}; the spread "
              f"copy's factor for a mean top-1 probability of {args.top1_prob}: {factor}", flush=True)
    else:
        factor = float(args.factor)
    spread_folder = spread.spread_copy(source.folder, work / f"spread-{factor:.4g}", factor)

    # the prompts
    first, last = args.ctx // 2, args.ctx - 1  # llama-perplexity's scored positions in each chunk
    text, all_ids = text_file(work, spread_folder, max(args.ctx * args.chunks, 2 * args.ctx))
    text_ids = all_ids[: args.ctx * args.chunks].reshape(args.chunks, args.ctx)
    from benchmarks.vision import photo

    image = Preprocessor(spread_folder).build_inputs(IMAGE_PROMPT, [photo(args.image_size, args.image_size)])
    inputs = work / "inputs.npz"
    np.savez(inputs, text=text_ids, first=first, last=last, **{f"image/{k}": v for k, v in image.items()})

    # PyTorch fp32, then our folders
    timings = {}
    logits_dir = work / "logits"
    logits_dir.mkdir(exist_ok=True)
    print("  torch-fp32", flush=True)
    timings["torch-fp32"] = run_child("torch", spread_folder, inputs, logits_dir / "torch-fp32.npz", args.threads)
    with np.load(logits_dir / "torch-fp32.npz") as data:
        reference = {k: data[k] for k in data.files}
    spreads = {prompt: spread.output_spread(reference[prompt]) for prompt in reference}
    for prompt, figures in spreads.items():
        print(f"  PyTorch fp32 on the spread copy, {prompt}: {spread.describe(figures)}", flush=True)
    rows = []
    for label, build_args in schemes.items():
        folder = build_scheme(label, build_args, spread_folder, work)
        print(f"  ours-{label}", flush=True)
        timings[f"ours-{label}"] = run_child("ours", folder, inputs, logits_dir / f"ours-{label}.npz", args.threads)
        with np.load(logits_dir / f"ours-{label}.npz") as data:
            rows += ours_rows(label, {k: data[k] for k in data.files}, reference)
    llama = {"text_only": "llama-mtmd-cli gives no per-token logits: llama.cpp runs the text prompt only"}
    if args.llama_kinds:
        name = f"{Path(args.model).name}-spread-{factor:.4g}"
        llama_figures, about = llama_rows(args, work, spread_folder, name, text, reference, text_ids)
        rows += llama_figures
        llama.update(about)

    report = {"benchmark": "fidelity", "machine": info, "model": args.model, "factor": factor,
              "schemes": {label: shlex.join(a) for label, a in schemes.items()},
              "text": {"ctx": args.ctx, "chunks": args.chunks,
                       "scored": f"positions {first}..{last - 1} of each chunk"},
              "image": {"size": args.image_size, "tokens": int(image["input_ids"].shape[1]),
                        "image_tokens": int((image["mm_token_type_ids"] == 1).sum())},
              "torch_fp32_spread": spreads, "llama": llama, "timings": timings, "rows": rows}
    from benchmarks.tables import fidelity_table

    print("\n" + "\n".join(fidelity_table(report)))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
