"""Write a bundle into a fresh folder beside its destination and swap it into place: a bundle is
never half-written, and a failure leaves the old one untouched.

The output rule every command that writes follows (`check_output`, `check_output_file`): a path
that does not exist is written if its parent folder exists and is writable; an existing scalecert
bundle (a directory whose manifest.json says so) is replaced only with --force, atomically; an
existing output file (bench report, plot, tuned checkpoint) only with --force; anything else (a
folder that is no bundle, the current folder or one above it, a file where a folder goes) is
refused with one line that names what is there, --force or not. Temporary folders
(`.scalecert-*`) never outlive the call, on success or failure."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from scalecert.errors import ScaleCertError


def is_bundle(path: str) -> bool:
    """A directory whose manifest.json is a scalecert manifest (schema_version and windows)."""
    manifest = os.path.join(path, "manifest.json")
    if not os.path.isdir(path) or not os.path.isfile(manifest):
        return False
    try:
        with open(manifest) as f:
            data = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get("schema_version"), int) and "windows" in data


def _what_is_there(path: str) -> str:
    if os.path.islink(path):
        return "a symbolic link"
    if os.path.isfile(path):
        return "a file"
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return "a folder"
    if not names:
        return "an empty folder that is no scalecert bundle"
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"a folder that is no scalecert bundle ({len(names)} entr{'y' if len(names) == 1 else 'ies'}: {shown})"


def _writable_parent(output: str, flag: str) -> None:
    """The output's folder may be missing (it is made, with its parents, when the output is written,
    as `mkdir -p`), but its nearest existing ancestor must be a writable folder."""
    parent = os.path.dirname(os.path.abspath(output))
    ancestor = parent
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ScaleCertError(f"{flag}{output}: cannot create {parent} ({ancestor} is a file, not a folder)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ScaleCertError(f"{flag}{output}: cannot write there ({ancestor} is not writable)")


def check_output(output: str, force: bool, flag: str = "") -> None:
    """Refuse, before any work, a bundle destination the output rule does not allow."""
    if not output or not output.strip():
        raise ScaleCertError(f"{flag}: empty output path")
    real = os.path.realpath(output)
    cwd = os.path.realpath(os.getcwd())
    if real == cwd or cwd.startswith(real.rstrip(os.sep) + os.sep) or real == os.sep:
        raise ScaleCertError(f"{flag}{output}: is the current folder or one above it; name a new bundle folder")
    if os.path.lexists(output):
        if not is_bundle(output) or os.path.islink(output):
            raise ScaleCertError(f"{flag}{output}: already exists and is {_what_is_there(output)}; "
                                 "refusing to replace it (--force replaces only a scalecert bundle)")
        if not force:
            raise ScaleCertError(f"{flag}{output}: already exists (pass --force to replace it)")
    _writable_parent(output, flag)


def check_output_file(output: str, force: bool, flag: str = "") -> None:
    """Refuse, before any work, an output file (report, plot, checkpoint) the rule does not allow."""
    if not output or not output.strip():
        raise ScaleCertError(f"{flag}: empty output path")
    if os.path.isdir(output):
        raise ScaleCertError(f"{flag}{output}: is a folder, expected a file name")
    if os.path.lexists(output):
        if not os.path.isfile(output) or os.path.islink(output):
            raise ScaleCertError(f"{flag}{output}: already exists and is not a plain file; refusing to replace it")
        if not force:
            raise ScaleCertError(f"{flag}{output}: already exists (pass --force to replace it)")
        if not os.access(output, os.W_OK):
            raise ScaleCertError(f"{flag}{output}: exists and is not writable")
    _writable_parent(output, flag)


def write_file_atomic(path: str, write) -> None:
    """`write(tmp_path)` then rename over `path`; the temporary file never outlives the call."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".scalecert-{os.getpid()}-{os.path.basename(path)}")
    try:
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise ScaleCertError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def replace_dir(work: str, output: str) -> None:
    """Move a finished bundle directory into place, replacing an old bundle (never half-written).
    Anything at `output` that is not a scalecert bundle is refused and left as it is."""
    os.chmod(work, 0o755)
    if not os.path.lexists(output):
        os.rename(work, output)
        return
    if not is_bundle(output) or os.path.islink(output):
        raise ScaleCertError(f"{output}: already exists and is {_what_is_there(output)}; refusing to replace it")
    parent = os.path.dirname(os.path.abspath(output))
    old = tempfile.mkdtemp(prefix=".scalecert-old-", dir=parent)
    os.rmdir(old)  # a fresh name; the old bundle is renamed to it
    os.rename(output, old)
    try:
        os.rename(work, output)
    except BaseException:
        os.rename(old, output)  # put the old bundle back
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staging(output: str, prefix: str = ".scalecert-"):
    """A fresh directory beside `output` to write a bundle into: when the block ends normally it
    replaces `output` (replace_dir); when it raises, it is removed and `output` is untouched."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    work = tempfile.mkdtemp(prefix=prefix, dir=os.path.dirname(os.path.abspath(output)))
    try:
        yield work
        replace_dir(work, output)
    finally:
        if os.path.exists(work):
            shutil.rmtree(work, ignore_errors=True)
