"""bundle -> precision variants, margins and TensorRT engines (`scalecert build`)."""
