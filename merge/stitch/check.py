"""The final check of a written model, by path: the ONNX checker, then an ONNX Runtime session.

Run in a child process (``python -m merge.stitch.check MODEL``) so that the session's copy of every weight never
adds to the build's own memory.
"""

from __future__ import annotations

import sys
from pathlib import Path

from merge.errors import MergeError

from .child import run_python


def check_onnx(path: Path) -> None:
    """Structural check by path (the checker cannot hold >2 GB models in memory) and session creation."""
    import onnx
    import onnxruntime as ort

    from .ort_schemas import register_ort_default_domain_ops

    register_ort_default_domain_ops()
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as exc:
        raise MergeError(f"{path.name}: the ONNX checker refused the model: {exc}") from exc
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise MergeError(f"{path.name}: ONNX Runtime could not create a session: {exc}") from exc


def check_onnx_in_child(path: Path) -> float:
    """:func:`check_onnx` in a child process; returns the child's peak resident memory in GiB."""
    result = run_python(["-m", "merge.stitch.check", str(path)])
    if result.returncode:
        raise MergeError(f"the check of {path.name} failed: {result.last_line().removeprefix('error: ')}")
    return result.peak_rss_gib


def main(argv: list[str] | None = None) -> int:
    (path,) = argv or sys.argv[1:]
    try:
        check_onnx(Path(path))
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
