"""ONNX Runtime on an emulated AVX2-only CPU, on any x86-64 Linux host.

QEMU's user-mode emulator (``qemu-x86_64``, Debian's ``qemu-user``) runs this same Python and ONNX Runtime with the
CPU model :data:`EMULATED_CPU`: AVX2 and FMA, no AVX-512, no VNNI, no AMX. MLAS reads the features through CPUID, so
it dispatches the kernels such a machine runs (the class of many cloud CPUs: AMD EPYC Zen 1 and 2, Intel before Ice
Lake), whatever CPU the host has. The emulation is exact: integer instructions, including the saturating
``vpmaddubsw``, are computed bit for bit as the hardware defines them (checked by
``tests/test_int8_saturation.py``: full-range int8 codes saturate there exactly as the numpy model of the kernel
says). It is slow (about 10x), so the tests send it one model holding all their cases, run once.

``.ci/run`` installs ``qemu-user``; elsewhere the tests that need it skip, naming the package.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

EMULATED_CPU = "Haswell"  # AVX2, FMA, F16C, BMI2; no AVX-512 (no VNNI, no AMX, no AVX-VNNI)
QEMU = shutil.which("qemu-x86_64")

# run in the emulated interpreter: one session over the model, the feeds from an .npz, every output into another
_CHILD = """
import sys
import numpy as np
import onnxruntime as ort
model, feeds, out = sys.argv[1:4]
options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
names = [o.name for o in session.get_outputs()]
np.savez(out, **dict(zip(names, session.run(names, dict(np.load(feeds))), strict=True)))
"""


def unavailable() -> str | None:
    """Why the emulated CPU cannot run here (a skip reason), or None."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"the AVX2 emulation runs x86-64 Linux binaries; this host is {sys.platform} {platform.machine()}"
    if QEMU is None:
        return "qemu-x86_64 is not installed (apt-get install qemu-user; .ci/run installs it)"
    return None


def run_emulated(model_path: Path, feeds: dict[str, np.ndarray], work: Path, timeout: float = 900) -> dict:
    """Every output of ``model_path`` on ``feeds``, computed by ONNX Runtime on the emulated CPU (one thread)."""
    feeds_path, out_path = work / "feeds.npz", work / "outputs.npz"
    np.savez(feeds_path, **feeds)
    done = python_emulated(["-c", _CHILD, str(model_path), str(feeds_path), str(out_path)], timeout)
    assert done.returncode == 0, f"the emulated run failed (exit {done.returncode}):\n{done.stderr}"
    with np.load(out_path) as outputs:
        return {name: outputs[name] for name in outputs.files}


def python_emulated(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """This Python with ``args`` on the emulated CPU (stdout and stderr captured as text; stderr without QEMU's
    warnings, one per host feature its TCG does not model: pcid, rtm, ...)."""
    done = subprocess.run([QEMU, "-cpu", EMULATED_CPU, sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout)
    done.stderr = "\n".join(line for line in done.stderr.splitlines()[-200:]
                            if "TCG doesn't support requested feature" not in line)
    return done


def run_native(model_path: Path, feeds: dict[str, np.ndarray]) -> dict:
    """The same on the host's CPU, in this process."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))
