"""``--out``: the output folder appears only when complete, and never half-overwrites an existing one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from merge.atomic import atomic_folder
from merge.errors import MergeError


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
    with atomic_folder(out) as stage:
        yield stage
