"""The errors scalecert raises on purpose: one line each, saying what is wrong and what to do.

An application catches `ScaleCertError` for all of them, or one kind:

  OptionError   an argument or option value is out of range or does not fit the others
  BundleError   the bundle is missing, corrupt, too old, unproven, or lacks the variant/margin asked for
  ImageError    an image cannot be read, decoded or used (unreadable, too large, wrong array)
  DataError     a data folder or labels file cannot be used
  BackendError  the engine cannot run here (no provider, no GPU, engines built for another GPU)
  ModelError    export: the model file cannot be loaded, converted or split soundly

Anything else that escapes is a bug (the CLI's exit code 3).
"""


class ScaleCertError(Exception):
    """A user-facing failure: the CLI prints its message as one line and exits non-zero."""


class OptionError(ScaleCertError):
    """An argument or option value is out of range or does not fit the others."""


class BundleError(ScaleCertError):
    """The bundle is missing, corrupt, too old, unproven, or lacks what was asked of it."""


class ImageError(ScaleCertError):
    """An image cannot be read, decoded or used."""


class DataError(ScaleCertError):
    """A data folder or labels file cannot be used."""


class BackendError(ScaleCertError):
    """The engine cannot run here."""


class ModelError(ScaleCertError):
    """The model file cannot be loaded, converted or split soundly."""
