"""Reading the small JSON files of a folder, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

from merge.errors import MergeError

MAX_JSON_BYTES = 64 << 20  # tokenizer.json files are a few MB; past this a file is not one of ours


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; a missing, oversized, malformed or non-object file is a MergeError."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise MergeError(f"{path} is {path.stat().st_size} bytes, too large for a configuration file")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MergeError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MergeError(f"{path} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise MergeError(f"{path} cannot be read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise MergeError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def required_file(folder: Path, name: str) -> Path:
    path = Path(folder) / name
    if not path.is_file():
        raise MergeError(f"{folder} has no {name}; it is not a combined (or checkpoint) folder")
    return path
