"""``merge inspect``'s command line. The work is in :mod:`merge.inspection`, imported only when the command
runs, so that building the CLI parser stays light (``merge run`` must work where onnx is not installed)."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_NETRON_PORT = 8080


def run(args: argparse.Namespace) -> int:
    """Show what a combined folder holds: metadata, I/O, parameters by scope, operators, data files.

    Reads the graph only (weights are never loaded), so it is quick on any model size. --check-checksums
    hashes the model files against merge.json (exit 1 on a mismatch); --stitch OUT.onnx writes a small
    weightless graph of the stitch region; --netron serves the model (or that stitch view) in Netron.
    """
    from . import inspection

    return inspection.run(args)


def add_parser(subparsers) -> None:
    """Register ``inspect`` on the CLI's subparsers."""
    first_line = (run.__doc__ or "").strip().splitlines()[0]
    p = subparsers.add_parser("inspect", help=first_line, description=run.__doc__)
    p.add_argument("combined", metavar="COMBINED", type=Path, help="a folder written by `python -m merge build`")
    p.add_argument("--json", action="store_true", help="print the same data as JSON")
    p.add_argument("--check-checksums", action="store_true",
                   help="hash the model files (streamed) and compare with merge.json's SHA-256")
    p.add_argument("--stitch", metavar="OUT.onnx", type=Path, default=None,
                   help="write a weightless graph of the stitch region (merge/*, DeepStack, positions) to OUT.onnx")
    p.add_argument("--netron", action="store_true",
                   help="serve the model (or the --stitch view) with Netron until Ctrl-C (pip install netron)")
    p.add_argument("--port", type=int, default=DEFAULT_NETRON_PORT,
                   help=f"Netron's port on localhost (default {DEFAULT_NETRON_PORT})")
    p.set_defaults(func=run)
