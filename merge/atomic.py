"""The atomic helpers: a folder (or a file) appears under its final name only when it is complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from merge.errors import WriteError
from merge.space import nearest_existing


def default_dir_mode() -> int:
    """The mode ``mkdir`` would give a new folder under the current umask."""
    return 0o777 & ~_umask()


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


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[BinaryIO]:
    """Yield a binary file beside ``final`` (``.{name}.partial-XXXX``) that takes ``final``'s place when the block
    ends normally; when it raises (Ctrl-C, SIGTERM, a full disk) the file is removed and ``final`` is left as it was.
    The parent folders are created; the file gets the mode a new file would get under the umask."""
    final = Path(final)
    make_parent(final)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.partial-", dir=final.parent)
    except OSError as exc:
        raise cannot_write(final, exc) from None
    stage = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        stage.chmod(0o666 & ~_umask())  # mkstemp makes 0600 files
        os.replace(stage, final)
    except BaseException:
        stage.unlink(missing_ok=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
