"""qwen3vl-merge: Qwen3-VL as one ONNX model.

Commands:
  build    export Qwen3-VL's parts to ONNX and write them into one folder
  verify   compare a combined folder with PyTorch, stage by stage
  run      generate text with a combined folder (ONNX Runtime only, no PyTorch)
  inspect  I/O, parameters per scope, operators, data files; --netron, --stitch
  presets  list the built-in presets (seeded random weights, published shapes)

Run ``python -m merge COMMAND --help`` for a command's options. Heavy libraries (torch, transformers)
are imported only by the commands that need them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import MergeError

log = logging.getLogger("merge")


def _cmd_build(args: argparse.Namespace) -> int:
    """Export Qwen3-VL to ONNX into --out (a new folder; --force replaces an existing one).

    --model takes a preset name (default: tiny), a local Hugging Face folder, or a hub id.
    """
    from .build import build
    from .sources import resolve_model

    source = resolve_model(args.model, args.cache_dir)
    print(f"model: {source.spec} ({source.folder})")
    result = build(source, Path(args.out), precision=args.precision, force=args.force)
    print(f"wrote {result.out}/ in {result.seconds:.1f} s (peak memory: decoder export "
          f"{result.export_peak_rss_gib:.2f} GiB, merge {result.peak_rss_gib:.2f} GiB, "
          f"session check {result.check_peak_rss_gib:.2f} GiB)")
    for part, path in result.parts.items():
        print(f"  {part}: {path}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    """Compare a combined folder with PyTorch, stage by stage; exit 1 if any stage fails.

    Runs the same processor output through PyTorch (--model) and the combined model and prints one table:
    vision image_embeds, each DeepStack level, merged input embeddings, 3-D position ids, prefill logits,
    each decode step's logits and the greedy tokens. With no --image, a few test images of different sizes
    are generated. --save-reference stores the reference so that --reference can check again without PyTorch.
    """
    from .verify import default_images, format_table, load_images, report_json, verify

    model_folder = None
    if args.reference is None:
        from .sources import resolve_model

        model_folder = resolve_model(args.model, args.cache_dir).folder
    images = load_images(args.image) if args.image else default_images()
    stages = verify(Path(args.combined), model_folder=model_folder, prompt=args.prompt, images=images,
                    new_tokens=args.max_new_tokens, reference=args.reference, save_to=args.save_reference)
    print(format_table(stages))
    if args.json:
        Path(args.json).write_text(report_json(stages) + "\n")
    return 0 if all(s.passed or not s.counted for s in stages) else 1


def _cmd_presets(args: argparse.Namespace) -> int:
    """List the built-in presets and their main shapes."""
    from .presets import PRESETS

    for name, cfg in PRESETS.items():
        v, t = cfg["vision_config"], cfg["text_config"]
        print(
            f"{name:14s} vision depth {v['depth']:2d} hidden {v['hidden_size']:4d} merge {v['spatial_merge_size']} "
            f"deepstack {v['deepstack_visual_indexes']} | text layers {t['num_hidden_layers']:2d} "
            f"hidden {t['hidden_size']:4d} heads {t['num_attention_heads']}/{t['num_key_value_heads']} "
            f"tied {cfg['tie_word_embeddings']}"
        )
    return 0


def _first_line(func) -> str:
    return (func.__doc__ or "").strip().splitlines()[0]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m merge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help=_first_line(_cmd_build), description=_cmd_build.__doc__)
    p.add_argument("--model", default="tiny", help="preset name, local HF folder or hub id (default: tiny)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int4"],
                   help="decoder weights: fp32, or int4 (MatMulNBits, block 32) for the CPU")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder when the build succeeds")
    p.add_argument("--cache-dir", type=Path, default=None, help="where presets are built (default ~/.cache)")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("verify", help=_first_line(_cmd_verify), description=_cmd_verify.__doc__)
    p.add_argument("combined", help="a folder written by merge build")
    p.add_argument("--model", default="tiny", help="the PyTorch reference: preset, HF folder or hub id")
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    p.add_argument("--prompt", default="Describe these images.", help="the user prompt")
    p.add_argument("--max-new-tokens", type=int, default=8, help="decode steps to compare")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    p.add_argument("--save-reference", type=Path, default=None, help="save the PyTorch reference (.npz)")
    p.add_argument("--reference", type=Path, default=None, help="use a saved reference instead of PyTorch")
    p.add_argument("--cache-dir", type=Path, default=None, help="where presets are built")
    p.set_defaults(func=_cmd_verify)

    from .inspect_cmd import add_parser as add_inspect_parser
    from .run_cmd import add_parser as add_run_parser

    add_run_parser(sub)
    add_inspect_parser(sub)

    p = sub.add_parser("presets", help=_first_line(_cmd_presets), description=_cmd_presets.__doc__)
    p.set_defaults(func=_cmd_presets)
    for command in sub.choices.values():  # --debug also after the command (SUPPRESS keeps the global default)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks and debug logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.debug:  # libraries' own progress chatter; our steps log under "merge" and "export"
        for name in ("onnx_ir", "onnxscript", "onnxruntime"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except MergeError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
