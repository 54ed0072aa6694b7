"""The small files of a folder (tokenizer, chat template, processor and generation configs), with errors that name
the file: a combined folder's as its loader checked and holds them (never re-read by path), or a checkpoint
folder's, read by path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

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
        if not path.is_file():
            return None
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise MergeError(f"{path} is {size} bytes, too large for a configuration file")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise MergeError(f"{path} cannot be read ({exc.strerror or exc})") from None

    def text(self, name: str) -> str | None:
        data = self.read(name)
        if data is None:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MergeError(f"{self.where(name)} is not UTF-8 text ({exc})") from None

    def json(self, name: str, required: bool = True) -> dict | None:
        """A JSON object; a missing (when ``required``), malformed or non-object file is a MergeError."""
        text = self.text(name)
        if text is None:
            if required:
                raise MergeError(f"{self.folder} has no {name}; it is not a combined (or checkpoint) folder")
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MergeError(f"{self.where(name)} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise MergeError(f"{self.where(name)}: expected a JSON object, found {type(data).__name__}")
        return data
