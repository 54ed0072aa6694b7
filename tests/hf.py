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


def hf_processor(folder: Path):
    """``Qwen3VLProcessor`` over the folder's tokenizer and image processor, without a video processor."""
    from transformers import ProcessorMixin
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    tokenizer, image_processor = load_preprocessors(folder)
    check = ProcessorMixin.check_argument_for_proper_class

    def allow_missing_video(self, name, arg):  # the one argument we leave out on purpose
        return None if name == "video_processor" and arg is None else check(self, name, arg)

    ProcessorMixin.check_argument_for_proper_class = allow_missing_video
    try:
        return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
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
