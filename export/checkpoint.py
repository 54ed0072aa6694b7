"""Lazy access to a checkpoint's safetensors: one tensor in memory at a time, converted to float32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from merge.errors import MergeError


class Checkpoint:
    """Tensor names, shapes and lazily loaded float32 values of a Hugging Face safetensors checkpoint."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise MergeError(f"{self.folder}: no *.safetensors weights found")
            weight_map = {}
            for f in files:
                for name in self._keys(f):
                    weight_map[name] = f.name
        self._file_of = weight_map
        self._shapes: dict[str, tuple[int, ...]] = {}

    @staticmethod
    def _keys(path: Path) -> list[str]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def names(self) -> list[str]:
        return list(self._file_of)

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
        if name not in self._shapes:
            from safetensors import safe_open

            with safe_open(str(self.folder / self._require(name)), framework="pt") as f:
                self._shapes[name] = tuple(f.get_slice(name).get_shape())
        return self._shapes[name]

    def load(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a float32 numpy array (bf16/fp16 checkpoints are widened exactly)."""
        import torch
        from safetensors import safe_open

        with safe_open(str(self.folder / self._require(name)), framework="pt") as f:
            tensor = f.get_tensor(name)
        return tensor.to(torch.float32).numpy()

    def _require(self, name: str) -> str:
        try:
            return self._file_of[name]
        except KeyError:
            raise MergeError(f"{self.folder}: tensor {name!r} is missing from the checkpoint") from None
