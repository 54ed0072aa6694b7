"""The seeded-weights file (``seeded_weights.json``): a checkpoint held as each tensor's stored shape and the law of its
values, and one seed. Written by the presets (:func:`export.random_weights.write_seeded_weights`), read and drawn by
:mod:`merge.sources.seeded`, which describes the drawing."""

from __future__ import annotations

import math
from dataclasses import dataclass

SEEDED_FILE = "seeded_weights.json"
SEEDED_FORMAT = "qwen3vl-merge seeded weights"
SEEDED_VERSION = 1


@dataclass(frozen=True)
class SeededTensor:
    name: str
    shape: tuple[int, ...]
    mean: float
    std: float

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def seeded_json(seed: int, tensors: list[SeededTensor]) -> dict:
    return {
        "format": SEEDED_FORMAT,
        "version": SEEDED_VERSION,
        "seed": seed,
        "tensors": {t.name: {"shape": list(t.shape), "mean": t.mean, "std": t.std} for t in tensors},
    }
