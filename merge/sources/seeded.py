"""Weights drawn from a seed when they are read: a checkpoint too large for the disk, held as one small JSON file.

Qwen3-VL-30B-A3B's random weights are 61 GB in bfloat16. A preset of that shape keeps, instead of safetensors,
``seeded_weights.json``: for every tensor its stored shape and the law of its values (a mean and a standard
deviation; see :func:`export.random_weights.parameter_law`), and one seed. A tensor is drawn when it is read, the
same every time and on every machine:

* its elements, in stored (row-major) order, are cut into chunks of ``CHUNK`` (2^20) elements; chunk ``c`` is
  ``standard_normal`` float32 from numpy's ``SFC64`` seeded with ``[seed, crc32(name), c]`` (so any range, one
  expert of a stack, is drawn without drawing the rest, and chunks are drawn by several threads at once);
* each value is ``mean + std * z`` in float32, rounded to bfloat16 (to nearest, ties to even), so the folder is the
  bfloat16 checkpoint that :func:`write_safetensors` writes out, bit for bit.

Only numpy is needed. A file that names no tensors, a shape that is not a list of non-negative integers, a
non-finite or negative law, or an unknown format is refused naming the file and the tensor.
"""

from __future__ import annotations

import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from merge.contract.reading import load_json, read_regular
from merge.contract.seeded import SEEDED_FILE, SEEDED_FORMAT, SEEDED_VERSION, SeededTensor

__all__ = ["CHUNK", "SEEDED_FILE", "SeededTensor", "SeededWeights", "draw", "seeded_file"]
from merge.errors import MergeError

CHUNK = 1 << 20  # elements per independently seeded chunk
MAX_SEEDED_BYTES = 16 << 20  # a few thousand tensors' shapes and laws: well under 1 MB for the largest models
_THREADS = max(1, min(4, os.cpu_count() or 1))


def _chunk(seed: int, key: int, index: int, mean: float, std: float, out: np.ndarray) -> None:
    """Draw chunk ``index`` into ``out`` (float32, at most CHUNK elements), as bfloat16 values widened."""
    rng = np.random.Generator(np.random.SFC64([seed, key, index]))
    rng.standard_normal(out=out, dtype=np.float32)
    out *= np.float32(std)
    out += np.float32(mean)
    bits = out.view(np.uint32)
    lsb = bits >> 16
    lsb &= 1
    lsb += 0x7FFF  # round to nearest, ties to even (no NaN can arise from a finite law)
    bits += lsb
    bits &= 0xFFFF0000


def draw(seed: int, tensor: SeededTensor, begin: int = 0, end: int | None = None) -> np.ndarray:
    """Elements ``begin:end`` of ``tensor`` in stored order (all of them by default), float32 (bfloat16 values)."""
    end = tensor.numel if end is None else end
    if not 0 <= begin <= end <= tensor.numel:
        raise ValueError(f"{tensor.name}: elements {begin}:{end} are outside its {tensor.numel}")
    out = np.empty(end - begin, np.float32)
    key = zlib.crc32(tensor.name.encode("utf-8"))
    first, last = begin // CHUNK, -(-end // CHUNK)
    scratch_needed = begin % CHUNK != 0 or end % CHUNK != 0

    def one(index: int) -> None:
        lo, hi = index * CHUNK, min((index + 1) * CHUNK, tensor.numel)
        if scratch_needed and (lo < begin or hi > end):  # a chunk cut by the range: draw it whole, keep a part
            whole = np.empty(hi - lo, np.float32)
            _chunk(seed, key, index, tensor.mean, tensor.std, whole)
            a, b = max(lo, begin), min(hi, end)
            out[a - begin:b - begin] = whole[a - lo:b - lo]
        else:
            _chunk(seed, key, index, tensor.mean, tensor.std, out[lo - begin:hi - begin])

    indices = range(first, last)
    if len(indices) > 1 and _THREADS > 1:
        with ThreadPoolExecutor(_THREADS) as pool:  # numpy's generators and ufuncs release the GIL
            list(pool.map(one, indices))
    else:
        for index in indices:
            one(index)
    return out


class SeededWeights:
    """The tensors of a ``seeded_weights.json``: names, stored shapes, and values drawn on :meth:`load`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        data = load_json(read_regular(self.path, str(self.path), MAX_SEEDED_BYTES), self.path)
        if not isinstance(data, dict) or data.get("format") != SEEDED_FORMAT:
            raise MergeError(f"{self.path}: not a seeded-weights file (format is not {SEEDED_FORMAT!r})")
        if data.get("version") != SEEDED_VERSION:
            raise MergeError(f"{self.path}: seeded-weights version {data.get('version')!r}; this release reads "
                             f"version {SEEDED_VERSION}")
        seed, tensors = data.get("seed"), data.get("tensors")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise MergeError(f"{self.path}: seed must be a non-negative integer, got {seed!r}")
        if not isinstance(tensors, dict) or not tensors:
            raise MergeError(f"{self.path}: 'tensors' must name at least one tensor")
        self.seed = seed
        self.tensors: dict[str, SeededTensor] = {}
        for name, info in tensors.items():
            self.tensors[name] = _parse_tensor(self.path, name, info)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._require(name).shape

    def load(self, name: str) -> np.ndarray:
        tensor = self._require(name)
        return draw(self.seed, tensor).reshape(tensor.shape)

    def load_rows(self, name: str, first: int, count: int) -> np.ndarray:
        """Rows ``first:first + count`` of the tensor's first axis (one expert of a stack) without the others."""
        tensor = self._require(name)
        if not tensor.shape or not 0 <= first <= first + count <= tensor.shape[0]:
            raise MergeError(f"{self.path}: rows {first}:{first + count} of {name!r} {list(tensor.shape)}")
        row = math.prod(tensor.shape[1:])
        return draw(self.seed, tensor, first * row, (first + count) * row).reshape(count, *tensor.shape[1:])

    def _require(self, name: str) -> SeededTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise MergeError(f"{self.path}: tensor {name!r} is missing from the seeded weights") from None


def _parse_tensor(path: Path, name: str, info) -> SeededTensor:
    if not isinstance(info, dict):
        raise MergeError(f"{path}: tensor {name!r} must be an object with shape, mean and std")
    shape, mean, std = info.get("shape"), info.get("mean"), info.get("std")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise MergeError(f"{path}: tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
    for key, value in (("mean", mean), ("std", std)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise MergeError(f"{path}: tensor {name!r} has {key} {value!r}, not a finite number")
    if std < 0 or abs(mean) + 8 * std > 1e30:  # 8 sigma stays a finite bfloat16
        raise MergeError(f"{path}: tensor {name!r} has std {std!r} (mean {mean!r}): out of range")
    return SeededTensor(name, tuple(shape), float(mean), float(std))


def seeded_file(folder: Path) -> Path | None:
    """The folder's ``seeded_weights.json`` when it holds no safetensors (a checkpoint's own weights come first)."""
    path = Path(folder) / SEEDED_FILE
    if path.is_file() and not any(Path(folder).glob("*.safetensors")):
        return path
    return None
