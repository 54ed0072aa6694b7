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

**8-bit blocks (``MatMulNBits`` bits=8: the default scheme's ``v_proj``, ``o_proj`` and head).** Raw codes reach 255,
so no arithmetic bound covers a kernel that paired them in an int16 (2 * 255 * 127 = 64770): only the kernels
themselves can say. The last part of this file runs them: ONNX Runtime on an emulated AVX2-only CPU (QEMU,
tests/emulated_cpu.py), on any x86-64 host, where full-range int8 codes saturate exactly as
``pair_saturating_matmul`` predicts (so the emulation reaches the non-VNNI kernels), while the folders' 7-bit vision
codes and the decoder's 4-bit and 8-bit blocks with zero points give the exact integer arithmetic.
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


# -- the real kernels on an emulated AVX2-only CPU -------------------------------------------------------------------
#
# The arithmetic above holds for whatever kernel a CPU runs; what follows runs the kernels themselves. ONNX Runtime,
# on a Haswell CPU model under QEMU (tests/emulated_cpu.py: AVX2, no AVX-512, no VNNI), takes the paths of an AVX2-only
# machine on any x86-64 host, and one model holding every case below runs there once. The first test proves the
# emulation reaches the non-VNNI kernel (it saturates full-range codes exactly as ``pair_saturating_matmul`` says),
# so the others, which find every quantized product of the built folders exact there, cannot pass by running the
# host's VNNI or AMX kernels instead.

from tests import emulated_cpu  # noqa: E402

INT8_ACTIVATION_LIMIT = 127  # MatMulNBits' int8 activations: per block of K, scale = max |a| / 127


def matmul_nbits_int8_model(a: np.ndarray, codes: np.ndarray, zero_points: np.ndarray, scales: np.ndarray,
                            block: int) -> np.ndarray:
    """MatMulNBits at accuracy level 4 as MLAS computes it, in float64: the activations a [M, K] quantized per block
    of K to int8 (scale = max |a| / 127, rounded half to even), the integer dot product of each block with
    ``codes - zero point`` ([N, K] and [N, K / block]), times both scales. It matches ONNX Runtime to about 2e-7
    of the largest output on every CPU with an exact kernel; a kernel that saturated would miss it by far more."""
    m, k = a.shape
    n, blocks = codes.shape[0], k // block
    a = a.reshape(m, blocks, block).astype(np.float32)
    top = np.abs(a).max(-1, keepdims=True)
    inverse = np.where(top > 0, np.float32(INT8_ACTIVATION_LIMIT) / np.where(top > 0, top, 1), 0).astype(np.float32)
    quantized = np.rint(a * inverse).astype(np.int64)
    weights = codes.reshape(n, blocks, block).astype(np.int64) - zero_points.reshape(n, blocks, 1).astype(np.int64)
    dots = np.einsum("mbk,nbk->mnb", quantized, weights).astype(np.float64)
    a_scales = (top[..., 0] / np.float32(INT8_ACTIVATION_LIMIT)).astype(np.float64)
    return np.einsum("mnb,mb,nb->mn", dots, a_scales, scales.astype(np.float64))


def pack_matmul_nbits(codes: np.ndarray, zero_points: np.ndarray, bits: int, block: int):
    """codes [N, K] and zero points [N, K / block] -> MatMulNBits' B [N, blocks, block * bits / 8] and zero points
    (4 bits: two per byte, the low nibble first, each row padded to whole bytes)."""
    n, k = codes.shape
    blocks = k // block
    if bits == 8:
        return codes.reshape(n, blocks, block).astype(np.uint8), zero_points.reshape(-1).astype(np.uint8)
    pairs = codes.reshape(n, blocks, block // 2, 2).astype(np.uint8)
    zp = np.pad(zero_points, ((0, 0), (0, blocks % 2))).astype(np.uint8)
    return (pairs[..., 0] | pairs[..., 1] << 4), (zp[:, 0::2] | zp[:, 1::2] << 4).reshape(-1)


def unpack_matmul_nbits(b: np.ndarray, zero_points: np.ndarray, scales: np.ndarray, bits: int, n: int, k: int,
                        block: int):
    """The inverse, for a built folder's node: (codes [N, K], zero points [N, blocks], scales [N, blocks])."""
    blocks = k // block
    if bits == 8:
        codes = b.reshape(n, k)
        zp = zero_points.reshape(n, blocks)
    else:
        codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, k)
        zp = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    return codes.astype(np.int64), zp.astype(np.int64), scales.reshape(n, blocks)


class CaseModel:
    """Independent single-node cases gathered into one ONNX model (one emulated run for all of them)."""

    def __init__(self) -> None:
        self.nodes, self.inputs, self.outputs, self.initializers = [], [], [], []
        self.feeds: dict[str, np.ndarray] = {}

    def input(self, name: str, array: np.ndarray) -> str:
        from onnx import TensorProto, helper

        self.feeds[name] = np.ascontiguousarray(array, np.float32)
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, array.shape))
        return name

    def constant(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[tuple[str, int]], **attributes) -> None:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [o for o, _ in outputs], domain=MS_DOMAIN
                                           if op in ("DynamicQuantizeMatMul", "MatMulNBits") else "", **attributes))
        self.outputs += [helper.make_tensor_value_info(o, dtype, None) for o, dtype in outputs]

    def dynamic_quantize_matmul(self, name: str, x: str, codes: np.ndarray) -> str:
        from onnx import TensorProto

        self.node("DynamicQuantizeMatMul", [x, self.constant(f"{name}/codes", codes.astype(np.int8)),
                                            self.constant(f"{name}/scale", np.ones(1, np.float32))],
                  [(f"{name}/y", TensorProto.FLOAT)])
        return f"{name}/y"

    def matmul_nbits(self, name: str, x: str, codes, zero_points, scales, bits: int, block: int) -> str:
        from onnx import TensorProto

        n, k = codes.shape
        b, zp = pack_matmul_nbits(codes, zero_points, bits, block)
        self.node("MatMulNBits", [x, self.constant(f"{name}/b", b),
                                  self.constant(f"{name}/scales", scales.astype(np.float32).reshape(-1)),
                                  self.constant(f"{name}/zero_points", zp)],
                  [(f"{name}/y", TensorProto.FLOAT)], K=k, N=n, bits=bits, block_size=block, accuracy_level=4)
        return f"{name}/y"

    def save(self, path) -> None:
        import onnx
        from onnx import helper

        graph = helper.make_graph(self.nodes, "cases", self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)])
        onnx.save(model, str(path))


def decoder_products(folder) -> list[tuple[str, np.ndarray, dict, dict]]:
    """Each MatMulNBits of a built folder's decoder with its input on a first call (an image prompt, run natively):
    (node name, input [rows, K], attributes, {b, scales, zero_points} as arrays)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from merge.runtime import CombinedModel
    from merge.tools.verify import default_images

    model = onnx.load(str(folder / "model.onnx"))
    weights = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    seen = {o.name for o in model.graph.output}
    for node in nodes:
        if node.input[0] not in seen:
            model.graph.output.append(helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, None))
            seen.add(node.input[0])
    slim = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    del slim.graph.output[:]
    slim.graph.output.extend(model.graph.output)
    runner = CombinedModel(folder, model_bytes=slim.SerializeToString())
    inputs = runner.preprocessor.build_inputs("Describe both pictures.", default_images(2))
    values = runner.forward(runner.first_feeds(inputs["input_ids"], inputs["attention_mask"],
                                               inputs["pixel_values"], inputs["image_grid_thw"]))
    products = []
    for node in nodes:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        arrays = dict(zip(("b", "scales", "zero_points"),
                          (numpy_helper.to_array(weights[name]) for name in node.input[1:4]), strict=True))
        x = values[node.input[0]].reshape(-1, attributes["K"])
        products.append((node.name, x, attributes, arrays))
    return products


@pytest.fixture(scope="module")
def emulated(products, combined, tmp_path_factory):
    """Every case, run natively and on the emulated AVX2-only CPU: (cases, native outputs, emulated outputs), where
    cases maps each kind to its list of (output name, what the output must equal)."""
    reason = emulated_cpu.unavailable()
    if reason:
        pytest.skip(reason)
    rng = np.random.default_rng(2026)
    model, cases = CaseModel(), {}

    # 1. synthetic int8: uint8 activations that quantize to themselves (range [0, 255]: scale 1, zero point 0)
    a = rng.integers(0, UINT8_MAX + 1, (16, 256)).astype(np.float32)
    a[0], a[1] = UINT8_MAX, 0
    x = model.input("int8/a", a)
    for limit in (INT8_CODE_LIMIT, FULL_RANGE):
        codes = (rng.choice([-1, 1], (256, 64)) * limit).astype(np.int8)
        codes[:, 0] = limit  # a column of the largest code: every pair at its worst
        cases.setdefault("int8 synthetic", []).append(
            (model.dynamic_quantize_matmul(f"int8/limit{limit}", x, codes), a, codes))

    # 2. the tiny int8 folder's vision products on the tower's real activations: the folder's codes, and the same
    #    weights in full-range codes (the broken twin)
    for node, activations, _, codes, weight in products:
        x = model.input(f"vision/{node}/x", activations.reshape(-1, codes.shape[0]))
        full, _ = quantize_weight_int8(weight, limit=FULL_RANGE)
        quantized = [f"vision/{node}/{part}" for part in ("q", "scale", "zero_point")]
        from onnx import TensorProto

        model.node("DynamicQuantizeLinear", [x], list(zip(quantized, (TensorProto.UINT8, TensorProto.FLOAT,
                                                                     TensorProto.UINT8), strict=True)))
        cases.setdefault("vision", []).append(
            (node, model.dynamic_quantize_matmul(f"vision/{node}/folder", x, codes),
             model.dynamic_quantize_matmul(f"vision/{node}/full", x, full), quantized, codes, full))

    # 3. synthetic MatMulNBits, 4 and 8 bits, at the patterns that push a 16-bit lane hardest: the largest raw codes
    #    with zero point 0, zero codes with the largest zero point, alternating extremes; activations all of one
    #    sign and large (int8 codes at or near 127), at M = 1 (decode kernels) and M > 1
    k, n = 512, 48
    for bits in (4, 8):
        top = 2**bits - 1
        for block in (32, 128):
            blocks = k // block
            patterns = {
                "largest codes": (np.full((n, k), top), np.zeros((n, blocks), np.int64)),
                "largest zero points": (np.zeros((n, k), np.int64), np.full((n, blocks), top)),
                "alternating": (np.where(rng.random((n, k)) < 0.5, 0, top), np.full((n, blocks), 2 ** (bits - 1))),
                "random": (rng.integers(0, top + 1, (n, k)), rng.integers(0, top + 1, (n, blocks))),
            }
            for pattern, (codes, zp) in patterns.items():
                scales = rng.uniform(0.002, 0.02, (n, blocks)).astype(np.float32)
                for m in (1, 5, 64):
                    a = (np.abs(rng.standard_normal((m, k))) + 3).astype(np.float32) * rng.choice([-1, 1])
                    name = f"nbits/{bits}bit/block{block}/{pattern}/m{m}"
                    y = model.matmul_nbits(name, model.input(f"{name}/a", a), codes, zp, scales, bits, block)
                    cases.setdefault("MatMulNBits synthetic", []).append(
                        (y, matmul_nbits_int8_model(a, codes, zp, scales, block), (a, codes, zp, scales, block)))

    # 4. the tiny int4 folder's decoder (the default scheme: 4-bit blocks, v_proj, o_proj and the head in 8 bits)
    #    on its real activations, every prefill row and a decode-shaped single row
    for node, x_all, attrs, arrays in decoder_products(combined("tiny", "int4", "int8")):
        codes, zp, scales = unpack_matmul_nbits(arrays["b"], arrays["zero_points"], arrays["scales"], attrs["bits"],
                                                attrs["N"], attrs["K"], attrs["block_size"])
        for rows, x_rows in (("prefill", x_all), ("decode", x_all[-1:])):
            name = f"decoder/{node}/{rows}"
            y = model.matmul_nbits(name, model.input(f"{name}/a", x_rows), codes, zp, scales, attrs["bits"],
                                   attrs["block_size"])
            cases.setdefault("MatMulNBits folder", []).append(
                (y, matmul_nbits_int8_model(x_rows, codes, zp, scales, attrs["block_size"]), attrs["bits"]))

    work = tmp_path_factory.mktemp("emulated-avx2")
    model.save(work / "cases.onnx")
    native = emulated_cpu.run_native(work / "cases.onnx", model.feeds)
    return cases, native, emulated_cpu.run_emulated(work / "cases.onnx", model.feeds, work)


def test_the_emulated_cpu_runs_the_saturating_kernel(emulated):
    """The emulation reaches the non-VNNI u8s8 kernel: full-range codes come out exactly as ``pair_saturating_matmul``
    predicts (and not as the exact product), 7-bit codes exactly as the exact product. On the host, the 7-bit codes
    are exact too, and the full-range ones are one of the two (exact with VNNI or AMX, saturated without)."""
    cases, native, emulated_outputs = emulated
    (seven_bit, a, codes7), (full, _, codes_full) = cases["int8 synthetic"]
    exact7 = a.astype(np.int64) @ codes7.astype(np.int64)
    exact_full = a.astype(np.int64) @ codes_full.astype(np.int64)
    saturated = pair_saturating_matmul(a.astype(np.uint8), codes_full)
    assert not np.array_equal(saturated, exact_full)  # the case can tell the two apart
    np.testing.assert_array_equal(emulated_outputs[seven_bit], exact7)
    np.testing.assert_array_equal(native[seven_bit], exact7)
    np.testing.assert_array_equal(emulated_outputs[full], saturated)
    assert np.array_equal(native[full], exact_full) or np.array_equal(native[full], saturated)


def test_vision_products_are_exact_on_the_emulated_cpu(emulated):
    """Every vision product of the tiny int8 folder, on the tower's real activations, computes the exact integer
    product of its quantized input with the folder's 7-bit codes on the AVX2-only CPU (and on the host); the same
    weights in full-range codes (the broken twin) depart from it there on most products."""
    cases, native, emulated_outputs = emulated
    departed = []
    for node, folder_y, full_y, (q, scale, zero_point), codes, full in cases["vision"]:
        quantized = emulated_outputs[q].astype(np.int64) - int(emulated_outputs[zero_point])
        np.testing.assert_array_equal(emulated_outputs[q], native[q], err_msg=f"{node}: quantized input")
        exact = (quantized @ codes.astype(np.int64)) * np.float64(emulated_outputs[scale])
        for outputs, where in ((emulated_outputs, "emulated AVX2"), (native, "host")):
            np.testing.assert_allclose(outputs[folder_y], exact, rtol=1e-6, atol=1e-6 * np.abs(exact).max(),
                                       err_msg=f"{node} on the {where} CPU")
        exact_full = (quantized @ full.astype(np.int64)) * np.float64(emulated_outputs[scale])
        if not np.allclose(emulated_outputs[full_y], exact_full, rtol=1e-6, atol=1e-6 * np.abs(exact_full).max()):
            departed.append(node)
    assert len(departed) > len(cases["vision"]) // 2, f"only {departed} saturated on the emulated CPU"


def test_matmul_nbits_is_exact_on_the_emulated_cpu(emulated):
    """MatMulNBits (4 and 8 bits, zero points, blocks of 32 and 128, M = 1, 5, 64) at the patterns that push a 16-bit
    lane hardest: the AVX2-only kernels match the model of exact int8 x n-bit arithmetic as closely as the host's
    do (8-bit raw codes reach 255, where 2 * 255 * 127 would overflow an int16 pair: the kernels do not pair them)."""
    cases, native, emulated_outputs = emulated
    for y, expected, _ in cases["MatMulNBits synthetic"]:
        bound = 1e-5 * np.abs(expected).max()
        for outputs, where in ((emulated_outputs, "emulated AVX2"), (native, "host")):
            error = np.abs(outputs[y] - expected).max()
            assert error <= bound, f"{y} on the {where} CPU: {error:.3g} from exact int8 arithmetic (bound {bound:.3g})"


def test_twin_the_bound_sees_one_quantum(emulated):
    """Broken twin for the bound above: the same products with fp32 activations (no int8 quantization, one quantum
    of difference per block) miss the 1e-5 bound, so the bound is tight enough to see a kernel that differs."""
    cases, _, emulated_outputs = emulated
    missed = 0
    for y, expected, (a, codes, zp, scales, block) in cases["MatMulNBits synthetic"]:
        weights = (codes - np.repeat(zp, block, axis=1)) * np.repeat(scales.astype(np.float64), block, axis=1)
        unquantized = a.astype(np.float64) @ weights.T
        if np.abs(emulated_outputs[y] - unquantized).max() > 1e-5 * np.abs(expected).max():
            missed += 1
    assert missed == len(cases["MatMulNBits synthetic"])


def test_the_folder_decoder_is_exact_on_the_emulated_cpu(emulated):
    """Each MatMulNBits of the tiny int4 folder (the default scheme: 4-bit and 8-bit blocks with zero points) on its
    real activations, prefill rows and a single decode row: the AVX2-only kernels give the exact int8 arithmetic."""
    cases, native, emulated_outputs = emulated
    folder = cases["MatMulNBits folder"]
    assert {bits for _, _, bits in folder} == {4, 8}  # both widths of the default scheme are there
    for y, expected, _ in folder:
        bound = 1e-5 * np.abs(expected).max()
        for outputs, where in ((emulated_outputs, "emulated AVX2"), (native, "host")):
            error = np.abs(outputs[y] - expected).max()
            assert error <= bound, f"{y} on the {where} CPU: {error:.3g} from exact int8 arithmetic (bound {bound:.3g})"
