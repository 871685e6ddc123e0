"""Write a bundle into a fresh folder beside its destination and swap it into place: a bundle is
never half-written, and a failure leaves the old one untouched."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


def replace_dir(work: str, output: str) -> None:
    """Move a finished bundle directory into place, replacing any old one (never half-written)."""
    os.chmod(work, 0o755)
    if os.path.exists(output):
        old = tempfile.mkdtemp(prefix=".scalecert-old-", dir=os.path.dirname(os.path.abspath(output)))
        os.rename(output, os.path.join(old, "bundle"))
        os.rename(work, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(work, output)


@contextlib.contextmanager
def staging(output: str, prefix: str = ".scalecert-"):
    """A fresh directory beside `output` to write a bundle into: when the block ends normally it
    replaces `output` (replace_dir); when it raises, it is removed and `output` is untouched."""
    work = tempfile.mkdtemp(prefix=prefix, dir=os.path.dirname(os.path.abspath(output)))
    try:
        yield work
        replace_dir(work, output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
