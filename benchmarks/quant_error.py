"""4-bit block quantization error by scheme and block size (numpy; a measurement to choose defaults, not a test).

For each weight kind (2048x2048 [K, N], as MatMulNBits reads a Linear's weight transposed):

* ``gaussian``: N(0, 1/K);
* ``t4``: Student t with 4 degrees of freedom (heavy tails: a few large weights per block), scaled to 1/sqrt(K);
* ``row-scaled``: gaussian with each input row (K) scaled by exp(N(0, 0.7)), so magnitudes vary inside a block,

and activations X [256, K] ~ N(0, 1) with 8 outlier channels x20 (a transformer's residual stream has a few),
it prints the relative output error ``|X (W_q - W)| / |X W|`` (Frobenius) of symmetric / asymmetric (zero points)
round-to-nearest and searched scales (:mod:`merge.quantize`) at blocks 32, 64 and 128, as a ratio to symmetric
rtn at block 32 (today's default) and in absolute terms, with bits per weight (codes, float32 scales and zero
points) and seconds per matrix. ``--eight-bit`` adds 8-bit rows (what a matrix sent to 8 bits gains), ``--speed``
times the quantizers on a 2048x6144 matrix (an MLP projection of the 2B model).

    python benchmarks/quant_error.py
    python benchmarks/quant_error.py --speed --eight-bit
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merge.contract.quant import dequantize_nbits  # noqa: E402
from merge.quantize import quantize_weight_nbits  # noqa: E402

K = N = 2048
ROWS = 256
OUTLIERS, OUTLIER_GAIN = 8, 20.0
BLOCKS = (32, 64, 128)
# (label, symmetric, method)
SCHEMES = (("sym rtn", True, "rtn"), ("asym rtn", False, "rtn"), ("sym search", True, "search"),
           ("asym search", False, "search"))


def weights(kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        w = rng.standard_normal((K, N))
    elif kind == "t4":
        w = rng.standard_t(4, (K, N)) / np.sqrt(2.0)  # t4 has variance 2
    elif kind == "row-scaled":
        w = rng.standard_normal((K, N)) * np.exp(rng.normal(0.0, 0.7, (K, 1)))
    else:
        raise ValueError(kind)
    return (w / np.sqrt(K)).astype(np.float32)


def activations(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((ROWS, K))
    x[:, rng.choice(K, OUTLIERS, replace=False)] *= OUTLIER_GAIN
    return x


def bits_per_weight(bits: int, block: int, symmetric: bool) -> float:
    return bits + 32 / block + (0 if symmetric else bits / block)


def study(eight_bit: bool) -> None:
    x = activations()
    rows = [(label, 4, symmetric, method) for label, symmetric, method in SCHEMES]
    if eight_bit:
        rows += [("8-bit sym rtn", 8, True, "rtn"), ("8-bit asym search", 8, False, "search")]
    print(f"relative output error |X(Wq - W)| / |XW|, X [{ROWS}, {K}] with {OUTLIERS} outlier channels "
          f"x{OUTLIER_GAIN:g}; W [{K}, {N}]")
    print("ratio to 4-bit symmetric rtn at block 32 (absolute error in brackets); bits/weight; seconds per matrix")
    header = f"{'weights':<11} {'scheme':<18}" + "".join(f"{'block ' + str(b):>30}" for b in BLOCKS)
    print(header)
    print("-" * len(header))
    for kind in ("gaussian", "t4", "row-scaled"):
        w = weights(kind)
        y = x @ w
        norm = np.linalg.norm(y)
        base = None
        for label, bits, symmetric, method in rows:
            cells = []
            for block in BLOCKS:
                start = time.perf_counter()
                parts = quantize_weight_nbits(w, bits, block, symmetric, method=method)
                seconds = time.perf_counter() - start
                error = np.linalg.norm(x @ dequantize_nbits(*parts, K, bits) - y) / norm
                if base is None:
                    base = error
                cells.append(f"{error / base:6.3f} ({error:.2e}) {bits_per_weight(bits, block, symmetric):5.2f} "
                             f"{seconds:4.1f}s")
            print(f"{kind:<11} {label:<18}" + "".join(f"{c:>30}" for c in cells), flush=True)


def speed(repeats: int = 3) -> None:
    w = (np.random.default_rng(2).standard_normal((2048, 6144)) / np.sqrt(2048)).astype(np.float32)
    print(f"\nseconds to quantize one 2048x6144 weight (best of {repeats}; one thread)")
    for block in BLOCKS:
        cells = []
        for label, symmetric, method in SCHEMES:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                quantize_weight_nbits(w, 4, block, symmetric, method=method)
                times.append(time.perf_counter() - start)
            cells.append(f"{label} {min(times):.2f}")
        print(f"block {block:<4} " + " | ".join(cells), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eight-bit", action="store_true", help="add 8-bit rows")
    parser.add_argument("--speed", action="store_true", help="time the quantizers on a 2048x6144 weight")
    args = parser.parse_args()
    study(args.eight_bit)
    if args.speed:
        speed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
