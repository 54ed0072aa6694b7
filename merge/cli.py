"""qwen3vl-merge: Qwen3-VL as one ONNX model.

Commands:
  build    export Qwen3-VL's parts to ONNX and write them into one folder
  verify   compare a combined folder with PyTorch, stage by stage
  run      generate text with a combined folder (ONNX Runtime only, no PyTorch)
  inspect  I/O, parameters per scope, operators, data files; --netron, --stitch
  presets  list the built-in presets (seeded random weights, published shapes)
  serve    the folder behind an OpenAI-compatible HTTP API, with continuous batching and a chat page

Run ``python -m merge COMMAND --help`` for a command's options. Heavy libraries (torch, transformers)
are imported only by the commands that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading

from .errors import MergeError, printable

log = logging.getLogger("merge")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m merge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    from .commands import build, inspect, presets, run, serve, verify

    for command in (build, verify, run, inspect, presets, serve):
        command.add_parser(sub)
    for command in sub.choices.values():  # --debug also after the command (SUPPRESS keeps the global default)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks and debug logs")
    return parser


class Terminated(BaseException):
    """SIGTERM, as an exception: the build's staging folder and children are cleaned up on the way out."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """The command line: every error a user can cause is one line on stderr and a non-zero exit (2 for bad input,
    1 for a failed check or anything unexpected); ``--debug`` shows tracebacks."""
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.debug:  # libraries' own progress chatter; our steps log under "merge" and "export"
        for name in ("onnx_ir", "onnxscript", "onnxruntime"):
            logging.getLogger(name).setLevel(logging.WARNING)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return args.func(args)
    except MergeError as exc:
        if args.debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return _stopped(130)
    except Terminated:
        print("terminated", file=sys.stderr)
        return _stopped(143)
    except BrokenPipeError:  # the reader went away (`| head`): nothing left to say to it
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except UnicodeError as exc:
        if args.debug:
            raise
        print(f"error: text that is not valid UTF-8 ({exc.reason}); arguments and files must be UTF-8",
              file=sys.stderr)
        return 2
    except Exception as exc:
        if args.debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stopped(code: int) -> int:
    """After Ctrl-C or SIGTERM: an ONNX Runtime call told to terminate may still be inside one node (the vision
    attention over a large photo: seconds to a minute; see merge.runtime.interrupt). Leave at once rather than wait
    for it, or tear the interpreter down around a thread still computing; nothing is being written by then (runs
    write nothing, writes are atomic)."""
    interrupt = sys.modules.get("merge.runtime.interrupt")  # not imported: no call was made
    if interrupt is None or not interrupt.running_calls():
        return code
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _one_line(exc: BaseException) -> str:
    """The message on one line, control characters escaped (it may quote a hostile folder's names)."""
    text = printable(" ".join(str(exc).split()))
    return text or type(exc).__name__
