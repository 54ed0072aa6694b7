"""A reduced-depth copy of a seeded preset (the 30B-A3B shape with fewer decoder layers), for comparisons whose other
side needs the weights on disk: llama.cpp converts safetensors only, and the 30B-A3B shape's 61 GB of bfloat16 do
not fit this machine's disk beside its conversions.

The copy keeps every shape but the depth: the first ``--layers`` decoder layers, the vision tower, the embeddings and
the head, with the same values (a seeded file's tensors are drawn by name, so a layer kept is the same layer).
``--safetensors`` also writes them out as bfloat16 safetensors (the folder is then an ordinary checkpoint).

    python benchmarks/reduced.py --model qwen3-vl-30b-a3b --layers 8 --out /tmp/moe30-8 --safetensors
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYER = re.compile(r"\.layers\.(\d+)\.")


def reduce(source: Path, out: Path, layers: int, safetensors: bool) -> Path:
    from merge.sources.checkpoint import Checkpoint
    from merge.sources.seeded import SEEDED_FILE

    config = json.loads((source / "config.json").read_text())
    text = config["text_config"]
    if not 0 < layers <= text["num_hidden_layers"]:
        raise SystemExit(f"--layers {layers}: the model has {text['num_hidden_layers']} decoder layers")
    if not (source / SEEDED_FILE).is_file():
        raise SystemExit(f"{source}: not a seeded folder (no {SEEDED_FILE})")
    out.mkdir(parents=True, exist_ok=False)
    for f in source.iterdir():
        if f.is_file() and not f.name.startswith(".") and f.name not in ("config.json", SEEDED_FILE):
            shutil.copy2(f, out / f.name)
    text["num_hidden_layers"] = layers
    text["mlp_only_layers"] = [i for i in text.get("mlp_only_layers", []) if i < layers]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    seeded = json.loads((source / SEEDED_FILE).read_text())

    def kept(name: str) -> bool:
        found = LAYER.search(name)
        return not (found and name.startswith("model.language_model.") and int(found.group(1)) >= layers)

    seeded["tensors"] = {n: t for n, t in seeded["tensors"].items() if kept(n)}
    (out / SEEDED_FILE).write_text(json.dumps(seeded, indent=1) + "\n")
    if safetensors:
        from export.random_weights import write_safetensors

        write_safetensors(out, Checkpoint(out), label=f"{out.name}'s weights")
        (out / SEEDED_FILE).unlink()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-vl-30b-a3b", help="a seeded preset or folder")
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--safetensors", action="store_true")
    args = parser.parse_args()
    from merge.sources.resolve import resolve_model

    out = reduce(resolve_model(args.model).folder, args.out, args.layers, args.safetensors)
    print(f"wrote {out} ({args.layers} decoder layers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
