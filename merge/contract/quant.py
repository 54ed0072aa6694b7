"""How a combined folder is quantized, and the numbers of its quantized formats.

:class:`QuantSpec` is the one description of a precision choice: it goes from the CLI through the build's
passes into ``merge.json``, and ``verify`` reads it back to give its PyTorch reference the same weights.

The MatMulNBits block format, for a weight ``W`` [K, N], ``bits`` 4 or 8 and ``k_blocks = ceil(K / block_size)``
(ONNX Runtime contrib op ``MatMulNBits``, as ``onnxruntime.quantization.matmul_nbits_quantizer`` writes it in
QOperator format):

* ``B``: uint8 [N, k_blocks, block_size * bits / 8]; the codes (0 .. 2**bits - 1) of column n, block b, run along
  K; 4 bits: two per byte, the even index in the low nibble; 8 bits: one per byte. The padded tail of the last
  block (K not a multiple of block_size) is never read by the kernel (it stops at K).
* ``scales``: float32 [N, k_blocks].
* ``zero_points``: uint8 [N, ceil(k_blocks * bits / 8)]; 4 bits: two per byte along the blocks, low nibble first
  (an odd k_blocks leaves the last high nibble at 8); 8 bits: one per byte. Omitted when ``symmetric``: the
  kernel then uses 2**(bits - 1) (8, or 128).
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

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from merge.errors import MergeError

PRECISIONS = ("fp32", "int4")
# The vision part: fp32, or int8 products (per-channel int8 weights, activations quantized at run time to uint8,
# ONNX Runtime's DynamicQuantizeMatMul; attention and the rest stay fp32).
VISION_PRECISIONS = ("fp32", "int8")
# The keys and values kept between calls (past_key_values.* and present.*): float32, or float16 (half the bytes)
KV_CACHES = ("float32", "float16")
# The int8 vision weights' largest code magnitude (see the module docstring): 7-bit codes, so that a pair of uint8 x
# int8 products can never leave int16 (2 * 255 * 63 = 32130 <= 32767) on CPUs without VNNI.
INT8_CODE_LIMIT = 63
BITS = 4
EIGHT_BITS = 8  # the precision of the matrices QuantSpec.eight_bit names
# How block scales (and zero points) are chosen: "rtn" from each block's range (round to nearest, as ONNX
# Runtime's own quantizer does); "search" by a search that minimises each block's squared error (see
# merge.quantize). The format is the same.
METHODS = ("rtn", "search")
# The decoder's matrices by kind, as QuantSpec.eight_bit names them: a layer's projections, and the head.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HEAD = "head"
MATRIX_KINDS = (*PROJECTIONS, HEAD)
HEAD_NAMES = ("lm_head",)  # the head's name in the decoder graph (decoder/lm_head) and in PyTorch (lm_head)


def matrix_kind(name: str) -> str | None:
    """The kind of one of the decoder's matrices (one of :data:`MATRIX_KINDS`) from its name, in the combined
    graph (``decoder/layers.3/mlp/down_proj/MatMul``, ``decoder/lm_head``) or in PyTorch
    (``model.language_model.layers.3.mlp.down_proj.weight``, ``lm_head.weight``); None for anything else."""
    parts = re.split(r"[/.]", name)
    if any(part in HEAD_NAMES for part in parts):
        return HEAD
    return next((part for part in reversed(parts) if part in PROJECTIONS), None)


MIN_BLOCK_SIZE = 16  # MatMulNBits' smallest block


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
    method: str = "rtn"  # how each block's scale (and zero point) is chosen: one of METHODS
    # matrix kinds (MATRIX_KINDS) stored in 8 bits instead (same block size, symmetry and method), every layer's
    eight_bit: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.bits != BITS:
            raise MergeError(f"quantization: {self.bits} bits are not supported (only {BITS})")
        check_block_size(self.block_size)
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise MergeError(f"quantization: accuracy_level {self.accuracy_level} is not one of 0..4")
        if self.method not in METHODS:
            raise MergeError(f"quantization: method {self.method!r} is not one of {', '.join(METHODS)}")
        unknown = [kind for kind in self.eight_bit if kind not in MATRIX_KINDS]
        if unknown:
            raise MergeError(f"quantization: eight_bit names {', '.join(map(repr, unknown))}, not one of the "
                             f"matrix kinds {', '.join(MATRIX_KINDS)}")
        if len(set(self.eight_bit)) != len(self.eight_bit):
            raise MergeError(f"quantization: eight_bit {list(self.eight_bit)} names a matrix kind twice")
        # one spelling per choice (a tuple in MATRIX_KINDS' order), so equal choices compare and serialize equal
        object.__setattr__(self, "eight_bit", tuple(kind for kind in MATRIX_KINDS if kind in self.eight_bit))

    @property
    def precision(self) -> str:
        return f"int{self.bits}"

    def scheme(self) -> str:
        """The weights this spec makes, in a few words: the precision, then what differs from the first scheme
        (block 32, symmetric, rtn, all 4-bit). Two specs that make different weights from one checkpoint have
        different schemes (accuracy_level changes the kernel, not the weights)."""
        details = [f"block {self.block_size}"] if self.block_size != 32 else []
        details += [] if self.symmetric else ["zero points"]
        details += [] if self.method == "rtn" else [self.method]
        details += [f"8-bit {','.join(self.eight_bit)}"] if self.eight_bit else []
        return self.precision + (f" ({', '.join(details)})" if details else "")

    def bits_for(self, name: str) -> int:
        """The bits of the matrix called ``name`` (a graph node's or a PyTorch parameter's name, see
        :func:`matrix_kind`): 8 for the kinds :attr:`eight_bit` names, else :attr:`bits`."""
        return EIGHT_BITS if matrix_kind(name) in self.eight_bit else self.bits

    def block_for(self, k: int) -> int:
        """The block of a matrix with ``k`` rows (its input size): :func:`block_for`."""
        return block_for(self.block_size, k)

    def expert_block_size(self, hidden: int, width: int) -> int:
        """The block of a Qwen3-VL-MoE model's 4-bit experts: ``QMoE`` has one block for fc1 (K = the hidden size)
        and fc2 (K = the experts' width) and quantizes whole blocks, so the largest power of two up to
        :attr:`block_size` dividing both (the published shapes, hidden 2048 and width 768, take 128)."""
        block = min(self.block_for(hidden), self.block_for(width))
        if hidden % block or width % block:
            raise MergeError(f"quantization: no block of at least {MIN_BLOCK_SIZE} (a power of two up to "
                             f"{self.block_size}) divides the hidden size {hidden} and the experts' width {width}; "
                             "QMoE quantizes whole blocks")
        return block

    def to_json(self) -> dict:
        """The fields that came later (``method``, ``eight_bit``) are written only when they differ from what their
        absence means, so that a folder built with the default scheme stays readable by the releases before them
        (which refuse unknown fields)."""
        data = {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric,
                "accuracy_level": self.accuracy_level, "scope": self.scope}
        if self.method != "rtn":
            data["method"] = self.method
        if self.eight_bit:
            data["eight_bit"] = list(self.eight_bit)
        return data

    @classmethod
    def from_json(cls, data: Any, where: str) -> QuantSpec:
        """From ``merge.json``'s ``quantization`` object; every field's type is checked. ``method`` and
        ``eight_bit`` came later: a manifest without them was written by round-to-nearest, all 4-bit."""
        if not isinstance(data, dict):
            raise MergeError(f"{where}: quantization must be an object, found {type(data).__name__}")
        types = {"bits": int, "block_size": int, "symmetric": bool, "accuracy_level": int, "scope": str,
                 "method": str, "eight_bit": list}
        later = {"method": "rtn", "eight_bit": []}  # absent from manifests written before them: their meaning then
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise MergeError(f"{where}: quantization has unknown field(s) {unknown}")
        fields = {}
        for key, kind in types.items():
            if key not in data and key not in later:
                raise MergeError(f"{where}: quantization has no {key!r}")
            value = data.get(key, later.get(key))
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise MergeError(f"{where}: quantization.{key} = {value!r} is not a {kind.__name__}")
            fields[key] = value
        if not all(isinstance(kind, str) for kind in fields["eight_bit"]):
            raise MergeError(f"{where}: quantization.eight_bit = {fields['eight_bit']!r} is not a list of strings")
        return cls(**{**fields, "eight_bit": tuple(fields["eight_bit"])})


def quant_spec_for(precision: str, block_size: int | None = None, *, method: str | None = None,
                   zero_points: bool | None = None, eight_bit: str | None = None) -> QuantSpec | None:
    """``--precision``: ``fp32`` (no quantization) or ``int4`` (:data:`DEFAULT_INT4`, each option given replacing
    its part: ``block_size``, ``method``, ``zero_points`` (False: symmetric), ``eight_bit`` (comma-separated matrix
    kinds stored in 8 bits, or ``none``); int8 activations)."""
    if precision not in PRECISIONS:
        raise MergeError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision != "int4":
        given = [option for option, value in (("--block-size", block_size), ("--int4-method", method),
                                              ("--zero-points", zero_points), ("--eight-bit", eight_bit))
                 if value is not None]
        if given:
            raise MergeError(f"{given[0]} applies to --precision int4 only")
        return None
    spec = DEFAULT_INT4
    fields: dict[str, Any] = {}
    if zero_points is not None:
        fields["symmetric"] = not zero_points
    if block_size is not None:
        fields["block_size"] = block_size
    if method is not None:
        fields["method"] = method
    if eight_bit is not None:
        kinds = [kind.strip() for kind in eight_bit.split(",") if kind.strip()]
        fields["eight_bit"] = () if kinds == [NO_EIGHT_BIT] else tuple(kinds)
    return dataclasses.replace(spec, **fields)


MLP_KINDS = ("gate_proj", "up_proj", "down_proj")  # a dense MLP's matrices (experts are QMoE's, always 4-bit)


def fit_default_to(quant: QuantSpec | None, dense_mlp: bool) -> QuantSpec | None:
    """The default 8-bit kinds as far as the model has them: a mixture-of-experts model whose every layer is sparse
    has no dense MLP, so the default's ``down_proj`` has nothing to name there and is dropped (the experts stay 4-bit);
    any other set, chosen by ``--eight-bit``, is kept as given (and refused by the build if a kind is absent)."""
    if quant is None or dense_mlp or quant.eight_bit != DEFAULT_EIGHT_BIT:
        return quant
    return dataclasses.replace(quant, eight_bit=tuple(k for k in quant.eight_bit if k not in MLP_KINDS))


def precision_of(quant: QuantSpec | None) -> str:
    return quant.precision if quant is not None else "fp32"


def default_kv_cache(quant: QuantSpec | None) -> str:
    """The KV cache's type when a build does not say: float32, whatever the weights. float16 halves the cache (1.75
    GiB instead of 3.5 at 16k on 2B) but ONNX Runtime's CPU attention converts a float16 cache to float32 for every
    query head at every call: on 2B (int4, AMX CPU) decode at a 4k context ran 5.3 tokens/s with it and about 8 with
    float32, below llama.cpp's Q4_K_M. So float16 is for long contexts where memory decides (``--kv-cache``)."""
    return "float32"


def default_vision_precision(quant: QuantSpec | None) -> str:
    """The vision part's precision when a build does not say: fp32 beside fp32 weights (exact), int8 beside int4
    (7-bit codes: 1.1 GiB less resident on 2B and the vision tower 3.5x faster on a CPU with AMX; on the 2B spread
    copy the image prompt's mean KL to fp32 went from 2.76e-2 to 3.27e-2, the text's unchanged)."""
    return "fp32" if quant is None else "int8"


def check_kv_cache(kv_cache: str) -> str:
    if kv_cache not in KV_CACHES:
        raise MergeError(f"--kv-cache {kv_cache}: choose one of {', '.join(KV_CACHES)}")
    return kv_cache


def check_vision_precision(precision: str) -> str:
    if precision not in VISION_PRECISIONS:
        raise MergeError(f"--vision-precision {precision}: choose one of {', '.join(VISION_PRECISIONS)}")
    return precision


def dequantize_weight_int8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The inverse of :func:`merge.quantize.quantize_weight_int8`, back to [out, in] float: the weights the kernel
    multiplies by."""
    return (codes.astype(np.float32) * scale[None, :]).T


def unpack_codes(packed: np.ndarray, bits: int = BITS) -> np.ndarray:
    """MatMulNBits' B [N, k_blocks, bytes] -> its codes uint8 [N, k_blocks, block_size] (4 bits: low nibble
    first)."""
    if bits == EIGHT_BITS:
        return packed
    n, kb, blob = packed.shape
    codes = np.empty((n, kb, blob * 2), np.uint8)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    return codes


def unpack_zero_points(zero_points: np.ndarray | None, n: int, kb: int, bits: int = BITS) -> np.ndarray:
    """MatMulNBits' zero_points [N, ceil(k_blocks * bits / 8)] (or None: 2**(bits - 1)) -> uint8 [N, k_blocks]."""
    if zero_points is None:
        return np.full((n, kb), 1 << (bits - 1), np.uint8)
    if bits == EIGHT_BITS:
        return zero_points.reshape(n, kb)
    return np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[:, :kb]


def dequantize_nbits(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int,
                     bits: int = BITS) -> np.ndarray:
    """MatMulNBits' dequantization from the op's spec, [K, N] float64: W[k, n] = (code - zp) * scale."""
    n, kb = packed.shape[:2]
    codes = unpack_codes(packed, bits).astype(np.float64)
    zp = unpack_zero_points(zero_points, n, kb, bits).astype(np.float64)
    w = (codes - zp[..., None]) * scales.reshape(n, kb).astype(np.float64)[..., None]
    return w.reshape(n, -1)[:, :k].T


def dequantize_int4(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int) -> np.ndarray:
    """:func:`dequantize_nbits` of 4-bit blocks."""
    return dequantize_nbits(packed, scales, zero_points, k, BITS)


def dequantize_nbits_rows(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int,
                          bits: int = BITS) -> np.ndarray:
    """:func:`dequantize_nbits` transposed, [N, K] float32 (a Linear's [out, in]), computed in float32: the same
    values, since ``code - zero_point`` is a small integer and its product with a float32 scale rounds once
    either way; faster, and without the float64 and transposed copies."""
    n, kb = packed.shape[:2]
    codes = unpack_codes(packed, bits).astype(np.float32)
    codes -= unpack_zero_points(zero_points, n, kb, bits)[..., None].astype(np.float32)
    codes *= scales.reshape(n, kb, 1).astype(np.float32)
    return np.ascontiguousarray(codes.reshape(n, -1)[:, :k])


def dequantize_int4_rows(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
                         k: int) -> np.ndarray:
    """:func:`dequantize_nbits_rows` of 4-bit blocks."""
    return dequantize_nbits_rows(packed, scales, zero_points, k, BITS)


def block_for(block_size: int, k: int) -> int:
    """The block a matrix with ``k`` rows (K, its input size) is quantized in: ``block_size``, or when that does not
    divide ``k`` the largest power of two below it that does (at least 16: a ``k`` that no such block divides is
    padded to whole blocks of ``block_size``, as MatMulNBits allows). Every K of the published shapes is a multiple
    of 128; a small one (the tiny presets' hidden size 64) takes a block that fits it, so that no block holds
    padding and a tied head's blocks stay a table the embedding lookup can read."""
    block = block_size
    while block > MIN_BLOCK_SIZE and k % block:
        block //= 2
    return block if k % block == 0 else block_size


def check_block_size(block_size: int) -> None:
    if block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
        raise MergeError(f"block_size must be a power of two >= {MIN_BLOCK_SIZE}, got {block_size}")


# ``--precision int4`` without other options: blocks of 128 with a zero point each, each block's scale and zero
# point searched, and the value, output and down projections and the head in 8 bits. Measured on the 2B preset's
# spread copy in one run (docs/benchmarks.md#fidelity): mean KL to fp32 on text 2.62e-2 against llama.cpp Q4_K_M's
# 3.19e-2 on the same weights (99th percentile 1.18e-1 against 9.85e-2), and faster than Q4_K_M in every phase
# measured (prefill 1.26-1.33x, decode 1.22-1.32x, batch 8 1.62x: docs/benchmarks.md#speed). Blocks of 64
# (``--block-size 64``) come closer still (2.21e-2, p99 8.90e-2) at Q4_K_M's prefill speed. The default before it:
# block 32, ``v_proj``, ``o_proj`` and the head in 8 bits (2.55e-2, prefill 0.82-0.89x of Q4_K_M's); before that,
# symmetric round-to-nearest all in 4 bits (7.52e-2). ``QuantSpec()`` stays that first scheme: it is what a manifest
# without ``method`` and ``eight_bit`` means.
DEFAULT_BLOCK_SIZE = 128
DEFAULT_EIGHT_BIT = ("v_proj", "o_proj", "down_proj", HEAD)
DEFAULT_INT4 = QuantSpec(block_size=DEFAULT_BLOCK_SIZE, symmetric=False, method="search", eight_bit=DEFAULT_EIGHT_BIT)
NO_EIGHT_BIT = "none"  # --eight-bit none: every matrix in 4 bits
