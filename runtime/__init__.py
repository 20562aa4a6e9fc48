"""dlnc's runtime: data loading and splits, training on ONNX Runtime, evaluation, search and the CLI."""
