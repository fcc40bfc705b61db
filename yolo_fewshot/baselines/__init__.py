"""Methods the benchmark compares against (no training or plain Ultralytics)."""
