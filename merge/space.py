"""Disk space: a write that cannot fit stops before it starts, and a disk that fills mid-write is named.

A full disk otherwise surfaces as numpy's ``OSError: 2097152 requested and 0 written`` after minutes of work
(an 8B build writes 7.4 GB over ~5 minutes), with no file and no size in it.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from merge.errors import WriteError

# Room asked for beyond the estimate, for alignment padding in external data and the small files beside it
# (measured: 0.05% on the 2B and 8B folders, ~600 bytes an initializer).
SLACK_BYTES, SLACK_FRACTION = 2**20, 0.01
# A write that failed with less than this left on its disk failed because the disk was full.
FULL_BELOW_BYTES = 16 * 2**20


def format_bytes(n: float, digits: int = 2) -> str:
    """``n`` bytes in the largest binary unit it reaches (GiB at most), with ``digits`` decimals."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{int(n)} B"


def nearest_existing(path: Path) -> Path:
    """``path`` if it exists, else its nearest existing parent: where the folders still to create would go."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(folder: Path) -> int:
    """Bytes free to this user on the disk that holds ``folder`` (or would hold it: its nearest existing parent)."""
    return shutil.disk_usage(nearest_existing(folder)).free


def require_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse, before anything is written, a write of ``needed`` bytes into ``folder`` that its disk cannot hold."""
    free = free_bytes(folder)
    needed = int(needed * (1 + SLACK_FRACTION)) + SLACK_BYTES
    if free < needed:
        raise WriteError(f"{what} needs {format_bytes(needed)} in {folder}, and that disk has "
                         f"{format_bytes(free)} free; free some space there or write somewhere else")


@contextlib.contextmanager
def naming_a_full_disk(path: Path) -> Iterator[None]:
    """Turn a write into ``path`` that fails because its disk filled (or its quota ran out) into one sentence.

    numpy's writer raises ``OSError`` without an errno when a write comes up short, so a failed write is
    also taken as a full disk when, after it, less than :data:`FULL_BELOW_BYTES` is free. Other errors pass.
    """
    try:
        yield
    except OSError as exc:
        try:
            free = free_bytes(path.parent)
        except OSError:
            raise exc from None
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) or free < FULL_BELOW_BYTES:
            raise WriteError(f"the disk filled while writing {path} ({format_bytes(free)} free there now; "
                             f"the write failed with: {exc}); free some space there or write somewhere else") \
                from exc
        raise
