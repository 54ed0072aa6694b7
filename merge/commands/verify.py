"""``merge verify``'s command line (light: PyTorch is imported only when the reference is computed)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .run import add_pixel_arguments, add_video_arguments


def run(args: argparse.Namespace) -> int:
    """Compare a combined folder with PyTorch, stage by stage; exit 1 if any stage fails.

    Runs the same processor output through PyTorch (--model, by default the model the folder was built from)
    and the combined model and prints one table: vision image_embeds, each DeepStack level, merged input
    embeddings, 3-D position ids, prefill logits, each decode step's logits and the greedy tokens; with --video,
    the videos' vision rows and DeepStack levels too. With no --image and no --video, a few test images of
    different sizes are generated. --save-reference stores the reference so that
    --reference can check again without PyTorch. An int4 mixture-of-experts folder runs first and PyTorch takes
    its expert choices and tokens (int8 activations flip near ties between experts); its router logits are a
    stage, and a saved reference holds those choices.
    """
    from .extras import BUILD_MODULES, INSPECT_MODULES, require

    require("verify", INSPECT_MODULES if args.reference else BUILD_MODULES)  # a saved reference needs no PyTorch

    from merge.contract.folder import CombinedFolder
    from merge.errors import MergeError
    from merge.tools.verify import (
        check_same_model,
        check_writable,
        default_images,
        format_table,
        known_config,
        load_images,
        verify,
        write_report,
    )

    if args.max_new_tokens < 1:
        raise MergeError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    combined = CombinedFolder.open(args.combined)
    for path in (args.json, args.save_reference):
        if path is not None:
            check_writable(path, combined)  # before the long PyTorch run, not after it
    model_folder = None
    if args.reference is None:
        from merge.sources.resolve import resolve_model

        spec = args.model or combined.manifest.source_model
        config = known_config(spec)
        if config is not None:  # before a preset is built (minutes, gigabytes for the large ones)
            check_same_model(combined, config, spec)
        source = resolve_model(spec, args.cache_dir)
        check_same_model(combined, source.config, spec)  # a hub id's, once downloaded; before PyTorch loads it
        model_folder = source.folder
    images = load_images(args.image) if args.image else [] if args.video else default_images()
    stages = verify(combined, model_folder=model_folder, prompt=args.prompt, images=images,
                    new_tokens=args.max_new_tokens, reference=args.reference, save_to=args.save_reference,
                    min_pixels=args.min_pixels, max_pixels=args.max_pixels, videos=args.video, fps=args.fps,
                    max_frames=args.max_frames, stream=True if args.stream_weights else None)
    print(format_table(stages))
    if args.json:
        write_report(args.json, stages)
    return 0 if all(s.passed or not s.counted for s in stages) else 1


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("verify", help=run.__doc__.strip().splitlines()[0], description=run.__doc__)
    p.add_argument("combined", help="a folder written by merge build")
    p.add_argument("--model", default=None,
                   help="the PyTorch reference: preset, HF folder or hub id (default: the folder's source model)")
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    p.add_argument("--video", action="append", default=[],
                   help="a video file or a folder of frames (repeatable; after the images)")
    p.add_argument("--prompt", default="Describe these images.", help="the user prompt")
    p.add_argument("--max-new-tokens", type=int, default=8, help="decode steps to compare")
    add_pixel_arguments(p)
    add_video_arguments(p)
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    p.add_argument("--save-reference", type=Path, default=None, help="save the PyTorch reference (.npz)")
    p.add_argument("--reference", type=Path, default=None, help="use a saved reference instead of PyTorch")
    p.add_argument("--cache-dir", type=Path, default=None, help="where presets are built")
    p.add_argument("--stream-weights", action="store_true",
                   help="PyTorch reads each module's weights from the checkpoint as it runs (the same numbers, "
                        "slower): for models whose fp32 weights do not fit in memory, chosen automatically then")
    p.set_defaults(func=run)
