"""The one atomic-folder helper: a folder appears under its final name only when it is complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def default_dir_mode() -> int:
    """The mode ``mkdir`` would give a new folder under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


@contextlib.contextmanager
def atomic_folder(final: Path, *, kind: str = "partial") -> Iterator[Path]:
    """Yield an empty staging folder beside ``final`` (``.{name}.{kind}-XXXX``).

    When the block ends normally the staging folder takes ``final``'s place (an existing ``final`` is moved
    aside first and removed after the swap); when it raises, the staging folder is removed and ``final`` is
    left exactly as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.{kind}-", dir=final.parent))
    stage.chmod(default_dir_mode())  # mkdtemp makes 0700 folders; the result should look like any folder
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(stage, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
