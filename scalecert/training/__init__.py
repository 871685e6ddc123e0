"""torch: the split program, the plain-PyTorch reference and `scalecert tune`."""
