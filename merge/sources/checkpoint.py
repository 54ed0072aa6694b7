"""A checkpoint's safetensors, read lazily with numpy alone: one tensor in memory at a time, as float32.

The safetensors format is an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape,
byte offsets into the data section) and the data. A tensor is read from its file (a positional read, no
memory map: pages of a mapped multi-GB checkpoint would stay resident and count against the process) and
widened to float32 (bf16 exactly, by moving its 16 bits into the high half of a float32) only when asked
for. Every header is checked against its file before anything is read: offsets inside the data section,
sizes equal to shape x dtype, no overlaps, a shard named by the index actually present.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from merge.contract.reading import load_json, open_file, read_regular
from merge.errors import MergeError

from .seeded import SEEDED_FILE, SeededWeights, seeded_file

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # the format's own limit
MAX_INDEX_BYTES = 64 << 20  # an index names each tensor once: a few MB for the largest models
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int


def read_header(path: Path) -> dict[str, _Entry]:
    """The tensors of one safetensors file, checked against the file's size."""
    try:
        with open_file(path) as f:  # a regular file only: a FIFO, socket or device is refused, never waited on
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise MergeError(f"{path}: {size} bytes, too short for a safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise MergeError(f"{path}: header length {length} does not fit the file ({size} bytes): "
                                 "corrupt or truncated safetensors")
            header = json.loads(f.read(length).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, 4300+ digits
        raise MergeError(f"{path}: the safetensors header is not valid JSON ({exc})") from None
    except OSError as exc:
        raise MergeError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path}: the safetensors header is not a JSON object")
    start = 8 + length
    entries: dict[str, _Entry] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MergeError(f"{path}: tensor {name!r} has no dtype, shape and data_offsets") from None
        if dtype not in DTYPES:
            raise MergeError(f"{path}: tensor {name!r} has dtype {dtype!r}, not one of {sorted(DTYPES)}")
        if any(d < 0 for d in shape):
            raise MergeError(f"{path}: tensor {name!r} has a negative dimension in {shape}")
        expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != expected or begin < 0:
            raise MergeError(f"{path}: tensor {name!r} spans bytes {begin}..{end} but shape {list(shape)} of "
                             f"{dtype} needs {expected}")
        if start + end > size:
            raise MergeError(f"{path}: tensor {name!r} ends at byte {start + end}, past the end of the file "
                             f"({size} bytes): truncated safetensors")
        entries[name] = _Entry(path, dtype, shape, start + begin, start + end)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise MergeError(f"{path}: tensors {a!r} and {b!r} overlap: corrupt safetensors")
    return entries


class Checkpoint:
    """Tensor names, shapes and lazily loaded float32 values of a Hugging Face safetensors checkpoint."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._seeded: SeededWeights | None = None  # a folder of seeded weights (no safetensors files)
        self._entries: dict[str, _Entry] = {}
        index = self.folder / INDEX_FILE
        if index.is_file():
            data = load_json(read_regular(index, str(index), MAX_INDEX_BYTES), index)
            try:
                weight_map = data["weight_map"]
                files = sorted(set(weight_map.values()))
            except (KeyError, TypeError, AttributeError):
                raise MergeError(f"{index}: not a safetensors index (no weight_map)") from None
            for name in files:
                if not isinstance(name, str) or Path(name).name != name or not (self.folder / name).is_file():
                    raise MergeError(f"{index} names the shard {name!r}, which is not a file in {self.folder}")
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            weight_map = None
            if not files:
                seeded = seeded_file(self.folder)
                if seeded is None:
                    raise MergeError(f"{self.folder}: no *.safetensors weights found (nor {SEEDED_FILE})")
                self._seeded = SeededWeights(seeded)
                return
        for name in files:
            self._entries.update(read_header(self.folder / name))
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._entries))
            if missing:
                raise MergeError(f"{index} lists {len(missing)} tensor(s) that no shard holds, e.g. {missing[0]!r}")

    @property
    def seeded(self) -> bool:
        """Whether the weights are drawn from a seed when read (:mod:`merge.sources.seeded`), not stored."""
        return self._seeded is not None

    def __contains__(self, name: str) -> bool:
        return name in self._seeded if self._seeded is not None else name in self._entries

    def names(self) -> list[str]:
        return self._seeded.names() if self._seeded is not None else list(self._entries)

    def find_prefix(self, candidates: tuple[str, ...], probe: str) -> str:
        """The first prefix in ``candidates`` for which ``prefix + probe`` is a tensor name."""
        for prefix in candidates:
            if prefix + probe in self:
                return prefix
        raise MergeError(
            f"{self.folder}: none of {[c + probe for c in candidates]} is in the checkpoint; "
            "is this a Qwen3-VL checkpoint?"
        )

    def shape(self, name: str) -> tuple[int, ...]:
        if self._seeded is not None:
            return self._seeded.shape(name)
        return self._require(name).shape

    def load(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a float32 numpy array (bf16/fp16 checkpoints are widened exactly); the file's
        bytes and the float32 result are the only memory it takes."""
        if self._seeded is not None:
            return self._seeded.load(name)
        entry = self._require(name)
        return self._read(name, entry, entry.begin, entry.shape)

    def load_rows(self, name: str, first: int, count: int) -> np.ndarray:
        """Rows ``first:first + count`` of the tensor's first axis (one expert of a stack), read alone, float32."""
        if self._seeded is not None:
            return self._seeded.load_rows(name, first, count)
        entry = self._require(name)
        if not entry.shape or not 0 <= first <= first + count <= entry.shape[0]:
            raise MergeError(f"{entry.file}: rows {first}:{first + count} of {name!r} {list(entry.shape)}")
        row_bytes = (entry.end - entry.begin) // entry.shape[0] if entry.shape[0] else 0
        return self._read(name, entry, entry.begin + first * row_bytes, (count, *entry.shape[1:]))

    @staticmethod
    def _read(name: str, entry: _Entry, begin: int, shape: tuple[int, ...]) -> np.ndarray:
        dtype = DTYPES[entry.dtype]
        raw = np.empty(shape, dtype)
        with open_file(entry.file) as f:
            f.seek(begin)
            got = f.readinto(memoryview(raw.reshape(-1)).cast("B"))
        if got != raw.nbytes:
            raise MergeError(f"{entry.file}: tensor {name!r} ended after {got} of {raw.nbytes} bytes: the "
                             "file changed or was truncated while it was read")
        if entry.dtype == "BF16":
            widened = np.empty(shape, np.uint32)
            np.copyto(widened, raw)
            del raw
            widened <<= 16
            return widened.view(np.float32)
        return raw if dtype == np.float32 else raw.astype(np.float32)

    def _require(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise MergeError(f"{self.folder}: tensor {name!r} is missing from the checkpoint") from None
