"""The vision tower, side by side in one run: ours (fp32 and int8) against PyTorch eager (fp32 and bf16) and
llama.cpp's projector (f32 and f16), per image size, with time and peak memory.

Every measurement runs in a child process of its own (so its peak memory is its own); systems are interleaved
within each repetition, and the table gives medians, minimums and ratios. All systems get the same number of
patches: ours and PyTorch the same pixel values (the folder's own preprocessing at the published limits), llama.cpp
the same image with ``--image-min/max-tokens`` set to the same token count. Figures, not pass/fail.

    python benchmarks/vision.py --model qwen3-vl-2b --sizes 448x448 896x896 4032x3024 --json vision.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import machine  # noqa: E402

SYSTEMS = ("ours-fp32", "ours-int8", "torch-fp32", "torch-bf16", "llama-f32", "llama-f16")
WARMUP_SIDE = 4  # patches per side of the warm-up image (kernels initialised, weights packed)


# -- the child: one system, one image, one timed call ---------------------------------------------------------------

def child(args: argparse.Namespace) -> int:
    pixels = np.load(args.pixels)
    grid = np.array([[int(v) for v in args.grid.split(",")]], np.int64)
    system = args.child
    if system.startswith("ours"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(args.onnx), options, providers=["CPUExecutionProvider"])

        def run(pv, g):
            return session.run(None, {"pixel_values": pv, "image_grid_thw": g})
    else:
        import torch

        torch.set_num_threads(args.threads)
        model = load_torch_vision(Path(args.model_folder))
        dtype = torch.bfloat16 if system == "torch-bf16" else torch.float32
        model = model.to(dtype)

        def run(pv, g):
            with torch.no_grad():
                return model(torch.from_numpy(pv).to(dtype), grid_thw=torch.from_numpy(g))
    side = WARMUP_SIDE * int(args.merge)
    run(np.zeros((side * side, pixels.shape[1]), np.float32), np.array([[1, side, side]], np.int64))
    start = time.perf_counter()
    run(pixels, grid)
    print(json.dumps({"seconds": time.perf_counter() - start}))
    return 0


def load_torch_vision(folder: Path):
    """Only the vision tower, fp32, from the checkpoint's ``model.visual.*`` tensors."""
    import torch
    from transformers import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    from graphs.vision import VISION_PREFIXES
    from merge.contract.config import ModelConfig
    from merge.sources.checkpoint import Checkpoint

    config = ModelConfig.from_folder(folder)
    ckpt = Checkpoint(folder)
    prefix = ckpt.find_prefix(VISION_PREFIXES, "patch_embed.proj.weight")
    model = Qwen3VLVisionModel(Qwen3VLVisionConfig(**config.raw["vision_config"])).eval()
    state = {n[len(prefix):]: torch.from_numpy(ckpt.load(n)) for n in ckpt.names() if n.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [m for m in missing if "inv_freq" not in m] or unexpected:
        raise RuntimeError(f"vision weights do not fit: missing {missing}, unexpected {unexpected}")
    return model


# -- the parent ------------------------------------------------------------------------------------------------------

def photo(width: int, height: int, seed: int = 0):
    """Smooth colours across the frame plus sensor-like noise (what compresses and resizes like a photo)."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin((x + y) / 300)], axis=-1)
    noise = np.random.default_rng(seed).normal(0, 12, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def prepare(args, work: Path):
    from merge.runtime.images import ImageProcessor
    from merge.sources.resolve import resolve_model
    from merge.stitch.parts import export_vision
    from merge.stitch.passes.quantize_vision_int8 import QuantizeVisionInt8

    source = resolve_model(args.model)
    onnx = {"ours-fp32": work / "fp32" / "vision.onnx", "ours-int8": work / "int8" / "vision.onnx"}
    if not onnx["ours-fp32"].is_file():
        export_vision(source.folder, source.config, onnx["ours-fp32"])
    if not onnx["ours-int8"].is_file():
        import onnx_ir as ir

        model = ir.load(onnx["ours-fp32"])
        QuantizeVisionInt8()(model)
        onnx["ours-int8"].parent.mkdir(parents=True, exist_ok=True)
        ir.save(model, onnx["ours-int8"], external_data="vision.onnx.data")
    processor = ImageProcessor.from_folder(source.folder)
    images = {}
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        path = work / f"photo-{size}.png"
        image = photo(width, height)
        image.save(path)
        out = processor(images=[image])
        np.save(work / f"pixels-{size}.npy", out["pixel_values"])
        images[size] = {"png": path, "npy": work / f"pixels-{size}.npy", "grid": out["image_grid_thw"][0].tolist()}
    return source, onnx, images


def measure(system: str, size: str, args, source, onnx, image, llama) -> dict:
    t, h, w = image["grid"]
    merge = source.config.vision.spatial_merge_size
    tokens = t * h * w // merge**2
    if system.startswith("llama"):
        cmd = [str(llama["bin"] / "llama-mtmd-cli"), "-m", str(llama["files"]["Q4_0"]), "--mmproj",
               str(llama["files"]["mmproj-" + system.split("-")[1]]), "--image", str(image["png"]), "-p", "Describe.",
               "-n", "1", "-t", str(args.threads), "-c", str(tokens + 256), "--image-min-tokens", str(tokens),
               "--image-max-tokens", str(tokens), "--no-warmup"]
        result = machine.measured_run(cmd)
        found = re.findall(r"batch encoding done in (\d+) ms", result["stdout"] + result["stderr"])
        if result["returncode"] or not found:
            return {"error": (result["stderr"] or result["stdout"]).strip().splitlines()[-1:]}
        return {"seconds": int(found[-1]) / 1e3, "peak_gib": result["peak_gib"]}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", system, "--pixels", str(image["npy"]),
           "--grid", ",".join(map(str, image["grid"])), "--threads", str(args.threads), "--merge", str(merge),
           "--model-folder", str(source.folder), "--onnx", str(onnx.get(system, ""))]
    result = machine.measured_run(cmd, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    if result["returncode"]:
        return {"error": result["stderr"].strip().splitlines()[-1:]}
    return {**json.loads(result["stdout"].strip().splitlines()[-1]), "peak_gib": result["peak_gib"]}


def ratio(rows: dict, base: str, row: dict) -> str:
    """How many times faster ``row`` is than ``base`` (medians)."""
    ref = rows.get(base, {})
    return f"{ref['median_s'] / row['median_s']:.2f}x" if "median_s" in ref else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-vl-2b")
    parser.add_argument("--sizes", nargs="+", default=["448x448", "896x896", "4032x3024"], help="WIDTHxHEIGHT")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (interleaved across systems)")
    parser.add_argument("--repeat-large", type=int, default=1, help="repetitions for images over 4 MP")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-dir", type=Path, default=None, help="llama.cpp build and GGUF folder (reused)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    # the child process's own arguments
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    for name in ("--pixels", "--grid", "--merge", "--model-folder", "--onnx"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import tempfile

    info = machine.describe(args.threads)
    print(machine.header(info), flush=True)
    scratch = None if args.workdir else tempfile.TemporaryDirectory(prefix="vision-bench-")
    work = Path(args.workdir or scratch.name)
    work.mkdir(parents=True, exist_ok=True)
    source, onnx, images = prepare(args, work)
    llama = None
    if any(s.startswith("llama") for s in args.systems):
        from benchmarks import llama_cpp

        root = args.llama_dir or llama_cpp.default_dir()
        llama = {"bin": llama_cpp.ensure_built(root),
                 "files": llama_cpp.convert(root, source.folder, args.model, kinds=())}  # the projector only

    results: dict[str, dict[str, list[dict]]] = {size: {s: [] for s in args.systems} for size in args.sizes}
    for size in args.sizes:
        t, h, w = images[size]["grid"]
        repeat = args.repeat if h * w * source.config.vision.patch_size**2 <= 4_000_000 else args.repeat_large
        for rep in range(repeat):
            for system in args.systems:
                result = measure(system, size, args, source, onnx, images[size], llama)
                results[size][system].append(result)
                shown = f"{result['seconds']:.2f} s, {result['peak_gib']:.2f} GiB" if "seconds" in result else \
                    f"error: {result['error']}"
                print(f"  {size} run {rep + 1}/{repeat} {system:11s} {shown}", flush=True)

    report = {"machine": info, "model": args.model, "sizes": {}}
    print(f"\nvision tower of {args.model}, one image per call (median of runs, min, peak memory of the process)")
    header = f"  {'image':>10} {'patches':>8} {'system':11} {'median':>9} {'min':>9} {'peak':>9} " \
             f"{'vs torch fp32':>14} {'vs torch bf16':>14}"
    print(header)
    for size in args.sizes:
        t, h, w = images[size]["grid"]
        rows = {}
        for system, runs in results[size].items():
            ok = [r for r in runs if "seconds" in r]
            if ok:
                rows[system] = {"median_s": statistics.median(r["seconds"] for r in ok),
                                "min_s": min(r["seconds"] for r in ok),
                                "peak_gib": max(r["peak_gib"] for r in ok), "runs": len(ok)}
            else:
                rows[system] = {"error": runs[0].get("error") if runs else "not run"}
        report["sizes"][size] = {"grid": [t, h, w], "systems": rows}
        for system, row in rows.items():
            if "error" in row:
                print(f"  {size:>10} {t * h * w:>8} {system:11} error: {row['error']}")
                continue
            ratios = [ratio(rows, base, row) for base in ("torch-fp32", "torch-bf16")]
            print(f"  {size:>10} {t * h * w:>8} {system:11} {row['median_s']:8.2f}s {row['min_s']:8.2f}s "
                  f"{row['peak_gib']:7.2f}GiB {ratios[0]:>14} {ratios[1]:>14}")
    print("  (ratios: how many times faster than that system; > 1 is faster)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if scratch:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
