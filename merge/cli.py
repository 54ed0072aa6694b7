"""qwen3vl-merge: Qwen3-VL as one ONNX model.

Commands:
  build    export Qwen3-VL's parts to ONNX and write them into one folder
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
          f"{result.export_peak_rss_gib:.2f} GiB, merge {result.peak_rss_gib:.2f} GiB)")
    for part, path in result.parts.items():
        print(f"  {part}: {path}")
    return 0


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

    p = sub.add_parser("presets", help=_first_line(_cmd_presets), description=_cmd_presets.__doc__)
    p.set_defaults(func=_cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
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
