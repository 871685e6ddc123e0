"""GPU pipelines: ONNX Runtime with the CUDA execution provider, and TensorRT engines (no torch)."""
from __future__ import annotations

from ..errors import ScaleCertError


def require_tensorrt():
    """The tensorrt module, or one line saying what is missing and what to do."""
    try:
        import tensorrt
    except ImportError:
        raise ScaleCertError("the TensorRT backend needs TensorRT (pip install 'scalecert[tensorrt]' from NVIDIA's "
                             "index) and an NVIDIA GPU; use --backend ort here") from None
    return tensorrt
