"""The device probes (no torch): what `scalecert doctor` runs on a device (runtime/doctor.py, the
report) and `scalecert build` runs and records on the staged bundle (`record_build`), and the
known answers export stores. docs/design.md §9.

Probes, each a `Check` (passed, failed with one line saying what to do, or informational):

  locality      the prefix as this backend runs it (ONNX Runtime CPU, docs/design.md §9): patches of
                random, saturated and out-of-range contents at many positions change features and
                gates only inside their footprint, bitwise, in batches (runtime/locality.py)
  spread        the suffix's logit spread across batch positions and sizes, measured here, fits
                the stored margin (docs/design.md §3.6)
  known answer  the probe images certify as recorded for this backend and precision
  latency       one image, median of a few runs (informational)

Known answers: a few probe images stored in the bundle with what the certifier answered for them.
Export writes the images (PNG at network size, hashed like every bundle file) and the ONNX Runtime
CPU fp32 answers; `scalecert build --backend B --precision P` records B/P's answers. `scalecert
doctor` certifies the images again on the target and compares. A difference counts only where the
recorded answer was clear of the noise the certificate already allows: a label whose recorded
margin exceeds `slack` (the backend's numeric margin delta) must come back the same; a status must
come back the same when every margin of that image exceeded it.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import time
from dataclasses import dataclass, field

import numpy as np

from scalecert.bundle import Bundle
from scalecert.bundle import manifest as manifest_io
from scalecert.core.margin import delta_from_spread, measure_margin
from scalecert.errors import ScaleCertError
from scalecert.runtime.images import normalize
from scalecert.runtime.locality import BATCH, check_locality

PROBE_DIR = "probes"
COUNT = 4  # images: up to half from the calibration set, the rest seeded synthetic
FEWEST = 2  # where a suffix row is expensive (export/measure.py::check_sample)
LOCALITY_POSITIONS = 64
LOCALITY_BATCH = BATCH
LATENCY_RUNS = 5
CROSS_ENGINE_FP32 = 0.01  # logits: fp32 on two engines (TF32 off) agree within 1e-3 in tests/test_gpu.py


@dataclass
class Check:
    """One check's or probe's outcome, as doctor's report and build's record show it."""

    name: str
    ok: bool | None  # None: informational, or not run
    detail: str
    fix: str = ""
    data: dict = field(default_factory=dict)

    def line(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "    "}[self.ok]
        return f"{mark} {self.name}: {self.detail}" + (f" -> {self.fix}" if self.ok is False and self.fix else "")


# -- known answers ----------------------------------------------------------------------------


def synthetic_images(image_hw, count: int, seed: int = 0) -> np.ndarray:
    """Smooth seeded colour fields with noise, uint8 (count, H, W, 3): image-like, no data needed."""
    from PIL import Image

    h, w = image_hw
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        blocks = Image.fromarray(rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)).resize((w, h), Image.BILINEAR)
        pixels = np.asarray(blocks, np.float64) + rng.normal(0, 20, (h, w, 3))
        out.append(np.clip(pixels, 0, 255).astype(np.uint8))
    return np.stack(out)


def write_images(bundle_dir: str, pixels: np.ndarray) -> list[str]:
    """PNG files under probes/; returns their names relative to the bundle."""
    from PIL import Image

    os.makedirs(os.path.join(bundle_dir, PROBE_DIR), exist_ok=True)
    names = []
    for i, image in enumerate(pixels):
        name = f"{PROBE_DIR}/probe-{i}.png"
        Image.fromarray(image).save(os.path.join(bundle_dir, name))
        names.append(name)
    return names


def answer(result) -> dict:
    """What a certifier Result says about one probe image, as stored in the manifest."""
    return {"status": result.status, "label": int(result.label), "base_margin": round(float(result.base_margin), 6),
            "window_labels": [int(v) for v in result.window_labels],
            "window_margins": [round(float(v), 6) for v in result.window_margins]}


def answers(certifier, bundle) -> list[dict]:
    """The certifier's answers for every probe image of the bundle, in order (every window evaluated)."""
    return [answer(certifier.certify(os.path.join(bundle.path, name), evaluation=True)) for name in bundle.probe_images]


def differences(expected: list[dict], got: list[dict], slack: float) -> list[str]:
    """One line per difference that the margin `slack` does not excuse (empty: the answers agree)."""
    if len(expected) != len(got):
        return [f"{len(got)} answers for {len(expected)} probe images"]
    out = []
    for i, (want, have) in enumerate(zip(expected, got)):
        margins = np.asarray(want["window_margins"], np.float64)
        labels_want, labels_have = np.asarray(want["window_labels"]), np.asarray(have["window_labels"])
        if len(labels_want) != len(labels_have):
            out.append(f"probe {i}: {len(labels_have)} windows, expected {len(labels_want)}")
            continue
        if have["label"] != want["label"] and want["base_margin"] > slack:
            out.append(f"probe {i}: label {have['label']}, expected {want['label']} (recorded margin {want['base_margin']:.3g})")
        moved = np.flatnonzero((labels_have != labels_want) & (margins > slack))
        if moved.size:
            out.append(f"probe {i}: {moved.size} window labels differ where the recorded margin exceeded {slack:.3g}")
        clear = want["base_margin"] > slack and bool((margins > slack).all())
        if have["status"] != want["status"] and clear:
            out.append(f"probe {i}: {have['status']}, expected {want['status']}")
    return out


# -- environment -------------------------------------------------------------------------------------


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def gpu_name() -> str | None:
    """The first CUDA device's name through the CUDA runtime (Polygraphy), else nvidia-smi, else None."""
    try:
        from scalecert.runtime.pipelines.tensorrt import gpu_identity

        name, (major, minor) = gpu_identity()
        return f"{name} (sm_{major}{minor})"
    except (ImportError, ScaleCertError):
        pass
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def environment(backend: str, threads: int | None) -> dict:
    """Where the probes ran: versions, device, what runs the prefix and the suffix."""
    import onnxruntime as ort

    tensorrt = None
    if backend == "trt":
        try:
            import tensorrt as trt

            tensorrt = trt.__version__
        except ImportError:
            pass
    gpu = gpu_name() if backend in ("ort-cuda", "trt") else None
    cpu = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    return {"scalecert": _version("scalecert") or "?", "python": platform.python_version(), "numpy": np.__version__,
            "onnxruntime": ort.__version__, "onnxruntime_package": next(
                (p for p in ("onnxruntime-gpu", "onnxruntime") if _version(p)), None),
            "providers": ort.get_available_providers(), "onnx": _version("onnx"), "onnx-ir": _version("onnx-ir"),
            "tensorrt": tensorrt, "polygraphy": _version("polygraphy"), "torch_installed": _version("torch") is not None,
            "device": gpu or cpu, "gpu": gpu,
            "prefix_runs_on": f"ONNX Runtime CPU ({threads or os.cpu_count()} threads)",
            "suffix_runs_on": {"ort-cpu": "ONNX Runtime CPU", "ort-cuda": "ONNX Runtime CUDA",
                               "trt": "TensorRT"}[backend]}


# -- on-device probes ------------------------------------------------------------------------------


def probe_pixels(bundle: Bundle) -> np.ndarray:
    """The image the locality and spread probes patch: the first probe image, else a synthetic one."""
    from scalecert.runtime.images import load_image

    if bundle.probe_images:
        return load_image(os.path.join(bundle.path, bundle.probe_images[0]), bundle.input_spec)
    return synthetic_images(bundle.image_hw, 1)[0]


def probe_locality(pipeline, bundle: Bundle, pixels: np.ndarray, count: int = LOCALITY_POSITIONS,
                   seed: int = 0) -> Check:
    """The locality check (runtime/locality.py) through this pipeline's prefix: features and gates
    outside each patch's footprint must be bit-identical to the clean image's, run alone."""
    report = check_locality(pipeline.prefix, pixels, bundle.input_spec, bundle.patch_hw, bundle.receptive_field,
                            bundle.feature_hw, seed=seed, limit=count)
    data = report.to_json(bundle.patch_hw)
    if not report.passed:
        return Check("locality", False, f"{len(report.leaks)} of {report.patched_images} patched images changed "
                     f"features or gates outside their footprint ({data['first_leak']})",
                     "the prefix is not local as run here: do not certify on this device; report it", data)
    return Check("locality", True, f"{report.positions} patch positions across the input, {report.patched_images} "
                 f"patched images (random, extreme, out-of-range, adversarial contents, batches of {LOCALITY_BATCH}): "
                 f"nothing moved outside the footprint; {report.moved_inside} moved inside", data=data)


def probe_spread(pipeline, bundle: Bundle, pixels: np.ndarray, delta: float) -> Check:
    record = measure_margin(pipeline, normalize(pixels[None], bundle.input_spec), bundle.windows())
    here = delta_from_spread(record["spread"])
    data = {"spread": record["spread"], "delta_here": here, "delta_stored": delta}
    if here > delta:
        return Check("spread", False, f"logit spread {record['spread']:.3g} across batch positions and sizes needs "
                     f"delta {here:.3g}, above the stored {delta:.3g}",
                     "re-measure the margin on this device with `scalecert build BUNDLE --backend B --precision P`", data)
    return Check("spread", True, f"logit spread {record['spread']:.3g} -> delta {here:.3g} <= stored {delta:.3g}", data=data)


def known_answer_reference(bundle: Bundle, backend: str, precision: str) -> tuple[list | None, float, str]:
    """(recorded answers, slack, where from): this backend's own, else for fp32 the export's ONNX
    Runtime CPU answers with the cross-engine fp32 tolerance added."""
    delta = bundle.margin(backend, precision) or 0.0
    own = bundle.probe_answers(backend, precision)
    if own is not None:
        return own, delta, manifest_io.margin_key(backend, precision)
    reference = bundle.probe_answers("ort-cpu", "fp32")
    if precision == "fp32" and reference is not None:
        slack = max(delta, bundle.margin("ort-cpu", "fp32") or 0.0) + CROSS_ENGINE_FP32
        return reference, slack, "ort-cpu-fp32"
    return None, delta, ""


def probe_known_answers(certifier, bundle: Bundle, backend: str, precision: str) -> tuple[Check, list]:
    if not bundle.probe_images:
        return Check("known answer", False, "the bundle has no probe images",
                     "re-export the bundle with this scalecert (export stores probe images and their answers)"), []
    expected, slack, source = known_answer_reference(bundle, backend, precision)
    got = answers(certifier, bundle)
    if expected is None:
        return Check("known answer", False, f"no answers recorded for {backend} at {precision}",
                     f"run `scalecert build {bundle.path} --backend {backend} --precision {precision}`"), got
    problems = differences(expected, got, slack)
    data = {"images": len(got), "reference": source, "slack": slack, "differences": problems}
    if problems:
        return Check("known answer", False, f"{len(problems)} of the {len(got)} probe images differ from the recorded "
                     f"{source} answers ({problems[0]})",
                     "this device computes other answers than recorded: do not certify here; rebuild or report", data), got
    statuses = ", ".join(a["status"] for a in got)
    return Check("known answer", True, f"{len(got)} probe images as recorded for {source} ({statuses})", data=data), got


def probe_latency(certifier, bundle: Bundle) -> Check:
    image = os.path.join(bundle.path, bundle.probe_images[0]) if bundle.probe_images else None
    pixels = certifier.prepare(image) if image else synthetic_images(bundle.image_hw, 1)[0]
    certifier.certify(pixels)  # warm-up: sessions, allocators, kernel choice
    results = [certifier.certify(pixels) for _ in range(LATENCY_RUNS)]
    median = float(np.median([r.latency_ms for r in results]))
    data = {"latency_ms": median, "prefix_ms": float(np.median([r.prefix_ms for r in results])),
            "suffix_ms": float(np.median([r.suffix_ms for r in results])), "windows": results[0].windows_evaluated}
    return Check("latency", None, f"{median:.2f} ms per image (median of {LATENCY_RUNS}; prefix {data['prefix_ms']:.2f}, "
                 f"suffix {data['suffix_ms']:.2f} ms, {data['windows']} windows)", data=data)


# -- `scalecert build --backend B` -----------------------------------------------------------------


def record_build(bundle: Bundle, backend: str, precision: str, say=print) -> dict:
    """The device probes `scalecert build` runs after measuring a margin, on the staged bundle:
    locality (refused when it fails) and the known answers, compared with the export's for fp32
    (refused when they differ beyond the margins) and recorded for this backend and precision.
    Returns the manifest's `doctor` record for this key; updates bundle.manifest["probes"]."""
    from scalecert.runtime.certifier import Certifier

    key = manifest_io.margin_key(backend, precision)
    with Certifier(bundle, backend, precision) as certifier:
        pixels = probe_pixels(bundle)
        locality = probe_locality(certifier.pipeline, bundle, pixels)
        say(locality.line())
        if not locality.ok:
            raise ScaleCertError(f"{key}: {locality.detail}; not recording a margin for a non-local prefix")
        record = {"locality": locality.data}
        if bundle.probe_images:
            got = answers(certifier, bundle)
            reference = bundle.probe_answers("ort-cpu", "fp32")
            if precision == "fp32" and reference is not None and key != "ort-cpu-fp32":
                slack = max(certifier.delta, bundle.margin("ort-cpu", "fp32") or 0.0) + CROSS_ENGINE_FP32
                problems = differences(reference, got, slack)
                if problems:
                    raise ScaleCertError(f"{key}: the probe images certify differently from the export's ONNX Runtime "
                                         f"CPU answers ({problems[0]}); this engine does not compute the exported network")
                say(f"ok   known answer: {len(got)} probe images agree with the export's answers")
            bundle.manifest.setdefault("probes", {"images": bundle.probe_images}).setdefault("answers", {})[key] = got
            record["known_answers"] = len(got)
        latency = probe_latency(certifier, bundle)
    record.update({"latency_ms": latency.data["latency_ms"], "environment": environment(backend, None),
                   "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return record
