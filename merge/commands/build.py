"""``merge build``'s command line (light: the pipeline is imported when the command runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from merge.contract.quant import (
    DEFAULT_EIGHT_BIT,
    KV_CACHES,
    MATRIX_KINDS,
    METHODS,
    NO_EIGHT_BIT,
    PRECISIONS,
    VISION_PRECISIONS,
)


def run(args: argparse.Namespace) -> int:
    """Export Qwen3-VL to ONNX into --out (a new folder; --force replaces an existing one).

    --model takes a preset name (default: tiny), a local Hugging Face folder, or a hub id. --debug lists the
    stitch passes as they run.
    """
    from .extras import BUILD_MODULES, require

    require("build", BUILD_MODULES)

    from merge.contract.quant import quant_spec_for
    from merge.sources.resolve import resolve_model
    from merge.stitch.pipeline import build

    quant = quant_spec_for(args.precision, args.block_size, method=args.int4_method, zero_points=args.zero_points,
                           eight_bit=args.eight_bit)
    source = resolve_model(args.model, args.cache_dir)
    print(f"model: {source.spec} ({source.folder})")
    result = build(source, Path(args.out), quant=quant, vision_precision=args.vision_precision, force=args.force,
                   others=args.others, kv_cache=args.kv_cache)
    print(f"wrote {result.out}/ in {result.seconds:.1f} s (peak memory: build {result.peak_rss_gib:.2f} GiB, "
          f"session check {result.check_peak_rss_gib:.2f} GiB)")
    for part, path in result.parts.items():
        print(f"  {part}: {path}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("build", help=run.__doc__.strip().splitlines()[0], description=run.__doc__)
    p.add_argument("--model", default="tiny", help="preset name, local HF folder or hub id (default: tiny)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="decoder weights: fp32, or int4 (MatMulNBits, blocks of 128 with zero points and searched "
                        "scales, v_proj, o_proj, down_proj and the head in 8 bits: closer to fp32 than llama.cpp's "
                        "Q4_K_M, and faster)")
    p.add_argument("--block-size", type=int, default=None, metavar="N",
                   help="int4 block along K (a power of two >= 16; default 128): larger blocks store fewer scales "
                        "and run faster, smaller ones come closer to fp32 (64: closer still, at llama.cpp Q4_K_M's "
                        "prefill speed; verify reports it)")
    p.add_argument("--int4-method", default=None, choices=METHODS,
                   help="how int4 blocks are quantized: search (each block's scale and zero point searched to "
                        "minimise its squared error; the default) or rtn (round to nearest from each block's range: "
                        "about 10x faster to build, further from fp32)")
    p.add_argument("--zero-points", default=None, action=argparse.BooleanOptionalAction,
                   help="int4 blocks with a zero point each (asymmetric: a block's range need not be centred on 0; "
                        "half a byte more per block; the default); --no-zero-points: symmetric")
    p.add_argument("--eight-bit", default=None, metavar="KINDS",
                   help="int4: comma-separated matrix kinds stored in 8 bits instead, in every layer (of "
                        f"{', '.join(MATRIX_KINDS)}; default {','.join(DEFAULT_EIGHT_BIT)}; "
                        f"'{NO_EIGHT_BIT}': every matrix in 4 bits)")
    p.add_argument("--vision-precision", default=None, choices=VISION_PRECISIONS,
                   help="vision products: fp32, or int8 (7-bit weight codes, exact on every CPU; activations "
                        "quantized at run time; uses the CPU's AMX / VNNI int8 units; verify reports its error). "
                        "Default: fp32 with --precision fp32, int8 with int4 (1.1 GiB less on 2B)")
    p.add_argument("--kv-cache", default=None, choices=KV_CACHES,
                   help="the keys and values kept between calls: float32 (the default), or float16: half the "
                        "cache's memory at long contexts (2B at 16k: 1.75 GiB instead of 3.5), slower decoding "
                        "(ONNX Runtime's CPU attention converts it to float32 at every call); verify reports its "
                        "error")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out folder a build wrote, when the build succeeds (refused, naming "
                        "them, if it holds files no build wrote, unless --others says what to do with them)")
    p.add_argument("--others", default=None, choices=("keep", "discard"),
                   help="with --force: keep the entries no build wrote (moved into the new folder) or discard them "
                        "(deleted with the old folder); default: refuse, naming them")
    p.add_argument("--cache-dir", type=Path, default=None, help="where presets are built (default ~/.cache)")
    p.set_defaults(func=run)
