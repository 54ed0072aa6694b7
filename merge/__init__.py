"""qwen3vl-merge: Qwen3-VL as one ONNX model."""

__version__ = "0.1.0"
