"""``merge inspect``'s command line. The work is imported only when the command runs, so that building the CLI
parser stays light (``merge run`` must work where onnx is not installed)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_NETRON_PORT = 8080


def run(args: argparse.Namespace) -> int:
    """Show what a combined folder holds: metadata, I/O, parameters by scope, operators, data files.

    Reads the graph only (weights are never loaded), so it is quick on any model size. --check-checksums
    hashes the model files against merge.json (exit 1 on a mismatch); --stitch OUT.onnx writes a small
    weightless graph of the stitch region; --netron serves the model (or that stitch view) in Netron.
    """
    from .extras import INSPECT_MODULES, require

    require("inspect", INSPECT_MODULES)

    from merge.contract.folder import CombinedFolder
    from merge.contract.names import MODEL_FILE
    from merge.tools.inspect.netron import import_netron, serve_netron, wait_for_netron
    from merge.tools.inspect.report import format_report, inspect_folder
    from merge.tools.inspect.stitch_view import write_stitch_view
    from merge.tools.verify import check_writable

    combined = CombinedFolder.open(args.combined)
    folder = combined.path
    if args.netron:
        import_netron()  # a missing optional package is reported before any work
    if args.stitch:
        check_writable(Path(args.stitch), combined)  # before any work, and never into the folder's own files
    data = inspect_folder(combined, verify_checksums=args.check_checksums)
    if args.stitch:
        path, nodes = write_stitch_view(combined, Path(args.stitch))
        data["stitch_view"] = {"path": str(path), "nodes": nodes, "bytes": path.stat().st_size}
    print(json.dumps(data, indent=2) if args.json else format_report(data))
    if args.netron:
        served = Path(args.stitch) if args.stitch else folder / MODEL_FILE
        host, port = serve_netron(served, args.port)
        print(f"Netron: http://{host}:{port} serving {served} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        wait_for_netron()
    return 1 if args.check_checksums and not data["checksums"]["ok"] else 0


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
