"""The one child-process runner: a Python module in a process of its own, its peak memory measured.

Used where a step's memory must be returned to the system when it ends (the final check loads every weight
into ONNX Runtime; the GenAI builder, the tests' reference, loads a whole checkpoint) and where a test or
benchmark measures a step's peak memory. The peak is the child's own (reported by :mod:`merge.stitch.measured`
from inside it: the parent's ``wait4`` figure would include the parent's size at fork). The child dies with
its parent (Linux ``PR_SET_PDEATHSIG``), so an interrupted build leaves no orphan running.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChildResult:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_gib: float  # the child's own peak resident memory

    def last_line(self) -> str:
        lines = [line for line in self.stderr.strip().splitlines() if line.strip()]
        return lines[-1] if lines else "no output"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the child may outlive an interrupted parent
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def run_python(args: list[str], *, capture: bool = True, env: dict[str, str] | None = None) -> ChildResult:
    """``python ARGS`` (e.g. ``["-m", "export.text", ...]``) with this checkout importable; waits for it.

    ``capture=False`` lets the child write to this terminal (progress bars a person watches); its stdout is
    then discarded and its stderr is not kept.
    """
    if not args or args[0] not in ("-m", "-c"):
        raise ValueError(f"run_python takes -m MODULE or -c CODE, got {args[:1]}")
    environ = {**os.environ, **(env or {})}
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), environ.get("PYTHONPATH")) if p)
    pipe = subprocess.PIPE if capture else None
    handle, report = tempfile.mkstemp(prefix="peak-", suffix=".kib")
    os.close(handle)
    proc = subprocess.Popen([sys.executable, "-m", "merge.stitch.measured", report, *args], env=environ,
                            stdout=pipe if capture else subprocess.DEVNULL, stderr=pipe, text=True,
                            preexec_fn=_die_with_parent)
    texts = {"stdout": "", "stderr": ""}

    def drain(name: str) -> None:
        stream = getattr(proc, name)
        texts[name] = stream.read()
        stream.close()

    readers = [threading.Thread(target=drain, args=(name,), daemon=True)
               for name in texts if getattr(proc, name) is not None]
    try:
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
        proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        text = Path(report).read_text().strip()
        Path(report).unlink(missing_ok=True)
    peak = int(text) / 1024**2 if text else float("nan")  # nothing written: the child was killed
    return ChildResult(proc.returncode, texts["stdout"], texts["stderr"], peak)
