"""Video through the combined model: the first call (video preprocessing, vision tower, prefill) on clips of
growing length, with time and peak memory, to show how both grow with the clip.

Each clip is a moving test pattern at ``--size`` x ``--size`` written with PyAV; frames are sampled at ``--fps`` as
Qwen3-VL's video processor samples them, and the video pixel budget is raised so that every frame keeps its size
(as with Qwen3-VL's published video limits for clips this short): a 10-second clip at 2 fps is 20 frames, 10 frame
groups of (size / 32)^2 tokens. Every clip runs in a child process of its own, so its peak memory (VmHWM) is its
own. Figures, not pass/fail.

    python benchmarks/video.py --model qwen3-vl-2b --durations 10 20 40 60 --json video.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import machine  # noqa: E402


def child(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import numpy as np

    from merge.runtime.model import CombinedModel
    from merge.stitch.measured import peak_kib

    model = CombinedModel(args.combined, threads=args.threads, fps=args.fps)
    pre = model.preprocessor
    side = args.size
    frames = int(args.duration * args.fps)
    # every frame keeps its size: the budget covers all of them (the defaults would shrink long clips)
    pre.video_processor = replace(pre.video_processor, max_pixels=max(pre.video_processor.max_pixels,
                                                                      (frames + 2) * side * side))
    start = time.perf_counter()
    inputs = pre.build_inputs("Describe what happens in the video.", videos=[args.clip])
    preprocess = time.perf_counter() - start
    feeds = model.first_feeds(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                              inputs["image_grid_thw"], inputs["pixel_values_videos"], inputs["video_grid_thw"])
    if model.keeps_logits:
        feeds["logits_to_keep"] = np.array(1, np.int64)
    start = time.perf_counter()
    model.forward(feeds)
    first_call = time.perf_counter() - start
    grid = inputs["video_grid_thw"][0].tolist()
    print(json.dumps({"preprocess_s": preprocess, "first_call_s": first_call, "grid": grid,
                      "video_tokens": int((inputs["input_ids"] == model.config.video_token_id).sum()),
                      "prompt_tokens": int(inputs["input_ids"].shape[1]), "peak_gib": peak_kib() / 1024**2}))
    return 0


def write_clip(path: Path, seconds: float, rate: int, side: int) -> Path:
    from tests.videos import write_clip as write

    return write(path, int(seconds * rate), rate, side, side)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-vl-2b")
    parser.add_argument("--combined", type=Path, default=None, help="a combined folder to reuse (else built)")
    parser.add_argument("--precision", default="int4", help="decoder precision of the folder built")
    parser.add_argument("--vision-precision", default="int8", help="vision precision of the folder built")
    parser.add_argument("--durations", nargs="+", type=float, default=[10, 20, 40, 60], help="seconds")
    parser.add_argument("--size", type=int, default=448, help="frame side in pixels")
    parser.add_argument("--fps", type=float, default=2.0, help="frames sampled per second")
    parser.add_argument("--source-fps", type=int, default=8, help="the clips' own frame rate")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--clip", help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import tempfile

    info = machine.describe(args.threads)
    print(machine.header(info), flush=True)
    scratch = None if args.workdir else tempfile.TemporaryDirectory(prefix="video-bench-")
    work = Path(args.workdir or scratch.name)
    work.mkdir(parents=True, exist_ok=True)
    combined = args.combined or work / f"combined-{args.precision}-vision-{args.vision_precision}"
    if not (combined / "model.onnx").is_file():
        subprocess.run([sys.executable, "-m", "merge", "build", "--model", args.model, "--precision", args.precision,
                        "--vision-precision", args.vision_precision, "--out", str(combined)], check=True, cwd=ROOT)
    rows = []
    for seconds in args.durations:
        clip = work / f"clip-{seconds:g}s-{args.size}.mp4"
        if not clip.is_file():
            write_clip(clip, seconds, args.source_fps, args.size)
        runs = []
        for _ in range(args.repeat):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--combined", str(combined), "--clip",
                   str(clip), "--duration", str(seconds), "--fps", str(args.fps), "--size", str(args.size),
                   "--threads", str(args.threads)]
            result = machine.measured_run(cmd, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
            if result["returncode"]:
                runs.append({"error": (result["stderr"].strip().splitlines() or ["killed"])[-1]})
                break
            runs.append(json.loads(result["stdout"].strip().splitlines()[-1]))
        good = [r for r in runs if "error" not in r]
        row = {"seconds": seconds, "runs": runs}
        if good:
            row.update({k: statistics.median(r[k] for r in good) for k in ("preprocess_s", "first_call_s",
                                                                            "peak_gib")})
            row.update({k: good[0][k] for k in ("grid", "video_tokens", "prompt_tokens")})
        rows.append(row)
        shown = (f"{row['first_call_s']:8.1f} s first call, {row['preprocess_s']:5.1f} s preprocessing, "
                 f"{row['peak_gib']:5.2f} GiB, {row['video_tokens']} video tokens (grid {row['grid']})"
                 if good else runs[-1]["error"])
        print(f"  {seconds:5g} s clip: {shown}", flush=True)
    base = next((r for r in rows if "first_call_s" in r), None)
    if base:
        print("\n  clip     frames  video tokens  first call   per token   peak GiB   growth vs the first clip")
        for r in rows:
            if "first_call_s" not in r:
                continue
            growth = r["first_call_s"] / base["first_call_s"]
            print(f"  {r['seconds']:5g} s  {int(r['seconds'] * args.fps):7d}  {r['video_tokens']:12d}  "
                  f"{r['first_call_s']:9.1f} s  {r['first_call_s'] / r['video_tokens'] * 1e3:7.1f} ms  "
                  f"{r['peak_gib']:8.2f}  {growth:8.2f}x time for {r['seconds'] / base['seconds']:.0f}x the clip")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "model": args.model, "combined": str(combined),
                                         "size": args.size, "fps": args.fps, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
