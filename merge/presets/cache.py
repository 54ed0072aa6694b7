"""Presets are built once into a cache folder (``$QWEN3VL_MERGE_CACHE`` or ``~/.cache/qwen3vl-merge``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from merge.atomic import atomic_folder
from merge.errors import WriteError

from .files import write_tokenizer_and_processor
from .shapes import PRESET_SEEDS, SEEDED_PRESETS, preset_config

log = logging.getLogger(__name__)

DONE_MARKER = ".preset-complete"


def cache_root() -> Path:
    """Where presets are built: ``$QWEN3VL_MERGE_CACHE`` or ``~/.cache/qwen3vl-merge``."""
    env = os.environ.get("QWEN3VL_MERGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qwen3vl-merge"


def ensure_preset(name: str, cache_dir: Path | None = None) -> Path:
    """Build preset ``name`` into the cache on first use and return its folder (never half-written)."""
    folder = (Path(cache_dir) if cache_dir else cache_root()) / "presets" / name
    if (folder / DONE_MARKER).is_file():
        return folder
    log.info("building preset %s (seeded random weights, bfloat16) in %s", name, folder)
    try:
        with atomic_folder(folder) as stage:
            write_preset(stage, name)
            (stage / DONE_MARKER).write_text("ok\n")
    except WriteError as exc:  # a file in the way, a read-only or full disk: say where the cache is set
        raise WriteError(f"{exc} (presets are built in the cache folder: QWEN3VL_MERGE_CACHE moves it)") from None
    return folder


def write_preset(folder: Path, name: str) -> None:
    """Config, seeded random weights (bf16 safetensors shards, or for :data:`SEEDED_PRESETS` the seed and laws they are
    drawn from when read) and tokenizer/processor files."""
    from export.random_weights import write_random_weights, write_seeded_weights  # torch: the model's parameters

    config = preset_config(name)
    if name in SEEDED_PRESETS:
        write_seeded_weights(folder, config, PRESET_SEEDS[name])
    else:
        write_random_weights(folder, config, PRESET_SEEDS[name], label=f"preset {name}")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer_and_processor(folder, config)
