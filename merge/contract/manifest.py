"""``merge.json``: what a build wrote, and the schema every reader checks it against.

The build writes it last (after the model is checked), so a folder with a well-formed manifest is a
complete one. Readers parse it with :meth:`Manifest.from_json`: every field is typed, unknown fields and
wrong types are refused with a sentence naming the field.

``format_version`` numbers what a folder's files hold that a reader relies on. A manifest without it was written
before formats were numbered: format 0, whatever its graph happens to hold. A reader refuses a format newer than
the one it knows (:data:`FORMAT_VERSION`), and asks for a new build where a feature needs a newer format than the
folder's (the ``FORMAT_*`` constants below say which format brought what); it never guesses from the graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge.errors import MergeError

from .names import DATA_FILE, MANIFEST_FILE, MODEL_FILE, PAST_PREFIX, TOOL_NAME
from .quant import KV_CACHES, PRECISIONS, VISION_PRECISIONS, QuantSpec
from .reading import load_json, read_regular

EMBEDDING_LAYOUTS = ("vocab_major", "hidden_major", "int4_blocks", "int8_blocks")
BLOCK_LAYOUTS = ("int4_blocks", "int8_blocks")  # a tied quantized head's own blocks serve as the token table
MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a few KiB; a bigger file is not ours

# The format this tool writes and the newest it reads. Raise it when a build starts writing something a reader
# needs to know about, and name the feature below.
FORMAT_VERSION = 2
# The first format with each feature the runtime relies on (format 0 folders may hold some of them, unrecorded):
FORMAT_LOGITS_TO_KEEP = 1  # the optional input logits_to_keep
FORMAT_VIDEOS = 1  # the inputs pixel_values_videos and video_grid_thw
FORMAT_KV_CACHE_IN_PLACE = 1  # past_key_values.* may be buffers written in place (metadata kv_cache_in_place "1")
FORMAT_KV_CACHE_TYPE = 2  # the field kv_cache: the type of past_key_values.* and present.* (float32 before)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str
    shape: list[int | str]

    def to_json(self) -> dict:
        return {"name": self.name, "type": self.type, "shape": list(self.shape)}


@dataclass(frozen=True)
class Manifest:
    tool_version: str
    source_model: str
    precision: str
    quantization: QuantSpec | None
    embedding_table: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    special_token_ids: dict[str, int]
    preprocessing_files: list[str]
    # SHA-256 of every file the build wrote but merge.json: the model files and the preprocessing files (folders
    # built before the preprocessing had them list model.onnx and model.onnx.data only)
    checksums: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # their sizes in bytes
    parts: dict[str, str] = field(default_factory=lambda: {"model": MODEL_FILE, "data": DATA_FILE})
    tool: str = TOOL_NAME
    vision_precision: str = "fp32"
    format_version: int = FORMAT_VERSION
    kv_cache: str = "float32"  # what past_key_values.* and present.* hold

    @property
    def decoder_scheme(self) -> str:
        """The decoder's precision with its quantization scheme (``fp32``, or ``int4 (block 128, ...)``)."""
        return self.quantization.scheme() if self.quantization is not None else self.precision

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version,
            "tool": self.tool,
            "tool_version": self.tool_version,
            "source_model": self.source_model,
            "precision": self.precision,
            "quantization": self.quantization.to_json() if self.quantization else None,
            "vision_precision": self.vision_precision,
            "kv_cache": self.kv_cache,
            "embedding_table": self.embedding_table,
            "parts": dict(self.parts),
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "special_token_ids": dict(self.special_token_ids),
            "preprocessing_files": list(self.preprocessing_files),
            "checksums": dict(self.checksums),
            "sizes": dict(self.sizes),
        }

    def write(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """``folder/merge.json``, parsed and checked (a missing or malformed file is a MergeError)."""
        path = Path(folder) / MANIFEST_FILE
        data = read_regular(path, str(path), MAX_MANIFEST_BYTES,
                            missing=f"{folder}: no {MANIFEST_FILE}; not a folder written by `python -m merge build` "
                                    "(or its build did not finish)")
        return cls.from_json(load_json(data, path), str(path))

    @classmethod
    def from_json(cls, data: Any, where: str = MANIFEST_FILE) -> Manifest:
        if not isinstance(data, dict):
            raise MergeError(f"{where}: expected a JSON object, found {type(data).__name__}")
        # first: a newer format may well have fields this reader does not know
        version = data.get("format_version", 0)  # written before formats were numbered: 0
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise MergeError(f"{where}: format_version = {version!r} is not a non-negative integer")
        if version > FORMAT_VERSION:
            raise MergeError(f"{where}: format_version {version} is newer than the format {FORMAT_VERSION} this "
                             f"{TOOL_NAME} reads; update {TOOL_NAME}")
        known = {"format_version", "tool", "tool_version", "source_model", "precision", "quantization",
                 "vision_precision", "kv_cache", "embedding_table", "parts",
                 "inputs", "outputs", "special_token_ids", "preprocessing_files", "checksums", "sizes"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MergeError(f"{where}: unknown field(s) {unknown}")

        def get(key: str, kind: type | tuple[type, ...]) -> Any:
            if key not in data:
                raise MergeError(f"{where}: no {key!r}")
            value = data[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
                raise MergeError(f"{where}: {key} = {value!r} is not a {names}")
            return value

        def mapping(key: str, value_kind: type) -> dict:
            value = get(key, dict)
            for k, v in value.items():
                if not isinstance(v, value_kind) or (value_kind is int and isinstance(v, bool)):
                    raise MergeError(f"{where}: {key}[{k!r}] = {v!r} is not a {value_kind.__name__}")
            return value

        def strings(key: str) -> list[str]:
            value = get(key, list)
            if not all(isinstance(v, str) for v in value):
                raise MergeError(f"{where}: {key} must be a list of strings")
            return value

        def tensors(key: str) -> list[TensorInfo]:
            out = []
            for i, item in enumerate(get(key, list)):
                if (not isinstance(item, dict) or set(item) != {"name", "type", "shape"}
                        or not isinstance(item["name"], str) or not isinstance(item["type"], str)
                        or not isinstance(item["shape"], list)
                        or not all(isinstance(d, int | str) and not isinstance(d, bool) for d in item["shape"])):
                    raise MergeError(f"{where}: {key}[{i}] is not a {{name, type, shape}} description")
                out.append(TensorInfo(item["name"], item["type"], list(item["shape"])))
            return out

        if get("tool", str) != TOOL_NAME:
            raise MergeError(f"{where}: tool is {data['tool']!r}, not {TOOL_NAME!r}")
        precision = get("precision", str)
        if precision not in PRECISIONS:
            raise MergeError(f"{where}: precision {precision!r} is not one of {PRECISIONS}")
        quant_data = data.get("quantization")
        quantization = None if quant_data is None else QuantSpec.from_json(quant_data, where)
        if (quantization.precision if quantization else "fp32") != precision:
            raise MergeError(f"{where}: precision {precision} but quantization {quant_data}")
        vision_precision = data.get("vision_precision", "fp32")  # folders written before it was recorded: fp32
        if vision_precision not in VISION_PRECISIONS:
            raise MergeError(f"{where}: vision_precision {vision_precision!r} is not one of {VISION_PRECISIONS}")
        kv_cache = get("kv_cache", str) if version >= FORMAT_KV_CACHE_TYPE else data.get("kv_cache", "float32")
        if kv_cache not in KV_CACHES:
            raise MergeError(f"{where}: kv_cache {kv_cache!r} is not one of {KV_CACHES}")
        layout = get("embedding_table", str)
        if layout not in EMBEDDING_LAYOUTS:
            raise MergeError(f"{where}: embedding_table {layout!r} is not one of {EMBEDDING_LAYOUTS}")
        parts = mapping("parts", str)
        if parts != {"model": MODEL_FILE, "data": DATA_FILE}:
            raise MergeError(f"{where}: parts {parts} are not {{model: {MODEL_FILE}, data: {DATA_FILE}}}")
        inputs = tensors("inputs")
        wrong = next((t for t in inputs if t.name.startswith(PAST_PREFIX) and t.type != kv_cache), None)
        if wrong is not None:
            raise MergeError(f"{where}: kv_cache is {kv_cache} but inputs list {wrong.name} as {wrong.type}")
        return cls(
            tool_version=get("tool_version", str),
            source_model=get("source_model", str),
            precision=precision,
            quantization=quantization,
            embedding_table=layout,
            inputs=inputs,
            outputs=tensors("outputs"),
            special_token_ids=mapping("special_token_ids", int),
            preprocessing_files=strings("preprocessing_files"),
            checksums=mapping("checksums", str),
            sizes=mapping("sizes", int),
            parts=parts,
            vision_precision=vision_precision,
            format_version=version,
            kv_cache=kv_cache,
        )
