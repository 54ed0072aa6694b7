"""A resolved model source: a checkpoint folder laid out like a Hugging Face one, and its checked config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from merge.contract.config import ModelConfig


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user asked for: a preset name, a folder, or a hub id
    folder: Path
    config: ModelConfig
