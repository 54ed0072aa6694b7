"""``python -m merge run``: generate from a combined folder with ONNX Runtime, its own preprocessing and no torch.

Imports stay light: onnxruntime, numpy, Pillow, ``tokenizers`` and ``jinja2``; neither torch, transformers nor
onnx is imported.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import TextIO

from merge.errors import MergeError

log = logging.getLogger(__name__)

# ``--image N:PATH`` / ``--video N:PATH``: it goes with prompt N (0-based); a plain PATH goes with prompt 0.
IMAGE_SPEC = re.compile(r"^(\d+):(.+)$")


def run(args: argparse.Namespace) -> int:
    """Generate text from a combined folder: prompts and images in, streamed text and timings out.

    Greedy decoding with the folder's own chat template, tokenizer and image processor (no torch, no
    transformers); stops at the EOS ids of generation_config.json or after --max-new-tokens.

    Images: --image PATH shows PATH with the first prompt; --image N:PATH with prompt N (counted from 0, in the
    order of the --prompt options). Repeat --image for several images; each prompt sees its own images in the
    order given, before its text. Write ./N:name for a file whose name itself starts with digits and a colon.

    Videos: --video PATH (a video file, or a folder of frames taken as a clip at --fps), --video N:PATH likewise,
    after the prompt's images. Frames are sampled as Qwen3-VL's video processor samples them: --fps frames per
    second (default: the folder's video processor config, 2), at least 4 and at most --max-frames (default 768),
    each frame group preceded by its timestamp.

    One --prompt streams its answer as the tokens arrive. Several --prompt run as one left-padded batch; each
    answer is printed under a header when the batch is done. The last line gives the timings: vision and prefill
    together (the vision tower runs inside the first call), the prompt and image token counts, and decoding speed.
    """
    from merge.runtime.images import load_image
    from merge.runtime.model import CombinedModel, check_threads
    from merge.runtime.sampling import Sampling, check_stop

    folder = Path(args.combined)
    if args.max_new_tokens < 1:
        raise MergeError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    check_threads(args.threads, "--threads")
    try:
        sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        stop = check_stop(args.stop)
    except MergeError as exc:
        raise MergeError(f"--{str(exc).replace('_', '-')}") from None
    prompts = list(args.prompt)
    images = [[load_image(path) for path in paths] for paths in _assign_images(args.image or [], len(prompts))]
    videos = _assign_images(args.video or [], len(prompts), "--video")
    if args.fps is not None and not 0 < args.fps <= 1000:
        raise MergeError(f"--fps must be above 0 and at most 1000, got {args.fps}")

    for prompt in prompts:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            shown = prompt.encode("utf-8", "replace").decode()
            raise MergeError(f"--prompt {shown!r} is not valid UTF-8 text") from None
    model = CombinedModel(folder, threads=args.threads, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                          check_checksums=args.check_checksums, fps=args.fps, max_frames=args.max_frames)
    model.watch = TerminalWatch(sys.stderr)
    out = sys.stdout
    if len(prompts) == 1:
        shown: list[str] = []

        def stream(_row: int, piece: str) -> None:
            shown.append(piece)
            out.write(piece)
            out.flush()

        completion = model.complete(prompts[0], images[0], videos=videos[0], max_new_tokens=args.max_new_tokens,
                                    stream=stream, sampling=sampling, stop=stop)
        if not "".join(shown).endswith("\n"):
            out.write("\n")
    else:
        completion = model.complete(prompts, images, videos=videos, max_new_tokens=args.max_new_tokens,
                                    sampling=sampling, stop=stop)
        for row, (prompt, text) in enumerate(zip(prompts, completion.texts, strict=True)):
            out.write(f"--- [{row}] {prompt}\n{text}\n")
    out.write(timing_line(completion) + "\n")
    out.flush()
    return 0


# --max-pixels suggested before a long first call: about this many tokens per image
SUGGESTED_TOKENS_PER_IMAGE = 1024


class TerminalWatch:
    """The first call, told on ``stream`` (stderr): before a long one (:data:`merge.runtime.interrupt.LONG_CALL_TOKENS`
    image and video tokens or more), one line with its tokens and the options that make fewer; while any first call
    runs past a second, when ``stream`` is a terminal, the seconds elapsed on one line, erased when it ends. A
    :class:`merge.runtime.interrupt.Watch` (not a subclass: this module stays free of the runtime until ``run``)."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.terminal = stream.isatty()
        self.shown = -1  # the whole seconds last shown (-1: nothing on the line)

    def start(self, call) -> None:
        self.shown = -1
        if call is not None and call.long:
            self.stream.write(long_call_line(call) + "\n")
            self.stream.flush()

    def tick(self, seconds: float) -> None:
        if not self.terminal or int(seconds) < 1 or int(seconds) == self.shown:
            return
        self.shown = int(seconds)
        minutes, rest = divmod(self.shown, 60)
        elapsed = f"{minutes} min {rest} s" if minutes else f"{rest} s"
        self.stream.write(f"\rfirst call: {elapsed} (Ctrl-C stops it)")
        self.stream.flush()

    def stop(self) -> None:
        if self.shown >= 0:
            self.stream.write("\r" + " " * 40 + "\r")
            self.stream.flush()
            self.shown = -1


def long_call_line(call) -> str:
    """One line before a long first call: its image and video tokens, and how to have fewer."""
    parts, fewer = [], []
    if call.image_tokens:
        parts.append(f"{call.image_tokens} image tokens ({call.num_images} image{'' if call.num_images == 1 else 's'})")
        fewer.append(f"--max-pixels {SUGGESTED_TOKENS_PER_IMAGE * call.pixels_per_token} gives at most "
                     f"{SUGGESTED_TOKENS_PER_IMAGE} tokens per image")
    if call.video_tokens:
        parts.append(f"{call.video_tokens} video tokens ({call.num_videos} video{'' if call.num_videos == 1 else 's'})")
        fewer.append("fewer frames: --max-frames N or a lower --fps")
    return (f"long first call: {', '.join(parts)} before the first word; it can take minutes on a CPU. "
            f"{'; '.join(fewer)}. Ctrl-C stops it.")


def _assign_images(specs: list[str], num_prompts: int, option: str = "--image") -> list[list[str]]:
    """``--image`` (or ``--video``) values -> one list of paths per prompt."""
    per_prompt: list[list[str]] = [[] for _ in range(num_prompts)]
    for spec in specs:
        match = IMAGE_SPEC.match(spec)
        row, path = (int(match.group(1)), match.group(2)) if match else (0, spec)
        if row >= num_prompts:
            raise MergeError(f"{option} {spec} names prompt {row}, but there {'is' if num_prompts == 1 else 'are'} "
                             f"{num_prompts} --prompt (prompts count from 0)")
        per_prompt[row].append(path)
    return per_prompt


def timing_line(completion) -> str:
    """One line: vision+prefill time and speed with the token counts, then decode time per step and speed."""
    gen = completion.generation
    batch, new_tokens = gen.tokens.shape
    prefill_ms = gen.prefill_seconds * 1e3
    prefill_rate = completion.prompt_tokens / gen.prefill_seconds if gen.prefill_seconds > 0 else float("nan")
    images = f"{completion.num_images} image{'' if completion.num_images == 1 else 's'}"
    videos = ""
    if completion.num_videos:
        plural = "" if completion.num_videos == 1 else "s"
        videos = f", {completion.video_tokens} video tokens, {completion.num_videos} video{plural}"
    line = (f"vision+prefill {prefill_ms:.1f} ms for {completion.prompt_tokens} prompt tokens "
            f"({completion.image_tokens} image tokens, {images}{videos}): {prefill_rate:.1f} tokens/s")
    steps = new_tokens - 1  # the first new token comes from the prefill call
    if steps < 1:
        return f"{line} | decode: no steps ({new_tokens} new token)"
    step_ms = gen.decode_seconds * 1e3 / steps
    rows = "" if batch == 1 else f" x {batch} rows"
    unit = "token" if batch == 1 else "step"
    return (f"{line} | decode {steps} steps{rows}: {step_ms:.2f} ms/{unit}, "
            f"{gen.decode_tokens_per_second:.1f} tokens/s")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """How tokens are chosen: greedy by default (see :mod:`merge.runtime.sampling`)."""
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="sample with this temperature (default 0: greedy, the most probable token)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="sample from the most probable tokens whose probabilities sum to P (default 1: all)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K",
                        help="sample from the K most probable tokens (default 0: all)")
    parser.add_argument("--seed", type=int, default=None, metavar="N",
                        help="seed of the sampling: the same seed gives the same text (default: a fresh one)")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="end the answer where TEXT first appears (not shown); repeat for several")


def add_session_arguments(parser: argparse.ArgumentParser) -> None:
    """``--check-checksums`` / ``--threads``: how the folder is opened and its session run."""
    parser.add_argument("--check-checksums", action="store_true",
                        help="also hash the model files against merge.json's SHA-256 and refuse unlisted files")
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime intra-op threads, from 1 to 4 per CPU this process may use (default: "
                             "ONNX Runtime's choice)")


def add_pixel_arguments(parser: argparse.ArgumentParser) -> None:
    """``--min-pixels`` / ``--max-pixels``: each image is resized so that its pixel count lies between them (sides
    multiples of patch x merge), overriding the folder's preprocessor_config.json as transformers' ``size`` does."""
    parser.add_argument("--min-pixels", type=int, default=None, metavar="N",
                        help="smallest pixel count an image is resized to (default: the folder's processor config)")
    parser.add_argument("--max-pixels", type=int, default=None, metavar="N",
                        help="largest pixel count an image is resized to: fewer image tokens, faster (e.g. 401408 "
                             "for 448x448 worth of pixels; default: the folder's processor config)")


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    """``--fps`` / ``--max-frames``: how many frames a video gives, as Qwen3-VL's video processor samples them."""
    parser.add_argument("--fps", type=float, default=None, metavar="F",
                        help="frames sampled per second of video (default: the folder's video processor config, 2); "
                             "a folder of frames is taken as a clip at this rate")
    parser.add_argument("--max-frames", type=int, default=None, metavar="N",
                        help="at most this many frames per video (default: the folder's config, 768)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("combined", help="a combined folder written by `python -m merge build`")
    parser.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                        help="the user's text; repeat for a batch (prompt 0, 1, ...)")
    parser.add_argument("--image", action="append", metavar="[N:]PATH",
                        help="an image for prompt N (default 0); repeat for several images")
    parser.add_argument("--video", action="append", metavar="[N:]PATH",
                        help="a video file or a folder of frames for prompt N (default 0); repeat for several")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many tokens (default 128)")
    add_sampling_arguments(parser)
    add_pixel_arguments(parser)
    add_video_arguments(parser)
    add_session_arguments(parser)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``run`` on ``python -m merge``'s subparsers."""
    parser = subparsers.add_parser("run", help=run.__doc__.strip().splitlines()[0], description=run.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser
