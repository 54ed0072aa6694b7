"""``--out``: the output folder appears only when complete, never half-overwrites an existing one, and never
takes the place of anything the build did not write.

- ``--force`` replaces only an empty folder or one a previous build wrote (its ``merge.json`` says so), and never
  ``/``, the home folder, the current folder or a folder that holds one of them;
- a build holds a lock beside ``--out`` (``.NAME.lock``, removed when it ends): a second build into the same
  folder stops at once;
- staging folders a killed build left (``.NAME.partial-*``, ``.NAME.old-*``) are removed by the next build, which
  holds the lock, so no other build can be using them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from merge.atomic import atomic_folder, cannot_write, make_parent
from merge.contract.manifest import MAX_MANIFEST_BYTES
from merge.contract.names import MANIFEST_FILE, TOOL_NAME
from merge.contract.reading import load_json, read_regular
from merge.errors import MergeError


def _is_same_or_inside(path: Path, other: Path) -> bool:
    """``other`` is ``path`` or lies inside it."""
    try:
        other.relative_to(path)
        return True
    except ValueError:
        return False


def check_replaceable(out: Path) -> None:
    """Refuse to replace what a build did not write (see the module docstring)."""
    protected = {Path("/"), Path.home().resolve(), Path.cwd().resolve()}
    for place in protected:
        if _is_same_or_inside(out, place):
            raise MergeError(f"--out {out} is or holds {place}; a build never replaces it, even with --force")
    if not out.is_dir():
        raise MergeError(f"{out} exists and is not a folder; a build never replaces it")
    entries = [p for p in out.iterdir()]
    if not entries:
        return
    manifest = out / MANIFEST_FILE
    try:  # read as a regular file only: a FIFO there is refused, never waited on
        data = load_json(read_regular(manifest, str(manifest), MAX_MANIFEST_BYTES), manifest)
        tool = data.get("tool") if isinstance(data, dict) else None
    except MergeError:
        tool = None
    if tool != TOOL_NAME:
        raise MergeError(f"{out} holds {len(entries)} entries and no {MANIFEST_FILE} of a previous build; --force "
                         "replaces only an empty folder or one merge build wrote")


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on ``out`` for the whole build; a second build fails at once, naming the lock."""
    lock_path = out.parent / f".{out.name}.lock"
    make_parent(out)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise cannot_write(out, exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MergeError(f"another build is writing {out} (it holds {lock_path}); wait for it to finish") from None
    try:
        remove_leftovers(out)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)  # while held: a build that opens the name later gets a new, free lock file
        os.close(fd)


def remove_leftovers(out: Path) -> list[Path]:
    """Staging folders a killed build left beside ``out`` (the caller holds the lock)."""
    removed = []
    for kind in ("partial", "old"):
        for leftover in out.parent.glob(f".{out.name}.{kind}-*"):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(leftover)
    return removed


@contextlib.contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield a staging folder beside ``out``; on success it replaces ``out``, on failure it is removed.

    ``out`` is checked before any work starts: an existing folder is refused unless ``force`` and replaceable.
    With ``force`` the old folder stays in place until the new one is complete.
    """
    out = Path(out).absolute()
    if out.exists() or out.is_symlink():
        if not force:
            raise MergeError(f"{out} already exists; pass --force to replace it")
        if out.is_symlink():
            raise MergeError(f"{out} is a symbolic link; a build never replaces it")
        check_replaceable(out.resolve())
    with build_lock(out), atomic_folder(out) as stage:
        yield stage
