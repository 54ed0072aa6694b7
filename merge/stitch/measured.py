"""``python -m merge.stitch.measured REPORT (-m MODULE | -c CODE) ARGS...``: run a Python module or code, then write
this process's peak resident memory (VmHWM, KiB) to REPORT.

Why not the parent's ``wait4`` figure: on Linux a child's ``ru_maxrss`` starts from its parent's resident size at
``fork`` (it survives the ``exec``), so a child of a 2 GB process reports at least 2 GB. VmHWM is the high-water mark
of the memory map this process has since it was exec'd: its own.
"""

from __future__ import annotations

import atexit
import runpy
import sys
from pathlib import Path


def peak_kib() -> int:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: the best there is


def main() -> None:
    report, mode, target, *rest = sys.argv[1:]
    atexit.register(lambda: Path(report).write_text(str(peak_kib())))
    if mode == "-m":
        sys.argv = [target, *rest]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif mode == "-c":
        sys.argv = ["-c", *rest]
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
    else:
        raise SystemExit(f"usage: python -m merge.stitch.measured REPORT (-m MODULE | -c CODE) ARGS..., got {mode}")


if __name__ == "__main__":
    main()
