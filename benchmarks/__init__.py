"""Speed and memory benchmarks: figures printed side by side in one run, never assertions."""
