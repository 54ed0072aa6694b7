"""Block-wise 4-bit (and 8-bit) weight quantization of MatMuls into ``com.microsoft::MatMulNBits``, streamed at
save time.

The GenAI model builder's own INT4 path holds every weight in fp32 in memory (a 4B build needs ~27 GiB), so
the decoder graph keeps fp32 weights and they are quantized here, one tensor at a time. :func:`quantize_matmuls_nbits`
only rewrites the graph: each quantized initializer is an ``ir.LazyTensor`` whose function reads the fp32
source (a lazy checkpoint read from :mod:`graphs.decoder`, or a memory-mapped ``ir.ExternalTensor`` from
``ir.load``) when ``ir.save`` writes it, quantizes it with numpy or ONNX Runtime's C++ routine
(:mod:`merge.quantize`; the format and its numbers are :mod:`merge.contract.quant`), and unmaps the source again.
Saving a model with many large MatMuls therefore holds about one weight's fp32 copy plus its packed form at a
time. :class:`QuantizeInt4` is the build's pass: the decoder's MatMuls only (the vision part stays fp32), 4 bits
but for the matrix kinds its :class:`~merge.contract.quant.QuantSpec` sends to 8 bits.

Qwen3-VL-MoE's experts (``com.microsoft.MoE``, :mod:`graphs.moe`) become ``QMoE`` with 4-bit experts
(:func:`quantize_experts_nbits`): each expert's fc1 and fc2 in MatMulNBits' own block format, stacked, quantized
at save time the same way. The router's MatMul stays fp32: its [experts, hidden] weight is small, and the expert
choice is discrete, so int8 activations there (accuracy level 4) would flip near ties between experts.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_ir as ir

from graphs.builder import initializer
from graphs.moe import ROUTER
from merge import quantize as quant
from merge.contract.names import DECODER_SCOPE, MS_DOMAIN
from merge.contract.quant import BITS, EIGHT_BITS, QuantSpec, block_for, check_block_size, matrix_kind
from merge.errors import MergeError

from .base import StitchError, StitchPass

log = logging.getLogger(__name__)


class _QuantJob:
    """One weight's quantization, shared by the lazy tensors of its parts (B, scales, zero points).

    The first part asked for computes all parts and keeps the others until they are asked for once, so a
    serial ``ir.save`` (which writes a weight's parts one after the other) quantizes each weight once. At most
    ``_MAX_CACHED_JOBS`` weights keep parts waiting; older ones drop theirs and recompute if asked again.
    The source's memory map is released after every run.
    """

    def __init__(self, source: ir.TensorProtocol, block_size: int, symmetric: bool, name: str, *, bits: int = BITS,
                 method: str = "rtn") -> None:
        self.source = source
        self.block_size = block_size
        self.symmetric = symmetric
        self.name = name
        self.bits = bits
        self.method = method
        self._pending: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def _compute(self) -> dict[str, np.ndarray]:
        log.debug("quantizing %s %s to %d bits (%s)", self.name, tuple(self.source.shape), self.bits, self.method)
        try:
            packed, scales, zero_points = self._weight_parts()  # no view on the memory map survives this call
        finally:
            release = getattr(self.source, "release", None)
            if callable(release):
                release()
        parts = {"B": packed, "scales": scales}
        if zero_points is not None:
            parts["zero_points"] = zero_points
        return parts

    def _weight_parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        weight = self.source.numpy()
        if self.bits == BITS:
            return quant.quantize_weight_int4(weight, self.block_size, self.symmetric, method=self.method)
        return quant.quantize_weight_nbits(weight, self.bits, self.block_size, self.symmetric, method=self.method)

    def drop_pending(self) -> None:
        self._pending = {}

    def part(self, key: str) -> ir.Tensor:
        with self._lock:
            array = self._pending.pop(key, None)
            if array is None:
                parts = self._compute()
                array = parts.pop(key)
                self._pending = parts
                _remember(self)
            if not self._pending:
                _forget(self)
        return ir.Tensor(array, name=f"{self.name}:{key}")

    def lazy(self, key: str, dtype: ir.DataType, shape: tuple[int, ...], name: str) -> ir.LazyTensor:
        # bind key as a default argument: no late-binding closure over a loop variable
        def load(job: _QuantJob = self, part_key: str = key) -> ir.TensorProtocol:
            return job.part(part_key)

        return ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(shape), name=name)


class _StackQuantJob(_QuantJob):
    """An expert stack [experts, N, K] (each expert a weight [out, in], as QMoE multiplies by) quantized expert by
    expert into QMoE's parts: ``B`` [experts, N, K * bits / 8] (MatMulNBits' blocks of each expert's [K, N]
    transpose, one row per output), ``scales`` [experts, N, K / block_size], ``zero_points`` [experts, N,
    ceil(K / block_size * bits / 8)]."""

    def _weight_parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        stack = self.source.numpy()

        def one(expert: np.ndarray):
            return quant.quantize_weight_nbits(np.ascontiguousarray(expert.T), self.bits, self.block_size,
                                               self.symmetric, method=self.method)

        # experts in parallel: numpy releases the GIL in the quantizer's array work (each expert's result is the same
        # as alone: nothing is shared between them)
        with ThreadPoolExecutor(_STACK_THREADS) as pool:
            parts = list(pool.map(one, stack))
        n = stack.shape[1]
        packed = np.stack([p[0].reshape(n, -1) for p in parts])
        scales = np.stack([p[1] for p in parts])
        zero_points = None if self.symmetric else np.stack([p[2] for p in parts])
        return packed, scales, zero_points


_STACK_THREADS = max(1, min(4, os.cpu_count() or 1))
# Jobs holding computed parts not yet asked for, oldest first (bounded: parallel saves interleave a few).
_MAX_CACHED_JOBS = 4
_cached_jobs: OrderedDict[int, _QuantJob] = OrderedDict()
_cache_lock = threading.Lock()


def _remember(job: _QuantJob) -> None:
    with _cache_lock:
        _cached_jobs[id(job)] = job
        _cached_jobs.move_to_end(id(job))
        while len(_cached_jobs) > _MAX_CACHED_JOBS:
            _, old = _cached_jobs.popitem(last=False)
            old.drop_pending()


def _forget(job: _QuantJob) -> None:
    with _cache_lock:
        _cached_jobs.pop(id(job), None)


def _all_value_names(graph: ir.Graph) -> set[str]:
    names: set[str] = set(graph.initializers)
    names.update(v.name for v in graph.inputs if v.name)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for value in (*node.inputs, *node.outputs):
            if value is not None and value.name:
                names.add(value.name)
    return names


def _unique(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


def _candidate_weight(node: ir.Node) -> ir.Value | None:
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a is None or b is None or not b.is_initializer() or b.is_graph_input() or b.const_value is None:
        return None
    tensor = b.const_value
    if tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2 or not tensor.shape.is_static():
        return None
    if a.dtype is not None and a.dtype != ir.DataType.FLOAT:
        return None
    return b


def _rewrite_initializers(graph: ir.Graph, replaced: dict[str, list[ir.Value]]) -> None:
    """Drop the fp32 weights nothing uses any more and put each weight's quantized parts where it was, so a
    layer's weights stay adjacent in the data file (runtimes page them in in execution order)."""
    new_parts = {id(v) for parts in replaced.values() for v in parts}
    order: list[ir.Value] = []
    for name, value in list(graph.initializers.items()):
        if id(value) in new_parts:
            continue
        if name not in replaced or value.uses() or value.is_graph_output():
            order.append(value)
        order.extend(replaced.get(name, ()))
    for name in list(graph.initializers):
        graph.initializers.pop(name)
    for value in order:
        graph.register_initializer(value)


def quantize_matmuls_int4(model: ir.Model, **options) -> int:
    """:func:`quantize_matmuls_nbits` with 4 bits."""
    return quantize_matmuls_nbits(model, bits=BITS, **options)


def quantize_matmuls_nbits(
    model: ir.Model,
    *,
    bits: int = BITS,
    block_size: int = 32,
    accuracy_level: int = 4,
    symmetric: bool = False,
    method: str = "rtn",
    min_elements: int = 0,
    include: Callable[[ir.Node], bool] | None = None,
) -> int:
    """Replace every MatMul whose second input is a 2-D float32 initializer [K, N] by com.microsoft MatMulNBits
    (``bits`` 4 or 8), in place. Returns the number replaced.

    Each node is changed in place: it keeps its name, its A input and its output Value (so consumers and
    graph outputs need no rewiring); only op type, domain, inputs and attributes change. MatMuls in
    subgraphs are included; the new initializers go to the graph that owns the fp32 weight. A weight shared
    by several MatMuls is quantized once; its fp32 initializer is removed once nothing else uses it.

    Nothing is quantized here: the new initializers are lazy and compute when the model is saved (see the
    module docstring). Save to a data file other than the one the fp32 sources live in: ``ir.save`` replaces
    its destination, and a source read after that would read the new file. With ``ir.save(max_workers=n)``
    up to n weights are quantized at once.

    Args:
        bits: 4 or 8.
        block_size: quantization block along K (power of two >= 16); a weight whose K it does not divide takes the
            largest smaller power of two that does (:func:`merge.contract.quant.block_for`).
        accuracy_level: MatMulNBits' minimum compute precision of A (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8);
            4 quantizes A to int8 at run time, the fast CPU path; 0 leaves the attribute out.
        symmetric: no zero points (the kernel uses 2**(bits - 1)); asymmetric blocks use every level.
        method: how blocks are quantized, "rtn" or "search" (:mod:`merge.quantize`).
        min_elements: skip weights with fewer than this many elements (K * N).
        include: further filter on the MatMul node.
    """
    check_block_size(block_size)
    if bits not in (BITS, EIGHT_BITS):
        raise ValueError(f"MatMulNBits: {bits} bits are not supported (only {BITS} and {EIGHT_BITS})")
    per_byte = 8 // bits
    jobs: dict[int, tuple[ir.Value, ...]] = {}  # id(fp32 weight value) -> (B, scales[, zero_points]) values
    replaced_by_graph: dict[int, tuple[ir.Graph, dict[str, list[ir.Value]]]] = {}
    taken: dict[int, set[str]] = {}
    count = 0

    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        weight = _candidate_weight(node)
        if weight is None:
            continue
        k, n = (int(d) for d in weight.const_value.shape)
        if k * n < min_elements or (include is not None and not include(node)):
            continue
        block = block_for(block_size, k)  # block_size, or a smaller one that divides K
        owner = weight.graph
        assert owner is not None, "an initializer belongs to a graph"
        if id(weight) not in jobs:
            names = taken.setdefault(id(owner), _all_value_names(owner))
            job = _QuantJob(weight.const_value, block, symmetric, weight.name or node.name or "weight",
                            bits=bits, method=method)
            kb = -(-k // block)
            specs = [("B", ir.DataType.UINT8, (n, kb, block // per_byte), f"_Q{bits}")]
            specs.append(("scales", ir.DataType.FLOAT, (n, kb), "_scales"))
            if not symmetric:
                specs.append(("zero_points", ir.DataType.UINT8, (n, -(-kb // per_byte)), "_zero_points"))
            values = []
            for key, dtype, shape, suffix in specs:
                name = _unique(f"{weight.name or node.name}{suffix}", names)
                value = initializer(name, job.lazy(key, dtype, shape, name))
                owner.register_initializer(value)
                values.append(value)
            jobs[id(weight)] = tuple(values)
            replaced_by_graph.setdefault(id(owner), (owner, {}))[1][weight.name] = values

        quantized = jobs[id(weight)]
        node.op_type = "MatMulNBits"
        node.domain = MS_DOMAIN
        node.version = None
        node.resize_inputs(1 + len(quantized))
        for i, value in enumerate(quantized, start=1):
            node.replace_input_with(i, value)
        for attr_name in list(node.attributes):
            del node.attributes[attr_name]
        attrs = [
            ir.AttrInt64("K", k),
            ir.AttrInt64("N", n),
            ir.AttrInt64("bits", bits),
            ir.AttrInt64("block_size", block),
        ]
        if accuracy_level:
            attrs.append(ir.AttrInt64("accuracy_level", accuracy_level))
        for attr in attrs:
            node.attributes[attr.name] = attr
        count += 1

    for owner, replaced in replaced_by_graph.values():
        _rewrite_initializers(owner, replaced)
    if count:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    log.info(
        "%d bits: %d MatMul(s) -> MatMulNBits (%d weight(s), block %d, %s, %s)",
        bits,
        count,
        len(jobs),
        block_size,
        "symmetric" if symmetric else "asymmetric",
        method,
    )
    return count


# QMoE's inputs by position (com.microsoft, ONNX Runtime 1.32)
_QMOE_FC1, _QMOE_FC1_SCALES, _QMOE_FC2, _QMOE_FC2_SCALES = 2, 3, 5, 6
_QMOE_FC1_ZERO_POINTS, _QMOE_FC2_ZERO_POINTS = 11, 12


def quantize_experts_nbits(
    model: ir.Model,
    *,
    bits: int = BITS,
    block_size: int = 32,
    accuracy_level: int = 4,
    symmetric: bool = False,
    method: str = "rtn",
    include: Callable[[ir.Node], bool] | None = None,
) -> int:
    """Replace every ``com.microsoft.MoE`` whose expert weights are float32 initializers by ``QMoE`` with
    ``bits``-bit experts, in place (name, inputs 0 and 1, output and the routing and activation attributes kept);
    returns the number replaced. Quantized at save time like :func:`quantize_matmuls_nbits`; QMoE quantizes whole
    blocks: the experts take the largest power of two up to ``block_size`` that divides the hidden size and the
    experts' width (:meth:`merge.contract.quant.QuantSpec.expert_block_size`)."""
    check_block_size(block_size)
    per_byte = 8 // bits
    count = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.op_type != "MoE" or node.domain != MS_DOMAIN or (include is not None and not include(node)):
            continue
        fc1, fc2 = node.inputs[2], node.inputs[4]
        for value in (fc1, fc2):
            if value is None or value.const_value is None or value.const_value.dtype != ir.DataType.FLOAT:
                raise StitchError(f"{node.name}: expert weights {value.name if value else None} are not float "
                                  "initializers")
        _, width2, hidden = (int(d) for d in fc1.const_value.shape)
        try:
            block = QuantSpec(block_size=block_size).expert_block_size(hidden, width2 // 2)
        except MergeError as exc:
            raise StitchError(f"{node.name}: {exc}") from None
        owner = fc1.graph
        names = _all_value_names(owner)
        parts: dict[int, ir.Value] = {}
        replaced: dict[str, list[ir.Value]] = {}
        for value, positions in ((fc1, (_QMOE_FC1, _QMOE_FC1_SCALES, _QMOE_FC1_ZERO_POINTS)),
                                 (fc2, (_QMOE_FC2, _QMOE_FC2_SCALES, _QMOE_FC2_ZERO_POINTS))):
            e, n, k = (int(d) for d in value.const_value.shape)
            kb = k // block
            job = _StackQuantJob(value.const_value, block, symmetric, value.name, bits=bits, method=method)
            specs = [("B", ir.DataType.UINT8, (e, n, k // per_byte), f"_Q{bits}", positions[0]),
                     ("scales", ir.DataType.FLOAT, (e, n, kb), "_scales", positions[1])]
            if not symmetric:
                specs.append(("zero_points", ir.DataType.UINT8, (e, n, -(-kb // per_byte)), "_zero_points",
                              positions[2]))
            values = []
            for key, dtype, shape, suffix, position in specs:
                name = _unique(f"{value.name}{suffix}", names)
                part = initializer(name, job.lazy(key, dtype, shape, name))
                owner.register_initializer(part)
                values.append(part)
                parts[position] = part
            replaced[value.name] = values
        inputs = [node.inputs[0], node.inputs[1]] + [None] * (_QMOE_FC2_ZERO_POINTS - 1)
        for position, part in parts.items():
            inputs[position] = part
        while inputs[-1] is None:
            inputs.pop()
        node.op_type = "QMoE"
        node.resize_inputs(len(inputs))
        for i, value in enumerate(inputs):
            node.replace_input_with(i, value)
        for attr in (ir.AttrInt64("expert_weight_bits", bits), ir.AttrInt64("block_size", block),
                     ir.AttrInt64("accuracy_level", accuracy_level)):
            node.attributes[attr.name] = attr
        _rewrite_initializers(owner, replaced)
        count += 1
    if count:
        log.info("%d MoE node(s) -> QMoE (%d-bit experts, block %d, %s, %s)", count, bits, block,
                 "symmetric" if symmetric else "asymmetric", method)
    return count


class QuantizeInt4(StitchPass):
    """The decoder's MatMuls (head included) become MatMulNBits with ``spec``'s settings, quantized at save time:
    4 bits, 8 for the matrix kinds ``spec.eight_bit`` names."""

    summary = ("decoder MatMuls -> MatMulNBits (4 bits; 8 for the kinds asked), MoE experts -> QMoE (4 bits), "
               "quantized while the model is written")

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec
        self.count = 0
        self.experts = 0
        self.eight_bit_kinds: set[str] = set()

    def requires(self, model: ir.Model) -> None:
        if self.spec.scope != DECODER_SCOPE:
            raise StitchError(f"quantization scope {self.spec.scope!r} is not supported (only {DECODER_SCOPE!r})")

    def apply(self, model: ir.Model) -> bool:
        spec = self.spec

        def in_decoder(node: ir.Node) -> bool:
            return (node.name or "").startswith(f"{DECODER_SCOPE}/")

        def quantized_matmul(node: ir.Node) -> bool:  # the MoE router stays fp32 (see the module docstring)
            return in_decoder(node) and f"/mlp/{ROUTER}/" not in (node.name or "")

        def eight_bit(node: ir.Node) -> bool:
            if in_decoder(node) and spec.bits_for(node.name) == EIGHT_BITS:
                self.eight_bit_kinds.add(matrix_kind(node.name))
                return True
            return False

        options = {"block_size": spec.block_size, "accuracy_level": spec.accuracy_level,
                   "symmetric": spec.symmetric, "method": spec.method}
        # the 8-bit matrices first: the 4-bit call then finds them MatMulNBits already and leaves them
        if spec.eight_bit:
            self.count = quantize_matmuls_nbits(model, bits=EIGHT_BITS, include=eight_bit, **options)
        self.count += quantize_matmuls_nbits(model, bits=spec.bits, include=quantized_matmul, **options)
        self.experts = quantize_experts_nbits(model, bits=spec.bits, include=in_decoder, **options)
        return self.count + self.experts > 0

    def ensures(self, model: ir.Model) -> None:
        if not self.count:
            raise StitchError("no decoder MatMul was quantized")
        missing = [kind for kind in self.spec.eight_bit if kind not in self.eight_bit_kinds]
        if missing:
            raise StitchError(f"eight_bit names {', '.join(missing)}, but the decoder has no such MatMul")
