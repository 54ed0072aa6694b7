"""The one atomic-folder helper: a folder appears under its final name only when it is complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from merge.errors import WriteError
from merge.space import nearest_existing


def default_dir_mode() -> int:
    """The mode ``mkdir`` would give a new folder under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def make_parent(final: Path) -> None:
    """Create ``final``'s parent folders, or say in one sentence why they cannot be (a file in the way, a
    read-only disk, no permission)."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = nearest_existing(final.parent)  # the first existing path on the way: a file
        raise WriteError(f"cannot create {final}: {blocker} is a file, not a folder") from None
    except OSError as exc:
        raise cannot_write(final, exc) from None


def cannot_write(final: Path, exc: OSError) -> WriteError:
    """One sentence for a write refused by the system where ``final`` was to go."""
    return WriteError(f"cannot write {final}: {exc.strerror or exc} ({exc.filename or final.parent}); choose a "
                      "folder you can write")


@contextlib.contextmanager
def atomic_folder(final: Path, *, kind: str = "partial") -> Iterator[Path]:
    """Yield an empty staging folder beside ``final`` (``.{name}.{kind}-XXXX``).

    When the block ends normally the staging folder takes ``final``'s place (an existing ``final`` is moved
    aside first and removed after the swap); when it raises, the staging folder is removed and ``final`` is
    left exactly as it was.
    """
    final = Path(final)
    make_parent(final)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.{kind}-", dir=final.parent))
    except OSError as exc:
        raise cannot_write(final, exc) from None
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
