"""What the vision part is: its shape parameters, its I/O contract, and the checks on its inputs.

Free of torch and onnx: the runtime checks a call's images with it before running anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from merge.errors import MergeError

# The vision part's I/O contract. Dimensions named here are dynamic in the exported graph.
VISION_INPUTS = {
    "pixel_values": ("float32", ["num_patches", "patch_dim"]),
    "image_grid_thw": ("int64", ["num_images", 3]),
}
VISION_OUTPUTS = {
    "image_embeds": ("float32", ["num_image_tokens", "out_hidden"]),
    "deepstack_embeds": ("float32", ["num_deepstack_levels", "num_image_tokens", "out_hidden"]),
}

# Sizes past these are a corrupt or hostile config, refused before anything is allocated from them.
SIZE_LIMITS = {
    "depth": 1024,
    "hidden_size": 1 << 16,
    "num_heads": 1024,
    "intermediate_size": 1 << 18,
    "in_channels": 16,
    "patch_size": 256,
    "temporal_patch_size": 64,
    "spatial_merge_size": 16,
    "out_hidden_size": 1 << 16,
    "num_position_embeddings": 1 << 24,
}

SUPPORTED_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "silu", "quick_gelu")

# transformers' Qwen3-VL vision LayerNorms (each block's norm1 and norm2, the mergers' norm) are
# ``nn.LayerNorm(eps=1e-6)``: its vision config has no key for it. A config that names another (``layer_norm_eps``, the
# usual Hugging Face key) is refused: transformers ignores the key, so following it would part from PyTorch.
LAYER_NORM_EPS = 1e-6


@dataclass(frozen=True)
class VisionSpec:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    hidden_act: str
    rope_theta: float
    layer_norm_eps: float = LAYER_NORM_EPS

    @classmethod
    def from_config(cls, vision_config: dict, where: str = "vision_config") -> VisionSpec:
        try:
            spec = cls._parse(vision_config)
        except KeyError as exc:
            raise MergeError(f"{where} has no {exc.args[0]!r}; is this a Qwen3-VL config?") from None
        except (TypeError, ValueError) as exc:
            raise MergeError(f"{where}: {exc}") from None
        spec.validate(where)
        return spec

    @classmethod
    def _parse(cls, vision_config: dict) -> VisionSpec:
        cfg = vision_config

        def scalar(key: str) -> int:
            value = cfg[key]
            if isinstance(value, (list, tuple)):  # patch sizes may be given per axis; Qwen3-VL uses one
                if len(set(value)) != 1:
                    raise MergeError(f"vision_config.{key} = {value}: only equal sizes per axis are supported")
                value = value[0]
            return int(value)

        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        return cls(
            depth=int(cfg["depth"]),
            hidden_size=int(cfg["hidden_size"]),
            num_heads=int(cfg["num_heads"]),
            intermediate_size=int(cfg["intermediate_size"]),
            in_channels=int(cfg.get("in_channels", 3)),
            patch_size=scalar("patch_size"),
            temporal_patch_size=scalar("temporal_patch_size"),
            spatial_merge_size=int(cfg["spatial_merge_size"]),
            out_hidden_size=int(cfg["out_hidden_size"]),
            num_position_embeddings=int(cfg["num_position_embeddings"]),
            deepstack_visual_indexes=tuple(int(i) for i in cfg.get("deepstack_visual_indexes", ())),
            hidden_act=str(cfg.get("hidden_act", "gelu_pytorch_tanh")),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            layer_norm_eps=float(cfg.get("layer_norm_eps", LAYER_NORM_EPS)),
        )

    def validate(self, where: str = "vision_config") -> None:
        for key, high in SIZE_LIMITS.items():
            value = getattr(self, key)
            if not 1 <= value <= high:
                raise MergeError(f"{where}: {key} = {value} must be between 1 and {high}")
        if self.hidden_size % self.num_heads:
            raise MergeError(f"{where}: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise MergeError(f"{where}: head dim {self.head_dim} must be divisible by 4 for 2-D rotary")
        if self.grid_side**2 != self.num_position_embeddings:
            raise MergeError(f"{where}: num_position_embeddings {self.num_position_embeddings} is not a square")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise MergeError(f"{where}: deepstack_visual_indexes {bad} outside 0..{self.depth - 1}")
        repeated = sorted({i for i in self.deepstack_visual_indexes if self.deepstack_visual_indexes.count(i) > 1})
        if repeated:  # transformers would run the first of that layer's mergers only, leaving the levels short
            raise MergeError(f"{where}: deepstack_visual_indexes {list(self.deepstack_visual_indexes)} repeats "
                             f"layer(s) {repeated}; each DeepStack level needs a layer of its own")
        if self.layer_norm_eps != LAYER_NORM_EPS:  # also refuses NaN
            raise MergeError(f"{where}: layer_norm_eps = {self.layer_norm_eps}, but transformers' Qwen3-VL vision "
                             f"tower ignores that key and uses {LAYER_NORM_EPS}; remove it (the export follows "
                             "transformers)")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise MergeError(f"{where}: hidden_act {self.hidden_act!r} unsupported "
                             f"(supported: {SUPPORTED_ACTIVATIONS})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


def check_vision_inputs(pixel_values: np.ndarray, image_grid_thw: np.ndarray, spec: VisionSpec) -> None:
    """Refuse inputs the vision part cannot process, naming the tensor and the numbers that disagree."""
    if pixel_values.ndim != 2:
        raise MergeError(f"pixel_values must be 2-D [num_patches, {spec.patch_dim}], got shape {pixel_values.shape}")
    if pixel_values.shape[1] != spec.patch_dim:
        raise MergeError(
            f"pixel_values has {pixel_values.shape[1]} values per patch; this model expects {spec.patch_dim} "
            f"(channels {spec.in_channels} x temporal {spec.temporal_patch_size} x patch {spec.patch_size}^2)"
        )
    if image_grid_thw.ndim != 2 or image_grid_thw.shape[1] != 3:
        raise MergeError(f"image_grid_thw must have shape [num_images, 3], got {image_grid_thw.shape}")
    if not np.issubdtype(image_grid_thw.dtype, np.integer):
        raise MergeError(f"image_grid_thw must hold integers, got {image_grid_thw.dtype}")
    grid = image_grid_thw.astype(np.int64)
    if (grid <= 0).any():
        i = int(np.argwhere((grid <= 0).any(axis=1))[0, 0])
        raise MergeError(f"image_grid_thw row {i} = {grid[i].tolist()}: every t, h, w must be positive")
    m = spec.spatial_merge_size
    for i, (_, h, w) in enumerate(grid.tolist()):
        if h % m or w % m:
            raise MergeError(
                f"image_grid_thw row {i} = {grid[i].tolist()}: h and w must be divisible by the spatial "
                f"merge size {m}"
            )
    expected = int(grid.prod(axis=1).sum())
    if expected != pixel_values.shape[0]:
        raise MergeError(
            f"pixel_values has {pixel_values.shape[0]} patch rows but image_grid_thw sums to {expected} "
            f"(sum of t*h*w over {len(grid)} images)"
        )
