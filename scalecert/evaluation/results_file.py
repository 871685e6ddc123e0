"""Per-image results of a whole data folder (`certify BUNDLE --data DIR -o FILE`): one row per image, written
so that no run ever leaves a half-written output and a rerun resumes where the last one stopped.

A row is `certify --json`'s object plus `path` (the image's path relative to the data folder: the
row's key), `true_label` when the folder is labelled, `bundle_sha256` (run_sha256: the bundle and
the settings that decide a result) and `file_sha256` (the image file's bytes, as certified); an
image that could not be certified is a row `{image, path, [true_label,] status: "error", error,
bundle_sha256, file_sha256}`, counted as done (file_sha256 is null where no bytes were read).

A rerun reuses a row only when its path, bundle_sha256 and file_sha256 all match the image as it
is now (a row without them, from an older scalecert, never does); any other image is certified
again and its new row replaces the old one.

- `.jsonl`: rows are appended one line at a time and flushed, so a run killed at any moment leaves
  every finished row intact; at most its last line is cut short, and the next run drops that torn
  line before it appends (it was never a finished row). A replacing row is appended too, and the
  last row for a path is the one that counts; a run that finishes rewrites the file once,
  atomically, without the rows it replaced (kept rows stay in order, byte for byte).
- `.parquet` (pyarrow): a Parquet file cannot be appended to, so rows go to a `.jsonl` journal
  beside it (`.NAME.parquet.partial.jsonl`, the rule above) and the Parquet file is written once at
  the end, atomically (old rows + new, the new replacing, sorted by path); the journal is then
  removed. A rerun after a killed run reads both, the journal's rows last.

Within one run the first row for an image wins, so a retried worker (docs/cluster.md) can never put
an image in the output twice.
"""
from __future__ import annotations

import hashlib
import json
import os

from scalecert.errors import OptionError, ScaleCertError

FORMATS = (".jsonl", ".parquet")


def output_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise OptionError(f"output {path}: expected a .jsonl or .parquet file name")
    return ext


def run_sha256(manifest: dict, precision: str, backend: str, threshold: float, early_exit: bool, batch: int) -> str:
    """A row's `bundle_sha256`: what decides its result besides the image. The manifest (it holds
    every bundle file's sha256, the windows, the measured margins and the default threshold), the
    precision and backend (the margin delta of the decision and the numbers they compute), the
    threshold T in force, early_exit, and with it batch (early exit stops at a batch's end, so
    windows_evaluated depends on it). Not threads, progress or output options: no row changes with
    them. The parsed manifest is hashed, not the file: it is what the Certifier read."""
    settings = {"precision": precision, "backend": backend, "threshold": float(threshold),
                "early_exit": bool(early_exit), "batch": max(1, int(batch)) if early_exit else None}
    text = json.dumps({"manifest": manifest, "settings": settings}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def certifier_sha256(cert) -> str:
    """run_sha256 of a Certifier as it was opened (on the worker that certifies the rows)."""
    return run_sha256(cert.manifest, cert.precision, cert.backend, cert.threshold, cert.early_exit, cert.batch)


def file_sha256(path: str) -> str | None:
    """sha256 of the file's bytes; None if it cannot be read now (its row is then never reused)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def _keyed(row: dict, rel: str, true_label, digest: str | None, data: bytes | None) -> dict:
    row = {**row, "path": rel}
    if true_label is not None:
        row["true_label"] = int(true_label)
    row["bundle_sha256"] = digest
    row["file_sha256"] = hashlib.sha256(data).hexdigest() if data is not None else None
    return row


def result_row(result_json: dict, rel: str, true_label, digest: str, data: bytes) -> dict:
    """`digest`: the Certifier's run_sha256; `data`: the bytes it certified (file_sha256)."""
    return _keyed(result_json, rel, true_label, digest, data)


def error_row(image: str, rel: str, true_label, error: str, digest: str | None = None,
              data: bytes | None = None) -> dict:
    """Keyed like any row, so a fixed file is certified again; without `data` (nothing was read,
    or no worker answered) it is retried on every rerun."""
    return _keyed({"image": image, "status": "error", "error": error}, rel, true_label, digest, data)


def certify_item(cert, digest: str, image: str, rel: str, true_label, data: bytes | None = None) -> dict:
    """One image -> its results row, the same as `certify IMAGE --json` gives (source report
    included); an image that cannot be certified is an error row. `digest`: the Certifier's
    run_sha256. The file is read once (`data`: a Ray worker's bytes), so the row's file_sha256 is
    that of the bytes certified."""
    from scalecert.runtime import source as source_space
    from scalecert.runtime.images import load_source, read_file

    try:
        data = read_file(image) if data is None else data
        pixels, source_hw = load_source(image, cert.input_spec, data)
        wide = source_space.describe(image, data).global_scale
        result = cert.certify(pixels, name=image, source=cert.source_report(source_hw, global_scale=wide))
    except ScaleCertError as exc:
        return error_row(image, rel, true_label, str(exc), digest, data)
    return result_row(result.to_json(), rel, true_label, digest, data)


def _require_pyarrow(path: str):
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise OptionError(f"output {path}: Parquet output needs pyarrow: pip install 'scalecert[ray]' "
                             "(or write .jsonl)") from None
    return pyarrow


def _read_jsonl(path: str) -> tuple[list[dict], int]:
    """Finished rows of a journal, and the byte length they end at (a torn last line is not one)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise OptionError(f"output {path}: cannot read it to resume ({exc.strerror or exc})") from None
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
            raise OptionError(f"output {path}:{number}: not a scalecert results row; refusing to append to it "
                                 "(name a new file)") from None
        rows.append(row)
    return rows, len(complete) + len(newline)


class ResultsFile:
    """The output of one `certify BUNDLE --data DIR -o FILE` run: `done` (path -> row: earlier runs' rows, the
    last per path, then this run's), `add(row)` (False for an image this run already wrote),
    `replaced` (rows of this run that replace an earlier one), `close()` (the atomic final write)."""

    def __init__(self, path: str):
        self.path, self.format = path, output_format(path)
        if os.path.isdir(path):
            raise OptionError(f"output {path}: is a folder, expected a .jsonl or .parquet file name")
        if os.path.lexists(path) and (not os.path.isfile(path) or os.path.islink(path)):
            raise OptionError(f"output {path}: already exists and is not a plain file; refusing to write to it")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise OptionError(f"output {path}: cannot write there ({parent} is not a writable folder)")
        self.journal = path if self.format == ".jsonl" else os.path.join(
            parent, f".{os.path.basename(path)}.partial.jsonl")
        earlier: list[dict] = []
        if self.format == ".parquet":
            pa = _require_pyarrow(path)
            if os.path.exists(path):
                try:
                    earlier = pa.parquet.read_table(path).to_pylist()
                except (OSError, pa.ArrowException) as exc:
                    raise OptionError(f"output {path}: not a readable Parquet file ({str(exc)[:80]}); "
                                         "refusing to replace it (name a new file)") from None
                if earlier and "path" not in earlier[0]:
                    raise OptionError(f"output {path}: a Parquet file without a path column is no scalecert "
                                         "results file; refusing to replace it")
        good, journal_rows = 0, []
        if os.path.exists(self.journal):
            journal_rows, good = _read_jsonl(self.journal)
        self.done: dict[str, dict] = {}
        for row in earlier + journal_rows:
            self.done[row["path"]] = row  # the last row for a path is the one that counts
        self.superseded = len(earlier) + len(journal_rows) - len(self.done)  # replaced rows still in the journal
        self.fresh: set[str] = set()
        self.added, self.replaced, self._good, self._file = 0, 0, good, None

    def _open(self):
        """The journal, opened on the first new row (a run that adds nothing leaves no file)."""
        try:
            if os.path.exists(self.journal) and os.path.getsize(self.journal) != self._good:
                os.truncate(self.journal, self._good)  # drop the torn line of a killed run before appending
            return open(self.journal, "a", encoding="utf-8")
        except OSError as exc:
            raise ScaleCertError(f"{self.journal}: cannot write ({exc.strerror or exc})") from None

    def add(self, row: dict) -> bool:
        """Append the row; a row for an image of an earlier run replaces that run's row."""
        key = row["path"]
        if key in self.fresh:
            return False
        if self._file is None:
            self._file = self._open()
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if key in self.done:
            self.replaced += 1
            self.superseded += 1
        self.done[key] = row
        self.fresh.add(key)
        self.added += 1
        return True

    def _compact(self) -> None:
        """Rewrite the .jsonl without the rows later ones replaced (once, atomically); the rows kept
        stay in order, byte for byte."""
        from scalecert.bundle.staging import write_file_atomic

        with open(self.path, "rb") as f:
            complete = f.read().rpartition(b"\n")[0]  # a torn last line (nothing appended) goes too
        lines = [line for line in complete.split(b"\n") if line.strip()]
        last = {json.loads(line)["path"]: i for i, line in enumerate(lines)}
        kept = b"".join(lines[i] + b"\n" for i in sorted(last.values()))

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(kept)

        write_file_atomic(self.path, write)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.format == ".jsonl" and self.superseded:
            self._compact()
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
