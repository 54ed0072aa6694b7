"""How a combined folder is quantized, and the numbers of its quantized formats.

:class:`QuantSpec` is the one description of a precision choice: it goes from the CLI through the build's
passes into ``merge.json``, and ``verify`` reads it back to give its PyTorch reference the same weights.

The MatMulNBits 4-bit block format, for a weight ``W`` [K, N] and ``k_blocks = ceil(K / block_size)`` (ONNX
Runtime contrib op ``MatMulNBits``, as ``onnxruntime.quantization.matmul_nbits_quantizer`` writes it in QOperator
format):

* ``B``: uint8 [N, k_blocks, block_size / 2]; the codes of column n, block b, run along K, two per byte,
  the even index in the low nibble. The padded tail of the last block (K not a multiple of block_size) is
  never read by the kernel (it stops at K).
* ``scales``: float32 [N, k_blocks].
* ``zero_points``: uint8 [N, ceil(k_blocks / 2)], two per byte along the blocks, low nibble first (an odd
  k_blocks leaves the last high nibble at 8). Omitted when ``symmetric``: the kernel then uses 8.
* dequantization: ``W[k, n] = (code - zero_point) * scale`` of the block holding k.

The vision part's int8 products (contrib op ``DynamicQuantizeMatMul``'s B) hold int8 codes [in, out] and float32
scales [out], one per output channel, no zero point: ``W[out, in] = code * scale``. The codes are 7-bit, within
``[-INT8_CODE_LIMIT, INT8_CODE_LIMIT]`` = [-63, 63], so that every CPU's kernel computes the same exact integer
product. The kernel quantizes the activations to uint8 [0, 255] at run time; x86 CPUs without VNNI (AVX2 only, or
AVX-512 before VNNI) multiply u8 x s8 with ``vpmaddubsw``, which adds each pair of adjacent products along K into a
*saturating* int16: full-range codes reach 255 * 127 * 2 = 64770 > 32767 and are clipped (measured cosine 0.992
against the same weights in PyTorch on such a machine), while 63 keeps every pair within 255 * 63 * 2 = 32130.
VNNI, AMX and ARM kernels accumulate in int32 and are exact either way. (This is the 7-bit weight range ONNX
Runtime's quantization guide advises for x86 without VNNI; its own ``reduce_range`` uses [-64, 64], 32640 at
worst. 63 keeps the range symmetric inside 7-bit two's complement, [-64, 63], as 127 does inside 8 bits.)

The quantizers that write these formats from float weights are in :mod:`merge.quantize`, a room above this one:
the runtime reads quantized folders and never quantizes.
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
# The int8 vision weights' largest code magnitude (see the module docstring): 7-bit codes, so that a pair of uint8 x
# int8 products can never leave int16 (2 * 255 * 63 = 32130 <= 32767) on CPUs without VNNI.
INT8_CODE_LIMIT = 63
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


def dequantize_weight_int8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The inverse of :func:`merge.quantize.quantize_weight_int8`, back to [out, in] float: the weights the kernel
    multiplies by."""
    return (codes.astype(np.float32) * scale[None, :]).T


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
