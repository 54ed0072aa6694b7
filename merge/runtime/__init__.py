"""Running a combined folder: ONNX Runtime, numpy, Pillow, tokenizers and jinja2; no torch, transformers or onnx.

``from merge.runtime import CombinedModel`` is the Python entry point (see the README).
"""

from .model import CombinedModel, Completion, Generation
from .sampling import Sampling

__all__ = ["CombinedModel", "Completion", "Generation", "Sampling"]
