"""The deployable half of scalecert: numpy, Pillow and an inference engine; never torch."""
from .certifier import Certifier, Result
from .decision import Decision, decide

__all__ = ["Certifier", "Result", "Decision", "decide"]
