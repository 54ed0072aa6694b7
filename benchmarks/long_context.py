"""Peak memory at long context: the combined folder against llama.cpp on the same weights, one child process per
system and context length, measured side by side in one run.

Each child loads its model, fills a context of N tokens (the runtime's chunked prefill: ``--chunk`` positions per
call, as a long prompt is fed), decodes a
few tokens after it and reports its peak resident memory (``ru_maxrss``) and, for ours, the resident memory
after loading and after the fill, so the table says where the memory goes: weights, KV cache, per-call work.
ONNX Runtime settings that bear on memory can be varied per run (``--arena``, ``--chunk``). Prints figures,
asserts nothing:

    python benchmarks/long_context.py --combined ~/int4-2b --contexts 4096 16384 [--gguf Q4_K_M.gguf]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import machine

DECODE_STEPS = 8
TEXT_IDS = (100, 3000)


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def child(folder: Path, context: int, chunk: int, arena: bool, threads: int) -> dict:
    """Runs in the child: load, fill ``context`` tokens ``chunk`` at a time into an in-place cache, decode."""
    import onnxruntime as ort

    from merge.runtime import CombinedModel

    if not arena:  # sessions without the CPU arena: every tensor freed when its last reader is done
        from merge.contract.folder import CombinedFolder

        plain = CombinedFolder.session

        def session(self, options=None, providers=None, **kwargs):
            options = options or ort.SessionOptions()
            options.enable_cpu_mem_arena = False
            return plain(self, options, providers, **kwargs)

        CombinedFolder.session = session
    model = CombinedModel(folder, threads=threads, prefill_chunk=chunk)
    loaded = _rss_gib()
    rng = np.random.default_rng(0)
    high = min(TEXT_IDS[1], model.config.text.vocab_size, *model.config.special_token_ids.values())
    ids = (min(TEXT_IDS[0], high // 2), high)  # ordinary text tokens: below the vision tokens
    prompt = rng.integers(*ids, (1, context)).astype(np.int64)
    cache = model.new_cache(1, context + DECODE_STEPS + 1)
    # the runtime's own prefill: the prompt in calls of `chunk` positions, written in place, last logits only
    feeds = {k: v for k, v in model.first_feeds(prompt, np.ones_like(prompt)).items() if k not in cache.buffers}
    feeds["logits_to_keep"] = np.array(1, np.int64)
    out = model.prefill(cache.run, feeds)
    done = context
    filled = _rss_gib()
    for step in range(DECODE_STEPS):
        feeds = {"input_ids": np.full((1, 1), 5, np.int64),
                 "attention_mask": np.ones((1, done + step + 1), np.int64), **model.no_vision(),
                 "rope_deltas": out["rope_deltas_out"]}
        out = cache.run(feeds)
    kv_bytes = sum(a.nbytes for a in cache.arrays.values())
    return {"loaded_gib": loaded, "filled_gib": filled, "kv_gib": kv_bytes / 1024**3,
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


def run_ours(folder: Path, context: int, chunk: int, arena: bool, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(folder), "--contexts", str(context), "--chunk", str(chunk),
           "--threads", str(threads)] + ([] if arena else ["--no-arena"])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_llama(bench: Path, gguf: Path, context: int, threads: int) -> dict:
    result = machine.measured_run([str(bench), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json",
                                   "-p", "0", "-n", str(DECODE_STEPS), "-d", str(context)])
    if result["returncode"]:
        return {"error": result["stderr"].strip().splitlines()[-1:]}
    return {"peak_gib": result["peak_gib"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--combined", type=Path, help="a combined folder (int4 for the comparison with llama.cpp)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--chunk", type=int, default=2048, help="tokens per prefill call (default 2048)")
    parser.add_argument("--no-arena", action="store_true", help="only this run: ONNX Runtime's CPU arena off")
    parser.add_argument("--compare-arena", action="store_true", help="run ours with the arena on and off")
    parser.add_argument("--gguf", type=Path, nargs="*", default=[], help="llama.cpp GGUF files of the same weights")
    parser.add_argument("--llama-dir", type=Path, default=None, help="llama.cpp folder (benchmarks/llama_cpp.py)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here (tables.py renders them)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.contexts[0], args.chunk, not args.no_arena, args.threads)))
        return 0

    info = machine.describe(args.threads)
    print(machine.header(info))
    rows = []
    arenas = (True, False) if args.compare_arena else (not args.no_arena,)
    for context in args.contexts:
        for arena in arenas:
            label = f"ours (chunk {args.chunk}{'' if arena else ', no arena'})"
            rows.append((label, context, run_ours(args.combined, context, args.chunk, arena, args.threads)))
        if args.gguf:
            from benchmarks.llama_cpp import default_dir, ensure_built

            bench = ensure_built(args.llama_dir or default_dir()) / "llama-bench"
            for gguf in args.gguf:
                rows.append((f"llama.cpp {gguf.stem}", context, run_llama(bench, gguf, context, args.threads)))
    print(f"  {'system':34}{'context':>9}{'loaded':>9}{'filled':>9}{'KV':>8}{'peak':>9}")
    for label, context, r in rows:
        if "error" in r:
            print(f"  {label:34}{context:9d}  error: {r['error']}")
            continue
        cells = "".join(f"{r[k]:8.2f}G" if k in r else f"{'':>9}" for k in ("loaded_gib", "filled_gib", "kv_gib"))
        print(f"  {label:34}{context:9d}{cells}{r['peak_gib']:8.2f}G")
    if args.json:
        from merge.contract.manifest import Manifest

        manifest = Manifest.read(args.combined)
        report = {"benchmark": "long_context", "machine": info, "model": manifest.source_model,
                  "combined": f"{manifest.decoder_scheme}, vision {manifest.vision_precision}, "
                              f"KV cache {manifest.kv_cache}",
                  "chunk": args.chunk, "rows": [{"system": system_name(label), "label": label, "context": context, **r}
                                                for label, context, r in rows]}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def system_name(label: str) -> str:
    """``ours`` for the combined folder (arena on), ``ours, no arena``, or ``llama.cpp KIND`` (the GGUF's kind)."""
    if label.startswith("ours"):
        return "ours, no arena" if "no arena" in label else "ours"
    return "llama.cpp " + label.rsplit("-", 1)[-1]


if __name__ == "__main__":
    raise SystemExit(main())
