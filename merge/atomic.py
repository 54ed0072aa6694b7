"""The atomic helpers: a folder (or a file) appears under its final name only when it is complete.

A staging folder is named ``.{name}.{kind}-{16 hex digits}`` beside its final place and holds a marker file
(:data:`STAGING_MARKER`) saying which name and kind it was made for: :func:`leftover_kind` recognises a leftover
by that exact name and that marker, never by a glob on the user's name, so nothing a build did not make is taken
for one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from merge.errors import WriteError
from merge.space import nearest_existing

STAGING_MARKER = ".qwen3vl-merge-staging"  # inside every staging folder while it stages (removed before the swap)
_MARKER_MAKER = "qwen3vl-merge"
_STAGING_SUFFIX = re.compile(r"(partial|old)-[0-9a-f]{16}")


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


def make_staging(final: Path, kind: str) -> Path:
    """A new, empty staging folder ``.{final.name}.{kind}-{hex}`` beside ``final``, holding only its marker."""
    for _ in range(100):
        stage = final.parent / f".{final.name}.{kind}-{secrets.token_hex(8)}"
        try:
            os.mkdir(stage)  # the mode any new folder gets under the umask
        except FileExistsError:
            continue
        except OSError as exc:
            raise cannot_write(final, exc) from None
        try:
            (stage / STAGING_MARKER).write_text(json.dumps(
                {"made_by": _MARKER_MAKER, "for": final.name, "kind": kind, "pid": os.getpid()}) + "\n")
        except OSError as exc:
            shutil.rmtree(stage, ignore_errors=True)
            raise cannot_write(final, exc) from None
        return stage
    raise WriteError(f"cannot write {final}: no free staging name beside it")


def leftover_kind(path: Path, final_name: str) -> str | None:
    """``"partial"`` or ``"old"`` when ``path`` is a staging folder a build made for ``final_name`` (its exact name
    and its marker), else None. Symbolic links, files and folders without the marker are never leftovers."""
    prefix = f".{final_name}."
    if not path.name.startswith(prefix):
        return None
    match = _STAGING_SUFFIX.fullmatch(path.name[len(prefix):])
    if match is None:
        return None
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return None
        marker = path / STAGING_MARKER
        info = os.lstat(marker)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 4096:
            return None
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    kind = match.group(1)
    if not isinstance(data, dict) or data.get("made_by") != _MARKER_MAKER or data.get("for") != final_name \
            or data.get("kind") != kind:
        return None
    return kind


@contextlib.contextmanager
def atomic_folder(final: Path, *, kind: str = "partial", carry: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a staging folder beside ``final`` (see :func:`make_staging`; it holds only its marker).

    When the block ends normally the marker goes and the staging folder takes ``final``'s place (an existing
    ``final`` is moved aside into an ``old`` staging folder first and removed after the swap); when it raises, the
    staging folder is removed and ``final`` is left exactly as it was. A swap the system refuses is one sentence
    naming where the finished folder lies.

    ``carry`` names entries of the existing ``final`` that move into the new folder: after the staging marker is
    gone (so no clean-up can take the folder holding them for a build's leftover) and before the swap; they go
    back into ``final`` if the swap fails. A carried name the new folder holds too stops before anything moves.
    """
    final = Path(final)
    make_parent(final)
    stage = make_staging(final, kind)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    clash = sorted(name for name in carry if os.path.lexists(stage / name))
    if clash:
        shutil.rmtree(stage, ignore_errors=True)
        raise WriteError(f"cannot keep {', '.join(clash)} of {final}: the new build writes a file of that name; move "
                         f"{'it' if len(clash) == 1 else 'them'} out of the folder and build again")
    old = None
    carried: list[str] = []
    try:
        (stage / STAGING_MARKER).unlink()  # from here on no clean-up takes the finished folder for a leftover
        for name in carry:
            os.replace(final / name, stage / name)
            carried.append(name)
        if final.exists():
            old = make_staging(final, "old")
            os.replace(final, old / final.name)
        os.replace(stage, final)
    except OSError as exc:
        if old is not None and (old / final.name).exists() and not final.exists():
            os.replace(old / final.name, final)  # the previous folder back in its place
        for name in carried:
            with contextlib.suppress(OSError):
                os.replace(stage / name, final / name)
        raise WriteError(f"cannot put {final} in place ({exc.strerror or exc}); the finished folder is {stage}: "
                         f"move it there yourself") from None
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
