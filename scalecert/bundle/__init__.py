"""The bundle: the artefact every stage reads or writes (no torch)."""
from scalecert.bundle.bundle import Bundle

__all__ = ["Bundle"]
