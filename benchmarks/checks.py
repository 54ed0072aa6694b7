"""What the in-graph input checks (``merge/checks/*``) cost per call: the same model built twice, with the checks
and with the value checks' pass left out, timed call by call in alternation in one run.

The checks read only ``input_ids`` and ``attention_mask`` (a few reductions over [batch, new] ids and
[batch, past + new] mask values, and a few scalar ops), so their cost does not grow with the model: the
difference measured on one preset is the absolute cost on any other of the same batch and lengths, and the
table gives it both in microseconds and as a share of this model's own call. Prints figures, asserts nothing:

    python benchmarks/checks.py --model tiny --precision int4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import machine


def _build_pair(model: str, precision: str, work: Path) -> tuple[Path, Path]:
    """(with checks, without the check pass) folders of ``model``."""
    import merge.stitch.passes as passes
    from merge.contract.quant import quant_spec_for
    from merge.sources.resolve import resolve_model
    from merge.stitch.pipeline import build

    source = resolve_model(model)
    quant = quant_spec_for(precision)
    with_checks, without = work / "with-checks", work / "without-checks"
    build(source, with_checks, quant=quant)

    class NoChecks(passes.StitchPass):
        summary = "the input checks left out (benchmark only)"

        def __init__(self, vocab_size: int) -> None:
            del vocab_size

        def apply(self, model) -> bool:
            return False

    real = passes.CheckContract
    passes.CheckContract = NoChecks
    try:
        build(source, without, quant=quant)
    finally:
        passes.CheckContract = real
    return with_checks, without


def _calls(folder: Path, batch: int, prompt: int, threads: int):
    """(prefill, decode step at ``prompt`` context) callables of one folder; the decode step reuses the prefill's
    cache, so every step sees the same lengths."""
    from merge.runtime import CombinedModel

    model = CombinedModel(folder, threads=threads)
    ids = np.random.default_rng(0).integers(0, 700, (batch, prompt)).astype(np.int64)
    mask = np.ones_like(ids)
    feeds = model.first_feeds(ids, mask)
    out = model.forward(feeds)
    step = {"input_ids": np.full((batch, 1), 5, np.int64),
            "attention_mask": np.ones((batch, prompt + 1), np.int64), **model.no_vision(),
            "rope_deltas": out["rope_deltas_out"],
            **{p: out[p.replace("past_key_values.", "present.")] for p in model.past_names}}
    return (lambda: model.forward(feeds)), (lambda: model.forward(step))


def _alternate(a, b, rounds: int) -> tuple[float, float]:
    """Fastest seconds of ``a`` and of ``b``, called in turn (after one warm-up each), so drift hits both alike; the
    minimum, not the median: on a shared machine other work only ever adds time."""
    a(), b()
    ta, tb = [], []
    for _ in range(rounds):
        for fn, times in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return min(ta), min(tb)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--precision", default="int4", choices=("fp32", "int4"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()

    print(machine.header(machine.describe(args.threads)))
    with tempfile.TemporaryDirectory(prefix="checks-bench-") as scratch:
        with_checks, without = _build_pair(args.model, args.precision, Path(scratch))
        print(f"model {args.model} ({args.precision}); fastest of {args.rounds} calls each (prefill: 1/8 as many), "
              "alternated")
        print(f"  {'call':34}{'with checks':>13}{'without':>11}{'checks cost':>13}{'share':>8}")
        for batch, prompt in ((1, 256), (1, 4096), (4, 1024)):
            prefill_a, step_a = _calls(with_checks, batch, prompt, args.threads)
            prefill_b, step_b = _calls(without, batch, prompt, args.threads)
            rows = (("decode step", step_a, step_b, args.rounds),
                    ("prefill", prefill_a, prefill_b, max(4, args.rounds // 8)))
            for label, a, b, rounds in rows:
                ta, tb = _alternate(a, b, rounds)
                print(f"  {f'{label}, batch {batch}, {prompt} tokens':34}{ta * 1e3:11.3f}ms{tb * 1e3:9.3f}ms"
                      f"{(ta - tb) * 1e6:11.0f}us{(ta - tb) / ta:8.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
