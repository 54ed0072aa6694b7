"""The small files of a folder (tokenizer, chat template, processor and generation configs), with errors that name
the file: a combined folder's as its loader checked and holds them (never re-read by path), or a checkpoint
folder's, read by path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from merge.contract.reading import load_json, read_regular
from merge.errors import MergeError

if TYPE_CHECKING:
    from merge.contract.folder import CombinedFolder

MAX_FILE_BYTES = 64 << 20  # tokenizer.json files are a few MB; past this a file is not one of ours


class Files:
    def __init__(self, folder: Path | str | CombinedFolder):
        from merge.contract.folder import CombinedFolder

        if isinstance(folder, CombinedFolder):
            self.folder, self._held = folder.path, folder.files
        else:
            self.folder, self._held = Path(folder), None
            if not self.folder.is_dir():
                raise MergeError(f"{self.folder} is not a folder")

    def where(self, name: str) -> Path:
        return self.folder / name

    def read(self, name: str) -> bytes | None:
        """The file's bytes, or None when the folder has no such file."""
        if self._held is not None:
            return self._held.get(name)
        path = self.folder / name
        if not os.path.lexists(path):
            return None
        return read_regular(path, str(path), MAX_FILE_BYTES)  # a FIFO, socket or device: refused, never waited on

    def text(self, name: str) -> str | None:
        data = self.read(name)
        if data is None:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MergeError(f"{self.where(name)} is not UTF-8 text ({exc})") from None

    def json(self, name: str, required: bool = True) -> dict | None:
        """A JSON object; a missing (when ``required``), malformed or non-object file is a MergeError (see
        :func:`merge.contract.reading.load_json` for the bounds)."""
        text = self.text(name)
        if text is None:
            if required:
                raise MergeError(f"{self.folder} has no {name}; it is not a combined (or checkpoint) folder")
            return None
        return load_json(text, self.where(name), want_object=True)  # nesting, NaN and huge numbers refused
