"""scalecert: certified patch-attack detection (ScaleCert) compiled to ONNX / TensorRT bundles."""
__version__ = "0.1.0"
