"""The quantizers: fp32 weights to the formats of :mod:`merge.contract.quant` (the format, its numbers and its
dequantization live there). The build's passes call them, and so does ``verify``'s PyTorch reference, which
requantizes its weights the same way so that quantization error is not mistaken for a graph error. numpy and
ONNX Runtime only, never torch: the runtime and the contract never import this room.

``MatMulNBits`` blocks (a weight [K, N], ``bits`` 4 or 8, ``qmax = 2**bits - 1``, ``half = 2**(bits - 1)``), two
methods:

* ``rtn`` (round to nearest, from each block's range): asymmetric blocks take their range over
  ``[min(0, min w), max(0, max w)]``: ``scale = (max - min) / qmax``, ``zero_point = round(-min / scale)``;
  symmetric blocks take the value ``m`` of largest magnitude: ``scale = m / -half``, zero point ``half``;
  ``code = clip(round(w / scale + zero_point), 0, qmax)``. For 4 bits the numpy path reproduces ONNX Runtime's
  ``quantize_matmul_4bits`` (MLAS, the routine ``onnxruntime.quantization.matmul_nbits_quantizer`` calls) exactly
  on the tested shapes: same scales, zero points and codes up to K. That C++ routine is used when present because
  it is faster (see :func:`ort_quantizer`); like ORT's quantizer, it gets a weight padded to whole blocks when K
  is not a multiple of block_size.
* ``search`` (the k-quant idea: choose each block's scale and zero point to minimise its squared error
  ``sum (w - (code - zero_point) * scale)**2``, see :func:`_search_blocks`): the kernel dequantizes with an
  integer zero point, so the search is over the scale and that integer (symmetric blocks: over the scale, zero
  point ``half``). Every block ends with the smaller error of the search's result and rtn's, so no block is worse
  than rtn's. Plain squared error, unweighted: with no calibration data to say which inputs matter, weighting the
  error by ``w**2`` or by llama.cpp's ``rms + |w|`` gave larger output errors when this was chosen (numpy, the
  weights and activations of ``benchmarks/quant_error.py``, block 32, ratio to symmetric rtn on gaussian / t4 /
  row-scaled weights: unweighted 0.89 / 0.81 / 0.80, ``w**2`` 0.92 / 0.83 / 0.82, ``rms + |w|`` 0.90 / 0.81 /
  0.80).

INT8 (the vision part's ``DynamicQuantizeMatMul``): per output channel, symmetric, no zero point, 7-bit codes:
``scale = max |w| / INT8_CODE_LIMIT`` (63; 1 for an all-zero channel), ``code = clip(round(w / scale), -63, 63)``.
Not the full int8 range: without VNNI, x86 kernels sum pairs of uint8 x int8 products in saturating int16, which
63 cannot overflow and 127 can (:mod:`merge.contract.quant` gives the arithmetic).
"""

from __future__ import annotations

import numpy as np

from merge.contract.quant import BITS, EIGHT_BITS, INT8_CODE_LIMIT, METHODS, check_block_size
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
# The search's steps hold about this many weights, so its temporaries (several per step) stay in the CPU's caches.
_SEARCH_CHUNK_WEIGHTS = 1 << 16
# The search's candidate scales: the block's range divided by qmax + t for each t (t > 0 clips the block's
# extremes, t < 0 widens the grid), each with its grid anchored at the block's minimum and at its maximum
# (asymmetric; symmetric: at the value of largest magnitude). Measured when chosen (the study of
# benchmarks/quant_error.py): 13 or 25 steps lowered the output error by < 0.3%; one anchor instead of two raised
# it by up to 1% at block 128.
_SEARCH_STEPS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)


def _k_blocks(k: int, block_size: int) -> int:
    return (k + block_size - 1) // block_size


def _rtn_blocks(blocks: np.ndarray, qmax: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Round to nearest: (scale, zero point) per block of ``blocks`` [..., block_size], both float32."""
    if symmetric:
        idx = np.abs(blocks).argmax(axis=-1)
        extreme = np.take_along_axis(blocks, idx[..., None], axis=-1)[..., 0]
        scale = extreme / np.float32(-(qmax + 1) // 2)
        return scale, np.full(scale.shape, (qmax + 1) // 2, dtype=np.float32)
    lo = np.minimum(blocks.min(axis=-1), 0.0)
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    scale = (hi - lo) / np.float32(qmax)
    safe = np.where(scale == 0, np.float32(1.0), scale)
    return scale, np.clip(np.round(-lo / safe), 0, qmax).astype(np.float32)


def _codes(blocks: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmax: int) -> np.ndarray:
    """The nearest codes (float32) of ``blocks`` on the grid ``(code - zp) * scale``."""
    safe = np.where(scale == 0, np.float32(1.0), scale)
    return np.clip(np.round(blocks / safe[..., None] + zp[..., None]), 0, qmax)


def _block_errors(blocks: np.ndarray, scale: np.ndarray, zp: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Each block's squared error against its dequantization, in float64 (as merge.contract.quant.dequantize_nbits
    computes it)."""
    deq = (codes.astype(np.float64) - zp[..., None]) * scale.astype(np.float64)[..., None]
    diff = blocks.astype(np.float64) - deq
    return np.einsum("...i,...i->...", diff, diff)


def _search_blocks(x: np.ndarray, qmax: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) per block of ``x`` [..., block_size] that (nearly) minimise the block's squared error
    ``sum (x - (code - zp) * scale)**2`` with codes in 0..qmax and an integer zero point in 0..qmax.

    Each candidate (a scale s0 and an integer zero point z) fixes the codes ``L`` (nearest on s0's grid); for those
    codes the best scale is the least-squares one, ``s = sum x q / sum q**2`` with ``q = L - z``, and the error
    is then ``sum x**2 - (sum x q)**2 / sum q**2``: two sums per candidate, no dequantization. The best candidate's
    codes are then reassigned to its scale and the scale refitted once more (neither can raise the error)."""
    half = (qmax + 1) // 2
    sxx = np.einsum("...i,...i->...", x, x)
    best_err = np.full(x.shape[:-1], np.inf, np.float32)
    best_scale = np.zeros(x.shape[:-1], np.float32)
    best_zp = np.full(x.shape[:-1], half if symmetric else 0, np.float32)
    q = np.empty_like(x)  # a candidate's codes less its zero point, reused

    def consider(inverse: np.ndarray, zp: np.ndarray | float) -> None:
        zp_b = zp[..., None] if isinstance(zp, np.ndarray) else zp
        np.multiply(x, inverse[..., None], out=q)
        np.add(q, zp_b, out=q)
        np.rint(q, out=q)
        np.clip(q, 0, qmax, out=q)
        np.subtract(q, zp_b, out=q)
        num = np.einsum("...i,...i->...", x, q)
        den = np.einsum("...i,...i->...", q, q)
        ok = den > 0
        den = np.where(ok, den, np.float32(1.0))
        err = np.where(ok, sxx - num * num / den, sxx)
        better = err < best_err
        np.copyto(best_err, err, where=better)
        np.copyto(best_scale, np.where(ok, num / den, np.float32(0.0)), where=better)
        np.copyto(best_zp, zp, where=better)

    if symmetric:
        idx = np.abs(x).argmax(axis=-1)
        extreme = np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]
        for t in _SEARCH_STEPS:
            scale = extreme / np.float32(-(half + t))
            consider(np.where(scale == 0, np.float32(0.0), 1 / np.where(scale == 0, 1, scale)), float(half))
    else:
        lo = np.minimum(x.min(axis=-1), 0.0)
        hi = np.maximum(x.max(axis=-1), 0.0)
        for t in _SEARCH_STEPS:
            scale = (hi - lo) / np.float32(qmax + t)
            inverse = np.where(scale == 0, np.float32(0.0), 1 / np.where(scale == 0, 1, scale)).astype(np.float32)
            consider(inverse, np.clip(np.rint(-lo * inverse), 0, qmax))  # the minimum on the grid's code 0
            consider(inverse, np.clip(qmax - np.rint(hi * inverse), 0, qmax))  # the maximum on qmax

    # the best candidate's codes again, nearest on its fitted scale, and the scale fitted to them
    final = _codes(x, best_scale, best_zp, qmax) - best_zp[..., None]
    num = np.einsum("...i,...i->...", x, final)
    den = np.einsum("...i,...i->...", final, final)
    scale = np.where(den > 0, num / np.where(den > 0, den, 1), 0).astype(np.float32)
    return scale, best_zp


def _quantize_blocks(blocks: np.ndarray, qmax: int, symmetric: bool,
                     method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, zero point, codes) of ``blocks`` [..., block_size]: float32, float32 (integers), uint8."""
    scale, zp = _rtn_blocks(blocks, qmax, symmetric)
    codes = _codes(blocks, scale, zp, qmax)
    if method == "rtn":
        return scale, zp, codes.astype(np.uint8)
    found_scale, found_zp = _search_blocks(blocks, qmax, symmetric)
    found_codes = _codes(blocks, found_scale, found_zp, qmax)
    # per block, the smaller error of the two (the search's cannot be worse but for the float32 rounding of its
    # scale; this makes "never worse than rtn" exact)
    better = _block_errors(blocks, found_scale, found_zp, found_codes) <= _block_errors(blocks, scale, zp, codes)
    scale = np.where(better, found_scale, scale)
    zp = np.where(better, found_zp, zp)
    codes = np.where(better[..., None], found_codes, codes)
    return scale, zp, codes.astype(np.uint8)


def _quantize_numpy(
    weight: np.ndarray, block_size: int, symmetric: bool, bits: int = BITS, method: str = "rtn"
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    k, n = weight.shape
    kb = _k_blocks(k, block_size)
    qmax = (1 << bits) - 1
    per_byte = 8 // bits
    packed = np.empty((n, kb, block_size // per_byte), dtype=np.uint8)
    scales = np.empty((n, kb), dtype=np.float32)
    zero_points = None if symmetric else np.empty((n, -(-kb // per_byte)), dtype=np.uint8)
    chunk = _NUMPY_COLUMN_CHUNK if method == "rtn" else max(1, _SEARCH_CHUNK_WEIGHTS // (kb * block_size))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        cols = stop - start
        blocks = np.zeros((cols, kb * block_size), dtype=np.float32)
        blocks[:, :k] = weight[:, start:stop].T
        blocks = blocks.reshape(cols, kb, block_size)
        # the padded tail of the last block holds the code of 0.0 (the kernel stops at K and never reads it)
        scale, zp, codes = _quantize_blocks(blocks, qmax, symmetric, method)
        if bits == 4:
            codes = codes.reshape(cols, kb, block_size // 2, 2)
            packed[start:stop] = codes[..., 0] | (codes[..., 1] << 4)
        else:
            packed[start:stop] = codes
        scales[start:stop] = scale
        if zero_points is not None:
            zpi = zp.astype(np.uint8)
            if bits == 4:
                if kb % 2:
                    # unused high nibble of the last byte: 8, as the C++ routine writes it
                    zpi = np.concatenate([zpi, np.full((cols, 1), 8, dtype=np.uint8)], axis=1)
                zpi = zpi[:, 0::2] | (zpi[:, 1::2] << 4)
            zero_points[start:stop] = zpi
    return packed, scales, zero_points


def quantize_weight_nbits(
    weight: np.ndarray, bits: int = BITS, block_size: int = 32, symmetric: bool = False, *, method: str = "rtn",
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize a float32 weight [K, N] to MatMulNBits' (B, scales, zero_points) of ``bits`` (4 or 8) bits;
    zero_points is None if symmetric. ``method``: "rtn" or "search" (see the module docstring).

    ``backend`` (4-bit rtn only): "ort" (onnxruntime's C++ ``quantize_matmul_4bits``), "numpy", or "auto" (ort
    when present); every other choice is numpy's.
    """
    if weight.ndim != 2:
        raise MergeError(f"expected a 2-D weight [K, N], got shape {weight.shape}")
    check_block_size(block_size)
    if bits not in (BITS, EIGHT_BITS):
        raise MergeError(f"MatMulNBits: {bits} bits are not supported (only {BITS} and {EIGHT_BITS})")
    if method not in METHODS:
        raise MergeError(f"quantization method {method!r} is not one of {', '.join(METHODS)}")
    if backend not in ("auto", "ort", "numpy"):
        raise ValueError(f"unknown backend {backend!r}")
    routine = ort_quantizer() if bits == BITS and method == "rtn" else None
    if backend == "ort" and routine is None:
        raise RuntimeError("onnxruntime's quantize_matmul_4bits does 4-bit rtn only, and this build may lack it")
    if backend == "numpy" or routine is None:
        return _quantize_numpy(weight, block_size, symmetric, bits, method)
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


def quantize_weight_int4(
    weight: np.ndarray, block_size: int = 32, symmetric: bool = False, *, method: str = "rtn", backend: str = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`quantize_weight_nbits` with 4 bits."""
    return quantize_weight_nbits(weight, BITS, block_size, symmetric, method=method, backend=backend)
