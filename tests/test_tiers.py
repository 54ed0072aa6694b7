"""The suite's two tiers: ``python -m pytest -q`` runs everything (CI); ``-m "not slow"`` is the fast tier.

The fast tier must still reach every room: for each room, at least one test module the fast tier collects imports
it. ``slow`` is the only marker of our own, and a misspelt one is an error, not a silently unselected test
(``--strict-markers`` in pyproject.toml).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
PYPROJECT = TOOL["pytest"]["ini_options"]


def rooms() -> list[str]:
    """The rooms: the packages import-linter checks besides merge, merge's subpackages, and the command line."""
    found = [name for name in TOOL["importlinter"]["root_packages"] if name != "merge"]
    found += [f"merge.{p.name}" for p in (ROOT / "merge").iterdir() if (p / "__init__.py").is_file()]
    return [*sorted(found), "merge.cli"]


def imported(path: Path) -> set[str]:
    """Every module a test file imports (at any depth: tests import the build lazily), with its parents."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {".".join(name.split(".")[:i]) for name in names for i in range(1, name.count(".") + 2)}


def test_the_rooms_are_the_ones_the_fast_tier_is_checked_for():
    assert rooms() == ["export", "graphs", "merge.commands", "merge.contract", "merge.presets", "merge.runtime",
                       "merge.serve", "merge.sources", "merge.stitch", "merge.tools", "merge.cli"]


def test_fast_tier_reaches_every_room():
    """Collected the way a developer runs it; under --strict-markers an unknown marker fails this collection."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not slow",
                           "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    modules = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    assert "tests/test_tiers.py" in modules
    reached = {room: sorted(m for m in modules if room in imported(ROOT / m)) for room in rooms()}
    assert all(reached.values()), {room: tests for room, tests in reached.items() if not tests}
    deselected = proc.stdout.strip().splitlines()[-1]
    assert "deselected" in deselected, deselected  # the slow tier exists and the fast one leaves it out


def test_slow_is_the_only_marker_and_markers_are_strict():
    assert [line.split(":")[0] for line in PYPROJECT["markers"]] == ["slow"]
    assert "--strict-markers" in PYPROJECT["addopts"].split()
