"""The deployable half of scalecert: numpy, Pillow and an inference engine; never torch."""
from scalecert.runtime.certifier import Certifier, Result

__all__ = ["Certifier", "Result"]
