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

from .errors import MergeError

log = logging.getLogger("merge")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m merge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    from .commands import build, inspect, presets, run, verify

    for command in (build, verify, run, inspect, presets):
        command.add_parser(sub)
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
