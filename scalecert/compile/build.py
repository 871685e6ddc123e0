"""`scalecert build`: add a precision variant (fp16 / int8 ONNX), its numeric margin per backend and,
on a machine with TensorRT, the suffix engine to a bundle (every backend runs the prefix on ONNX
Runtime CPU, docs/design.md §9). The bundle is copied, extended and swapped into place, manifest
hashes recomputed: never half-written. No torch.

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
from scalecert.export.locality import confirm as confirm_locality
from scalecert.runtime import pipelines
from scalecert.runtime.probes import probe_pixels, record_build


def calibration_images(calib: str | None, limit: int, input_spec: dict) -> np.ndarray | None:
    from scalecert.runtime.datasets import image_set
    from scalecert.runtime.images import load_image, normalize

    if calib is None:
        return None
    items = image_set(calib, limit=limit)
    return normalize(np.stack([load_image(path, input_spec) for path, _ in items]), input_spec)


def suffix_feeds(pipeline, images: np.ndarray, windows: np.ndarray, per_image: int = 8, seed: int = 0,
                 max_rows: int | None = None) -> list[dict]:
    """Suffix calibration inputs: each image's gated features with the empty window and a few others,
    at most `max_rows` windows a feed (a suffix that kept its fixed batch takes one)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for lo in range(0, len(images), 16):
        features, _ = pipeline.prefix(images[lo:lo + 16])
        for i in range(len(features)):
            picked = windows[rng.choice(len(windows), min(per_image - 1, len(windows)), replace=False)]
            rows = np.concatenate([np.zeros((1, 4), np.int64), picked])
            step = max_rows or len(rows)
            feeds += [{"features": features[i:i + 1], "windows": rows[r:r + step]} for r in range(0, len(rows), step)]
    return feeds


def _window_logits(pipeline, images: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """(images x (1 + windows), classes): base then every window, one image at a time."""
    queue = np.concatenate([np.zeros((1, 4), np.int64), windows])
    out = []
    for i in range(len(images)):
        features, _ = pipeline.prefix(images[i:i + 1])
        out.append(pipeline.suffix(pipeline.select(features, 0), queue))
    return np.stack(out)


INT8_FLOOR = {"top1_agreement": 0.95, "certified_drop": 0.02}  # refused below, unless the loss is accepted


def int8_family(backend: str) -> str:
    """The int8 variant a backend gets. ONNX Runtime CPU: asymmetric uint8 activations (the ReLU/ReLU6
    ranges fold into them) and 7-bit weights (x86 u8s8 kernels without VNNI saturate on full-range
    weights). GPUs (TensorRT, ONNX Runtime CUDA): symmetric int8 activations and full-range weights,
    the explicit quantisation TensorRT accepts."""
    return "cpu" if backend == "ort-cpu" else "gpu"


def build(bundle_dir: str, precision: str = "fp32", calib: str | None = None, backend: str = "ort",
          calib_limit: int = 64, workspace_mb: int = 4096, max_windows: int = 128, say=print,
          accept_loss: bool = False, min_agreement: float = INT8_FLOOR["top1_agreement"]) -> dict:
    """Add a precision variant (fp16: explicit casts; int8: static QDQ calibrated on `calib`), its
    numeric margin on `backend` and, for trt, the TensorRT suffix engine to the bundle, in place
    (staged and swapped). An int8 variant is compared with fp32 on held-back calibration images (top-1
    agreement over the base and every window, certified rates) and refused below INT8_FLOOR unless
    `accept_loss`. Returns the new manifest."""
    if precision not in manifest_io.PRECISIONS:
        raise ScaleCertError(f"--precision {precision!r}: expected one of {', '.join(manifest_io.PRECISIONS)}")
    if not 0 <= min_agreement <= 1:
        raise ScaleCertError(f"--min-agreement {min_agreement:g}: expected a fraction in [0, 1]")
    backend = pipelines.canonical(backend)
    bundle = Bundle.open(bundle_dir, verify=True)
    pipelines.require(backend)
    manifest = bundle.manifest
    existing = bundle.precisions.get(precision)
    rebuild_int8 = precision == "int8" and (existing is None or existing.get("family", "gpu") != int8_family(backend))
    if rebuild_int8 and calib is None:
        raise ScaleCertError(f"--precision int8 needs --calib DIR: activation scales are calibrated on images (for {backend})")
    images = calibration_images(calib, calib_limit, bundle.input_spec)
    windows = bundle.windows()
    with staging(bundle_dir, ".scalecert-build-") as work:
        shutil.copytree(bundle_dir, work, dirs_exist_ok=True)
        staged = Bundle(work, manifest)
        variants = manifest.setdefault("precisions", bundle.precisions)
        if images is None:  # fp16 and margins only need some input: a seeded noise image
            from scalecert.runtime.images import normalize

            h, w = bundle.image_hw
            images = normalize(np.random.default_rng(0).integers(0, 256, (4, h, w, 3), dtype=np.uint8), bundle.input_spec)
        if precision not in variants or (precision == "int8" and (calib is not None or rebuild_int8)):
            family = int8_family(backend)
            variants[precision] = _make_variant(staged, precision, images, windows, family, min_agreement)
            if precision == "int8":
                _int8_verdict(variants[precision], accept_loss, min_agreement, say)
                for key in [k for k in manifest["margin"] if k.endswith("-int8")]:  # measured on the old variant
                    del manifest["margin"][key]
                    manifest.get("margin_measurement", {}).pop(key, None)
            prefix_file = variants[precision]["prefix"]
            manifest.setdefault("locality", {})[prefix_file] = confirm_locality(
                work, manifest, prefix_file, probe_pixels(staged), say=say)
            manifest["files"] = manifest_io.describe_files(work, sorted(_bundle_files(work)))
            say(f"{precision}: wrote {prefix_file} and {variants[precision]['suffix']}")
        if backend == "trt":
            from scalecert.compile.tensorrt import build_engines

            files = staged.files(precision)
            entry = build_engines(bundle_dir, work, precision, files["suffix"], min(max_windows, staged.suffix_max_rows or max_windows),
                                  workspace_mb)
            manifest.setdefault("engines", {})[f"trt-{precision}"] = entry
            say(f"TensorRT {entry['tensorrt']} suffix engine for {entry['gpu']}: {entry['suffix']}")
        with pipelines.open_pipeline(staged, backend, precision) as pipeline:
            margin = measure_margin(pipeline, _margin_images(staged, images), windows)
        key = manifest_io.margin_key(backend, precision)
        manifest["margin"][key] = margin["delta"]
        manifest.setdefault("margin_measurement", {})[key] = margin
        say(f"numeric margin {key}: spread {margin['spread']:g} -> delta {margin['delta']:g}")
        manifest.setdefault("doctor", {})[key] = record_build(staged, backend, precision, say)  # doctor's probes
        manifest["files"] = manifest_io.describe_files(work, sorted(_bundle_files(work)))
        manifest_io.write(work, manifest)
    return manifest


def _make_variant(staged: Bundle, precision: str, images: np.ndarray, windows: np.ndarray, family: str = "gpu",
                  min_agreement: float = INT8_FLOOR["top1_agreement"]) -> dict:
    """The fp16 or int8 variant's files in the staged bundle and its comparison with fp32 on held-back
    images. int8 tries conversions.INT8_FLOAT_STEPS in order, fastest first, and keeps the first that
    meets the floor on the held-back images: they both pick the step and judge it."""
    from scalecert.compile import precision as conversions

    work = staged.path
    src = staged.files("fp32")
    names = {part: f"{part}.{precision}.onnx" for part in ("prefix", "suffix")}
    info: dict = {"conversion": {}}
    held = images[:max(8, len(images) // 4)] if precision == "int8" and len(images) >= 16 else images[:16]
    fit = images[len(held):] if len(images) >= 16 else images  # int8 ranges from the rest: `held` judges them
    reference = precision == "int8" and family == "gpu"
    with pipelines.open_pipeline(staged, "ort-cpu", "fp32") as fp32:
        ref = _window_logits(fp32, held, windows)
        if precision == "int8":
            feeds_for = {"suffix": suffix_feeds(fp32, fit, windows, max_rows=staged.suffix_max_rows),
                         "prefix": [{"image": fit[i:i + 16]} for i in range(0, len(fit), 16)]}
    if precision == "fp16":
        for part in ("prefix", "suffix"):
            info["conversion"][part] = conversions.to_fp16(src[part], os.path.join(work, names[part]), part)
    else:
        options = ({"activations": "uint8", "reduce_range": True, "full_range_depthwise": True} if family == "cpu" else
                   {"activations": "int8", "reduce_range": False})
        info.update({"family": family, "calibration_images": len(fit), "held_back_images": len(held), "float_steps": []})
    for keep in conversions.INT8_FLOAT_STEPS if precision == "int8" else [None]:
        if keep is not None:
            for part in ("prefix", "suffix"):
                info["conversion"][part] = conversions.to_int8(src[part], os.path.join(work, names[part]), part,
                                                               feeds_for[part], keep_float=keep, **options)
        for part in ("prefix", "suffix"):
            problems = conversions.check_static_precision(os.path.join(work, names[part]))
            if problems:
                raise ScaleCertError(f"{names[part]}: {problems[0]}")
        with _variant_pipeline(work, names, reference) as variant:
            got = _window_logits(variant, held, windows)
        if keep is not None:
            info["float_kept"] = keep
            info["float_steps"].append({"float_kept": keep, "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean())})
            if not _below_floor(ref, got, min_agreement):
                break
    ref_labels, got_labels = ref.argmax(-1), got.argmax(-1)
    ref_cert, got_cert = (ref_labels == ref_labels[:, :1]).all(1), (got_labels == got_labels[:, :1]).all(1)
    info["vs_fp32"] = {"images": len(held), "held_back": precision == "int8" and len(images) >= 16,
                       "windows_per_image": 1 + len(windows), "max_abs_logit_diff": float(np.abs(ref - got).max()),
                       "top1_agreement": float((ref_labels == got_labels).mean()),
                       "base_agreement": float((ref_labels[:, 0] == got_labels[:, 0]).mean()),
                       "certified_rate_fp32": float(ref_cert.mean()), "certified_rate": float(got_cert.mean()),
                       "judged_by": ("ONNX Runtime CPU, reference QDQ semantics (no fused integer kernels)"
                                     if precision == "int8" and family == "gpu" else "ONNX Runtime CPU kernels"),
                       "status_agreement": float((ref_cert == got_cert).mean())}
    return {**names, **info}


def _floor_problems(agreement: float, certified_drop: float, images: int, min_agreement: float) -> list[str]:
    """Why a variant falls below INT8_FLOOR; empty when it meets it (one image of slack on the
    certified rate for small samples)."""
    problems = []
    if agreement < min_agreement:
        problems.append(f"top-1 agreement {agreement:.1%} is below {min_agreement:.0%}")
    if certified_drop > INT8_FLOOR["certified_drop"] + 1 / max(1, images):
        problems.append(f"certified rate falls {certified_drop:.1%}")
    return problems


def _below_floor(ref: np.ndarray, got: np.ndarray, min_agreement: float) -> list[str]:
    """_floor_problems of window logits `got` against fp32's `ref`, (images, 1 + windows, classes) each."""
    ref_labels, got_labels = ref.argmax(-1), got.argmax(-1)
    drop = (ref_labels == ref_labels[:, :1]).all(1).mean() - (got_labels == got_labels[:, :1]).all(1).mean()
    return _floor_problems(float((ref_labels == got_labels).mean()), float(drop), len(ref), min_agreement)


def _variant_pipeline(work: str, names: dict, reference: bool):
    from scalecert.runtime.pipelines.onnxruntime import OrtCpuPipeline

    return OrtCpuPipeline(os.path.join(work, names["prefix"]), os.path.join(work, names["suffix"]), reference=reference)


def _int8_verdict(variant: dict, accept_loss: bool, min_agreement: float, say) -> None:
    """Print the comparison with fp32; refuse a variant below the floor unless the loss is accepted."""
    v = variant["vs_fp32"]
    drop = v["certified_rate_fp32"] - v["certified_rate"]
    kept = variant.get("float_kept", "none")
    say(f"int8 ({variant['family']}, float kept: {kept}) vs fp32 on {v['images']} held-back images: top-1 agreement "
        f"{v['top1_agreement']:.1%} over the base and {v['windows_per_image'] - 1} windows, certified "
        f"{v['certified_rate']:.1%} vs {v['certified_rate_fp32']:.1%}")
    problems = _floor_problems(v["top1_agreement"], drop, v["images"], min_agreement)
    variant["accepted_loss"] = bool(problems) and accept_loss
    if problems and not accept_loss:
        raise ScaleCertError(f"int8 variant refused: {'; '.join(problems)} (floor: docs/design.md §3.7); "
                             "pass --accept-loss to keep it anyway, or use fp16")
    if problems:
        say(f"warning: int8 kept with --accept-loss although {'; '.join(problems)}")


def _margin_images(bundle: Bundle, images: np.ndarray) -> np.ndarray:
    """The margin is measured on the image `scalecert doctor` re-measures it on (the first probe
    image) and on a calibration image: a build on the device then passes doctor's spread check
    there unless the engine's numerics drift."""
    from scalecert.runtime.images import normalize

    return np.concatenate([normalize(probe_pixels(bundle)[None], bundle.input_spec), images[:1]])


def _bundle_files(root: str) -> list[str]:
    out = []
    for directory, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(directory, name), root)
            # the TensorRT timing cache changes on every build and only speeds up the next one: not hashed
            if rel != manifest_io.MANIFEST and not rel.endswith((".tmp", ".cache")):
                out.append(rel)
    return out
