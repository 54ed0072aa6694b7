"""transformers' own preprocessing, the reference the runtime's is held to (tests only).

``AutoProcessor`` for ``qwen3_vl`` also builds the video processor, which imports torchvision (not installed
beside the CPU torch build); :func:`hf_processor` builds ``Qwen3VLProcessor`` with its real tokenizer and image
processor and no video processor, so its own ``__call__`` (placeholder expansion, ``mm_token_type_ids``) and
``apply_chat_template`` run. If transformers changes so that this no longer works, the tests fail and say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_preprocessors(folder: Path) -> tuple[Any, Any]:
    """transformers' (tokenizer, image processor) of a checkpoint folder; the ``pil`` image backend, so that pixel
    values do not depend on whether torchvision happens to be installed."""
    from transformers import AutoImageProcessor, AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)), AutoImageProcessor.from_pretrained(str(folder), backend="pil")


def hf_processor(folder: Path, video: bool = False):
    """``Qwen3VLProcessor`` over the folder's tokenizer and image processor; without a video processor unless
    ``video`` (transformers' ``Qwen3VLVideoProcessor`` from the folder's config: its sampling, sizes, timestamps and
    placeholders run without torchvision, its resize needs it)."""
    from transformers import ProcessorMixin
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    tokenizer, image_processor = load_preprocessors(folder)
    video_processor = None
    if video:
        import json

        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        config = json.loads((Path(folder) / "video_preprocessor_config.json").read_text())
        config = {k: v for k, v in config.items() if k not in ("processor_class", "video_processor_type")}
        video_processor = Qwen3VLVideoProcessor(**config)
    check = ProcessorMixin.check_argument_for_proper_class

    def allow_missing_video(self, name, arg):  # left out, or built above (its class lookup needs torchvision)
        return None if name == "video_processor" else check(self, name, arg)

    ProcessorMixin.check_argument_for_proper_class = allow_missing_video
    try:
        return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                                chat_template=tokenizer.chat_template)
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def hf_inputs(processor, prompt: str, images: list) -> dict:
    """What ``Qwen3VLProcessor`` gives for one user turn (its chat template, its expansion), as numpy arrays."""
    import numpy as np

    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    out = processor(text=[text], images=images or None, return_tensors="np")
    return {k: np.asarray(v) for k, v in out.items()}


def hf_kwargs(inputs: dict) -> dict:
    """The runtime's inputs as HF's forward / generate take them: a modality with no rows is left out (HF would run
    its tower on zero patches)."""
    out = dict(inputs)
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if grid in out and len(out[grid]) == 0:
            out.pop(pixels, None)
            out.pop(grid)
    return out
