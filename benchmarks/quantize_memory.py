"""Peak memory of the streamed INT4 quantization (merge/quantize.py): near one weight, not the whole model.

1. writes a synthetic fp32 model (``--layers`` MatMuls of ``--k`` x ``--n``, random weights) as external data,
   itself streamed (each weight is generated when ir.save writes it);
2. in a FRESH process: ``ir.load`` (memory-mapped), ``quantize_matmuls_int4``, ``ir.save``; prints that
   process's peak RSS (``resource.getrusage``), its RSS just after the imports, the fp32 total and one
   weight's size;
3. with ``--check-ort``, loads the result in ONNX Runtime in another fresh process and runs it once.

    python benchmarks/quantize_memory.py                 # 20 x 2048x6144 fp32 = 1.0 GB
    python benchmarks/quantize_memory.py --layers 40 --workers 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def create(folder: Path, layers: int, k: int, n: int) -> None:
    import numpy as np
    import onnx_ir as ir

    x = ir.Value(name="x", shape=ir.Shape(["batch", "seq", k]), type=ir.TensorType(ir.DataType.FLOAT))
    nodes, inits = [], []
    for i in range(layers):

        def make(seed: int = i) -> ir.Tensor:  # default argument: each weight its own seed
            rng = np.random.default_rng(seed)
            return ir.tensor(rng.standard_normal((k, n), dtype=np.float32))

        w = ir.Value(
            name=f"model.layers.{i}.mlp.up_proj.MatMul.weight",
            shape=ir.Shape([k, n]),
            type=ir.TensorType(ir.DataType.FLOAT),
            const_value=ir.LazyTensor(make, dtype=ir.DataType.FLOAT, shape=ir.Shape([k, n])),
        )
        node = ir.Node("", "MatMul", [x, w], name=f"/model/layers.{i}/mlp/up_proj/MatMul")
        node.outputs[0].name = f"out{i}"
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        nodes.append(node)
        inits.append(w)
    graph = ir.Graph([x], [nd.outputs[0] for nd in nodes], nodes=nodes, initializers=inits, opset_imports={"": 21})
    ir.save(ir.Model(graph, ir_version=10), folder / "fp32.onnx", external_data="fp32.onnx.data")


def quantize_child(folder: Path, workers: int | None) -> dict:
    baseline = current_rss_bytes()
    import onnx_ir as ir

    from merge.stitch.passes.quantize_int4 import quantize_matmuls_int4

    after_imports = current_rss_bytes()
    start = time.perf_counter()
    model = ir.load(folder / "fp32.onnx")
    weights = [v.const_value for v in model.graph.initializers.values()]
    largest = max(t.nbytes for t in weights)
    count = quantize_matmuls_int4(model)
    ir.save(model, folder / "int4.onnx", external_data="int4.onnx.data", max_workers=workers)
    return {
        "replaced": count,
        "seconds": time.perf_counter() - start,
        "rss_at_start": baseline,
        "rss_after_imports": after_imports,
        "peak_rss": peak_rss_bytes(),
        "largest_weight": largest,
    }


def ort_child(folder: Path) -> dict:
    import numpy as np
    import onnxruntime as ort

    start = time.perf_counter()
    sess = ort.InferenceSession(str(folder / "int4.onnx"), providers=["CPUExecutionProvider"])
    k = sess.get_inputs()[0].shape[-1]
    outs = sess.run(None, {"x": np.ones((1, 4, k), dtype=np.float32)})
    return {"seconds": time.perf_counter() - start, "peak_rss": peak_rss_bytes(), "outputs": len(outs)}


def in_fresh_process(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"child {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--n", type=int, default=6144)
    parser.add_argument("--workers", type=int, default=None, help="ir.save max_workers (default: serial)")
    parser.add_argument("--check-ort", action="store_true", help="also load and run the result in ONNX Runtime")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--child", choices=["quantize", "ort"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = quantize_child(args.dir, args.workers) if args.child == "quantize" else ort_child(args.dir)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="quantize-memory-", dir=args.dir) as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        create(folder, args.layers, args.k, args.n)
        fp32 = (folder / "fp32.onnx.data").stat().st_size
        print(f"fp32 model: {args.layers} MatMuls of {args.k}x{args.n}, {fp32 / MIB:.0f} MiB of weights "
              f"(written in {time.perf_counter() - start:.1f} s)")  # fmt: skip
        child = ["--child", "quantize", "--dir", str(folder)]
        if args.workers:
            child += ["--workers", str(args.workers)]
        r = in_fresh_process(*child)
        int4 = (folder / "int4.onnx.data").stat().st_size
        grown = r["peak_rss"] - r["rss_after_imports"]
        print(f"quantized {r['replaced']} MatMuls in {r['seconds']:.1f} s -> {int4 / MIB:.0f} MiB int4 data")
        print(f"peak RSS {r['peak_rss'] / MIB:.0f} MiB; after imports {r['rss_after_imports'] / MIB:.0f} MiB; "
              f"growth {grown / MIB:.0f} MiB = {grown / r['largest_weight']:.2f} x one fp32 weight "
              f"({r['largest_weight'] / MIB:.0f} MiB) = {grown / fp32:.3f} x the fp32 total")  # fmt: skip
        if args.check_ort:
            o = in_fresh_process("--child", "ort", "--dir", str(folder))
            print(f"onnxruntime: session + one run {o['seconds']:.1f} s, peak RSS {o['peak_rss'] / MIB:.0f} MiB, "
                  f"{o['outputs']} outputs")  # fmt: skip


if __name__ == "__main__":
    main()
