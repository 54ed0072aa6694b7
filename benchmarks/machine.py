"""What machine a benchmark ran on: CPU model and the features that decide which kernels run, thread count, and the
measured memory read bandwidth (the ceiling of every weight-streaming phase). Printed first by every benchmark and
stored in its JSON report, so that figures are read as ratios on that machine, never against another day's."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

FEATURES = {
    "amx_int8": "AMX int8 tiles",
    "amx_bf16": "AMX bf16 tiles",
    "avx512_vnni": "AVX-512 VNNI",
    "avx512_bf16": "AVX-512 bf16",
    "avx512f": "AVX-512",
    "avx_vnni": "AVX-VNNI",
    "avx2": "AVX2",
}


def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    return {"model": model, "cores": os.cpu_count(), "features": [name for name in FEATURES if name in flags]}


def read_bandwidth_gbs(megabytes: int = 512, repeat: int = 5) -> float:
    """Best of ``repeat`` full reads of a buffer far larger than the caches (numpy sum: two threads or not, this
    is what weight streaming gets)."""
    import numpy as np

    data = np.ones(megabytes * (1 << 20) // 8, dtype=np.float64)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def describe(threads: int) -> dict:
    info = cpu_info()
    info["threads"] = threads
    info["read_bandwidth_gbs"] = round(read_bandwidth_gbs(), 1)
    return info


def header(info: dict) -> str:
    features = ", ".join(FEATURES[f] for f in info["features"]) or "none of note"
    return (f"CPU: {info['model']} ({info['cores']} cores; {features}); {info['threads']} threads; "
            f"memory read {info['read_bandwidth_gbs']} GB/s")


# Runs a command and reports its rusage: started fresh (small), so that the command it forks does not inherit the
# benchmark's own resident size into its ru_maxrss (Linux carries a parent's size at fork over the exec).
_LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, s, u = os.wait4(p.pid, 0); "
             "open(sys.argv[1], 'w').write(str(u.ru_maxrss)); sys.exit(os.waitstatus_to_exitcode(s))")


def measured_run(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd`` to completion; its stdout, stderr, exit status, wall time (s) and peak resident memory (GiB, its
    own)."""
    import subprocess
    import sys
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "peak"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, str(report), *cmd], env=env, capture_output=True,
                              text=True)
        seconds = time.perf_counter() - start
        peak = int(report.read_text()) / 1024**2 if report.is_file() else float("nan")
    return {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "peak_gib": peak,
            "seconds": seconds}


def median_step(run, steps: int) -> float:
    """Median seconds of ``run(i)`` over ``steps`` calls, the first (warm-up) left out."""
    import statistics
    import time

    times = []
    for i in range(steps):
        start = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:] or times)
