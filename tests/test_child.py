"""The child runner reports the child's own peak memory, not the parent's size at fork."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from merge.stitch.child import run_python

ALLOCATE = "import numpy as np, sys; a = np.ones(int(sys.argv[1]) * 2**20 // 8); print(a.sum())"


def test_child_peak_is_its_own():
    parent = np.ones(1536 * 2**20 // 8)  # this process holds 1.5 GiB while the child runs
    parent[::4096] = 2.0  # touched: resident
    small = run_python(["-c", ALLOCATE, "64"])
    large = run_python(["-c", ALLOCATE, "768"])
    assert small.returncode == 0 and large.returncode == 0
    assert small.peak_rss_gib < 0.5, small.peak_rss_gib  # the interpreter, numpy and 64 MiB
    assert 0.75 < large.peak_rss_gib < 1.25, large.peak_rss_gib  # 768 MiB more shows, in proportion

    # twin: the figure a plain wait4 gives carries the parent's 1.5 GiB into the child's
    proc = subprocess.Popen([sys.executable, "-c", ALLOCATE, "64"], stdout=subprocess.DEVNULL)
    _, _, usage = os.wait4(proc.pid, 0)
    assert usage.ru_maxrss / 2**20 > 1.4
    del parent


def test_child_failure_is_reported():
    result = run_python(["-c", "import sys; sys.exit('no such thing')"])
    assert result.returncode == 1 and result.last_line() == "no such thing"
