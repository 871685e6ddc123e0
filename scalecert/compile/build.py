"""`scalecert build`: add a precision variant (fp16 / int8 ONNX), its numeric margin per backend and,
on a machine with TensorRT, engines to a bundle. The bundle is copied, extended and swapped into
place, manifest hashes recomputed: never half-written. No torch.

Numeric margin, per backend and precision: delta = 2 x SAFETY x the largest logit spread of that
engine for identical suffix inputs across batch positions and sizes (core/margin.py, docs/design.md §3.6). The
certificate is a statement about the classifier that is deployed, here the int8 or fp16 network
as that engine runs it: the soundness chain needs p_W(x') = p_W(x) for S_W(x') = S_W(x), i.e. the
same engine giving the same argmax for the same input wherever it sits in a batch, and that is
what delta covers. The deviation from the fp32 network is measured and recorded too (`vs_fp32`):
it says how far the deployed classifier is from the exported one, not whether its certificate holds.
"""
from __future__ import annotations

import os
import shutil

import numpy as np

from scalecert.bundle import Bundle, manifest as manifest_io
from scalecert.bundle.staging import staging
from scalecert.core.margin import measure_margin
from scalecert.errors import ScaleCertError
from scalecert.runtime import pipelines

BACKENDS = {"ort": "ort-cpu", "ort-cpu": "ort-cpu", "ort-cuda": "ort-cuda", "trt": "trt"}


def _calibration_images(calib: str | None, limit: int, input_spec: dict) -> np.ndarray | None:
    from scalecert.runtime.datasets import image_set
    from scalecert.runtime.images import load_image, normalize

    if calib is None:
        return None
    items = image_set(calib, limit=limit)
    return normalize(np.stack([load_image(path, input_spec) for path, _ in items]), input_spec)


def _suffix_feeds(pipeline, images: np.ndarray, windows: np.ndarray, per_image: int = 8, seed: int = 0) -> list[dict]:
    """Suffix calibration inputs: each image's gated features with the empty window and a few others."""
    rng = np.random.default_rng(seed)
    feeds = []
    for lo in range(0, len(images), 16):
        features, _ = pipeline.prefix(images[lo:lo + 16])
        for i in range(len(features)):
            picked = windows[rng.choice(len(windows), min(per_image - 1, len(windows)), replace=False)]
            feeds.append({"features": features[i:i + 1],
                          "windows": np.concatenate([np.zeros((1, 4), np.int64), picked])})
    return feeds


def _window_logits(pipeline, images: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """(images x (1 + windows), classes): base then every window, one image at a time."""
    queue = np.concatenate([np.zeros((1, 4), np.int64), windows])
    out = []
    for i in range(len(images)):
        features, _ = pipeline.prefix(images[i:i + 1])
        out.append(pipeline.suffix(pipeline.select(features, 0), queue))
    return np.stack(out)


def build(bundle_dir: str, precision: str = "fp32", calib: str | None = None, backend: str = "ort",
          calib_limit: int = 64, workspace_mb: int = 4096, max_windows: int = 128, max_images: int = 16,
          say=print) -> dict:
    """Add a precision variant (fp16: explicit casts; int8: static QDQ calibrated on `calib`), its
    numeric margin on `backend` and, for trt, TensorRT engines to the bundle, in place (staged and
    swapped). Returns the new manifest."""
    if precision not in manifest_io.PRECISIONS:
        raise ScaleCertError(f"--precision {precision!r}: expected one of {', '.join(manifest_io.PRECISIONS)}")
    backend = pipelines.canonical(backend)
    bundle = Bundle.open(bundle_dir, verify=True)
    pipelines.require(backend)
    manifest = bundle.manifest
    if precision == "int8" and calib is None and "int8" not in bundle.precisions:
        raise ScaleCertError("--precision int8 needs --calib DIR: activation scales are calibrated on images")
    images = _calibration_images(calib, calib_limit, bundle.input_spec)
    windows = bundle.windows()
    with staging(bundle_dir, ".scalecert-build-") as work:
        shutil.copytree(bundle_dir, work, dirs_exist_ok=True)
        staged = Bundle(work, manifest)
        variants = manifest.setdefault("precisions", bundle.precisions)
        if images is None:  # fp16 and margins only need some input: a seeded noise image
            from scalecert.runtime.images import normalize

            h, w = bundle.image_hw
            images = normalize(np.random.default_rng(0).integers(0, 256, (4, h, w, 3), dtype=np.uint8), bundle.input_spec)
        if precision not in variants or (precision == "int8" and calib is not None):
            variants[precision] = _make_variant(staged, precision, images, windows)
            say(f"{precision}: wrote {variants[precision]['prefix']} and {variants[precision]['suffix']}")
        if backend == "trt":
            from scalecert.compile.tensorrt import build_engines

            files = staged.files(precision)
            entry = build_engines(bundle_dir, work, precision, files["prefix"], files["suffix"], max_images, max_windows,
                                  workspace_mb)
            manifest.setdefault("engines", {})[f"trt-{precision}"] = entry
            say(f"TensorRT {entry['tensorrt']} engines for {entry['gpu']}: {entry['prefix']}, {entry['suffix']}")
        with pipelines.open_pipeline(staged, backend, precision) as pipeline:
            margin = measure_margin(pipeline, images, windows)
        key = manifest_io.margin_key(backend, precision)
        manifest["margin"][key] = margin["delta"]
        manifest.setdefault("margin_measurement", {})[key] = margin
        say(f"numeric margin {key}: spread {margin['spread']:g} -> delta {margin['delta']:g}")
        manifest["files"] = manifest_io.describe_files(work, sorted(_bundle_files(work)))
        manifest_io.write(work, manifest)
    return manifest


def _make_variant(staged: Bundle, precision: str, images: np.ndarray, windows: np.ndarray) -> dict:
    from scalecert.compile import precision as conversions
    from scalecert.runtime.pipelines.onnxruntime import OrtCpuPipeline

    work = staged.path
    src = staged.files("fp32")
    names = {part: f"{part}.{precision}.onnx" for part in ("prefix", "suffix")}
    info: dict = {"conversion": {}}
    if precision == "fp16":
        for part in ("prefix", "suffix"):
            info["conversion"][part] = conversions.to_fp16(src[part], os.path.join(work, names[part]), part)
    else:
        with pipelines.open_pipeline(staged, "ort-cpu", "fp32") as fp32:
            suffix_feeds = _suffix_feeds(fp32, images, windows)
        prefix_feeds = [{"image": images[i:i + 16]} for i in range(0, len(images), 16)]
        info["conversion"]["prefix"] = conversions.to_int8(src["prefix"], os.path.join(work, names["prefix"]), "prefix",
                                                           prefix_feeds)
        info["conversion"]["suffix"] = conversions.to_int8(src["suffix"], os.path.join(work, names["suffix"]), "suffix", suffix_feeds)
        info["calibration_images"] = len(images)
    for part in ("prefix", "suffix"):
        problems = conversions.check_static_precision(os.path.join(work, names[part]))
        if problems:
            raise ScaleCertError(f"{names[part]}: {problems[0]}")
    sample = images[:16]
    with pipelines.open_pipeline(staged, "ort-cpu", "fp32") as fp32, \
            OrtCpuPipeline(os.path.join(work, names["prefix"]), os.path.join(work, names["suffix"])) as variant:
        ref, got = _window_logits(fp32, sample, windows[:32]), _window_logits(variant, sample, windows[:32])
    info["vs_fp32"] = {"images": len(sample), "windows_per_image": 1 + min(32, len(windows)),
                       "max_abs_logit_diff": float(np.abs(ref - got).max()),
                       "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean())}
    return {**names, **info}


def _bundle_files(root: str) -> list[str]:
    out = []
    for directory, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(directory, name), root)
            # the TensorRT timing cache changes on every build and only speeds up the next one: not hashed
            if rel != manifest_io.MANIFEST and not rel.endswith((".tmp", ".cache")):
                out.append(rel)
    return out
