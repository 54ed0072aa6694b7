"""``merge presets``: the built-in presets and their main shapes."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    """List the built-in presets and their main shapes."""
    from merge.presets.shapes import PRESETS, SEEDED_PRESETS

    width = max(map(len, PRESETS))
    for name, cfg in PRESETS.items():
        v, t = cfg["vision_config"], cfg["text_config"]
        drawn = " | drawn when read" if name in SEEDED_PRESETS else ""
        print(
            f"{name:{width}s} vision depth {v['depth']:2d} hidden {v['hidden_size']:4d} "
            f"merge {v['spatial_merge_size']} "
            f"deepstack {v['deepstack_visual_indexes']} | text layers {t['num_hidden_layers']:2d} "
            f"hidden {t['hidden_size']:4d} heads {t['num_attention_heads']}/{t['num_key_value_heads']} "
            f"tied {cfg['tie_word_embeddings']}" + _experts(t) + drawn
        )
    return 0


def _experts(text: dict) -> str:
    """A Qwen3-VL-MoE preset's experts (nothing for a dense one)."""
    if "num_experts" not in text:
        return ""
    only = f" dense {text['mlp_only_layers']}" if text.get("mlp_only_layers") else ""
    step = f" every {text['decoder_sparse_step']}" if text.get("decoder_sparse_step", 1) != 1 else ""
    return (f" | experts {text['num_experts']} top-{text['num_experts_per_tok']} width "
            f"{text['moe_intermediate_size']}{step}{only}")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("presets", help=run.__doc__.strip().splitlines()[0], description=run.__doc__)
    p.set_defaults(func=run)
