"""``--out``: the output folder appears only when complete, never half-overwrites an existing one, and never
takes the place of anything the build did not write.

- ``--force`` replaces only an empty folder or one a previous build wrote: every entry in it is a file its
  ``merge.json`` lists (anything else, a user's ``NOTES.md`` or ``results/``, stops the build with one line naming
  it, before any work, unless ``--others keep`` moves it into the new folder or ``--others discard`` lets it go
  with the old one); never ``/``, the home folder, the current folder or a folder that holds one of them, and
  never a mount point (a new folder cannot be renamed over one: build into a folder on it);
- a build holds a lock beside ``--out`` (``.NAME.lock``, which it made and marked, removed when it ends): a second
  build into the same folder stops at once; a ``.NAME.lock`` without the mark is not taken (nor removed);
- staging folders a killed build left (``.NAME.partial-HEX``, ``.NAME.old-HEX`` holding the marker a build writes,
  see :mod:`merge.atomic`) are removed by the next build, which holds the lock, so no other build can be using
  them; nothing is matched by a glob on the name, and an ``old`` one whose build died mid-swap is put back first.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from merge.atomic import atomic_folder, cannot_write, leftover_kind, make_parent
from merge.contract.manifest import MAX_MANIFEST_BYTES
from merge.contract.names import MANIFEST_FILE, TOOL_NAME
from merge.contract.reading import load_json, read_regular
from merge.errors import MergeError

log = logging.getLogger(__name__)

LOCK_TEXT = f"{TOOL_NAME} build lock\n"  # what a build writes into the lock file it makes
MAX_NAMED = 6  # stray entries named in the refusal; the rest are counted


def _is_same_or_inside(path: Path, other: Path) -> bool:
    """``other`` is ``path`` or lies inside it."""
    try:
        other.relative_to(path)
        return True
    except ValueError:
        return False


def _is_mount_point(out: Path) -> bool:
    try:
        return os.path.ismount(out) or os.stat(out).st_dev != os.stat(out.parent).st_dev
    except OSError:
        return False


def _refuse_mount_point(out: Path) -> None:
    if _is_mount_point(out):
        raise MergeError(f"--out {out} is a mount point; a build cannot put a new folder in its place: build into a "
                         f"folder on it (--out {out / 'NAME'})")


def _written_by_a_build(out: Path) -> set[str] | None:
    """The names ``out``'s ``merge.json`` says a build wrote (itself included), or None when it has none of ours."""
    manifest = out / MANIFEST_FILE
    try:  # read as a regular file only: a FIFO there is refused, never waited on
        data = load_json(read_regular(manifest, str(manifest), MAX_MANIFEST_BYTES), manifest)
    except MergeError:
        return None
    if not isinstance(data, dict) or data.get("tool") != TOOL_NAME:
        return None
    names = {MANIFEST_FILE}
    for key in ("parts", "checksums", "sizes"):
        value = data.get(key)
        names |= {n for n in (value.values() if key == "parts" else value) if isinstance(n, str)} \
            if isinstance(value, dict) else set()
    files = data.get("preprocessing_files")
    names |= {n for n in files if isinstance(n, str)} if isinstance(files, list) else set()
    return names


OTHERS = ("keep", "discard")  # what --force may do with entries no build wrote (default: refuse)


def check_replaceable(out: Path, others: str | None = None) -> tuple[str, ...]:
    """Refuse to replace what a build did not write (see the module docstring); with ``others`` the entries no
    build wrote are returned instead (names in ``out``)."""
    protected = {Path("/"), Path.home().resolve(), Path.cwd().resolve()}
    for place in protected:
        if _is_same_or_inside(out, place):
            raise MergeError(f"--out {out} is or holds {place}; a build never replaces it, even with --force")
    if not out.is_dir():
        raise MergeError(f"{out} exists and is not a folder; a build never replaces it")
    _refuse_mount_point(out)
    entries = sorted(out.iterdir())
    if not entries:
        return ()
    written = _written_by_a_build(out)
    if written is None:
        raise MergeError(f"{out} holds {len(entries)} entries and no {MANIFEST_FILE} of a previous build; --force "
                         "replaces only an empty folder or one merge build wrote")
    strays = []
    for entry in entries:
        mode = entry.lstat().st_mode
        if entry.name not in written or not stat.S_ISREG(mode):  # a build writes files, never folders or links
            strays.append(entry)
    if strays and others is None:
        shown = [e.name + ("/" if e.is_dir() and not e.is_symlink() else "") for e in strays]
        named = ", ".join(shown[:MAX_NAMED]) + (f" and {len(shown) - MAX_NAMED} more" if len(shown) > MAX_NAMED
                                                else "")
        it = "it" if len(strays) == 1 else "them"
        raise MergeError(f"{out} holds {named}, which no build wrote; --force replaces only a build's own files: "
                         f"move {it} out of the folder, or pass --others keep (into the new folder) or --others "
                         f"discard (deleted with the old one)")
    return tuple(e.name for e in strays)


def _open_lock(lock_path: Path, out: Path) -> int:
    """A descriptor on ``lock_path``, locked: made and marked here, or one a build made (its mark) and no build
    holds now. Refused: a file without the mark (not ours to use or remove), one another build holds."""
    not_ours = MergeError(f"{lock_path} is not a lock a build made (a build locks {out} there); move it away and "
                          "build again")
    for _ in range(20):
        created = True
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            created = False
            try:
                if not stat.S_ISREG(os.lstat(lock_path).st_mode):
                    raise not_ours from None
                fd = os.open(lock_path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # its build ended and removed it: make a new one
            except OSError as exc:
                raise cannot_write(out, exc) from None
        except OSError as exc:
            raise cannot_write(out, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MergeError(f"another build is writing {out} (it holds {lock_path}); wait for it to finish") from None
        if not _is_the_file(fd, lock_path):  # removed (or replaced) by the build that held it: take the new one
            os.close(fd)
            continue
        if created:
            os.write(fd, LOCK_TEXT.encode())
            return fd
        if os.pread(fd, len(LOCK_TEXT) + 1, 0) != LOCK_TEXT.encode():
            os.close(fd)
            raise not_ours
        return fd  # a killed build's lock
    raise MergeError(f"cannot take the lock {lock_path}: other builds keep replacing it")


def _is_the_file(fd: int, path: Path) -> bool:
    try:
        here, held = os.lstat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on ``out`` for the whole build; a second build fails at once, naming the lock."""
    lock_path = out.parent / f".{out.name}.lock"
    make_parent(out)
    fd = _open_lock(lock_path, out)
    try:
        remove_leftovers(out)
        yield
    finally:
        if _is_the_file(fd, lock_path):
            with contextlib.suppress(OSError):
                os.unlink(lock_path)  # while held: a build that opens the name later sees it gone and makes its own
        os.close(fd)


def remove_leftovers(out: Path) -> list[Path]:
    """Staging folders a killed build left beside ``out`` (the caller holds the lock): only those with a build's
    exact name and marker. An ``old`` one holding the previous folder while ``out`` is missing (killed mid-swap)
    gives the folder back first."""
    removed = []
    for entry in sorted(out.parent.iterdir()):
        kind = leftover_kind(entry, out.name)
        if kind is None:
            continue
        previous = entry / out.name
        if kind == "old" and not out.exists() and not out.is_symlink() and previous.is_dir() \
                and not previous.is_symlink():
            os.replace(previous, out)
            log.warning("put back %s, which a build killed while replacing it left in %s", out, entry)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def staged_output(out: Path, force: bool, others: str | None = None) -> Iterator[Path]:
    """Yield a staging folder beside ``out``; on success it replaces ``out``, on failure it is removed.

    ``out`` is checked before any work starts: an existing folder is refused unless ``force`` and replaceable.
    With ``force`` the old folder stays in place until the new one is complete; ``others`` (``keep`` or
    ``discard``) says what becomes of entries in it that no build wrote.
    """
    out = Path(out).absolute()
    if others is not None and others not in OTHERS:
        raise MergeError(f"--others {others!r}: expected one of {', '.join(OTHERS)}")
    if others is not None and not force:
        raise MergeError(f"--others {others} applies to a folder --force replaces; pass --force too")
    strays: tuple[str, ...] = ()
    if out.exists() or out.is_symlink():
        if not force:
            if out.is_dir() and not out.is_symlink():
                _refuse_mount_point(out)
            raise MergeError(f"{out} already exists; pass --force to replace it")
        if out.is_symlink():
            raise MergeError(f"{out} is a symbolic link; a build never replaces it")
        strays = check_replaceable(out.resolve(), others)
        if strays:
            log.warning("%s %d entr%s no build wrote in %s: %s", "keeping" if others == "keep" else "discarding",
                        len(strays), "y" if len(strays) == 1 else "ies", out, ", ".join(strays))
    with build_lock(out), atomic_folder(out, carry=strays if others == "keep" else ()) as stage:
        yield stage
