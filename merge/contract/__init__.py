"""What a combined folder is, free of torch and onnx: its names, the manifest schema and the folder loader, the
config parse, the vision spec and input checks, and the quantization format. The runtime stands on this."""
