"""Vision part speed, side by side in one run (figures, not pass/fail: the machines are shared and noisy).

Prints:
  * ONNX Runtime: 8 images of 16x16 patches against 1 such image (per-image attention: ratio near 8);
  * ONNX Runtime (our dynamic export) against PyTorch eager fp32 on a 448x448 and an 896x896 image;
  * optionally the alternative: a TorchScript export traced at ONE fixed grid, run at that grid only.

    python benchmarks/vision.py --model qwen3-vl-4b
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merge.build.parts import export_vision
from merge.contract.vision import VisionSpec
from merge.sources.resolve import resolve_model


def timed(fn, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_torch_vision(folder: Path, vision_config: dict):
    """Only the vision tower, in fp32, from the checkpoint's ``model.visual.*`` tensors."""
    import torch
    from transformers import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    from graphs.vision import VISION_PREFIXES
    from merge.sources.checkpoint import Checkpoint

    ckpt = Checkpoint(folder)
    prefix = ckpt.find_prefix(VISION_PREFIXES, "patch_embed.proj.weight")
    model = Qwen3VLVisionModel(Qwen3VLVisionConfig(**vision_config)).eval()
    state = {n[len(prefix):]: torch.from_numpy(ckpt.load(n)) for n in ckpt.names() if n.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [m for m in missing if "inv_freq" not in m] or unexpected:
        raise RuntimeError(f"vision weights do not fit: missing {missing}, unexpected {unexpected}")
    return model


def inputs(spec: VisionSpec, grids: list[tuple[int, int, int]], seed: int = 0):
    grid = np.array(grids, np.int64)
    rows = int(grid.prod(axis=1).sum())
    return np.random.default_rng(seed).standard_normal((rows, spec.patch_dim), dtype=np.float32), grid


def image_grid(spec: VisionSpec, pixels: int) -> tuple[int, int, int]:
    side = pixels // spec.patch_size
    return (1, side, side)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-vl-4b")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 896])
    parser.add_argument("--no-fixed-grid", action="store_true", help="skip the fixed-grid TorchScript baseline")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import onnxruntime as ort
    import torch

    source = resolve_model(args.model)
    spec = source.config.vision
    scratch = None if args.workdir else tempfile.TemporaryDirectory(prefix="vision-bench-")  # removed at exit
    work = args.workdir or Path(scratch.name)
    start = time.perf_counter()
    path = export_vision(source.folder, source.config, work / "vision.onnx")
    print(f"model {args.model}: vision depth {spec.depth}, hidden {spec.hidden_size}; "
          f"export {time.perf_counter() - start:.1f} s; torch threads {torch.get_num_threads()}")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run_onnx(pv, grid):
        return sess.run(None, {"pixel_values": pv, "image_grid_thw": grid})

    one = inputs(spec, [(1, 16, 16)])
    eight = inputs(spec, [(1, 16, 16)] * 8)
    t1 = timed(lambda: run_onnx(*one), args.repeat)
    t8 = timed(lambda: run_onnx(*eight), args.repeat)
    print("\nper-image attention (ONNX Runtime)")
    print(f"  1 image  16x16 patches: {t1 * 1e3:8.1f} ms")
    print(f"  8 images 16x16 patches: {t8 * 1e3:8.1f} ms   ratio {t8 / t1:.2f} (linear: 8)")

    model = load_torch_vision(source.folder, source.config.raw["vision_config"])
    rows = []
    for size in args.sizes:
        pv, grid = inputs(spec, [image_grid(spec, size)])
        pt, gt = torch.from_numpy(pv), torch.from_numpy(grid)
        with torch.no_grad():
            t_torch = timed(lambda pt=pt, gt=gt: model(pt, grid_thw=gt), args.repeat)
        t_onnx = timed(lambda pv=pv, grid=grid: run_onnx(pv, grid), args.repeat)
        t_fixed = None
        if not args.no_fixed_grid:
            t_fixed = fixed_grid_baseline(model, pv, grid, work / f"fixed_{size}.onnx", args.repeat)
        rows.append((size, grid, t_torch, t_onnx, t_fixed))

    print("\nONNX Runtime (dynamic export) against PyTorch eager fp32, one image")
    header = ("image", "grid", "pytorch", "onnx", "speedup", "fixed-grid", "dyn/fixed")
    print("  {:>9} {:>12} {:>10} {:>10} {:>8} {:>11} {:>9}".format(*header))
    for size, grid, t_torch, t_onnx, t_fixed in rows:
        fixed = f"{t_fixed * 1e3:9.0f}ms" if t_fixed else "-"
        ratio = f"{t_onnx / t_fixed:8.2f}" if t_fixed else "-"
        grid_text = str(tuple(int(v) for v in grid[0]))
        print(f"  {size:>4}x{size:<4} {grid_text:>12} {t_torch * 1e3:8.0f}ms {t_onnx * 1e3:8.0f}ms "
              f"{t_torch / t_onnx:7.2f}x {fixed:>11} {ratio:>9}")
    return 0


def fixed_grid_baseline(model, pv: np.ndarray, grid: np.ndarray, path: Path, repeat: int) -> float | None:
    """What public recipes do: trace at one grid (TorchScript) and run at that grid only."""
    import onnxruntime as ort
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values, grid_thw):
            out = self.inner(pixel_values, grid_thw=grid_thw)
            return out.pooler_output, torch.stack(out.deepstack_features)

    try:
        with torch.no_grad():
            torch.onnx.export(Wrapper(model), (torch.from_numpy(pv), torch.from_numpy(grid)), str(path),
                              dynamo=False, opset_version=17, input_names=["pixel_values", "image_grid_thw"])
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # the baseline is informative only; report and go on
        print(f"  (fixed-grid baseline could not be exported: {type(exc).__name__}: {str(exc)[:200]})")
        return None
    names = [i.name for i in sess.get_inputs()]
    feeds = {"pixel_values": pv, "image_grid_thw": grid}
    return timed(lambda: sess.run(None, {n: feeds[n] for n in names}), repeat)


if __name__ == "__main__":
    raise SystemExit(main())
