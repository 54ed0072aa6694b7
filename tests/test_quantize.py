"""MatMulNBits quantization (the pass, the quantizers in merge.quantize, the format in merge.contract.quant):
layout checked by ONNX Runtime against an independent numpy dequantization, closeness to fp32, lazy streaming at
save time, and a broken twin (scales x2) that must fail; the searched quantizer (never worse than rtn on any
block), 8-bit blocks, the tied table's lookup of a quantized head, and the spec that chooses them."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import merge.quantize as quantizers
from merge.contract.quant import dequantize_int4
from merge.quantize import quantize_weight_int4
from merge.stitch.passes.quantize_int4 import quantize_matmuls_int4
from merge.tools.compare import compare

log = logging.getLogger(__name__)

BLOCK = 32
SHAPES = {"w_up": (64, 48), "w_down": (88, 40)}  # K=88 is no multiple of 16: padded to whole blocks of 32
NAMES = {"w_up": "/model/layers.0/mlp/up_proj/MatMul", "w_down": "/model/layers.0/mlp/down_proj/MatMul"}
# Bounds (relative to max(1, max|expected|)) against the reference built from the dequantized weights.
DEQUANT_SCALE = {1: 1e-5, 4: 3e-2}  # accuracy_level 1: fp32 compute; 4: A is quantized to int8 at run time


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (k, n) in SHAPES.items():
        # per-column magnitudes spread over two decades so a wrong scale or a swapped column shows
        w = rng.standard_normal((k, n)) * np.exp(rng.uniform(-2.3, 2.3, size=(1, n)))
        out[name] = w.astype(np.float32)
    out["bias"] = rng.standard_normal(48).astype(np.float32)
    return out


def _fvalue(name: str, shape) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))


def build_model(weights: dict[str, np.ndarray]) -> ir.Model:
    """x [b,s,64] -MatMul w_up-> h [b,s,48] -Add bias-> concat x2 [b,s,K-48] -> [b,s,K] -MatMul w_down-> y [b,s,40]
    (K = w_down's rows)."""
    x = _fvalue("x", ["batch", "seq", 64])
    x2 = _fvalue("x2", ["batch", "seq", weights["w_down"].shape[0] - 48])
    inits = {name: _fvalue(name, arr.shape) for name, arr in weights.items()}
    for name, value in inits.items():
        value.const_value = ir.tensor(weights[name], name=name)
    up = ir.Node("", "MatMul", [x, inits["w_up"]], name=NAMES["w_up"], num_outputs=1)
    up.outputs[0].name, up.outputs[0].type = "h", ir.TensorType(ir.DataType.FLOAT)
    up.outputs[0].shape = ir.Shape(["batch", "seq", 48])
    add = ir.Node("", "Add", [up.outputs[0], inits["bias"]], name="/model/layers.0/Add")
    add.outputs[0].name = "h_bias"
    cat = ir.Node("", "Concat", [add.outputs[0], x2], attributes=[ir.AttrInt64("axis", -1)], name="/model/Concat")
    cat.outputs[0].name = "cat"
    down = ir.Node("", "MatMul", [cat.outputs[0], inits["w_down"]], name=NAMES["w_down"])
    y = down.outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["batch", "seq", 40])
    graph = ir.Graph(
        [x, x2],
        [up.outputs[0], y],
        nodes=[up, add, cat, down],
        initializers=[inits["w_up"], inits["bias"], inits["w_down"]],
        opset_imports={"": 21},
        name="two_matmuls",
    )
    return ir.Model(graph, ir_version=10)


def forward(weights: dict[str, np.ndarray], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    h = feeds["x"].astype(np.float64) @ weights["w_up"]
    cat = np.concatenate([h + weights["bias"], feeds["x2"]], axis=-1)
    return {"h": h.astype(np.float32), "y": (cat @ weights["w_down"]).astype(np.float32)}


def feeds_for(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((2, 5, 64)).astype(np.float32),
        "x2": rng.standard_normal((2, 5, SHAPES["w_down"][0] - 48)).astype(np.float32),
    }


def run_ort(path) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds_for()), strict=True))


def dequantized_weights(path) -> dict[str, np.ndarray]:
    """Read the saved quantized initializers back and dequantize them (the reference ORT must reproduce)."""
    model = ir.load(path)
    inits = model.graph.initializers
    out = {"bias": inits["bias"].const_value.numpy()}
    for name, (k, _) in SHAPES.items():
        zp = inits.get(f"{name}_zero_points")
        out[name] = dequantize_int4(
            inits[f"{name}_Q4"].const_value.numpy(),
            inits[f"{name}_scales"].const_value.numpy(),
            None if zp is None else zp.const_value.numpy(),
            k,
        )
    return out


def quantized_copy(tmp_path, *, symmetric=False, accuracy_level=1, name="q"):
    weights = _weights()
    model = build_model(weights)
    assert quantize_matmuls_int4(model, block_size=BLOCK, accuracy_level=accuracy_level, symmetric=symmetric) == 2
    path = tmp_path / f"{name}.onnx"
    ir.save(model, path, external_data=f"{name}.onnx.data")
    return weights, path


def test_rewrite_keeps_names_outputs_and_drops_fp32():
    model = build_model(_weights())
    graph = model.graph
    outputs = {node.name: node.outputs[0] for node in graph}
    h_consumers = list(graph.outputs[0].uses())
    assert quantize_matmuls_int4(model, block_size=BLOCK) == 2

    nodes = {node.name: node for node in graph}
    for key, node_name in NAMES.items():
        node = nodes[node_name]
        k, n = SHAPES[key]
        kb = -(-k // BLOCK)
        assert (node.op_type, node.domain) == ("MatMulNBits", "com.microsoft")
        assert node.outputs[0] is outputs[node_name]
        assert {a.name: a.value for a in node.attributes.values()} == {
            "K": k, "N": n, "bits": 4, "block_size": BLOCK, "accuracy_level": 4,
        }  # fmt: skip
        b, scales, zp = node.inputs[1:]
        assert b.name == f"{key}_Q4" and tuple(b.shape) == (n, kb, BLOCK // 2) and b.dtype == ir.DataType.UINT8
        assert tuple(scales.shape) == (n, kb) and scales.dtype == ir.DataType.FLOAT
        assert tuple(zp.shape) == (n, (kb + 1) // 2) and zp.dtype == ir.DataType.UINT8
        assert all(isinstance(v.const_value, ir.LazyTensor) for v in (b, scales, zp))
    assert graph.outputs[0] is outputs[NAMES["w_up"]] and list(graph.outputs[0].uses()) == h_consumers
    # fp32 weights gone; the parts sit where their weight was (layer order kept in the data file)
    assert list(graph.initializers) == [
        "w_up_Q4", "w_up_scales", "w_up_zero_points", "bias", "w_down_Q4", "w_down_scales", "w_down_zero_points",
    ]  # fmt: skip
    assert model.opset_imports["com.microsoft"] == 1


def test_a_block_that_does_not_divide_k_shrinks_to_one_that_does():
    """block_for: the block size, or the largest power of two below it dividing K (at least 16); a K that no such
    block divides keeps the block size (padded to whole blocks). The rewrite takes it per weight."""
    from merge.contract.quant import QuantSpec, block_for
    from merge.errors import MergeError

    assert [block_for(128, k) for k in (2048, 6144, 768, 64, 96, 80, 88, 33)] == [128, 128, 128, 64, 32, 16, 128, 128]
    assert block_for(32, 80) == 16 and block_for(32, 88) == 32
    spec = QuantSpec(block_size=128)
    assert spec.block_for(64) == 64 and spec.expert_block_size(2048, 768) == 128
    assert spec.expert_block_size(64, 128) == 64 and spec.expert_block_size(96, 64) == 32
    with pytest.raises(MergeError, match="no block of at least 16"):
        spec.expert_block_size(88, 64)
    model = build_model({**_weights(), "w_down": np.ones((80, 40), np.float32)})
    assert quantize_matmuls_int4(model, block_size=BLOCK) == 2
    blocks = {n.name: n.attributes["block_size"].value for n in model.graph if n.op_type == "MatMulNBits"}
    assert blocks == {NAMES["w_up"]: 32, NAMES["w_down"]: 16}


def test_symmetric_has_no_zero_points_and_level_0_no_attribute():
    model = build_model(_weights())
    quantize_matmuls_int4(model, symmetric=True, accuracy_level=0)
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            assert len(node.inputs) == 3
            assert "accuracy_level" not in node.attributes


@pytest.mark.parametrize("backend", ["ort", "numpy"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("accuracy_level", [1, 4])
def test_onnxruntime_matches_dequantized_reference(tmp_path, monkeypatch, backend, symmetric, accuracy_level):
    if backend == "numpy":
        monkeypatch.setattr(quantizers, "ort_quantizer", lambda: None)
    elif quantizers.ort_quantizer() is None:
        pytest.skip("this onnxruntime build has no quantize_matmul_4bits")
    weights, path = quantized_copy(tmp_path, symmetric=symmetric, accuracy_level=accuracy_level)
    actual = run_ort(path)
    deq = dequantized_weights(path)
    expected = forward(deq, feeds_for())
    fp32 = forward(weights, feeds_for())
    for name in ("h", "y"):
        result = compare(name, actual[name], expected[name], scale=DEQUANT_SCALE[accuracy_level])
        vs_fp32 = compare(name, actual[name], fp32[name])
        log.info("%s (%s, %s, level %d) vs dequantized: %s", name, backend, "sym" if symmetric else "asym",
                 accuracy_level, result.line())  # fmt: skip
        log.info("%s vs fp32: max|err| / max|fp32| = %.3e, cos=%.6f", name, vs_fp32.needed_scale, vs_fp32.cosine)
        assert result.passed, result.line()
        assert vs_fp32.cosine > 0.99, vs_fp32.line()
    # the dequantized weights are a 4-bit approximation of the fp32 ones, not a copy of them
    for name in SHAPES:
        rel = np.abs(deq[name] - weights[name]).max() / np.abs(weights[name]).max()
        assert 1e-3 < rel < 0.2, rel


def test_broken_twin_scales_doubled_fails(tmp_path):
    """The dequantized comparison must see a wrong scale: double one weight's scales in a copy."""
    _, path = quantized_copy(tmp_path, accuracy_level=1)
    good = run_ort(path)
    reference = forward(dequantized_weights(path), feeds_for())
    assert compare("y", good["y"], reference["y"], scale=DEQUANT_SCALE[1]).passed

    model = ir.load(path)
    scales = model.graph.initializers["w_down_scales"]
    scales.const_value = ir.tensor(scales.const_value.numpy() * 2, name=scales.name)
    broken = tmp_path / "broken.onnx"
    ir.save(model, broken, external_data="broken.onnx.data")
    bad = run_ort(broken)
    result = compare("y", bad["y"], reference["y"], scale=DEQUANT_SCALE[4])  # fails even the loose bound
    log.info("broken twin: %s", result.line())
    assert not result.passed
    assert compare("h", bad["h"], reference["h"], scale=DEQUANT_SCALE[1]).passed  # only w_down was touched


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape", [(64, 48), (80, 40), (33, 7), (256, 512)])
def test_numpy_packing_equals_onnxruntime_routine(shape, symmetric):
    if quantizers.ort_quantizer() is None:
        pytest.skip("this onnxruntime build has no quantize_matmul_4bits")
    rng = np.random.default_rng(sum(shape))
    w = (rng.standard_normal(shape) * np.exp(rng.uniform(-3, 3, size=(1, shape[1])))).astype(np.float32)
    w[:BLOCK, 0] = 0.0  # an all-zero block
    w[:, -1] = np.abs(w[:, -1])  # an all-positive column
    ours = quantize_weight_int4(w, BLOCK, symmetric, backend="numpy")
    theirs = quantize_weight_int4(w, BLOCK, symmetric, backend="ort")
    # codes up to K (the kernel never reads the padded tail, where the C++ routine leaves varying nibbles)
    np.testing.assert_array_equal(_codes(ours[0])[:, : shape[0]], _codes(theirs[0])[:, : shape[0]])
    np.testing.assert_array_equal(ours[1], theirs[1])
    if symmetric:
        assert ours[2] is None and theirs[2] is None
    else:
        np.testing.assert_array_equal(ours[2], theirs[2])


def _codes(packed: np.ndarray) -> np.ndarray:
    n = packed.shape[0]
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)


def test_streaming_quantizes_only_at_save_once_per_weight(tmp_path, monkeypatch):
    """Sources stay unloaded until ir.save; each weight is quantized once; its memory map is closed afterwards."""
    weights = _weights()
    ir.save(build_model(weights), tmp_path / "fp32.onnx", external_data="fp32.onnx.data", size_threshold_bytes=0)
    model = ir.load(tmp_path / "fp32.onnx")
    sources = {name: model.graph.initializers[name].const_value for name in SHAPES}
    assert all(isinstance(t, ir.ExternalTensor) for t in sources.values())

    calls: list[tuple[int, ...]] = []
    real = quantizers.quantize_weight_int4

    def counting(weight, *args, **kwargs):
        calls.append(weight.shape)
        return real(weight, *args, **kwargs)

    monkeypatch.setattr(quantizers, "quantize_weight_int4", counting)
    assert quantize_matmuls_int4(model, block_size=BLOCK, accuracy_level=1) == 2
    assert calls == []
    assert all(t.raw is None for t in sources.values())  # not even memory-mapped yet

    out = tmp_path / "int4.onnx"
    ir.save(model, out, external_data="int4.onnx.data")
    assert sorted(calls) == sorted(SHAPES.values())
    assert all(t.raw is None for t in sources.values())  # maps released after use

    saved = ir.load(out)
    assert not any(name in saved.graph.initializers for name in SHAPES)
    assert (tmp_path / "int4.onnx.data").stat().st_size < (tmp_path / "fp32.onnx.data").stat().st_size / 4
    expected = forward(dequantized_weights(out), feeds_for())
    actual = run_ort(out)
    assert compare("y", actual["y"], expected["y"], scale=DEQUANT_SCALE[1]).passed

    # a second save recomputes from the sources and writes the same bytes
    ir.save(model, tmp_path / "again.onnx", external_data="again.onnx.data")
    assert len(calls) == 4
    assert (tmp_path / "again.onnx.data").read_bytes() == (tmp_path / "int4.onnx.data").read_bytes()
    # parallel writers (parts of one weight requested from several threads) write the same bytes too
    ir.save(model, tmp_path / "parallel.onnx", external_data="parallel.onnx.data", max_workers=4)
    assert (tmp_path / "parallel.onnx.data").read_bytes() == (tmp_path / "int4.onnx.data").read_bytes()
    assert all(t.raw is None for t in sources.values())


def test_shared_weight_quantized_once_and_skips(tmp_path, monkeypatch):
    k, n = 64, 32
    rng = np.random.default_rng(3)
    shared = _fvalue("shared", (k, n))
    shared.const_value = ir.tensor(rng.standard_normal((k, n)).astype(np.float32))
    small = _fvalue("small", (k, 4))
    small.const_value = ir.tensor(rng.standard_normal((k, 4)).astype(np.float32))
    batched = _fvalue("batched", (2, k, n))
    batched.const_value = ir.tensor(rng.standard_normal((2, k, n)).astype(np.float32))
    x = _fvalue("x", [3, k])
    wx = _fvalue("wx", [k, n])  # a weight fed as a graph input: not a constant, left alone
    nodes = [
        ir.Node("", "MatMul", [x, shared], name="a"),
        ir.Node("", "MatMul", [x, shared], name="b"),
        ir.Node("", "MatMul", [x, small], name="small_mm"),
        ir.Node("", "MatMul", [x, batched], name="batched_mm"),
        ir.Node("", "MatMul", [x, wx], name="input_mm"),
        ir.Node("", "MatMul", [x, shared], name="excluded"),
    ]
    for i, node in enumerate(nodes):
        node.outputs[0].name = f"out{i}"
    graph = ir.Graph(
        [x, wx], [nd.outputs[0] for nd in nodes], nodes=nodes, initializers=[shared, small, batched],
        opset_imports={"": 21},
    )  # fmt: skip
    model = ir.Model(graph, ir_version=10)
    count = quantize_matmuls_int4(
        model, block_size=BLOCK, accuracy_level=1, min_elements=k * 8, include=lambda node: node.name != "excluded"
    )
    assert count == 2
    ops = {node.name: node.op_type for node in graph}
    assert ops == {"a": "MatMulNBits", "b": "MatMulNBits", "small_mm": "MatMul", "batched_mm": "MatMul",
                   "input_mm": "MatMul", "excluded": "MatMul"}  # fmt: skip
    assert nodes[0].inputs[1:] == nodes[1].inputs[1:]
    assert "shared" in graph.initializers  # still used by "excluded"
    assert list(graph.initializers) == [
        "shared",
        "shared_Q4",
        "shared_scales",
        "shared_zero_points",
        "small",
        "batched",
    ]

    calls = []
    real = quantizers.quantize_weight_int4
    monkeypatch.setattr(quantizers, "quantize_weight_int4",
                        lambda w, *a, **kw: calls.append(1) or real(w, *a, **kw))
    ir.save(model, tmp_path / "shared.onnx", external_data="shared.onnx.data")
    assert len(calls) == 1
    sess = ort.InferenceSession(str(tmp_path / "shared.onnx"), providers=["CPUExecutionProvider"])
    xv = rng.standard_normal((3, k)).astype(np.float32)
    out = sess.run(None, {"x": xv, "wx": shared.const_value.numpy()})
    np.testing.assert_allclose(out[0], out[1], rtol=0, atol=0)
    ref = compare("shared", out[0], xv @ shared.const_value.numpy(), scale=0.1)
    assert ref.cosine > 0.99, ref.line()
    np.testing.assert_allclose(out[5], xv @ shared.const_value.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("k", "n", "block"), [(64, 48, 32), (80, 7, 16), (96, 33, 64)])
def test_dequantize_rows_equals_the_spec(symmetric, k, n, block):
    """The float32 [N, K] dequantization (verify's reference uses it) gives the spec function's values bit for bit,
    partial last blocks and zero points included; a twin that forgets the zero points must differ."""
    from merge.contract.quant import dequantize_int4_rows

    weight = np.random.default_rng(k * n).standard_normal((k, n)).astype(np.float32) + (0 if symmetric else 0.7)
    packed, scales, zero_points = quantize_weight_int4(weight, block, symmetric)
    spec = dequantize_int4(packed, scales, zero_points, k).T.astype(np.float32)
    assert np.array_equal(dequantize_int4_rows(packed, scales, zero_points, k), spec)
    if not symmetric:
        assert not np.array_equal(dequantize_int4_rows(packed, scales, None, k), spec)


# -- the searched quantizer, 8-bit blocks, and the spec that chooses them ------------------------------------------

def _study_weight(shape, seed, block: int = BLOCK) -> np.ndarray:
    """Heavy-tailed (Student t, 4 degrees of freedom) with input rows of different magnitudes, an all-zero block,
    an all-positive column and a constant block: the cases a range-based scale handles worst or trips over."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, shape) * np.exp(rng.normal(0, 0.5, (shape[0], 1)))
    w[:block, 0] = 0.0
    w[:, 1] = np.abs(w[:, 1])
    w[:block, 2] = 0.37
    return w.astype(np.float32)


def _block_errors(weight: np.ndarray, parts, bits: int, block: int) -> np.ndarray:
    """Each block's squared error [N, k_blocks] against the spec's dequantization, over the rows up to K."""
    from merge.contract.quant import dequantize_nbits

    k, n = weight.shape
    diff = dequantize_nbits(*parts, k, bits) - weight.astype(np.float64)
    padded = np.zeros((-(-k // block) * block, n))
    padded[:k] = diff**2
    return padded.reshape(-1, block, n).sum(axis=1).T


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("shape", "block"), [((256, 48), 32), ((272, 33), 32), ((200, 20), 64), ((96, 8), 16)])
def test_search_is_never_worse_than_rtn_on_any_block(shape, block, symmetric, bits):
    """Every block's squared error under the searched scale and zero point is at most round-to-nearest's (the
    search ends by keeping the better of the two per block), and in aggregate clearly below it: the search does
    search. Its output is the MatMulNBits format: codes in range, integer zero points, float32 scales."""
    from merge.quantize import quantize_weight_nbits

    weight = _study_weight(shape, seed=sum(shape) + bits, block=block)
    rtn = quantize_weight_nbits(weight, bits, block, symmetric, method="rtn")
    found = quantize_weight_nbits(weight, bits, block, symmetric, method="search")
    for ours, theirs in zip(found, rtn, strict=True):
        assert (ours is None) == (theirs is None) == (symmetric and ours is None)
        if ours is not None:
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    rtn_err, found_err = _block_errors(weight, rtn, bits, block), _block_errors(weight, found, bits, block)
    assert (found_err <= rtn_err).all(), np.argwhere(found_err > rtn_err)[:5]
    ratio = found_err.sum() / rtn_err.sum()
    log.info("search / rtn squared error, %d bits, %s, block %d, %s: %.3f", bits,
             "sym" if symmetric else "asym", block, shape, ratio)
    assert ratio < 0.985, ratio
    assert found_err[0, 0] == 0.0  # the all-zero block stays exact


def _one_matmul(weight: np.ndarray) -> ir.Model:
    k, n = weight.shape
    x = _fvalue("x", ["m", k])
    w = _fvalue("w", (k, n))
    w.const_value = ir.tensor(weight, name="w")
    node = ir.Node("", "MatMul", [x, w], name="/model/layers.0/mlp/down_proj/MatMul")
    y = node.outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["m", n])
    graph = ir.Graph([x], [y], nodes=[node], initializers=[w], opset_imports={"": 21}, name="one_matmul")
    return ir.Model(graph, ir_version=10)


def _outlier_activations(m: int, k: int, seed: int) -> np.ndarray:
    """Activations with a few outlier channels, as a transformer's residual stream has."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, rng.choice(k, 4, replace=False)] *= 20
    return x


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("accuracy_level", [1, 4])
def test_searched_blocks_run_in_matmulnbits_as_dequantized(tmp_path, accuracy_level, symmetric, bits):
    """ONNX Runtime's MatMulNBits on searched blocks equals x @ the spec's dequantization at M = 1, 8 and 226, with
    and without zero points, at accuracy level 1 (fp32) and 4 (int8 activations): the search writes the kernel's
    format exactly. (ONNX Runtime issue #29853 reports 46% error for zero-point weights at M = 1, level 4 on some
    AVX2 machines: this test holds it.) Twin: the same weights dequantized without their zero points miss."""
    from merge.contract.quant import dequantize_nbits
    from merge.stitch.passes.quantize_int4 import quantize_matmuls_nbits

    k, n = 272, 40  # 9 blocks of 32: an odd count (the last zero point byte half used) and a partial last block
    weight = _study_weight((k, n), seed=7) * 0.05 + np.float32(0.01)  # an offset: zero points have work to do
    model = _one_matmul(weight)
    assert quantize_matmuls_nbits(model, bits=bits, block_size=BLOCK, accuracy_level=accuracy_level,
                                  symmetric=symmetric, method="search") == 1
    path = tmp_path / "one.onnx"
    ir.save(model, path, external_data="one.onnx.data")
    inits = ir.load(path).graph.initializers
    zp = inits.get("w_zero_points")
    assert (zp is None) == symmetric
    parts = (inits[f"w_Q{bits}"].const_value.numpy(), inits["w_scales"].const_value.numpy(),
             None if zp is None else zp.const_value.numpy())
    deq = dequantize_nbits(*parts, k, bits)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for m in (1, 8, 226):
        x = _outlier_activations(m, k, seed=m)
        actual = session.run(None, {"x": x})[0]
        result = compare(f"M={m}", actual, (x.astype(np.float64) @ deq).astype(np.float32),
                         scale=DEQUANT_SCALE[accuracy_level])
        log.info("%d bits, %s, level %d: %s", bits, "sym" if symmetric else "zero points", accuracy_level,
                 result.line())
        assert result.passed, result.line()
        if not symmetric and accuracy_level == 1:
            forgot = dequantize_nbits(parts[0], parts[1], None, k, bits)
            assert not compare("twin", actual, (x.astype(np.float64) @ forgot).astype(np.float32),
                               scale=DEQUANT_SCALE[4]).passed


@pytest.mark.parametrize(("bits", "symmetric", "hidden", "block"),
                         [(4, False, 96, 32), (4, False, 128, 32), (4, True, 128, 32), (8, False, 96, 32),
                          (8, True, 64, 16)])
def test_token_lookup_reads_a_quantized_heads_blocks(bits, symmetric, hidden, block):
    """The tied table's lookup (GatherBlockQuantized on the head's own MatMulNBits blocks, zero points unpacked in
    the graph) gives the spec's dequantized rows: 4 and 8 bits, an odd and an even number of blocks per row."""
    from graphs.builder import GraphBuilder, make_model, tensor_input
    from graphs.embedding_merge import token_embeddings
    from merge.contract.names import OPSET
    from merge.contract.quant import dequantize_nbits
    from merge.quantize import quantize_weight_nbits
    from tests.onnx_session import checked_session

    vocab = 50
    head = _study_weight((hidden, vocab), seed=hidden + bits) + np.float32(0.5)  # [hidden, vocab], as MatMul's B
    parts = quantize_weight_nbits(head, bits, block, symmetric, method="search")
    table = dequantize_nbits(*parts, hidden, bits).T.astype(np.float32)  # [vocab, hidden]
    b = GraphBuilder("t/")
    ids = tensor_input("ids", ir.DataType.INT64, ["batch", "sequence"])
    data, scales, zero_points = (None if p is None else b.const(p, name) for p, name in
                                 zip(parts, ("blocks", "scales", "zero_points"), strict=True))
    layout = f"int{bits}_blocks"
    out = token_embeddings(b, data, ids, layout, hidden, scales, block, zero_points)
    out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["batch", "sequence", hidden])
    session = checked_session(make_model(b, [ids], [out], name="lookup",
                                         opset_imports={"": OPSET, "com.microsoft": 1}))
    feed = np.array([[0, 7, 49, 3], [12, 12, 1, 48]], np.int64)
    np.testing.assert_allclose(session.run(None, {"ids": feed})[0], table[feed], rtol=0, atol=1e-6)


def test_quant_spec_round_trip_and_older_manifests():
    """method and eight_bit go to merge.json and back; a quantization object written before them reads as the
    scheme it was (rtn, all 4-bit); wrong values are refused with a sentence naming them."""
    from merge.contract.quant import QuantSpec
    from merge.errors import MergeError

    spec = QuantSpec(block_size=64, symmetric=False, method="search", eight_bit=("head", "v_proj"))
    data = json.loads(json.dumps(spec.to_json()))
    assert data["method"] == "search" and data["eight_bit"] == ["v_proj", "head"]  # in MATRIX_KINDS' order
    assert QuantSpec.from_json(data, "m") == spec
    older = {"bits": 4, "block_size": 32, "symmetric": True, "accuracy_level": 4, "scope": "decoder"}
    assert QuantSpec.from_json(older, "m") == QuantSpec() and QuantSpec().method == "rtn"
    assert QuantSpec.from_json(older, "m").eight_bit == ()
    assert spec.scheme() == "int4 (block 64, zero points, search, 8-bit v_proj,head)" and QuantSpec().scheme() == "int4"
    for bad, message in [({"method": "gptq"}, "method 'gptq' is not one of rtn, search"),
                         ({"method": 1}, "quantization.method = 1 is not a str"),
                         ({"eight_bit": "head"}, "quantization.eight_bit = 'head' is not a list"),
                         ({"eight_bit": ["lm_head"]}, "eight_bit names 'lm_head', not one of the matrix kinds"),
                         ({"eight_bit": [1]}, "is not a list of strings"),
                         ({"eight_bit": ["head", "head"]}, "names a matrix kind twice")]:
        with pytest.raises(MergeError, match=re.escape(message)):
            QuantSpec.from_json({**older, **bad}, "m")
    # which matrices are 8-bit, by their names in the graph and in PyTorch
    assert [spec.bits_for(name) for name in (
        "decoder/lm_head", "lm_head.weight", "decoder/layers.3/attn/v_proj/MatMul",
        "model.language_model.layers.3.self_attn.v_proj.weight", "decoder/layers.3/attn/k_proj/MatMul",
        "model.language_model.layers.0.mlp.down_proj")] == [8, 8, 8, 8, 4, 4]


def test_quant_options_need_int4():
    from merge.contract.quant import QuantSpec, quant_spec_for
    from merge.errors import MergeError

    assert quant_spec_for("int4", method="search", zero_points=True, eight_bit="head, down_proj") == QuantSpec(
        block_size=128, symmetric=False, method="search", eight_bit=("head", "down_proj"))
    # the default: blocks of 128, zero points, searched, v_proj/o_proj/down_proj/head in 8 bits; each option replaces
    # its part of it
    assert quant_spec_for("int4") == QuantSpec(block_size=128, symmetric=False, method="search",
                                               eight_bit=("v_proj", "o_proj", "down_proj", "head"))
    assert quant_spec_for("int4", 32, method="rtn", zero_points=False, eight_bit="none") == QuantSpec()
    assert quant_spec_for("int4", eight_bit="head") == QuantSpec(block_size=128, symmetric=False, method="search",
                                                                 eight_bit=("head",))
    assert quant_spec_for("int4", zero_points=False).symmetric
    assert quant_spec_for("int4", block_size=64).block_size == 64
    for option, kwargs in [("--int4-method", {"method": "search"}), ("--zero-points", {"zero_points": True}),
                           ("--zero-points", {"zero_points": False}),
                           ("--eight-bit", {"eight_bit": "head"})]:
        with pytest.raises(MergeError, match=f"{option} applies to --precision int4 only"):
            quant_spec_for("fp32", **kwargs)


def test_a_saved_reference_names_the_quantization_scheme():
    """verify --reference refuses a reference saved for another scheme: the key names block size, zero points,
    method and 8-bit matrices where they differ from the first int4 scheme (whose key stays "int4", so references
    saved before still match the folders they were saved for)."""
    from merge.contract.manifest import Manifest
    from merge.contract.quant import QuantSpec
    from merge.tools.verify import precision_key

    def key(quant, vision="fp32"):
        return precision_key(Manifest(tool_version="test", source_model="m", precision="int4" if quant else "fp32",
                                      quantization=quant, embedding_table="e", inputs=[], outputs=[],
                                      special_token_ids={}, preprocessing_files=[], vision_precision=vision))

    assert key(QuantSpec()) == "int4" and key(None, "int8") == "fp32+vision-int8"
    assert key(QuantSpec(accuracy_level=1)) == "int4"  # the kernel's precision, not the weights
    assert key(QuantSpec(symmetric=False, method="search"), "int8") == "int4 (zero points, search)+vision-int8"
    assert key(QuantSpec(block_size=64, eight_bit=("head",))) == "int4 (block 64, 8-bit head)"
