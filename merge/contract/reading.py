"""The one way the tool opens a file it is given (a folder's files, ``--image``, ``--video``, ``--reference``, a
checkpoint's files), and the one JSON parse of the small files, each within bounds.

Opening: a FIFO blocks whoever opens it for reading until a writer comes (forever, in a downloaded folder), and a
device may never end (``/dev/zero``). So a file is

1. checked first (``stat``; ``lstat`` where symbolic links are refused): anything but a regular file is one
   :class:`MergeError` naming the file and what it is ("a named pipe (FIFO)", "a socket", "a character device", ...);
2. opened with ``O_NONBLOCK`` (and ``O_NOCTTY``): a FIFO swapped in after the check opens at once instead of
   waiting for a writer;
3. checked again on the descriptor (``fstat``): what was opened is a regular file, else it is closed and refused;
4. put back in blocking mode (which a regular file never needed).

JSON: :func:`load_json` refuses, in one line naming the file, nesting deeper than :data:`MAX_JSON_DEPTH` (before
Python's parser would recurse into it: a file nested 100,000 deep is a ``RecursionError`` there), ``NaN`` and
``Infinity`` (not JSON, and never a meaningful size or id), numbers that overflow a float, and integers longer than
:data:`MAX_JSON_DIGITS` digits.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from merge.errors import MergeError

# The deepest real file read here nests 5 levels (tokenizer_config.json's added_tokens_decoder entries; merge.json's
# quantization); 64 leaves room for any config to grow and stays far below Python's recursion limit (1000), so
# neither the parse nor any code that walks the result can hit it.
MAX_JSON_DEPTH = 64
# Token ids, sizes and counts have at most 10 digits; a longer integer is not one of them (and past 4300 digits
# Python refuses to parse it at all).
MAX_JSON_DIGITS = 64

_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISLNK, "a symbolic link"),
)


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words ("a regular file", "a named pipe (FIFO)", ...)."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _refuse(label: str, mode: int, link_note: str) -> MergeError:
    if stat.S_ISLNK(mode) and link_note:
        return MergeError(f"{label} is a symbolic link; {link_note}")
    return MergeError(f"{label} is {file_kind(mode)}, not a regular file")


def open_regular(path: str | os.PathLike, label: str, *, dir_fd: int | None = None, follow_symlinks: bool = True,
                 missing: str | None = None, link_note: str = "") -> int:
    """A read-only descriptor on ``path`` (relative to ``dir_fd`` when given), which is a regular file.

    ``label`` names the file in messages (a path, or ``--reference PATH``). ``follow_symlinks=False`` refuses a
    symbolic link (``lstat`` and ``O_NOFOLLOW``; ``link_note`` says why). ``missing``: the message when there is no
    such file (default "LABEL: no such file"). Never blocks: see the module docstring."""
    try:
        info = os.stat(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        raise MergeError(missing or f"{label}: no such file") from None
    except OSError as exc:
        raise MergeError(f"{label}: cannot be opened ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise _refuse(label, info.st_mode, link_note)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise MergeError(missing or f"{label}: no such file") from None
    except OSError as exc:  # ELOOP: a symbolic link swapped in after the check; ENXIO: a socket
        try:
            now = os.stat(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks).st_mode
        except OSError:
            now = None
        if now is not None and not stat.S_ISREG(now):
            raise _refuse(label, now, link_note) from None
        raise MergeError(f"{label}: cannot be opened ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _refuse(label, mode, link_note)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def refuse_special_files(folder: Path, label: str) -> None:
    """Refuse a folder whose entries (symbolic links followed) include a named pipe, socket or device: libraries
    that open a model folder themselves (transformers' ``from_pretrained`` reads any ``generation_config.json`` or
    tokenizer file it finds) would block on a FIFO forever. Folders and regular files pass; so does a dangling
    link (the loader then says which file is missing)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise MergeError(f"{label}: cannot be listed ({exc.strerror or exc})") from None
    for entry in entries:
        try:
            mode = os.stat(entry.path).st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise MergeError(f"{label}: {entry.name} is {file_kind(mode)}, not a regular file; a model folder holds "
                             "files only")


def read_fd(fd: int, size: int) -> bytes:
    """Up to ``size`` bytes from ``fd`` (fewer if the file ends first)."""
    chunks, left = [], size
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_regular(path: str | os.PathLike, label: str, limit: int, *, dir_fd: int | None = None,
                 follow_symlinks: bool = True, missing: str | None = None, link_note: str = "") -> bytes:
    """The bytes of a regular file (see :func:`open_regular`) of at most ``limit`` bytes."""
    fd = open_regular(path, label, dir_fd=dir_fd, follow_symlinks=follow_symlinks, missing=missing,
                      link_note=link_note)
    return read_and_close(fd, label, limit)


def read_and_close(fd: int, label: str, limit: int) -> bytes:
    """All of an open regular file's bytes, refused past ``limit`` (before any is read); ``fd`` is closed."""
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise MergeError(f"{label} is {size} bytes, more than the {limit} such a file may have")
        return read_fd(fd, size)
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_file(path: str | os.PathLike, label: str | None = None, *, missing: str | None = None) -> Iterator[IO[bytes]]:
    """A binary file object on a regular file (symbolic links followed), for libraries that read from one (Pillow,
    PyAV, numpy); closed on leaving."""
    fd = open_regular(path, label or str(path), missing=missing)
    with os.fdopen(fd, "rb") as f:
        yield f


# -- JSON ---------------------------------------------------------------------------------------------------

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)  # a JSON string (its brackets are not structure)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``text``'s arrays and objects nest more than ``limit`` deep (counted without parsing)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for bracket in _NOT_BRACKET.sub("", _STRING.sub("", text)):
        if bracket in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


class _NotJson(ValueError):
    pass


def _constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _NotJson(f"{text} is not a finite number")
    return value


def _int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_JSON_DIGITS:
        raise _NotJson(f"a number of {digits} digits is not a size, count or id")
    return int(text)


def load_json(data: bytes | str, label: str | Path, *, want_object: bool = False) -> Any:
    """The JSON value of ``data`` (UTF-8 bytes or text), within the bounds of the module docstring; every failure
    is one MergeError naming ``label``. ``want_object``: anything but a JSON object is refused too."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MergeError(f"{label}: not valid JSON (not UTF-8 text: {exc})") from None
    if json_too_deep(data):
        raise MergeError(f"{label}: arrays or objects nested more than {MAX_JSON_DEPTH} levels deep (no file this "
                         "tool reads nests so)")
    try:
        value = json.loads(data, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except _NotJson as exc:
        raise MergeError(f"{label}: {exc}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise MergeError(f"{label}: not valid JSON ({exc})") from None
    if want_object and not isinstance(value, dict):
        raise MergeError(f"{label}: expected a JSON object, found {type(value).__name__}")
    return value
