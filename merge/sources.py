"""Model sources shared by every command: a local Hugging Face folder, a hub id, or a built-in preset.

Every source resolves to a *folder* laid out like a Hugging Face checkpoint (config.json, safetensors,
tokenizer and processor files). Presets are written into a cache folder on first use, atomically: a
half-written preset folder never becomes visible under its final name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import MergeError
from .outdir import default_dir_mode
from .presets import PRESET_SEEDS, PRESETS, preset_config

log = logging.getLogger(__name__)

DEFAULT_MODEL = "tiny"
SUPPORTED_MODEL_TYPES = ("qwen3_vl",)
_SHARD_BYTES = 2 * 1024**3
_DONE_MARKER = ".preset-complete"


def cache_root() -> Path:
    """Where presets are built: ``$QWEN3VL_MERGE_CACHE`` or ``~/.cache/qwen3vl-merge``."""
    env = os.environ.get("QWEN3VL_MERGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qwen3vl-merge"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: a checkpoint folder and its parsed config.json."""

    spec: str
    folder: Path
    config: dict

    @property
    def vision_config(self) -> dict:
        return self.config["vision_config"]

    @property
    def text_config(self) -> dict:
        return self.config["text_config"]

    @property
    def is_preset(self) -> bool:
        return self.spec in PRESETS


def resolve_model(spec: str | None = None, cache_dir: Path | None = None) -> ModelSource:
    """Resolve ``--model``: a preset name, a local folder, or a hub id (downloaded by huggingface_hub)."""
    spec = spec or DEFAULT_MODEL
    if spec in PRESETS:
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
    return ModelSource(spec=spec, folder=folder, config=load_config(folder))


def load_config(folder: Path) -> dict:
    """Read and check ``folder/config.json``: it must describe a Qwen3-VL model."""
    path = folder / "config.json"
    if not path.is_file():
        raise MergeError(f"{folder}: no config.json; a Hugging Face Qwen3-VL folder is expected")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MergeError(f"{path}: not valid JSON ({exc})") from exc
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = config.get("architectures")
        raise MergeError(
            f"{path}: model_type is {model_type!r} (architectures {archs}); this tool supports Qwen3-VL "
            f"(model_type {' or '.join(map(repr, SUPPORTED_MODEL_TYPES))})"
        )
    for key in ("vision_config", "text_config"):
        if not isinstance(config.get(key), dict):
            raise MergeError(f"{path}: {key} is missing; a Qwen3-VL config has vision_config and text_config")
    return config


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _download_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
    except Exception as exc:  # the hub client raises many types; all mean "could not get the folder"
        raise MergeError(f"--model {repo_id}: could not download from the Hugging Face hub ({exc})") from exc


def ensure_preset(name: str, cache_dir: Path | None = None) -> Path:
    """Build preset ``name`` into the cache on first use and return its folder."""
    root = Path(cache_dir) if cache_dir else cache_root()
    folder = root / "presets" / name
    if (folder / _DONE_MARKER).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    (root / "presets").mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root / "presets"))
    tmp.chmod(default_dir_mode())
    try:
        log.info("building preset %s (seeded random weights, bfloat16) in %s", name, folder)
        write_preset(tmp, name)
        (tmp / _DONE_MARKER).write_text("ok\n")
        if folder.exists():
            shutil.rmtree(folder)  # an incomplete earlier attempt: it has no marker
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_preset(folder: Path, name: str) -> None:
    """Write config, seeded random weights (bf16 safetensors shards) and tokenizer/processor files."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from .random_weights import draw_parameter
    from .tokenizer_files import write_tokenizer_and_processor

    config = preset_config(name)
    hf_config = Qwen3VLConfig(**config)
    with torch.device("meta"):
        skeleton = Qwen3VLForConditionalGeneration(hf_config)
    gen = torch.Generator().manual_seed(PRESET_SEEDS[name])

    # Stream: each shard is written as soon as it is full, so at most one shard is in memory.
    params = sorted(((n, tuple(p.shape)) for n, p in skeleton.named_parameters()), key=lambda kv: kv[0])
    del skeleton
    shard_files: list[tuple[str, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        fname = f"model-{len(shard_files) + 1:05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        shard_files.append((fname, list(shard)))
        shard.clear()

    from tqdm.auto import tqdm

    for pname, shape in tqdm(params, desc=f"preset {name}: random weights", unit="tensor", disable=None, leave=False):
        tensor = draw_parameter(pname, shape, gen).to(torch.bfloat16)
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > _SHARD_BYTES:
            flush()
            size = 0
        shard[pname] = tensor
        size += nbytes
    flush()

    if len(shard_files) == 1:
        os.replace(folder / shard_files[0][0], folder / "model.safetensors")
    else:
        total = len(shard_files)
        weight_map = {}
        for i, (fname, names) in enumerate(shard_files):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(folder / fname, folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer_and_processor(folder, config)
