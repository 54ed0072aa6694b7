"""The rooms' rules hold (import-linter, as configured in pyproject.toml), a twin that breaks one must be caught,
and the bare package (``pip install qwen3vl-merge``, no extras) runs a combined folder without PyTorch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("merge", "export", "graphs")


def _lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "lint-imports"
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    return subprocess.run([str(script), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_contracts_hold():
    proc = _lint_imports(ROOT, ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("merge/runtime/prompts.py", "import torch", "The runtime and the contract import neither"),
    ("merge/contract/names.py", "import merge.stitch.pipeline", "Rooms are layered"),
    ("graphs/rope_index.py", "import transformers", "Graph builders, the build and its passes"),
    ("merge/quantize.py", "import torch", "the quantizers, checkpoints and inspect never import torch"),
    ("merge/runtime/prompts.py", "import merge.quantize", "The runtime and the contract import neither"),
])
def test_twin_a_forbidden_import_is_caught(tmp_path, module, line, contract):
    """The same contracts on a copy of the tree with one forbidden import added must fail, naming the contract."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n{line}  # a broken rule, on purpose\n")
    proc = _lint_imports(tmp_path, tmp_path)
    assert proc.returncode != 0, proc.stdout[-3000:]
    broken = [block for block in proc.stdout.split("\n\n") if "BROKEN" in block]
    assert any(contract in " ".join(block.split()) for block in broken), proc.stdout[-3000:]


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with the package installed without extras (from this checkout)."""
    work = tmp_path_factory.mktemp("bare")
    source = work / "source"  # a copy: building the wheel writes build/ and *.egg-info beside the sources
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(source)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return python


@pytest.mark.slow  # a fresh virtual environment and a pip install
def test_bare_install_runs_a_combined_folder(bare_venv, combined, tmp_path):
    folder = combined("tiny")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([str(bare_venv), "-c", "import importlib.util as u; print([m for m in ('torch', "
                            "'transformers', 'onnx', 'onnx_ir', 'onnxruntime_genai') if u.find_spec(m)])"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr  # none of the build's packages came along

    from tests.videos import write_clip

    clip = write_clip(tmp_path / "clip.mp4", 9, 6, 64, 48)
    run = subprocess.run([str(bare_venv), "-m", "merge", "run", str(folder), "--prompt", "Hello there.",
                          "--video", str(clip), "--max-new-tokens", "4"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1].startswith("vision+prefill")
    assert "1 video)" in run.stdout  # the bare runtime reads video files too (PyAV)

    build = subprocess.run([str(bare_venv), "-m", "merge", "build", "--out", str(tmp_path / "out")],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert build.returncode == 2 and "Traceback" not in build.stderr
    assert "pip install 'qwen3vl-merge[build]'" in build.stderr.strip().splitlines()[-1]
