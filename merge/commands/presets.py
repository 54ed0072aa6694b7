"""``merge presets``: the built-in presets and their main shapes."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    """List the built-in presets and their main shapes."""
    from merge.presets.shapes import PRESETS

    for name, cfg in PRESETS.items():
        v, t = cfg["vision_config"], cfg["text_config"]
        print(
            f"{name:14s} vision depth {v['depth']:2d} hidden {v['hidden_size']:4d} merge {v['spatial_merge_size']} "
            f"deepstack {v['deepstack_visual_indexes']} | text layers {t['num_hidden_layers']:2d} "
            f"hidden {t['hidden_size']:4d} heads {t['num_attention_heads']}/{t['num_key_value_heads']} "
            f"tied {cfg['tie_word_embeddings']}"
        )
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("presets", help=run.__doc__.strip().splitlines()[0], description=run.__doc__)
    p.set_defaults(func=run)
