"""The dlnc compiler: typed AST to IR, symbolic training graphs, simplification and ONNX.

It imports `onnx` and `numpy`, never `onnxruntime`.
"""
__version__ = "0.1.0"
