"""The quantizers: fp32 weights to the formats of :mod:`merge.contract.quant` (the format, its numbers and its
dequantization live there). The build's passes call them, and so does ``verify``'s PyTorch reference, which
requantizes its weights the same way so that quantization error is not mistaken for a graph error. numpy and
ONNX Runtime only, never torch: the runtime and the contract never import this room.

INT4 (``MatMulNBits`` blocks, a weight [K, N]): asymmetric blocks take their range over
``[min(0, min w), max(0, max w)]``: ``scale = (max - min) / 15``, ``zero_point = round(-min / scale)``; symmetric
blocks take the value ``m`` of largest magnitude: ``scale = m / -8``, zero point 8;
``code = clip(round(w / scale + zero_point), 0, 15)``. The numpy path reproduces ONNX Runtime's
``quantize_matmul_4bits`` (MLAS, the routine ``onnxruntime.quantization.matmul_nbits_quantizer`` calls) exactly on
the tested shapes: same scales, zero points and codes up to K. That C++ routine is used when present because it is
faster (see :func:`ort_quantizer`); like ORT's quantizer, it gets a weight padded to whole blocks when K is not a
multiple of block_size.

INT8 (the vision part's ``DynamicQuantizeMatMul``): per output channel, symmetric, no zero point, 7-bit codes:
``scale = max |w| / INT8_CODE_LIMIT`` (63; 1 for an all-zero channel), ``code = clip(round(w / scale), -63, 63)``.
Not the full int8 range: without VNNI, x86 kernels sum pairs of uint8 x int8 products in saturating int16, which
63 cannot overflow and 127 can (:mod:`merge.contract.quant` gives the arithmetic).
"""

from __future__ import annotations

import numpy as np

from merge.contract.quant import INT8_CODE_LIMIT, check_block_size
from merge.errors import MergeError


def quantize_weight_int8(weight: np.ndarray, limit: int = INT8_CODE_LIMIT) -> tuple[np.ndarray, np.ndarray]:
    """[out, in] float -> (int8 [in, out], float32 scales [out]): per output channel, symmetric (scale =
    max |w| / limit, no zero point), codes in [-limit, limit], as DynamicQuantizeMatMul reads its B. The build
    and verify's reference use the default; another ``limit`` (127: the full int8 range) is for tests."""
    if not 0 < limit <= 127:
        raise ValueError(f"int8 code limit {limit} is not in 1..127")
    weight = np.asarray(weight, np.float32)
    scale = np.abs(weight).max(axis=1) / np.float32(limit)
    scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
    codes = np.clip(np.rint(weight / scale[:, None]), -limit, limit).astype(np.int8)
    return np.ascontiguousarray(codes.T), scale


def ort_quantizer():
    """ONNX Runtime's C++ ``quantize_matmul_4bits`` (the routine its own quantizer uses), or None where the
    build lacks it; :func:`quantize_weight_int4` then takes the numpy path. Imported on first use."""
    # The project's one private ONNX Runtime import, kept in this one function. ONNX Runtime (1.32 checked) has no
    # public way to quantize one weight: its documented int4 route, matmul_nbits_quantizer.MatMulNBitsQuantizer,
    # rewrites a whole in-memory onnx.ModelProto (the build streams one weight at a time), and that module's
    # DefaultWeightOnlyQuantizer.qbits_block_quant only wraps this same private function, while importing the
    # module takes onnx and ~1.7 s and calls logging.basicConfig(level=INFO) on the root logger. Should a release
    # drop the function, the numpy path (tests/test_quantize.py holds it equal to this one) takes over.
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
