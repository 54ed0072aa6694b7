"""Built-in presets: published Qwen3-VL shapes with seeded random weights, tokenizer and processor files."""
