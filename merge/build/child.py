"""The one child-process runner: a Python module in a process of its own, its peak memory measured.

Used where a step's memory must be returned to the system when it ends (the GenAI builder loads a whole
checkpoint; the final check loads every weight into ONNX Runtime) and where a test or benchmark measures a
step's peak memory. The child dies with its parent (Linux ``PR_SET_PDEATHSIG``), so an interrupted build
leaves no orphan running.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
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
    environ = {**os.environ, **(env or {})}
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), environ.get("PYTHONPATH")) if p)
    pipe = subprocess.PIPE if capture else None
    proc = subprocess.Popen([sys.executable, *args], env=environ, stdout=pipe if capture else subprocess.DEVNULL,
                            stderr=pipe, text=True, preexec_fn=_die_with_parent)
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
        _, status, usage = os.wait4(proc.pid, 0)  # reaps the child and gives its own resource usage
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ChildResult(proc.returncode, texts["stdout"], texts["stderr"], usage.ru_maxrss / 1024**2)
