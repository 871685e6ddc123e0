class ScaleCertError(Exception):
    """A user-facing failure: the CLI prints its message as one line and exits non-zero."""
