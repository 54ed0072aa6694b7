"""How a combined folder is quantized, and the numbers of its 4-bit format.

:class:`QuantSpec` is the one description of a precision choice: it goes from the CLI through the build's
passes into ``merge.json``, and ``verify`` reads it back to give its PyTorch reference the same weights.

The functions below are the MatMulNBits 4-bit block format itself, for a weight ``W`` [K, N] and
``k_blocks = ceil(K / block_size)`` (ONNX Runtime contrib op ``MatMulNBits``, as
``onnxruntime.quantization.matmul_nbits_quantizer`` writes it in QOperator format):

* ``B``: uint8 [N, k_blocks, block_size / 2]; the codes of column n, block b, run along K, two per byte,
  the even index in the low nibble. The padded tail of the last block (K not a multiple of block_size) is
  never read by the kernel (it stops at K).
* ``scales``: float32 [N, k_blocks].
* ``zero_points``: uint8 [N, ceil(k_blocks / 2)], two per byte along the blocks, low nibble first (an odd
  k_blocks leaves the last high nibble at 8). Omitted when ``symmetric``: the kernel then uses 8.
* dequantization: ``W[k, n] = (code - zero_point) * scale`` of the block holding k.

Asymmetric blocks take their range over ``[min(0, min w), max(0, max w)]``: ``scale = (max - min) / 15``,
``zero_point = round(-min / scale)``; symmetric blocks take the value ``m`` of largest magnitude:
``scale = m / -8``, zero point 8; ``code = clip(round(w / scale + zero_point), 0, 15)``. The numpy path
reproduces ONNX Runtime's ``quantize_matmul_4bits`` (MLAS, the routine ``onnxruntime.quantization.
matmul_nbits_quantizer`` calls) exactly on the tested shapes: same scales, zero points and codes up to K.
That C++ routine is used when present because it is faster; like ORT's quantizer, it gets a weight padded to
whole blocks when K is not a multiple of block_size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from merge.errors import MergeError

PRECISIONS = ("fp32", "int4")
# The vision part: fp32, or int8 products (per-channel int8 weights, activations quantized at run time to uint8,
# ONNX Runtime's DynamicQuantizeMatMul; attention and the rest stay fp32).
VISION_PRECISIONS = ("fp32", "int8")
BITS = 4


@dataclass(frozen=True)
class QuantSpec:
    """Block-wise weight quantization of the decoder's matrices (``MatMulNBits``)."""

    bits: int = BITS
    block_size: int = 32
    symmetric: bool = True
    # MatMulNBits' minimum compute precision of A (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8): 4 quantizes the
    # activations to int8 at run time, the fast CPU path.
    accuracy_level: int = 4
    scope: str = "decoder"  # which MatMuls: the decoder's, the head included; the vision part stays fp32

    def __post_init__(self) -> None:
        if self.bits != BITS:
            raise MergeError(f"quantization: {self.bits} bits are not supported (only {BITS})")
        check_block_size(self.block_size)
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise MergeError(f"quantization: accuracy_level {self.accuracy_level} is not one of 0..4")

    @property
    def precision(self) -> str:
        return f"int{self.bits}"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> QuantSpec:
        """From ``merge.json``'s ``quantization`` object; every field's type is checked."""
        if not isinstance(data, dict):
            raise MergeError(f"{where}: quantization must be an object, found {type(data).__name__}")
        types = {"bits": int, "block_size": int, "symmetric": bool, "accuracy_level": int, "scope": str}
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise MergeError(f"{where}: quantization has unknown field(s) {unknown}")
        for key, kind in types.items():
            if key not in data:
                raise MergeError(f"{where}: quantization has no {key!r}")
            value = data[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise MergeError(f"{where}: quantization.{key} = {value!r} is not a {kind.__name__}")
        return cls(**data)


def quant_spec_for(precision: str, block_size: int | None = None) -> QuantSpec | None:
    """``--precision``: ``fp32`` (no quantization) or ``int4`` (block 32 unless ``block_size``, symmetric, int8
    activations)."""
    if precision not in PRECISIONS:
        raise MergeError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision != "int4":
        if block_size is not None:
            raise MergeError("--block-size applies to --precision int4 only")
        return None
    return QuantSpec() if block_size is None else QuantSpec(block_size=block_size)


def precision_of(quant: QuantSpec | None) -> str:
    return quant.precision if quant is not None else "fp32"


def check_vision_precision(precision: str) -> str:
    if precision not in VISION_PRECISIONS:
        raise MergeError(f"--vision-precision {precision}: choose one of {', '.join(VISION_PRECISIONS)}")
    return precision


def quantize_weight_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[out, in] float -> (int8 [in, out], float32 scales [out]): per output channel, symmetric (scale =
    max |w| / 127, no zero point), as DynamicQuantizeMatMul reads its B."""
    weight = np.asarray(weight, np.float32)
    scale = np.abs(weight).max(axis=1) / 127
    scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
    codes = np.clip(np.rint(weight / scale[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(codes.T), scale


def dequantize_weight_int8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The inverse of :func:`quantize_weight_int8`, back to [out, in] float: the weights the kernel multiplies by."""
    return (codes.astype(np.float32) * scale[None, :]).T



def ort_quantizer():
    """ONNX Runtime's C++ ``quantize_matmul_4bits`` (the routine its own quantizer uses), or None where the
    build lacks it. Imported on first use: the runtime imports this module without quantizing anything."""
    try:
        from onnxruntime.capi._pybind_state import quantize_matmul_4bits
    except ImportError:  # pragma: no cover - depends on the onnxruntime build
        return None
    return quantize_matmul_4bits

# Columns (N) the numpy path quantizes per step: bounds its temporaries to a few MB whatever the weight size.
_NUMPY_COLUMN_CHUNK = 512


def _k_blocks(k: int, block_size: int) -> int:
    return (k + block_size - 1) // block_size


def _quantize_numpy(
    weight: np.ndarray, block_size: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    k, n = weight.shape
    kb = _k_blocks(k, block_size)
    packed = np.empty((n, kb, block_size // 2), dtype=np.uint8)
    scales = np.empty((n, kb), dtype=np.float32)
    zero_points = None if symmetric else np.empty((n, (kb + 1) // 2), dtype=np.uint8)
    for start in range(0, n, _NUMPY_COLUMN_CHUNK):
        stop = min(n, start + _NUMPY_COLUMN_CHUNK)
        cols = stop - start
        blocks = np.zeros((cols, kb * block_size), dtype=np.float32)
        blocks[:, :k] = weight[:, start:stop].T
        blocks = blocks.reshape(cols, kb, block_size)
        if symmetric:
            idx = np.abs(blocks).argmax(axis=-1)
            extreme = np.take_along_axis(blocks, idx[..., None], axis=-1)[..., 0]
            scale = extreme / np.float32(-8.0)
            zp = np.full((cols, kb), 8.0, dtype=np.float32)
        else:
            lo = np.minimum(blocks.min(axis=-1), 0.0)
            hi = np.maximum(blocks.max(axis=-1), 0.0)
            scale = (hi - lo) / np.float32(15.0)
            safe = np.where(scale == 0, np.float32(1.0), scale)
            zp = np.clip(np.round(-lo / safe), 0, 15).astype(np.float32)
        safe = np.where(scale == 0, np.float32(1.0), scale)
        codes = np.clip(np.round(blocks / safe[..., None] + zp[..., None]), 0, 15).astype(np.uint8)
        # the padded tail of the last block holds the code of 0.0 (the kernel stops at K and never reads it)
        codes = codes.reshape(cols, kb, block_size // 2, 2)
        packed[start:stop] = codes[..., 0] | (codes[..., 1] << 4)
        scales[start:stop] = scale
        if zero_points is not None:
            zpi = zp.astype(np.uint8)
            if kb % 2:
                # unused high nibble of the last byte: 8, as the C++ routine writes it
                zpi = np.concatenate([zpi, np.full((cols, 1), 8, dtype=np.uint8)], axis=1)
            zero_points[start:stop] = zpi[:, 0::2] | (zpi[:, 1::2] << 4)
    return packed, scales, zero_points


def quantize_weight_int4(
    weight: np.ndarray, block_size: int = 32, symmetric: bool = False, *, backend: str = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize a float32 weight [K, N] to MatMulNBits' (B, scales, zero_points); zero_points is None if symmetric.

    ``backend``: "ort" (onnxruntime's C++ ``quantize_matmul_4bits``), "numpy", or "auto" (ort when present).
    """
    if weight.ndim != 2:
        raise MergeError(f"expected a 2-D weight [K, N], got shape {weight.shape}")
    check_block_size(block_size)
    routine = ort_quantizer()
    if backend == "auto":
        backend = "ort" if routine is not None else "numpy"
    if backend == "numpy":
        return _quantize_numpy(weight, block_size, symmetric)
    if backend != "ort":
        raise ValueError(f"unknown backend {backend!r}")
    if routine is None:
        raise RuntimeError("this onnxruntime build has no quantize_matmul_4bits")
    k, n = weight.shape
    kb = _k_blocks(k, block_size)
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    if k % block_size:
        # as ORT's own quantizer does: the routine may read past row K in a partial last block
        weight = np.pad(weight, ((0, kb * block_size - k), (0, 0)))
    packed = np.zeros((n, kb, block_size // 2), dtype=np.uint8)
    scales = np.zeros((n, kb), dtype=np.float32)
    zero_points = np.zeros((n, (kb + 1) // 2), dtype=np.uint8)
    routine(packed, weight, scales, zero_points, block_size, n, k, symmetric)
    return packed, scales, (None if symmetric else zero_points)


def dequantize_int4(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int) -> np.ndarray:
    """MatMulNBits' dequantization from the op's spec: W[k, n] = (code - zp) * scale, codes low nibble first."""
    n, kb, blob = packed.shape
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, kb, blob * 2).astype(np.float64)
    scales = scales.reshape(n, kb).astype(np.float64)
    if zero_points is None:
        zp = np.full((n, kb), 8.0)
    else:
        zp = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[:, :kb].astype(np.float64)
    w = (codes - zp[..., None]) * scales[..., None]
    return w.reshape(n, kb * blob * 2)[:, :k].T


def dequantize_int4_rows(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
                         k: int) -> np.ndarray:
    """:func:`dequantize_int4` transposed, [N, K] float32 (a Linear's [out, in]), computed in float32: the same
    values, since ``code - zero_point`` is a small integer and its product with a float32 scale rounds once
    either way; faster, and without the float64 and transposed copies."""
    n, kb, blob = packed.shape
    codes = np.empty((n, kb, blob * 2), np.float32)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    if zero_points is None:
        codes -= 8
    else:
        zp = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[:, :kb]
        codes -= zp[..., None].astype(np.float32)
    codes *= scales.reshape(n, kb, 1).astype(np.float32)
    return np.ascontiguousarray(codes.reshape(n, kb * blob * 2)[:, :k])


def check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise MergeError(f"block_size must be a power of two >= 16, got {block_size}")
