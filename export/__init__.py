"""The PyTorch room: the only code that imports torch or transformers' modeling code.

- :mod:`export.text`: the text decoder through the ONNX Runtime GenAI model builder (run in a child process);
- :mod:`export.reference`: ``verify``'s PyTorch reference;
- :mod:`export.random_weights`: the presets' seeded random weights.
"""
