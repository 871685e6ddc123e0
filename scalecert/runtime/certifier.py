"""Window-batched certification of images against a bundle (no torch)."""
from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np

from scalecert.bundle import Bundle
from scalecert.core import decision, geometry
from scalecert.errors import BackendError, ImageError, OptionError
from scalecert.runtime import pipelines
from scalecert.runtime import source as source_space
from scalecert.runtime.images import load_source, normalize, resize_to_input
from scalecert.runtime.pipelines.base import Pipeline
from scalecert.runtime.results import Result, SourceReport, Status, WindowMap

EMPTY_WINDOW = np.zeros((1, 4), np.int64)  # zero-area rectangle: the un-occluded features


class Certifier:
    """Certifies images against one bundle, precision and backend (no torch).

    `scalecert.load(bundle_dir).certify(image) -> Result` (docs/api.md). `image`: a path, or an RGB
    uint8 HxWx3 array of any size (resized and cropped per the manifest, as a file would be). The
    pipeline is activated on `with`/`__enter__` or on first use, and released by `close()` / leaving
    the block. For each image: the prefix once, then the suffix on the un-occluded features and on
    one representative of every distinct window intersection (docs/design.md §2, §3.5), in batches
    of `batch`; the decision is core.decision.decide over the expanded window-prediction map.
    `early_exit` stops at the first batch with a disagreeing window (the alert is then certain).
    `threshold` is the confidence threshold T of the alert operating point (docs/design.md §7;
    default: the bundle's). `evaluation` attaches each result's window map (Result.evaluation).
    Not thread-safe: use one Certifier per thread, or guard one with a lock."""

    def __init__(self, bundle: Bundle, backend: str = "ort-cpu", precision: str = "fp32", *, batch: int = 64,
                 early_exit: bool = False, threads: int | None = None, threshold: float | None = None,
                 evaluation: bool = False):
        self.bundle, self.bundle_dir, self.manifest = bundle, bundle.path, bundle.manifest
        self.backend, self.precision = backend, precision
        if int(batch) < 1:
            raise OptionError(f"batch {batch}: expected at least 1 window row per call")
        self.batch, self.early_exit, self.evaluation = int(batch), bool(early_exit), bool(evaluation)
        self.input_spec = bundle.input_spec
        self.feature_hw = bundle.feature_hw
        self.windows = bundle.windows()
        self.masks = geometry.window_masks(self.windows, self.feature_hw)
        delta = bundle.margin(backend, precision)
        if delta is None:
            raise BackendError(f"{bundle.path}: no numeric margin measured for {backend} at {precision}")
        self.delta = delta
        self.threshold = bundle.default_threshold if threshold is None else decision.check_threshold(threshold)
        self.classes = bundle.classes
        self._source_reports: dict = {}
        self._pipeline = pipelines.open_pipeline(bundle, backend, precision, threads)

    @classmethod
    def load(cls, bundle_dir: str, backend: str = "auto", precision: str = "fp32", *, batch: int = 64,
             early_exit: bool = False, threads: int | None = None, threshold: float | None = None,
             evaluation: bool = False) -> "Certifier":
        bundle = Bundle.open(bundle_dir, verify=True)
        bundle.files(precision)
        return cls(bundle, pipelines.pick(backend, precision, bundle), precision, batch=batch, early_exit=early_exit,
                   threads=threads, threshold=threshold, evaluation=evaluation)

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
            raise ImageError(f"expected an RGB uint8 HxWx3 array, got {array.dtype} {array.shape}")
        _, h, w = self.input_spec["input_size"]
        if array.shape[:2] != (h, w):
            from PIL import Image

            return resize_to_input(Image.fromarray(array), self.input_spec), array.shape[:2]
        return array, (h, w)

    def source_report(self, source_hw, requested_hw=None, global_scale: bool = False) -> SourceReport:
        """The certificate in source pixels at this source size (docs/design.md §8). A pure function
        of its arguments, kept per size: a camera or a dataset repeats a few sizes, and computing it
        (about 1.5 ms) was the largest cost of certify() outside the sessions."""
        key = (tuple(source_hw), None if requested_hw is None else tuple(requested_hw), bool(global_scale))
        if key not in self._source_reports:
            if len(self._source_reports) >= 1024:
                self._source_reports.clear()
            self._source_reports[key] = SourceReport.from_json(source_space.report(
                source_hw, self.input_spec, self.bundle.patch_hw, requested_hw, global_scale))
        return self._source_reports[key]

    def source_for(self, image, source_hw) -> SourceReport:
        wide = isinstance(image, (str, os.PathLike)) and source_space.describe(os.fspath(image)).global_scale
        return self.source_report(source_hw, global_scale=wide)

    # -- inference ------------------------------------------------------------------------
    def features(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.pipeline.prefix(normalize(pixels, self.input_spec))

    def window_logits(self, features: np.ndarray, windows: np.ndarray) -> np.ndarray:
        return self.pipeline.suffix(features, windows)

    def certify(self, image, name: str | None = None, source: SourceReport | dict | None = None,
                evaluation: bool | None = None) -> Result:
        """One image (path or RGB uint8 array of any size). `source`: the source-space report to
        attach (default: from the image's own size); `evaluation`: attach the window map."""
        start = time.perf_counter()
        pixels, source_hw = self.prepare_source(image)
        features, gate = self.features(pixels)
        name = name or (os.fspath(image) if isinstance(image, (str, os.PathLike)) else "<array>")
        result = self._certify_features(self.pipeline.select(features, 0), gate, start, time.perf_counter(), name,
                                        self.evaluation if evaluation is None else evaluation)
        if source is None:
            source = self.source_for(image, source_hw)
        elif isinstance(source, dict):
            source = SourceReport.from_json(source)
        return replace(result, source=source)

    def certify_batch(self, images, names=None, prefix_batch: int = 64, evaluation: bool | None = None) -> list[Result]:
        """Many images (paths, or RGB uint8 arrays of any sizes: a camera's frames, or one (N, H, W, 3)
        array): the prefix runs on batches of images, then each image's windows go to the suffix as
        in certify(). Latency is reported per image (the prefix's share split evenly)."""
        evaluation = self.evaluation if evaluation is None else evaluation
        results = []
        for lo in range(0, len(images), prefix_batch):
            chunk = images[lo:lo + prefix_batch]
            prepared = [self.prepare_source(image) for image in chunk]
            start = time.perf_counter()
            features, gate = self.features(np.stack([pixels for pixels, _ in prepared]))
            share = (time.perf_counter() - start) / len(chunk)
            for i, (image, (_, source_hw)) in enumerate(zip(chunk, prepared)):
                t0 = time.perf_counter()
                name = names[lo + i] if names is not None else (
                    os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"<array {lo + i}>")
                result = self._certify_features(self.pipeline.select(features, i), gate[i:i + 1], t0 - share, t0, name,
                                                evaluation)
                results.append(replace(result, source=self.source_for(image, source_hw)))
        return results

    def _certify_features(self, features, gate, start, after_prefix, name, evaluation: bool = False) -> Result:
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
            status=Status(verdict.status),
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
            alert_windows=tuple(tuple(int(v) for v in w) for w in self.windows[alerts]),
            evaluation=WindowMap(window_labels, window_margins, window_logconf, base_logconf, gate[0]) if evaluation else None,
        )
