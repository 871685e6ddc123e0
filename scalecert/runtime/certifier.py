"""Window-batched certification of images against a bundle (no torch)."""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field, fields

import numpy as np

from scalecert.bundle import Bundle
from scalecert.core import decision, geometry
from scalecert.errors import ScaleCertError
from scalecert.runtime import pipelines
from scalecert.runtime import source as source_space
from scalecert.runtime.images import load_source, normalize, resize_to_input
from scalecert.runtime.pipelines.base import Pipeline

EMPTY_WINDOW = np.zeros((1, 4), np.int64)  # zero-area rectangle: the un-occluded features


@dataclass
class Result:
    image: str
    status: str  # "certified" | "alert" | "uncertified" (core/decision.py)
    label: int
    class_name: str | None
    windows_total: int
    windows_evaluated: int
    latency_ms: float
    prefix_ms: float
    suffix_ms: float
    kept_fraction: float
    base_margin: float
    confidence: float = 1.0  # softmax probability of the label on the un-occluded features
    threshold: float = 0.0  # the confidence threshold T of the decision
    alert_windows: list = field(default_factory=list)  # feature-space [y0, x0, y1, x1)
    # per window of the family, for evaluation (bench re-decides at other thresholds from these)
    window_labels: np.ndarray | None = None
    window_margins: np.ndarray | None = None
    window_logconf: np.ndarray | None = None
    base_logconf: float = 0.0
    gate: np.ndarray | None = None
    source: dict | None = None  # the certificate in source pixels (runtime/source.py::report)

    EVALUATION_ONLY = ("window_labels", "window_margins", "window_logconf", "base_logconf", "gate", "class_name")

    def to_json(self) -> dict:
        # not asdict: it would deep-copy the per-window arrays of every image only to drop them
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.EVALUATION_ONLY}
        out["alert_windows"] = list(self.alert_windows)
        out["class"] = self.class_name
        out["latency_ms"] = round(self.latency_ms, 3)
        out["prefix_ms"], out["suffix_ms"] = round(self.prefix_ms, 3), round(self.suffix_ms, 3)
        out["base_margin"] = float(self.base_margin)
        out["confidence"] = round(self.confidence, 6)
        if self.status != "alert":
            out.pop("alert_windows")
        if out["source"] is None:
            out.pop("source")
        return out


class Certifier:
    """Certifies images against one bundle, precision and backend (no torch).

    `Certifier.load(bundle_dir).certify(path_or_uint8_array) -> Result`. The pipeline is activated
    on `with`/`__enter__` or on first use, and released by `close()` / leaving the block. For each
    image: the prefix once, then the suffix on the un-occluded features and on one representative
    of every distinct non-empty window intersection (docs/design.md §2, §3.5), in batches of
    `batch`; the decision is core.decision.decide over the expanded window-prediction map.
    `early_exit` stops at the first batch with a disagreeing window (the alert is then certain).
    `threshold` is the confidence threshold T of the alert operating point (docs/design.md §7;
    default: the bundle's)."""

    def __init__(self, bundle: Bundle, backend: str = "ort-cpu", precision: str = "fp32",
                 batch: int = 64, early_exit: bool = False, threads=None, threshold: float | None = None):
        self.bundle, self.bundle_dir, self.manifest = bundle, bundle.path, bundle.manifest
        self.backend, self.precision = backend, precision
        self.batch, self.early_exit = max(1, int(batch)), early_exit
        self.input_spec = bundle.input_spec
        self.feature_hw = bundle.feature_hw
        self.windows = bundle.windows()
        self.masks = geometry.window_masks(self.windows, self.feature_hw)
        delta = bundle.margin(backend, precision)
        if delta is None:
            raise ScaleCertError(f"{bundle.path}: no numeric margin measured for {backend} at {precision}")
        self.delta = delta
        self.threshold = bundle.default_threshold if threshold is None else decision.check_threshold(threshold)
        self.classes = bundle.classes
        self._source_reports: dict = {}
        self._pipeline = pipelines.open_pipeline(bundle, backend, precision, threads)

    @classmethod
    def load(cls, bundle_dir: str, backend: str = "auto", batch: int = 64, early_exit: bool = False,
             threads: int | None = None, precision: str = "fp32", threshold: float | None = None) -> "Certifier":
        bundle = Bundle.open(bundle_dir, verify=True)
        bundle.files(precision)
        return cls(bundle, pipelines.pick(backend, precision, bundle), precision, batch, early_exit, threads, threshold)

    dedupe = property(geometry.Dedupe.of)

    @property
    def pipeline(self) -> Pipeline:
        self._pipeline.activate()  # first use; a no-op once active
        return self._pipeline

    def close(self) -> None:
        self._pipeline.deactivate()

    def __enter__(self):
        self._pipeline.activate()
        return self

    def __exit__(self, *exc):
        self.close()

    # -- inputs ---------------------------------------------------------------------------
    def prepare(self, image) -> np.ndarray:
        """Path or uint8 array -> uint8 HxWx3 at network size (resized per the manifest if needed)."""
        return self.prepare_source(image)[0]

    def prepare_source(self, image) -> tuple[np.ndarray, tuple[int, int]]:
        """(network-size uint8 image, the source's (height, width)): a network-size array is used
        as it is (its source is itself); a path or another size goes through resize_to_input."""
        if isinstance(image, (str, os.PathLike)):
            return load_source(os.fspath(image), self.input_spec)
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ScaleCertError(f"expected a uint8 HxWx3 array, got {array.dtype} {array.shape}")
        _, h, w = self.input_spec["input_size"]
        if array.shape[:2] != (h, w):
            from PIL import Image

            return resize_to_input(Image.fromarray(array), self.input_spec), array.shape[:2]
        return array, (h, w)

    def source_report(self, source_hw, requested_hw=None, global_scale: bool = False) -> dict:
        """The certificate in source pixels at this source size (docs/design.md §8). A pure function
        of its arguments, kept per size: a camera or a dataset repeats a few sizes, and computing it
        (about 1.5 ms) was the largest cost of certify() outside the sessions."""
        key = (tuple(source_hw), None if requested_hw is None else tuple(requested_hw), bool(global_scale))
        if key not in self._source_reports:
            if len(self._source_reports) >= 1024:
                self._source_reports.clear()
            self._source_reports[key] = source_space.report(source_hw, self.input_spec, self.bundle.patch_hw,
                                                            requested_hw, global_scale)
        return copy.deepcopy(self._source_reports[key])

    # -- inference ------------------------------------------------------------------------
    def features(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.pipeline.prefix(normalize(pixels, self.input_spec))

    def window_logits(self, features: np.ndarray, windows: np.ndarray) -> np.ndarray:
        return self.pipeline.suffix(features, windows)

    def certify(self, image, name: str | None = None, source: dict | None = None) -> Result:
        """`source`: the source-space report to attach (default: from the image's own size)."""
        start = time.perf_counter()
        pixels, source_hw = self.prepare_source(image)
        features, gate = self.features(pixels)
        result = self._certify_features(self.pipeline.select(features, 0), gate, start, time.perf_counter(), name or (
            os.fspath(image) if isinstance(image, (str, os.PathLike)) else "<array>"))
        if source is None:
            wide = isinstance(image, (str, os.PathLike)) and source_space.describe(os.fspath(image)).global_scale
            source = self.source_report(source_hw, global_scale=wide)
        result.source = source
        return result

    def certify_batch(self, pixels: np.ndarray, names=None, prefix_batch: int = 64) -> list[Result]:
        """Many uint8 network-size images: the prefix runs on batches of images, then each image's
        windows go to the suffix as in certify(). Latency is reported per image (prefix share split)."""
        results = []
        for lo in range(0, len(pixels), prefix_batch):
            chunk = pixels[lo:lo + prefix_batch]
            start = time.perf_counter()
            features, gate = self.features(chunk)
            share = (time.perf_counter() - start) / len(chunk)
            for i in range(len(chunk)):
                t0 = time.perf_counter()
                name = names[lo + i] if names is not None else f"<array {lo + i}>"
                results.append(self._certify_features(self.pipeline.select(features, i), gate[i:i + 1],
                                                      t0 - share, t0, name))
        return results

    def _certify_features(self, features, gate, start, after_prefix, name) -> Result:
        distinct = self.dedupe.windows_for(gate[0])
        reps = distinct.representatives
        rep_labels = np.full(len(reps), -1, np.int64)  # -1, -inf: not evaluated (early exit), never agreeing
        rep_margins = np.full(len(reps), -np.inf, np.float32)
        rep_logconf = np.full(len(reps), -np.inf)
        evaluated, base = 0, None
        queue = np.concatenate([EMPTY_WINDOW, reps])
        for lo in range(0, len(queue), self.batch):
            logits = self.window_logits(features, queue[lo:lo + self.batch])
            labels, margins = decision.top2_margin(logits)
            logconf = decision.log_confidence(logits)
            if lo == 0:
                base = int(labels[0]), float(margins[0]), float(logconf[0])
                labels, margins, logconf, offset = labels[1:], margins[1:], logconf[1:], 0
            else:
                offset = lo - 1
            rep_labels[offset:offset + len(labels)] = labels
            rep_margins[offset:offset + len(labels)] = margins
            rep_logconf[offset:offset + len(labels)] = logconf
            evaluated = offset + len(labels)
            if self.early_exit and decision.disagreeing(base[0], labels, logconf, self.threshold).size:
                break  # the alert is certain; the windows left stay "not evaluated"
        base_label, base_margin, base_logconf = base
        group = distinct.group_of_window
        window_labels = decision.expand_groups(group, rep_labels, base_label)
        window_margins = decision.expand_groups(group, rep_margins, np.float32(base_margin))
        window_logconf = decision.expand_groups(group, rep_logconf, base_logconf)
        verdict = decision.decide(base_label, base_margin, window_labels, window_margins, self.delta, base_logconf,
                                  window_logconf, self.threshold)
        alerts = verdict.alert_windows[window_labels[verdict.alert_windows] != -1]  # evaluated ones only
        end = time.perf_counter()
        return Result(
            image=name,
            status=verdict.status,
            label=verdict.label,
            class_name=self.classes[verdict.label] if self.classes else None,
            windows_total=len(self.windows),
            windows_evaluated=int(evaluated),
            latency_ms=(end - start) * 1e3,
            prefix_ms=(after_prefix - start) * 1e3,
            suffix_ms=(end - after_prefix) * 1e3,
            kept_fraction=float(gate.mean()),
            base_margin=base_margin,
            confidence=float(np.exp(base_logconf)),
            threshold=self.threshold,
            alert_windows=self.windows[alerts].tolist(),
            window_labels=window_labels,
            window_margins=window_margins,
            window_logconf=window_logconf,
            base_logconf=base_logconf,
            gate=gate[0],
        )
