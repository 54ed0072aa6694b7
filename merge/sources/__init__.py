"""Where checkpoints come from: a local folder, a hub id, or a built-in preset; and their safetensors."""
