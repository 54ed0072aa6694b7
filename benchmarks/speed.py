"""The decoder's phases, side by side in one run: the combined model against the bare decoder (the decoder graph
the build writes, without the stitch, with the same 4-bit weights), llama.cpp (Q4_0 and Q4_K_M, from the same
preset converted to GGUF) and PyTorch eager (fp32, bf16). Figures, not pass/fail.

Phases: prefill of 226 and 2048 text tokens; decode at a context of 256, 4096 and 16384 tokens (the context is
filled in chunks of 2048 first; the figure is the decode step at that depth); the first call with one 448x448
image (vision included); decode throughput at batch 1, 4 and 8. Each (repetition, system) runs in a child process
of its own, systems interleaved within each repetition; the table gives medians, minimums and ratios, and a JSON
report keeps everything with the machine it ran on.

    python benchmarks/speed.py --model qwen3-vl-2b --json speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import machine  # noqa: E402
from merge.runtime.model import PREFILL_CHUNK  # noqa: E402

PHASES = ("prefill-226", "prefill-2048", "decode-256", "decode-4096", "decode-16384", "image-448", "batch-1",
          "batch-4", "batch-8")
SYSTEMS = ("combined", "combined-growing", "bare", "llama-Q4_0", "llama-Q4_K_M", "torch-fp32", "torch-bf16")
# a prompt or context is fed this many tokens a call, as the runtime's chunked prefill feeds it (a 16k prefill in one
# call would materialise scores for all of it); llama.cpp's micro-batches are 512 (llama-bench's default -ub)
CHUNK = PREFILL_CHUNK
DECODE_STEPS = 16
TEXT_IDS = (100, 3000)  # ordinary tokens of the presets' tokenizer


def _ids(rng, batch: int, length: int) -> np.ndarray:
    return rng.integers(*TEXT_IDS, (batch, length)).astype(np.int64)


# -- ONNX: the combined model and the bare decoder ----------------------------------------------------------------

class OnnxDecoder:
    """One calling convention over both: ``prefill(ids)`` then ``step(token)``; the bare decoder takes random
    embeddings for the tokens (its cost does not depend on their values) and plain positions."""

    def __init__(self, system: str, path: Path, threads: int, in_place: bool = True):
        import onnxruntime as ort

        from merge.runtime import CombinedModel

        self.combined = system.startswith("combined")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if self.combined:
            self.model = CombinedModel(path, threads=threads)
            self.session = self.model.session
            self.hidden = self.model.config.text.hidden_size
            kv, head = self.model.num_kv_heads, self.model.head_dim
        else:
            from merge.contract.config import ModelConfig

            self.session = ort.InferenceSession(str(path / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
            config = ModelConfig.from_folder(path)
            self.hidden, kv, head = config.text.hidden_size, config.text.num_kv_heads, config.text.head_dim
        self.kv, self.head = kv, head
        self.in_place = in_place  # the KV cache in buffers written in place (IOBinding), else present fed back
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.rng = np.random.default_rng(0)

    def _run(self, feeds):
        return dict(zip(self.outputs, self.session.run(self.outputs, feeds), strict=True))

    def call(self, ids: np.ndarray, state: dict | None, keep_last: bool = True, capacity: int = 0) -> dict:
        """One call of ``ids`` [batch, n] after ``state`` (None: the first call, with room for ``capacity``
        positions in an in-place cache)."""
        from merge.runtime.cache import InPlaceCache, kv_cache_dtype

        batch, n = ids.shape
        past = 0 if state is None else state["length"]
        mask = np.ones((batch, past + n), np.int64)
        in_place = state["cache"] if state else None
        if state is None and self.in_place:
            in_place = InPlaceCache(self.session, self.past_names, batch, self.kv, self.head, max(capacity, n))
        if in_place is not None:
            cache = {}
        elif state is None:
            empty = np.zeros((batch, self.kv, 0, self.head), kv_cache_dtype(self.session, self.past_names))
            cache = dict.fromkeys(self.past_names, empty)
        else:
            cache = {p: state["out"][p.replace("past_key_values.", "present.")] for p in self.past_names}
        if self.combined:
            feeds = {"input_ids": ids, "attention_mask": mask, **self.model.no_vision(),
                     "rope_deltas": np.zeros((batch, 1), np.int64) if state is None else state["out"][
                         "rope_deltas_out"]}
            if keep_last and n > 1 and self.model.keeps_logits:  # a decode step has one position anyway
                feeds["logits_to_keep"] = np.array(1, np.int64)
        else:
            positions = np.broadcast_to(np.arange(past, past + n), (3, batch, n)).astype(np.int64)
            feeds = {"inputs_embeds": self.rng.standard_normal((batch, n, self.hidden), dtype=np.float32),
                     "attention_mask": mask, "position_ids": positions}
        feeds.update(cache)
        out = self._run(feeds) if in_place is None else in_place.run(feeds)
        return {"out": out, "length": past + n, "cache": in_place}

    def fill(self, length: int, batch: int = 1) -> dict:
        """A context of ``length`` tokens, with room for the decode steps after it."""
        state = None
        while (state or {"length": 0})["length"] < length:
            size = min(CHUNK, length - (state or {"length": 0})["length"])
            state = self.call(_ids(self.rng, batch, size), state, capacity=length + DECODE_STEPS + 1)
        return state


def run_onnx(system: str, path: Path, phases: list[str], threads: int) -> dict:
    decoder = OnnxDecoder(system, path, threads, in_place=not system.endswith("-growing"))
    rng = np.random.default_rng(1)
    results = {}
    decoder.call(_ids(rng, 1, 16), None)  # warm: weights packed, first-call allocations done
    for phase in phases:
        kind, _, value = phase.partition("-")
        if kind == "prefill":
            ids = _ids(rng, 1, int(value))
            start = time.perf_counter()
            decoder.call(ids, None) if int(value) <= CHUNK else decoder.fill(int(value))
            results[phase] = {"seconds": time.perf_counter() - start}
        elif kind == "decode":
            state = decoder.fill(int(value))
            holder = {"state": state}

            def step(_, holder=holder):
                holder["state"] = decoder.call(np.array([[5]], np.int64), holder["state"])

            results[phase] = {"tokens_per_s": 1 / machine.median_step(step, DECODE_STEPS)}
        elif kind == "batch":
            batch = int(value)
            holder = {"state": decoder.fill(128, batch)}

            def step(_, holder=holder, batch=batch):
                holder["state"] = decoder.call(np.full((batch, 1), 5, np.int64), holder["state"])

            results[phase] = {"tokens_per_s": batch / machine.median_step(step, DECODE_STEPS)}
        elif kind == "image" and decoder.combined:
            from benchmarks.vision import photo

            side = int(value)
            model = decoder.model
            inputs = model.preprocessor.build_inputs("Describe the picture in detail.",
                                                     [photo(side, side)])
            start = time.perf_counter()
            model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                           inputs["image_grid_thw"], max_new_tokens=1, all_logits=False)
            results[phase] = {"seconds": time.perf_counter() - start,
                              "tokens": int(inputs["input_ids"].shape[1])}
    return results


# -- PyTorch -------------------------------------------------------------------------------------------------------

def run_torch(system: str, folder: Path, phases: list[str], threads: int) -> dict:
    import torch
    from transformers import DynamicCache, Qwen3VLForConditionalGeneration

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if system == "torch-bf16" else torch.float32
    model = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    rng = np.random.default_rng(1)

    def call(ids, cache, length):
        batch, n = ids.shape
        mask = torch.ones((batch, length + n), dtype=torch.long)
        out = model(input_ids=torch.from_numpy(ids), attention_mask=mask, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        return out.past_key_values, length + n

    def fill(length, batch=1):
        cache, done = DynamicCache(config=model.config), 0
        while done < length:
            size = min(CHUNK, length - done)
            cache, done = call(_ids(rng, batch, size), cache, done)
        return cache, done

    results = {}
    with torch.no_grad():
        fill(16)
        for phase in phases:
            kind, _, value = phase.partition("-")
            if kind == "prefill":
                start = time.perf_counter()
                fill(int(value))
                results[phase] = {"seconds": time.perf_counter() - start}
            elif kind in ("decode", "batch"):
                batch = int(value) if kind == "batch" else 1
                holder = {"state": fill(int(value) if kind == "decode" else 128, batch)}

                def step(_, holder=holder, batch=batch):
                    holder["state"] = call(np.full((batch, 1), 5, np.int64), *holder["state"])

                results[phase] = {"tokens_per_s": batch / machine.median_step(step, DECODE_STEPS)}
            elif kind == "image":
                from benchmarks.vision import photo
                from merge.runtime.preprocess import Preprocessor

                side = int(value)
                inputs = Preprocessor(folder).build_inputs("Describe the picture in detail.", [photo(side, side)])
                kwargs = {k: torch.from_numpy(v) for k, v in inputs.items()}
                kwargs["pixel_values"] = kwargs["pixel_values"].to(dtype)
                start = time.perf_counter()
                model(**kwargs, logits_to_keep=1)
                results[phase] = {"seconds": time.perf_counter() - start, "tokens": int(inputs["input_ids"].shape[1])}
    return results


# -- llama.cpp -------------------------------------------------------------------------------------------------------

def run_llama(system: str, llama: dict, phases: list[str], threads: int, work: Path) -> tuple[dict, float]:
    kind = system.split("-", 1)[1]
    gguf, bin_dir = str(llama["files"][kind]), llama["bin"]
    results, peak = {}, 0.0

    def bench(args: list[str]) -> list[dict]:
        nonlocal peak
        result = machine.measured_run([str(bin_dir / "llama-bench"), "-m", gguf, "-t", str(threads), "-r", "1",
                                       "-o", "json", *args])
        peak = max(peak, result["peak_gib"])
        if result["returncode"]:
            raise RuntimeError(result["stderr"].strip().splitlines()[-1:])
        return json.loads(result["stdout"])

    prefills = [p for p in phases if p.startswith("prefill")]
    if prefills:
        for row in bench(["-p", ",".join(p.split("-")[1] for p in prefills), "-n", "0"]):
            results[f"prefill-{row['n_prompt']}"] = {"seconds": row["n_prompt"] / row["avg_ts"]}
    for phase in (p for p in phases if p.startswith("decode")):
        depth = int(phase.split("-")[1])
        (row,) = bench(["-p", "0", "-n", str(DECODE_STEPS), "-d", str(depth)])
        results[phase] = {"tokens_per_s": row["avg_ts"]}
    batches = [p.split("-")[1] for p in phases if p.startswith("batch")]
    if batches:
        result = machine.measured_run([str(bin_dir / "llama-batched-bench"), "-m", gguf, "-t", str(threads),
                                       "-c", str(8 * (128 + 2 * DECODE_STEPS)), "-npp", "128",
                                       "-ntg", str(DECODE_STEPS), "-npl", ",".join(batches)])
        peak = max(peak, result["peak_gib"])
        for line in result["stdout"].splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
            if len(cells) >= 10 and cells[2].isdigit() and cells[2] in batches:
                results[f"batch-{cells[2]}"] = {"tokens_per_s": float(cells[7])}
    if "image-448" in phases:
        from benchmarks.vision import photo

        image = work / "photo-448.png"
        photo(448, 448).save(image)
        result = machine.measured_run([str(bin_dir / "llama-mtmd-cli"), "-m", gguf, "--mmproj",
                                       str(llama["files"]["mmproj-f16"]), "--image", str(image), "-p",
                                       "Describe the picture in detail.", "-n", "1", "-t", str(threads), "-c", "4096",
                                       "--perf"])
        peak = max(peak, result["peak_gib"])
        log = result["stdout"] + result["stderr"]
        # this build prints no timings at the end; its log lines carry the time since start (min.s.ms.us): the
        # first call is from the start of the image's encoding to the end (projector, the image embeddings' and
        # the text's decoding, one token)
        found = re.search(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) I encoding mtmd batch", log, re.MULTILINE)
        if result["returncode"] == 0 and found:
            minutes, seconds, ms, us = (int(g) for g in found.groups())
            started = minutes * 60 + seconds + ms / 1e3 + us / 1e6
            results["image-448"] = {"seconds": result["seconds"] - started}
    return results, peak


# -- the parent ----------------------------------------------------------------------------------------------------

def child(args) -> int:
    phases = args.phases
    if args.child.startswith("torch"):
        results = run_torch(args.child, Path(args.path), phases, args.threads)
    else:
        results = run_onnx(args.child, Path(args.path), phases, args.threads)
    print(json.dumps(results))
    return 0


def prepare(args, work: Path, source) -> dict[str, Path]:
    """The combined int4 folder (the default scheme; built if absent) and the bare decoder with the same weights."""
    from merge.contract.quant import DEFAULT_INT4, EIGHT_BITS
    from merge.stitch.pipeline import build

    paths = {}
    combined = args.combined or work / "combined"
    if not (combined / "model.onnx").is_file():
        print(f"building {combined} (int4)", flush=True)
        build(source, combined, quant=DEFAULT_INT4, force=True)
    paths["combined"] = paths["combined-growing"] = combined
    bare = work / "bare"
    if "bare" in args.systems and not (bare / "decoder.onnx").is_file():
        import onnx_ir as ir

        from graphs.decoder import DecoderOptions
        from merge.sources.checkpoint import Checkpoint
        from merge.stitch.decoder import write_decoder
        from merge.stitch.passes.quantize_int4 import quantize_matmuls_int4, quantize_matmuls_nbits

        spec = DEFAULT_INT4
        # the bare decoder (no stitch options), with the combined model's scheme; weights quantized when saved
        model = write_decoder(Checkpoint(source.folder), source.config, DecoderOptions())
        options = {"block_size": spec.block_size, "accuracy_level": spec.accuracy_level,
                   "symmetric": spec.symmetric, "method": spec.method}
        quantize_matmuls_nbits(model, bits=EIGHT_BITS, include=lambda n: spec.bits_for(n.name) == EIGHT_BITS,
                               **options)
        quantize_matmuls_int4(model, **options)
        bare.mkdir(parents=True, exist_ok=True)
        ir.save(model, bare / "decoder.onnx", external_data="decoder.onnx.data")
        (bare / "config.json").write_text((source.folder / "config.json").read_text())
        del model
    paths["bare"] = bare
    paths["torch-fp32"] = paths["torch-bf16"] = source.folder
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-vl-2b")
    parser.add_argument("--combined", type=Path, default=None, help="an int4 combined folder of --model (built "
                                                                    "into --workdir if not given)")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=FOLDER",
                        help="another combined folder of --model (e.g. built with --block-size 128), run as the "
                             "system combined-LABEL beside the others; repeatable")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-dir", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--series", default="", help="a name for this run: tables.py puts reports of one model and "
                        "series in one table (e.g. a long-context run beside its main run)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from merge.sources.resolve import resolve_model

    info = machine.describe(args.threads)
    print(machine.header(info), flush=True)
    scratch = None if args.workdir else tempfile.TemporaryDirectory(prefix="speed-bench-")
    work = Path(args.workdir or scratch.name)
    work.mkdir(parents=True, exist_ok=True)
    source = resolve_model(args.model)
    paths = prepare(args, work, source)
    for variant in args.variant:
        label, sep, folder = variant.partition("=")
        if not sep or not (Path(folder) / "model.onnx").is_file():
            parser.error(f"--variant {variant!r}: expected LABEL=FOLDER with a combined folder (model.onnx in it)")
        paths[f"combined-{label}"] = Path(folder)
        args.systems.append(f"combined-{label}")
    llama = None
    if any(s.startswith("llama") for s in args.systems):
        from benchmarks import llama_cpp

        root = args.llama_dir or llama_cpp.default_dir()
        kinds = tuple(s.removeprefix("llama-") for s in args.systems if s.startswith("llama-"))
        llama = {"bin": llama_cpp.ensure_built(root),
                 "files": llama_cpp.convert(root, source.folder, Path(args.model).name, kinds)}

    runs: dict[str, list[dict]] = {s: [] for s in args.systems}
    peaks: dict[str, float] = dict.fromkeys(args.systems, 0.0)
    for rep in range(args.repeat):
        for system in args.systems:
            start = time.perf_counter()
            if system.startswith("llama"):
                try:
                    results, peak = run_llama(system, llama, args.phases, args.threads, work)
                except RuntimeError as exc:
                    results, peak = {"error": str(exc)}, 0.0
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", system, "--path", str(paths[system]),
                       "--threads", str(args.threads), "--phases", *args.phases]
                result = machine.measured_run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)})
                peak = result["peak_gib"]
                results = (json.loads(result["stdout"].strip().splitlines()[-1]) if result["returncode"] == 0
                           else {"error": result["stderr"].strip().splitlines()[-1:]})
            runs[system].append(results)
            peaks[system] = max(peaks[system], peak)
            print(f"  run {rep + 1}/{args.repeat} {system:13s} {time.perf_counter() - start:6.0f} s "
                  f"{json.dumps(results)}", flush=True)

    report = {"machine": info, "model": Path(args.model).name, "series": args.series, "systems": {}, "peak_gib": peaks}
    if "combined" in paths:  # what the combined model was: its int4 scheme and KV cache (tables.py's caption)
        from merge.contract.manifest import Manifest

        manifest = Manifest.read(paths["combined"])
        report["combined_scheme"] = f"{manifest.decoder_scheme}, KV cache {manifest.kv_cache} in place"
    print(f"\n{args.model}: medians of {args.repeat} interleaved runs (best in brackets); ratios: combined / system, "
          "> 1 means the combined model is faster")
    header = f"  {'phase':14}" + "".join(f"{s:>22}" for s in args.systems)
    print(header)
    for phase in args.phases:
        unit = "s" if phase.startswith(("prefill", "image")) else "tok/s"
        cells, summary = [], {}
        for system in args.systems:
            values = [r[phase]["seconds" if unit == "s" else "tokens_per_s"] for r in runs[system] if phase in r]
            if not values:
                cells.append(f"{'-':>22}")
                continue
            median = statistics.median(values)
            best = min(values) if unit == "s" else max(values)
            summary[system] = {"median": median, "best": best, "unit": unit, "runs": values}
            cells.append(f"{median:>11.2f} ({best:6.2f}) {unit:<3}")
        report["systems"].setdefault(phase, summary)
        print(f"  {phase:14}" + "".join(cells))
        base = summary.get("combined")
        if base:
            ratios = []
            for system in args.systems:
                other = summary.get(system)
                if not other:
                    ratios.append(f"{'':>22}")
                    continue
                ratio = other["median"] / base["median"] if unit == "s" else base["median"] / other["median"]
                ratios.append(f"{ratio:>20.2f}x ")
            print(f"  {'  vs combined':14}" + "".join(ratios))
    print("  peak memory GiB: " + ", ".join(f"{s} {peaks[s]:.2f}" for s in args.systems))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if scratch:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
