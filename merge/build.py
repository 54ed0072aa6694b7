"""``merge build``: export the parts, stitch them, and write one self-contained folder."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import MergeError
from .outdir import staged_output
from .sources import ModelSource

log = logging.getLogger(__name__)

# Files copied from the checkpoint so that the same preprocessing loads from the output folder alone.
PREPROCESSING_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
)
MANIFEST = "merge.json"
VISION_MODEL = "vision.onnx"


@dataclass
class BuildResult:
    out: Path
    parts: dict[str, str]
    missing: list[str] = field(default_factory=list)
    seconds: float = 0.0


def build(source: ModelSource, out: Path, *, precision: str = "fp32", force: bool = False) -> BuildResult:
    """Build the output folder for ``source``. At this stage: the vision part only (see README)."""
    if precision != "fp32":
        raise MergeError(f"--precision {precision}: only fp32 is available in this version")
    start = time.perf_counter()
    with staged_output(out, force) as stage:
        from export.vision import export_vision

        log.info("exporting the vision tower of %s", source.spec)
        export_vision(source.folder, source.vision_config, stage / VISION_MODEL)
        copied = copy_preprocessing(source.folder, stage)
        check_onnx(stage / VISION_MODEL)
        parts = {"vision": VISION_MODEL}
        missing = ["decoder", "stitched model.onnx"]
        write_manifest(stage, source, precision, parts, copied, missing)
    return BuildResult(out=Path(out), parts=parts, missing=missing, seconds=time.perf_counter() - start)


def copy_preprocessing(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in PREPROCESSING_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "vocab.json" not in copied:
        log.warning("%s has no tokenizer files; the output folder cannot tokenize prompts", src)
    return copied


def check_onnx(path: Path) -> None:
    """Structural check by path (the checker cannot hold >2 GB models in memory) and session creation."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as exc:
        raise MergeError(f"{path.name}: the ONNX checker refused the model: {exc}") from exc
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise MergeError(f"{path.name}: ONNX Runtime could not create a session: {exc}") from exc


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(
    folder: Path, source: ModelSource, precision: str, parts: dict[str, str], copied: list[str], missing: list[str]
) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".onnx", ".data"))
    manifest = {
        "tool": "qwen3vl-merge",
        "tool_version": __version__,
        "source_model": source.spec,
        "precision": precision,
        "parts": parts,
        "not_built_yet": missing,
        "special_token_ids": {
            k: source.config[k]
            for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
            if k in source.config
        },
        "preprocessing_files": copied,
        "checksums": {p.name: file_sha256(p) for p in files},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
