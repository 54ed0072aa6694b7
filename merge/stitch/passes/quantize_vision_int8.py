"""The vision part's products in int8: ``Gemm`` -> ``com.microsoft::DynamicQuantizeMatMul``, weights quantized
at save time.

Weights: int8 per output channel, symmetric, 7-bit codes (scale = max |w| / 63, codes in [-63, 63], no zero
point; :data:`merge.contract.quant.INT8_CODE_LIMIT`). Activations: quantized by the kernel at run time to uint8 with
one scale and zero point per tensor. ONNX Runtime's u8s8 kernels use AMX tiles or AVX-512 VNNI where the CPU has
them (measured on a [784 x 1024] x [1024 x 4096] product with AMX: 2249 GFLOP/s against 324 for fp32 MatMul); on
x86 without VNNI they add pairs of products in saturating int16, which 7-bit codes cannot overflow
(2 * 255 * 63 = 32130 <= 32767), so the result is the same exact integer product on every CPU. Attention,
normalization and everything else stay fp32.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import onnx_ir as ir

from graphs.builder import initializer
from merge.contract.names import MS_DOMAIN, VISION_SCOPE
from merge.quantize import quantize_weight_int8

from .base import StitchError, StitchPass

log = logging.getLogger(__name__)

class _Int8Job:
    """One weight's codes and scales, computed once when the first of the two is written."""

    def __init__(self, source: ir.TensorProtocol, name: str) -> None:
        self.source, self.name = source, name
        self._parts: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def part(self, key: str) -> ir.Tensor:
        with self._lock:
            if key not in self._parts:
                codes, scale = quantize_weight_int8(self.source.numpy())
                self._parts = {"codes": codes, "scale": scale}
            array = self._parts.pop(key)
        return ir.Tensor(array, name=f"{self.name}:{key}")

    def lazy(self, key: str, dtype: ir.DataType, shape: tuple[int, ...], name: str) -> ir.LazyTensor:
        def load(job: _Int8Job = self, part_key: str = key) -> ir.TensorProtocol:
            return job.part(part_key)

        return ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(shape), name=name)


class QuantizeVisionInt8(StitchPass):
    """Every vision ``Gemm`` (2-D input, [out, in] weight with transB) becomes DynamicQuantizeMatMul with the bias
    folded in; the fp32 weight goes (it is never loaded: lazy)."""

    summary = "vision products -> DynamicQuantizeMatMul (int8 weights per channel, uint8 activations at run time)"

    def __init__(self) -> None:
        self.count = 0

    def apply(self, model: ir.Model) -> bool:
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.op_type != "Gemm" or not (node.name or "").startswith(f"{VISION_SCOPE}/"):
                continue
            attrs = {k: a.value for k, a in node.attributes.items()}
            weight = node.inputs[1]
            if (attrs.get("transB") != 1 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                    or attrs.get("beta", 1.0) != 1.0 or weight is None or weight.const_value is None):
                continue
            out_dim, in_dim = (int(d) for d in weight.const_value.shape)
            owner = weight.graph
            job = _Int8Job(weight.const_value, weight.name)
            codes = initializer(f"{weight.name}_int8",
                                job.lazy("codes", ir.DataType.INT8, (in_dim, out_dim), f"{weight.name}_int8"))
            scale = initializer(f"{weight.name}_scale",
                                job.lazy("scale", ir.DataType.FLOAT, (out_dim,), f"{weight.name}_scale"))
            owner.register_initializer(codes)
            owner.register_initializer(scale)
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            node.op_type, node.domain, node.version = "DynamicQuantizeMatMul", MS_DOMAIN, None
            node.resize_inputs(5)
            for index, value in enumerate((node.inputs[0], codes, scale, None, bias)):
                node.replace_input_with(index, value)
            for name in list(node.attributes):
                del node.attributes[name]
            if not weight.uses():
                owner.initializers.pop(weight.name)
            self.count += 1
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        return self.count > 0

    def ensures(self, model: ir.Model) -> None:
        if not self.count:
            raise StitchError("no vision Gemm was quantized")
