"""bundle -> precision variants, margins and the TensorRT suffix engine (`scalecert build`); derived
bundles at another pruning rate or stride (variants.py)."""
