"""The one loader of a combined folder: every command that reads a folder opens it here first.

:meth:`CombinedFolder.open` reads ``merge.json`` (schema checked) and ``config.json`` (a Qwen3-VL config)
and checks that the model file the manifest names is there, before anything else reads the folder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from merge.errors import MergeError

from .config import ModelConfig
from .manifest import Manifest
from .names import DATA_FILE, MANIFEST_FILE, MODEL_FILE


@dataclass(frozen=True)
class CombinedFolder:
    path: Path
    manifest: Manifest
    config: ModelConfig

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def data_path(self) -> Path:
        return self.path / DATA_FILE

    @classmethod
    def open(cls, folder: Path | str) -> CombinedFolder:
        path = Path(folder)
        hint = f"build one with `python -m merge build --out {folder}`"
        if not path.exists():
            raise MergeError(f"{folder}: no such folder ({hint})")
        if not path.is_dir():
            raise MergeError(f"{folder} is not a folder (expected a combined folder; {hint})")
        if not (path / MODEL_FILE).is_file():
            raise MergeError(f"{folder} is not a combined folder: no {MODEL_FILE} ({hint})")
        if not (path / MANIFEST_FILE).is_file():
            raise MergeError(f"{folder} is not a complete combined folder: no {MANIFEST_FILE} ({hint})")
        return cls(path=path, manifest=Manifest.read(path), config=ModelConfig.from_folder(path))


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
