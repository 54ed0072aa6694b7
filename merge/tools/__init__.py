"""The tools around a combined folder: ``verify`` (against PyTorch) and ``inspect`` (what it holds)."""
