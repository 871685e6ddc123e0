"""Per-image results of a whole data folder (`certify DIR --out FILE`): one row per image, written
so that no run ever leaves a half-written output and a rerun resumes where the last one stopped.

A row is `certify --json`'s object plus `path` (the image's path relative to the data folder: the
row's key) and `true_label` when the folder is labelled; an image that could not be certified is a
row `{image, path, [true_label,] status: "error", error}`, counted as done.

- `.jsonl`: rows are appended one line at a time and flushed, so a run killed at any moment leaves
  every finished row intact; at most its last line is cut short, and the next run drops that torn
  line before it appends (it was never a finished row).
- `.parquet` (pyarrow): a Parquet file cannot be appended to, so rows go to a `.jsonl` journal
  beside it (`.NAME.parquet.partial.jsonl`, the rule above) and the Parquet file is written once at
  the end, atomically (old rows + new, sorted by path); the journal is then removed. A rerun after
  a killed run reads both.

Rows are deduplicated by `path` as they arrive: the first row for an image wins, so a retried
worker (docs/cluster.md) can never put an image in the output twice.
"""
from __future__ import annotations

import json
import os

from scalecert.errors import ScaleCertError

FORMATS = (".jsonl", ".parquet")


def output_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ScaleCertError(f"--out {path}: expected a .jsonl or .parquet file name")
    return ext


def result_row(result_json: dict, rel: str, true_label) -> dict:
    row = {**result_json, "path": rel}
    if true_label is not None:
        row["true_label"] = int(true_label)
    return row


def error_row(image: str, rel: str, true_label, error: str) -> dict:
    row = {"image": image, "path": rel, "status": "error", "error": error}
    if true_label is not None:
        row["true_label"] = int(true_label)
    return row


def _require_pyarrow(path: str):
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ScaleCertError(f"--out {path}: Parquet output needs pyarrow: pip install 'scalecert[ray]' "
                             "(or write .jsonl)") from None
    return pyarrow


def _read_jsonl(path: str) -> tuple[list[dict], int]:
    """Finished rows of a journal, and the byte length they end at (a torn last line is not one)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ScaleCertError(f"--out {path}: cannot read it to resume ({exc.strerror or exc})") from None
    complete, newline, _torn = data.rpartition(b"\n")  # after the last newline: a killed run's torn line
    rows = []
    for number, line in enumerate(complete.split(b"\n") if newline else [], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                raise ValueError
        except ValueError:
            raise ScaleCertError(f"--out {path}:{number}: not a scalecert results row; refusing to append to it "
                                 "(name a new file)") from None
        rows.append(row)
    return rows, len(complete) + len(newline)


class ResultsFile:
    """The output of one `certify DIR --out FILE` run: `done` (path -> row) from earlier runs,
    `add(row)` (False for an image already there), `close()` (Parquet: the atomic final write)."""

    def __init__(self, path: str):
        self.path, self.format = path, output_format(path)
        if os.path.isdir(path):
            raise ScaleCertError(f"--out {path}: is a folder, expected a .jsonl or .parquet file name")
        if os.path.lexists(path) and (not os.path.isfile(path) or os.path.islink(path)):
            raise ScaleCertError(f"--out {path}: already exists and is not a plain file; refusing to write to it")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise ScaleCertError(f"--out {path}: cannot write there ({parent} is not a writable folder)")
        self.journal = path if self.format == ".jsonl" else os.path.join(
            parent, f".{os.path.basename(path)}.partial.jsonl")
        earlier: list[dict] = []
        if self.format == ".parquet":
            pa = _require_pyarrow(path)
            if os.path.exists(path):
                try:
                    earlier = pa.parquet.read_table(path).to_pylist()
                except (OSError, pa.ArrowException) as exc:
                    raise ScaleCertError(f"--out {path}: not a readable Parquet file ({str(exc)[:80]}); "
                                         "refusing to replace it (name a new file)") from None
                if earlier and "path" not in earlier[0]:
                    raise ScaleCertError(f"--out {path}: a Parquet file without a path column is no scalecert "
                                         "results file; refusing to replace it")
        good = 0
        if os.path.exists(self.journal):
            journal_rows, good = _read_jsonl(self.journal)
            earlier += journal_rows
        self.done: dict[str, dict] = {}
        for row in earlier:
            self.done.setdefault(row["path"], row)
        self.resumed = len(self.done)
        self.added, self._good, self._file = 0, good, None

    def _open(self):
        """The journal, opened on the first new row (a run that adds nothing leaves no file)."""
        try:
            if os.path.exists(self.journal) and os.path.getsize(self.journal) != self._good:
                os.truncate(self.journal, self._good)  # drop the torn line of a killed run before appending
            return open(self.journal, "a", encoding="utf-8")
        except OSError as exc:
            raise ScaleCertError(f"--out {self.journal}: cannot write ({exc.strerror or exc})") from None

    def add(self, row: dict) -> bool:
        if row["path"] in self.done:
            return False
        if self._file is None:
            self._file = self._open()
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self.done[row["path"]] = row
        self.added += 1
        return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.format == ".parquet" and os.path.exists(self.journal):
            from scalecert.bundle.staging import write_file_atomic

            pa = _require_pyarrow(self.path)
            rows = [self.done[key] for key in sorted(self.done)]
            columns = list(dict.fromkeys(key for row in rows for key in row))
            table = pa.table({key: [row.get(key) for row in rows] for key in columns})
            write_file_atomic(self.path, lambda tmp: pa.parquet.write_table(table, tmp))
            os.remove(self.journal)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        elif self._file is not None:
            self._file.close()  # the journal keeps every finished row; the next run resumes from it
