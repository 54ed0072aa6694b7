"""``--model``, shared by every command: a local Hugging Face folder, a hub id, or a built-in preset.

Every source resolves to a *folder* laid out like a Hugging Face checkpoint (config.json, safetensors,
tokenizer and processor files) and its checked config (:class:`merge.contract.config.ModelConfig`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from merge.contract.config import ModelConfig
from merge.contract.reading import refuse_special_files
from merge.errors import MergeError
from merge.presets.shapes import PRESETS

from .source import ModelSource

log = logging.getLogger(__name__)

DEFAULT_MODEL = "tiny"


def resolve_model(spec: str | None = None, cache_dir: Path | None = None) -> ModelSource:
    """Resolve ``--model``: a preset name, a local folder, or a hub id (downloaded by huggingface_hub)."""
    spec = spec or DEFAULT_MODEL
    if spec in PRESETS:
        from merge.presets.cache import ensure_preset

        folder = ensure_preset(spec, cache_dir)
    elif Path(spec).expanduser().exists():
        folder = Path(spec).expanduser().resolve()
        if not folder.is_dir():
            raise MergeError(f"--model {spec}: expected a Hugging Face model folder, found a file")
    elif _looks_like_hub_id(spec):
        folder = _download_hub(spec)
    else:
        raise MergeError(
            f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}), an existing folder, nor a hub id"
        )
    refuse_special_files(folder, f"--model {spec}")  # before any library opens the folder's files itself
    return ModelSource(spec=spec, folder=folder, config=ModelConfig.from_folder(folder))


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _download_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
    except Exception as exc:  # the hub client raises many types; all mean "could not get the folder"
        raise MergeError(f"--model {repo_id}: could not download from the Hugging Face hub ({exc})") from exc
