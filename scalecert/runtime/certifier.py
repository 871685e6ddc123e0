"""Window-batched certification of images against a bundle (no torch)."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import manifest as manifest_io
from ..errors import ScaleCertError
from . import decision, geometry
from .backends import OrtCpuPipeline, Pipeline, ort_providers, window_parallel
from .preprocess import load_image, normalize, resize_to_input

EMPTY_WINDOW = np.zeros((1, 4), np.int64)  # zero-area rectangle: the un-occluded features


@dataclass
class Result:
    image: str
    status: str  # "certified" | "alert"
    label: int
    class_name: str | None
    windows_total: int
    windows_evaluated: int
    latency_ms: float
    prefix_ms: float
    suffix_ms: float
    kept_fraction: float
    base_margin: float
    alert_windows: list = field(default_factory=list)  # feature-space [y0, x0, y1, x1)
    window_labels: np.ndarray | None = None  # per window of the family (evaluation mode)
    gate: np.ndarray | None = None

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("window_labels", "gate", "class_name")}
        out["class"] = self.class_name
        out["latency_ms"] = round(self.latency_ms, 3)
        out["prefix_ms"], out["suffix_ms"] = round(self.prefix_ms, 3), round(self.suffix_ms, 3)
        out["base_margin"] = float(self.base_margin)
        if self.status != "alert":
            out.pop("alert_windows")
        return out


BACKENDS = ("ort-cpu", "ort-cuda", "trt")
PRECISIONS = ("fp32", "fp16", "int8")


def precision_files(manifest: dict, precision: str) -> dict:
    """{"prefix": file, "suffix": file} of one precision variant of the bundle."""
    variants = manifest.get("precisions") or {"fp32": {"prefix": "prefix.onnx", "suffix": "suffix.onnx"}}
    if precision not in PRECISIONS:
        raise ScaleCertError(f"unknown precision {precision!r} ({', '.join(PRECISIONS)})")
    if precision not in variants:
        raise ScaleCertError(f"this bundle has no {precision} variant; add one with "
                             f"`scalecert build BUNDLE --precision {precision}`")
    return variants[precision]


def pick_backend(backend: str, precision: str, manifest: dict) -> str:
    """The backend to certify with. A backend/precision whose numeric margin was never measured
    for this bundle is not used: its logits could move with batch composition by an amount
    nobody bounded, and a zero delta would then be unsound."""
    margins = manifest["margin"]
    if backend == "ort":
        backend = "ort-cpu"
    if backend == "auto":
        backend = "ort-cpu"
        if f"ort-cuda-{precision}" in margins:
            try:
                ort_providers("cuda")
                backend = "ort-cuda"
            except ScaleCertError:
                pass
    if backend not in BACKENDS:
        raise ScaleCertError(f"unknown backend {backend!r} (auto, ort, ort-cpu, ort-cuda, trt)")
    if backend == "trt":
        from . import gpu

        gpu.require_tensorrt()
    elif backend == "ort-cuda":
        ort_providers("cuda")
    if f"{backend}-{precision}" not in margins:
        raise ScaleCertError(f"this bundle has no numeric margin measured for {backend} at {precision}; run "
                             f"`scalecert build BUNDLE --precision {precision} --backend {backend}` first")
    return backend


def open_pipeline(bundle_dir: str, manifest: dict, backend: str, precision: str, threads=None) -> Pipeline:
    if backend == "ort-cpu":
        files = precision_files(manifest, precision)
        suffix_macs = manifest.get("stats", {}).get("suffix", {}).get("macs") or 0
        return OrtCpuPipeline(os.path.join(bundle_dir, files["prefix"]), os.path.join(bundle_dir, files["suffix"]), threads,
                              window_parallel=window_parallel(precision, suffix_macs))
    from . import gpu

    if backend == "ort-cuda":
        files = precision_files(manifest, precision)
        return gpu.OrtCudaPipeline(os.path.join(bundle_dir, files["prefix"]), os.path.join(bundle_dir, files["suffix"]))
    return gpu.TrtPipeline.from_bundle(bundle_dir, manifest, precision)


class Certifier:
    def __init__(self, bundle_dir: str, manifest: dict, backend: str = "ort-cpu", precision: str = "fp32",
                 batch: int = 64, early_exit: bool = False, threads=None):
        self.bundle_dir, self.manifest = bundle_dir, manifest
        self.backend, self.precision = backend, precision
        self.batch, self.early_exit = max(1, int(batch)), early_exit
        self.input_spec = manifest["input"]
        c, fh, fw = manifest["layer"]["shape"]
        self.feature_hw = (fh, fw)
        w = manifest["windows"]
        self.windows = geometry.window_family(tuple(w["footprint"]), w["stride"], self.feature_hw)
        if len(self.windows) != w["count"]:
            raise ScaleCertError(f"{bundle_dir}: window family mismatch ({len(self.windows)} vs {w['count']}); re-export")
        self.masks = geometry.window_masks(self.windows, self.feature_hw)
        self.delta = float(manifest["margin"][f"{backend}-{precision}"])
        self.classes = manifest.get("classes")
        self.pipeline = open_pipeline(bundle_dir, manifest, backend, precision, threads)
        self.pipeline.activate()

    @classmethod
    def load(cls, bundle_dir: str, backend: str = "auto", batch: int = 64, early_exit: bool = False,
             threads: int | None = None, precision: str = "fp32") -> "Certifier":
        manifest = manifest_io.read(bundle_dir, verify=True)
        precision_files(manifest, precision)
        return cls(bundle_dir, manifest, pick_backend(backend, precision, manifest), precision, batch, early_exit, threads)

    def close(self) -> None:
        self.pipeline.deactivate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- inputs ---------------------------------------------------------------------------
    def prepare(self, image) -> np.ndarray:
        """Path or uint8 array -> uint8 HxWx3 at network size (resized per the manifest if needed)."""
        if isinstance(image, (str, os.PathLike)):
            return load_image(os.fspath(image), self.input_spec)
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ScaleCertError(f"expected a uint8 HxWx3 array, got {array.dtype} {array.shape}")
        _, h, w = self.input_spec["input_size"]
        if array.shape[:2] != (h, w):
            from PIL import Image

            array = resize_to_input(Image.fromarray(array), self.input_spec)
        return array

    # -- inference ------------------------------------------------------------------------
    def features(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.pipeline.prefix(normalize(pixels, self.input_spec))

    def window_logits(self, features: np.ndarray, windows: np.ndarray) -> np.ndarray:
        return self.pipeline.suffix(features, windows)

    def certify(self, image, name: str | None = None) -> Result:
        start = time.perf_counter()
        pixels = self.prepare(image)
        features, gate = self.features(pixels)
        return self._certify_features(self.pipeline.select(features, 0), gate, start, time.perf_counter(), name or (
            os.fspath(image) if isinstance(image, (str, os.PathLike)) else "<array>"))

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
        distinct = geometry.distinct_windows(self.windows, self.masks, gate[0])
        reps = distinct.representatives
        rep_labels = np.empty(len(reps), np.int64)
        rep_margins = np.empty(len(reps), np.float32)
        evaluated, base_label, base_margin = 0, None, None
        queue = np.concatenate([EMPTY_WINDOW, reps])
        for lo in range(0, len(queue), self.batch):
            logits = self.window_logits(features, queue[lo:lo + self.batch])
            labels, margins = decision.top2_margin(logits)
            if lo == 0:
                base_label, base_margin = int(labels[0]), float(margins[0])
                labels, margins, offset = labels[1:], margins[1:], 0
            else:
                offset = lo - 1
            rep_labels[offset:offset + len(labels)] = labels
            rep_margins[offset:offset + len(labels)] = margins
            evaluated = offset + len(labels)
            if self.early_exit and ((labels != base_label) | (margins < self.delta)).any():
                rep_labels[evaluated:] = -1  # not evaluated: counts as disagreeing, never as agreeing
                rep_margins[evaluated:] = -np.inf
                break
        window_labels = decision.expand_groups(distinct.group_of_window, rep_labels, base_label)
        window_margins = decision.expand_groups(distinct.group_of_window, rep_margins, np.float32(base_margin))
        verdict = decision.decide(base_label, base_margin, window_labels, window_margins, self.delta)
        if self.early_exit and not verdict.certified:
            bad = verdict.alert_windows[window_labels[verdict.alert_windows] != -1]
            verdict = decision.Decision(False, verdict.label, bad)
        end = time.perf_counter()
        return Result(
            image=name,
            status="certified" if verdict.certified else "alert",
            label=verdict.label,
            class_name=self.classes[verdict.label] if self.classes else None,
            windows_total=len(self.windows),
            windows_evaluated=int(evaluated),
            latency_ms=(end - start) * 1e3,
            prefix_ms=(after_prefix - start) * 1e3,
            suffix_ms=(end - after_prefix) * 1e3,
            kept_fraction=float(gate.mean()),
            base_margin=base_margin,
            alert_windows=self.windows[verdict.alert_windows].tolist(),
            window_labels=window_labels,
            gate=gate[0],
        )
