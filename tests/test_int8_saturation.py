"""The quantized products are exact on every CPU: the arithmetic of the 16-bit lanes, checked on any machine.

**int8 vision (``DynamicQuantizeMatMul``).** ONNX Runtime quantizes each product's input at run time to uint8
[0, 255] (with a zero point) and multiplies it by the int8 weight codes. With VNNI (``vpdpbusd``), AMX or ARM's
dot products every u8 x s8 product is added in int32: exact. x86 CPUs without VNNI (AVX2 only, AVX-512 before VNNI)
run MLAS's u8s8 kernel on ``vpmaddubsw``: it adds each pair of adjacent products along K into a *saturating* int16,
then ``vpmaddwd`` widens to int32. Full-range codes reach 255 * 127 * 2 = 64770 > 32767 and are clipped (cosine
0.992 against PyTorch measured on an AMD EPYC, AVX2 only). The build writes 7-bit codes
(:data:`merge.contract.quant.INT8_CODE_LIMIT` = 63): 255 * 63 * 2 = 32130 <= 32767, so no pair can saturate and
every kernel computes the same integer product. The tests below prove it from the built folder's own codes, and
emulate the non-VNNI kernel in numpy on the vision tower's real activations; a twin with full-range codes (the former
quantizer, limit 127) must fail both. Nothing here depends on the machine's kernel.

**int4 decoder (``MatMulNBits``, accuracy level 4).** MLAS quantizes the activations per block to signed int8,
symmetric (scale = max |a| / 127, so [-127, 127]); the weights are 4-bit codes in [0, 15], used raw or as
``code - zero_point`` in [-15, 15] (symmetric blocks: zero point 8, [-8, 7]). Its AVX2 kernels multiply with
``vpmaddubsw`` too (the raw codes, or the magnitudes of ``code - zero_point``, as the unsigned operand), and some
add two such results again with the wrapping ``vphaddw`` before widening: at most four products share an int16,
4 * 128 * 15 = 7680 <= 32767 (taking |-128| even though MLAS never produces it). No 16-bit lane can overflow: nothing
to change there (the AVX2 machine above measured it within 0.6% of its own dequantized weights).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from merge.contract.names import MS_DOMAIN
from merge.contract.quant import INT8_CODE_LIMIT, QuantSpec
from merge.quantize import quantize_weight_int8

UINT8_MAX = 255  # DynamicQuantizeMatMul's activations: uint8 [0, 255]
INT8_ACTIVATION_MAGNITUDE = 128  # MatMulNBits' int8 activations: [-127, 127]; |-128| as the worst case anyway
INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1
FULL_RANGE = 127  # the former int8 code limit: the broken twin


# -- the arithmetic --------------------------------------------------------------------------------------------------

def worst_pair_sum(codes: np.ndarray) -> int:
    """The largest magnitude uint8 activations can give one pair of adjacent products along K of int8 codes [K, N]:
    ``255 * (|b[k, n]| + |b[k + 1, n]|)``, over every k and n (every adjacent pair, whatever pairing a kernel uses)."""
    mag = np.abs(codes.astype(np.int32))
    pairs = mag[:-1] + mag[1:] if mag.shape[0] > 1 else mag
    return UINT8_MAX * int(pairs.max(initial=0))


def dynamic_quantize_linear(x: np.ndarray) -> np.ndarray:
    """ONNX ``DynamicQuantizeLinear``: uint8 over [min(0, x), max(0, x)], zero point rounded (half to even)."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = np.float32((hi - lo) / UINT8_MAX) if hi > lo else np.float32(1)
    zero_point = np.clip(np.rint(-lo / scale), 0, UINT8_MAX)
    return np.clip(np.rint(x / scale) + zero_point, 0, UINT8_MAX).astype(np.uint8)


def pair_saturating_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """uint8 [M, K] x int8 [K, N] as MLAS's u8s8 kernel computes it without VNNI: ``vpmaddubsw`` adds the products
    of k and k + 1 (k even; K padded with zeros) saturated to int16, ``vpmaddwd`` / ``vpaddd`` add those in int32."""
    a, b = a.astype(np.int32), b.astype(np.int32)
    if a.shape[1] % 2:
        a, b = np.pad(a, ((0, 0), (0, 1))), np.pad(b, ((0, 1), (0, 0)))
    acc = np.zeros((a.shape[0], b.shape[1]), np.int32)
    for k in range(0, a.shape[1], 2):
        pair = a[:, k, None] * b[None, k] + a[:, k + 1, None] * b[None, k + 1]
        acc += np.clip(pair, INT16_MIN, INT16_MAX)
    return acc


def test_the_emulation_saturates_exactly_where_a_pair_leaves_int16():
    """The kernel model itself: exact below the int16 limit, clipped one step above it."""
    a = np.full((1, 2), UINT8_MAX, np.uint8)
    inside = np.array([[64], [64]], np.int8)  # 255 * 128 = 32640
    outside = np.array([[65], [64]], np.int8)  # 32895
    assert worst_pair_sum(inside) == 32640 <= INT16_MAX < worst_pair_sum(outside)
    assert pair_saturating_matmul(a, inside)[0, 0] == 32640 == (a.astype(np.int32) @ inside.astype(np.int32))[0, 0]
    assert pair_saturating_matmul(a, outside)[0, 0] == INT16_MAX
    assert pair_saturating_matmul(a, -outside.astype(np.int32))[0, 0] == INT16_MIN


def test_the_code_limit_cannot_saturate_a_pair():
    """The sufficient bound on the constant itself: two products of the largest uint8 and the largest code."""
    assert 2 * UINT8_MAX * INT8_CODE_LIMIT <= INT16_MAX
    assert 2 * UINT8_MAX * FULL_RANGE > INT16_MAX  # the former limit could


def test_int4_activation_products_cannot_leave_int16():
    """MatMulNBits at accuracy level 4: int8 activations times 4-bit codes (raw, or minus a zero point)."""
    spec = QuantSpec()
    assert spec.accuracy_level == 4  # the int8-activation path is the one in use
    largest_code = 2**spec.bits - 1  # raw codes [0, 15]; code - zero point in [-15, 15]
    assert 2 * INT8_ACTIVATION_MAGNITUDE * largest_code <= INT16_MAX  # one vpmaddubsw pair: 3840
    assert 4 * INT8_ACTIVATION_MAGNITUDE * largest_code <= INT16_MAX  # two pairs joined by vphaddw: 7680


# -- the built folder ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder_codes(combined) -> dict[str, np.ndarray]:
    """Every DynamicQuantizeMatMul's B (int8 [K, N]) in the built tiny int8 folder, by initializer name."""
    model = ir.load(combined("tiny", "fp32", "int8") / "model.onnx")
    codes = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "DynamicQuantizeMatMul" and node.domain == MS_DOMAIN:
            b = node.inputs[1]
            assert b is not None and b.const_value is not None, f"{node.name}: B is not an initializer"
            assert b.const_value.dtype == ir.DataType.INT8, f"{node.name}: B is {b.const_value.dtype}"
            codes[b.name] = b.const_value.numpy()
    return codes


def test_built_int8_codes_cannot_saturate_int16_pairs(folder_codes, sources):
    """Every product of the folder: no adjacent pair along K, times the largest uint8, leaves int16."""
    vision = sources("tiny").config.vision
    assert len(folder_codes) == 6 * vision.depth + 2 * (len(vision.deepstack_visual_indexes) + 1) + 1
    for name, codes in folder_codes.items():
        assert codes.ndim == 2, name
        assert int(np.abs(codes.astype(np.int32)).max()) <= INT8_CODE_LIMIT, name
        assert worst_pair_sum(codes) <= INT16_MAX, f"{name}: a pair can reach {worst_pair_sum(codes)}"


# -- the non-VNNI kernel on real activations -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def products(sources):
    """For each vision product of tiny: its input (the tower's real activations on test images, run by ONNX Runtime
    through the int8 graph), its int8 codes, and the fp32 weight they came from."""
    from merge.runtime.images import ImageProcessor
    from merge.sources.checkpoint import Checkpoint
    from merge.stitch.parts import build_vision_model
    from merge.stitch.passes.quantize_vision_int8 import QuantizeVisionInt8
    from merge.tools.verify import default_images

    source = sources("tiny")
    model = build_vision_model(Checkpoint(source.folder), source.config.vision)
    fp32 = {n.name: n.inputs[1].const_value.numpy() for n in model.graph if n.op_type == "Gemm"}
    QuantizeVisionInt8()(model)
    nodes = [n for n in model.graph if n.op_type == "DynamicQuantizeMatMul"]
    for value in {n.inputs[0].name: n.inputs[0] for n in nodes}.values():
        value.dtype = ir.DataType.FLOAT
        model.graph.outputs.append(value)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = ImageProcessor.from_folder(source.folder)(images=default_images(3))
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()}), strict=True))
    return [(n.name, values[n.inputs[0].name], n.inputs[1].name, n.inputs[1].const_value.numpy(), fp32[n.name])
            for n in nodes]


def test_non_vnni_kernel_is_exact_on_the_folder_codes(products, folder_codes):
    """The emulated AVX2 kernel equals the exact int32 product on every vision product, with the folder's codes."""
    assert len(products) == len(folder_codes)
    for node, x, codes_name, codes, _ in products:
        np.testing.assert_array_equal(codes, folder_codes[codes_name], err_msg=f"{node}: not the folder's codes")
        a = dynamic_quantize_linear(x.reshape(-1, codes.shape[0]))
        assert a.max() >= UINT8_MAX - 1  # the top of the range (the rounded zero point may cost one step)
        exact = a.astype(np.int32) @ codes.astype(np.int32)
        np.testing.assert_array_equal(pair_saturating_matmul(a, codes), exact, err_msg=node)


def test_twin_full_range_codes_saturate(products):
    """Broken twin: the same weights quantized to full-range codes (limit 127, the former quantizer) fail the bound on
    every product, and the emulated AVX2 kernel departs from the exact product on the tower's real activations."""
    departed = []
    for node, x, _, codes, weight in products:
        full, _ = quantize_weight_int8(weight, limit=FULL_RANGE)
        assert full.shape == codes.shape and int(np.abs(full.astype(np.int32)).max()) == FULL_RANGE, node
        assert worst_pair_sum(full) > INT16_MAX, node
        a = dynamic_quantize_linear(x.reshape(-1, full.shape[0]))
        exact = a.astype(np.int32) @ full.astype(np.int32)
        if not np.array_equal(pair_saturating_matmul(a, full), exact):
            departed.append(node)
    assert len(departed) > len(products) // 2, f"only {departed} saturated"


def test_a_folder_built_with_full_range_codes_is_named_at_load(combined, tmp_path, caplog):
    """Folders built before the 7-bit codes carry no code-limit mark: loading one warns that it must be rebuilt
    (its codes saturate on CPUs without VNNI); a folder built now loads without a word."""
    import json
    import logging
    import shutil

    from merge.contract.folder import file_sha256
    from merge.contract.names import VISION_INT8_CODE_LIMIT
    from merge.runtime import CombinedModel

    built = combined("tiny", vision_precision="int8")
    with caplog.at_level(logging.WARNING, logger="merge.runtime.model"):
        CombinedModel(built)
    assert not [r for r in caplog.records if "full-range" in r.getMessage()]
    old = tmp_path / "old"
    shutil.copytree(built, old)
    model = ir.load(old / "model.onnx")
    assert model.metadata_props.pop(VISION_INT8_CODE_LIMIT) == str(INT8_CODE_LIMIT)
    ir.save(model, old / "model.onnx", external_data="model.onnx.data")
    manifest = json.loads((old / "merge.json").read_text())
    for name in ("model.onnx", "model.onnx.data"):
        manifest["sizes"][name] = (old / name).stat().st_size
        manifest["checksums"][name] = file_sha256(old / name)
    (old / "merge.json").write_text(json.dumps(manifest))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="merge.runtime.model"):
        CombinedModel(old)
    warned = [r.getMessage() for r in caplog.records if "full-range" in r.getMessage()]
    assert len(warned) == 1 and "build the folder again" in warned[0] and str(old) in warned[0]
