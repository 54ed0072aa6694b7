"""An output folder that appears only when complete, and never half-overwrites an existing one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import MergeError


def default_dir_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


@contextlib.contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield a staging folder beside ``out``; on success it replaces ``out``, on failure it is removed.

    ``out`` is checked before any work starts: an existing folder is refused unless ``force``. With
    ``force`` the old folder stays in place until the new one is complete.
    """
    out = Path(out).resolve()
    if out.exists() and not force:
        raise MergeError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise MergeError(f"{out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    stage.chmod(default_dir_mode())  # mkdtemp makes 0700 folders; the result should look like any folder
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
