"""Certified recovery at run time (no torch): double masking over the bundle's window family
(docs/design.md §10; the decisions are core/recovery.py's pure functions).

Per image: the prefix once; then the *fast path* a device runs: the first round over every window
of the family (one suffix row per distinct non-empty window intersection, exactly as detection
dedupes them); if every window agrees, that label; otherwise, for each first-round disagreer in
family order, a second round over the pairs (disagreer, j) for every window j (deduplicated the
same way, stopped at the first pair that disagrees), until a disagreer's second round is
unanimous (its label) or none is (the first-round majority). With certification (evaluation,
`--certify-recovery`): every pair of windows i <= j, deduplicated exactly, must predict the
recovered label with a margin of at least the engine's numeric margin delta.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace

import numpy as np

from scalecert.core import decision, geometry, recovery
from scalecert.errors import ScaleCertError
from scalecert.runtime.certifier import Certifier
from scalecert.runtime.results import SourceReport

EMPTY_ROW = np.zeros((1, 4), np.int64)  # zero-area rectangle: the un-occluded features


def check_recoverable(bundle) -> None:
    """One line when a bundle's suffix cannot zero a pair of windows in one row."""
    if not bundle.suffix_takes_pairs:
        raise ScaleCertError(f"{bundle.path}: exported before certified recovery (its suffix takes one window per row); "
                             "re-export it with scalecert-export to use --mode recover")


def recovery_options(bundle_dir: str, mode: str | None, certify_recovery: bool, early_exit: bool = False,
                     png_dir: str | None = None, threshold: float | None = None) -> str:
    """The mode `scalecert certify` runs in (default: the bundle's), or one line saying which
    options do not go with it; read from the manifest before any session loads."""
    from scalecert.bundle import Bundle

    opened = Bundle.open(bundle_dir, verify=False)
    why = "--mode detect was given" if mode else "this bundle's default mode is detect"
    mode = mode or opened.default_mode
    if mode == "detect":
        if certify_recovery:
            raise ScaleCertError(f"--certify-recovery needs --mode recover ({why})")
        return mode
    for flag, given in (("--early-exit", early_exit), ("--png-dir", png_dir), ("--threshold", threshold is not None)):
        if given:
            raise ScaleCertError(f"{flag} belongs to --mode detect; recovery has no alert to exit on, draw or threshold")
    check_recoverable(opened)
    return mode


@dataclass(frozen=True)
class RecoveryResult:
    image: str
    label: int
    class_name: str | None
    case: str  # "agreed" | "disagreer" | "majority" (core/recovery.py)
    disagreers: list  # first-round disagreeing windows, feature-space [y0, x0, y1, x1)
    windows_total: int
    windows_evaluated: int  # suffix rows of the first round (distinct windows, plus the base when needed)
    pairs_evaluated: int  # suffix rows of the second rounds (fast path)
    latency_ms: float
    prefix_ms: float
    suffix_ms: float  # the fast path's suffix time
    kept_fraction: float
    certified: bool | None = None  # None: certification was not asked for
    pairs_total: int = 0  # pairs i <= j of the family: what certification covers
    certification_pairs_evaluated: int | None = None  # distinct pair rows run for certification
    certify_ms: float | None = None  # time of the certification on top of the fast path
    source: SourceReport | None = None  # the certificate in source pixels (docs/design.md §8)
    # for evaluation
    first_labels: np.ndarray | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        out = {"image": self.image, "mode": "recover", "label": self.label, "class": self.class_name}
        if self.certified is not None:
            out["certified"] = bool(self.certified)
        out.update({"case": self.case, "disagreers": list(self.disagreers), "windows_total": self.windows_total,
                    "windows_evaluated": self.windows_evaluated, "pairs_evaluated": self.pairs_evaluated})
        if self.certified is not None:
            out.update({"pairs_total": self.pairs_total,
                        "certification_pairs_evaluated": self.certification_pairs_evaluated,
                        "certify_ms": round(self.certify_ms, 3)})
        out.update({"latency_ms": round(self.latency_ms, 3), "prefix_ms": round(self.prefix_ms, 3),
                    "suffix_ms": round(self.suffix_ms, 3), "kept_fraction": self.kept_fraction})
        if self.source is not None:
            out["source"] = self.source.to_json()
        return out


class _Rows:
    """One image's evaluations through a row predictor `predict(rows) -> logits` (rows of one or two
    rectangles, (k, 4) or (k, 2, 4)) in batches, and the un-occluded prediction at most once."""

    def __init__(self, predict, batch: int):
        self.predict, self.batch = predict, batch
        self.base = None
        self.rows_run = 0

    def base_prediction(self) -> tuple[int, float]:
        if self.base is None:
            labels, margins = decision.top2_margin(self.predict(EMPTY_ROW))
            self.base = int(labels[0]), float(margins[0])
            self.rows_run += 1
        return self.base

    def run(self, rows: np.ndarray, stop_unless=None) -> tuple[np.ndarray, np.ndarray, int]:
        """(labels, margins, rows run) of rows (k, 4) or (k, 2, 4), in batches; with `stop_unless`
        (a label) the batches stop after the first one holding another label, and the rows not run
        keep label -1 and margin -inf (never agreeing)."""
        labels = np.full(len(rows), -1, np.int64)
        margins = np.full(len(rows), -np.inf, np.float32)
        batch, done = self.batch, 0
        for lo in range(0, len(rows), batch):
            got_labels, got_margins = decision.top2_margin(self.predict(rows[lo:lo + batch]))
            labels[lo:lo + len(got_labels)], margins[lo:lo + len(got_labels)] = got_labels, got_margins
            done = lo + len(got_labels)
            if stop_unless is not None and np.any(got_labels != stop_unless):
                break
        self.rows_run += done
        return labels, margins, done

    def expanded(self, distinct: geometry.DistinctWindows, stop_unless=None) -> tuple[np.ndarray, np.ndarray, int]:
        """Per member (window or pair) labels and margins from one evaluation per distinct
        intersection; members whose intersection is empty take the base prediction."""
        group = distinct.group_of_window
        labels, margins, done = self.run(distinct.representatives, stop_unless)
        if (group < 0).any():
            base_label, base_margin = self.base_prediction()
        else:
            base_label, base_margin = -1, -np.inf  # unused
        return (decision.expand_groups(group, labels, base_label),
                decision.expand_groups(group, margins, np.float32(base_margin)), done)


@dataclass(frozen=True)
class Outcome:
    """What the procedure decided for one image (rows are suffix rows actually run, after dedupe)."""

    verdict: recovery.Recovery
    first: np.ndarray  # first-round label per window
    first_rows: int
    second_rows: int
    certified: bool | None  # None: certification not asked
    certification_rows: int | None
    fast_ms: float  # the fast path's time (rows only: the caller ran the prefix, if any)
    certify_ms: float | None


class PairRecovery:
    """Double masking over a window family with any row predictor (docs/design.md §10): the one
    recovery procedure. The runtime's Recoverer runs it on a bundle's suffix; `scalecert tune`
    validates with a torch predictor, and the PatchCleanser baseline with pixel masks (windows in
    pixel space, every position kept). Rows are deduplicated exactly (core/geometry.py::Dedupe);
    `delta`: a prediction certifies only with a margin above it (core/decision.py)."""

    def __init__(self, windows: np.ndarray, feature_hw, filled: bool = False, delta: float = 0.0, batch: int = 64):
        self.windows, self.feature_hw, self.filled = windows, tuple(feature_hw), filled
        self.masks = geometry.window_masks(windows, self.feature_hw)
        self.delta, self.batch = float(delta), max(1, int(batch))
        self.pairs = geometry.pair_indices(len(windows))

    @property
    def dedupe(self) -> geometry.Dedupe:
        """Rebuilt whenever `windows` or `masks` is replaced (the negative controls replace them)."""
        cached = self.__dict__.get("_dedupe")
        if cached is None or cached.windows is not self.windows or cached.masks is not self.masks:
            cached = self.__dict__["_dedupe"] = geometry.Dedupe(self.windows, self.masks, self.filled)
        return cached

    def run(self, predict, gate: np.ndarray, certify: bool = False) -> Outcome:
        """The fast path a device runs, then (with `certify`) every pair i <= j. `predict(rows) ->
        logits` for rows (k, 4) or (k, 2, 4) of rectangles of the family; `gate`: the kept positions."""
        rows = _Rows(predict, self.batch)
        start = time.perf_counter()
        verdict, first, first_rows, second_rows = self.fast_path(rows, gate)
        fast_ms = (time.perf_counter() - start) * 1e3
        certified = certification_rows = certify_ms = None
        if certify:
            start = time.perf_counter()
            certified, certification_rows = self.certify_label(rows, gate, verdict.label)
            certify_ms = (time.perf_counter() - start) * 1e3
        return Outcome(verdict, first, first_rows, second_rows, certified, certification_rows, fast_ms, certify_ms)

    # -- the two rounds ----------------------------------------------------------------------
    def first_round(self, rows: _Rows, gate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        distinct = self.dedupe.windows_for(gate)
        labels, margins, _ = rows.expanded(distinct)
        return labels, margins

    def second_round(self, rows: _Rows, gate: np.ndarray, i: int, label: int) -> np.ndarray:
        """Labels of the pairs (i, j) for every window j, stopped at the first batch that holds a
        label other than `label` (window i's first-round label); rows not run are -1."""
        pairs = np.stack([np.full(len(self.windows), i, np.int64), np.arange(len(self.windows))], axis=1)
        distinct = self.dedupe.pairs_for(gate, pairs)
        labels, _, _ = rows.expanded(distinct, stop_unless=label)
        return labels

    def fast_path(self, rows: _Rows, gate: np.ndarray) -> tuple[recovery.Recovery, np.ndarray, int, int]:
        """(decision, first-round labels, first-round rows run, second-round rows run)."""
        first, _ = self.first_round(rows, gate)
        first_rows = rows.rows_run
        _, disagreers = recovery.first_round_disagreers(first)
        second = {}
        for i in disagreers:
            second[int(i)] = row = self.second_round(rows, gate, int(i), int(first[i]))
            if np.all(row == first[i]):
                break  # the first unanimous disagreer decides (core/recovery.py::double_masking)
        return recovery.double_masking(first, second), first, first_rows, rows.rows_run - first_rows

    def certify_label(self, rows: _Rows, gate: np.ndarray, label: int) -> tuple[bool, int]:
        """Every pair i <= j predicts `label` with margin > delta (rows run, after dedupe)."""
        before = rows.rows_run
        distinct = self.dedupe.pairs_for(gate, self.pairs)
        labels, margins, _ = rows.expanded(distinct)
        ok = recovery.certified_recovery(labels, label, thin=margins <= self.delta)
        return ok, rows.rows_run - before


class Recoverer(PairRecovery):
    """Certified recovery against one bundle, precision and backend: `recover(image) ->
    RecoveryResult`. It runs on a Certifier (same pipeline, preprocessing, window family and
    numeric margin); `certify=True` adds the certification over all pairs."""

    mode = "recover"

    def __init__(self, certifier: Certifier, certify: bool = False):
        check_recoverable(certifier.bundle)
        super().__init__(certifier.windows, certifier.feature_hw, certifier.bundle.window_filled, certifier.delta,
                         certifier.batch)
        self.certifier, self.certify_pairs = certifier, bool(certify)
        self.bundle, self.manifest, self.backend = certifier.bundle, certifier.manifest, certifier.backend

    @classmethod
    def load(cls, bundle_dir: str, backend: str = "auto", batch: int = 64, threads: int | None = None,
             precision: str = "fp32", certify: bool = False) -> "Recoverer":
        from scalecert.bundle import Bundle

        check_recoverable(Bundle.open(bundle_dir, verify=False))  # before the sessions load
        return cls(Certifier.load(bundle_dir, backend, precision, batch=batch, threads=threads), certify)

    def __enter__(self):
        self.certifier.__enter__()
        return self

    def __exit__(self, *exc):
        self.certifier.close()

    def close(self) -> None:
        self.certifier.close()

    def prepare(self, image) -> np.ndarray:
        return self.certifier.prepare(image)

    def prepare_source(self, image):
        return self.certifier.prepare_source(image)

    def source_report(self, *args, **kwargs) -> SourceReport:
        return self.certifier.source_report(*args, **kwargs)

    # -- images ------------------------------------------------------------------------------
    def recover(self, image, name: str | None = None, certify: bool | None = None,
                source: SourceReport | dict | None = None) -> RecoveryResult:
        """One image (path or RGB uint8 array of any size). `source`: the source-space report to
        attach (default: from the image's own size)."""
        start = time.perf_counter()
        pixels, source_hw = self.prepare_source(image)
        features, gate = self.certifier.features(pixels)
        name = name or (os.fspath(image) if isinstance(image, (str, os.PathLike)) else "<array>")
        result = self._recover_features(self.certifier.pipeline.select(features, 0), gate, start, time.perf_counter(),
                                        name, self.certify_pairs if certify is None else certify)
        if source is None:
            source = self.certifier.source_for(image, source_hw)
        elif isinstance(source, dict):
            source = SourceReport.from_json(source)
        return replace(result, source=source)

    def certify_batch(self, pixels: np.ndarray, names=None, prefix_batch: int = 64,
                      certify: bool | None = None) -> list[RecoveryResult]:
        """Many uint8 network-size images, the prefix batched over images (as Certifier.certify_batch)."""
        certify = self.certify_pairs if certify is None else certify
        results, pipeline = [], self.certifier.pipeline
        for lo in range(0, len(pixels), prefix_batch):
            chunk = pixels[lo:lo + prefix_batch]
            start = time.perf_counter()
            features, gate = self.certifier.features(chunk)
            share = (time.perf_counter() - start) / len(chunk)
            for i in range(len(chunk)):
                t0 = time.perf_counter()
                name = names[lo + i] if names is not None else f"<array {lo + i}>"
                results.append(self._recover_features(pipeline.select(features, i), gate[i:i + 1], t0 - share, t0,
                                                      name, certify))
        return results

    def _recover_features(self, features, gate, start, after_prefix, name, certify) -> RecoveryResult:
        outcome = self.run(lambda rows: self.certifier.window_logits(features, rows), gate[0], certify)
        verdict, classes = outcome.verdict, self.certifier.classes
        suffix_ms = (time.perf_counter() - after_prefix) * 1e3 - (outcome.certify_ms or 0.0)
        return RecoveryResult(
            image=name, label=verdict.label, class_name=classes[verdict.label] if classes else None,
            case=verdict.case, disagreers=self.windows[verdict.disagreers].tolist(),
            windows_total=len(self.windows), windows_evaluated=int(outcome.first_rows),
            pairs_evaluated=int(outcome.second_rows), latency_ms=(after_prefix - start) * 1e3 + suffix_ms,
            prefix_ms=(after_prefix - start) * 1e3, suffix_ms=suffix_ms, kept_fraction=float(gate.mean()),
            certified=outcome.certified, pairs_total=len(self.pairs),
            certification_pairs_evaluated=outcome.certification_rows, certify_ms=outcome.certify_ms,
            first_labels=outcome.first)
