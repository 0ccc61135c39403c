"""Offline training, evaluation and ONNX export for the four models (needs the `train` extra)."""
