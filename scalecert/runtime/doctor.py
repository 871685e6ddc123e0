"""`scalecert doctor`: is this bundle sound and fast on this device, with this engine? (no torch)

Checks, in order; each is a `Check` (passed, failed with one line saying what to do, or
informational):

  integrity     every bundle file matches its sha256 in the manifest
  backend       the engine runs here (ONNX Runtime provider, TensorRT)
  margin        a numeric margin was measured for this backend and precision
  engines       (trt) the engines were built for this GPU and TensorRT version
  locality      the prefix as this backend runs it (ONNX Runtime CPU, docs/design.md §9): patches of
                random, saturated and out-of-range contents at many positions change features and
                gates only inside their footprint, bitwise, in batches
  spread        the suffix's logit spread across batch positions and sizes, measured here, fits
                the stored margin (docs/design.md §3.6)
  known answer  the probe images certify as recorded for this backend and precision
  latency       one image, median of a few runs (informational)

`scalecert build --backend B` runs the same probes and records them (`record_build`).
"""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from scalecert.bundle import Bundle
from scalecert.bundle import manifest as manifest_io
from scalecert.core import geometry
from scalecert.core.margin import delta_from_spread, measure_margin
from scalecert.errors import ScaleCertError
from scalecert.runtime import pipelines, probes
from scalecert.runtime.locality import BATCH, check_locality
from scalecert.runtime.images import normalize

LOCALITY_POSITIONS = 64
LOCALITY_BATCH = BATCH
LATENCY_RUNS = 5
CROSS_ENGINE_FP32 = 0.01  # logits: fp32 on two engines (TF32 off) agree within 1e-3 in tests/test_gpu.py


@dataclass
class Check:
    name: str
    ok: bool | None  # None: informational, or not run
    detail: str
    fix: str = ""
    data: dict = field(default_factory=dict)

    def line(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "    "}[self.ok]
        return f"{mark} {self.name}: {self.detail}" + (f" -> {self.fix}" if self.ok is False and self.fix else "")


@dataclass
class Report:
    bundle: str
    backend: str
    precision: str
    environment: dict
    checks: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.ok is not False for c in self.checks) and any(c.name == "known answer" and c.ok for c in self.checks)

    def to_json(self) -> dict:
        return {"bundle": self.bundle, "backend": self.backend, "precision": self.precision, "passed": self.passed,
                "environment": self.environment, "checks": [asdict(c) for c in self.checks]}

    def render(self) -> str:
        env = self.environment
        head = [f"scalecert {env['scalecert']}, onnxruntime {env['onnxruntime']} ({', '.join(env['providers'])})"
                + (f", TensorRT {env['tensorrt']}" if env.get("tensorrt") else ""),
                f"device: {env['device']}; prefix on {env['prefix_runs_on']}, suffix on {env['suffix_runs_on']}",
                f"bundle {self.bundle}, backend {self.backend}, precision {self.precision}"]
        failed = sum(c.ok is False for c in self.checks)
        verdict = "all probes passed" if self.passed else f"{failed} check(s) failed: fix each FAIL line before certifying here"
        return "\n".join([*head, *(c.line() for c in self.checks), verdict])


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


# -- checks without the pipeline -------------------------------------------------------------------


def check_integrity(path: str) -> Check:
    try:
        manifest_io.read(path, verify=True)
    except ScaleCertError as exc:
        return Check("integrity", False, str(exc), "re-copy the bundle from its source, or re-export it")
    return Check("integrity", True, f"{len(Bundle.open(path, verify=False).manifest['files'])} files match their sha256")


def check_backend(backend: str) -> Check:
    try:
        pipelines.require(backend)
    except ScaleCertError as exc:
        return Check("backend", False, str(exc), "install the engine, or pass --backend ort-cpu")
    return Check("backend", True, f"{backend} is available")


def check_margin(bundle: Bundle, backend: str, precision: str) -> Check:
    delta = bundle.margin(backend, precision)
    if delta is None:
        return Check("margin", False, f"no numeric margin measured for {backend} at {precision}",
                     f"run `scalecert build {bundle.path} --backend {backend} --precision {precision}` on this device")
    return Check("margin", True, f"delta {delta:g} ({manifest_io.margin_key(backend, precision)})", data={"delta": delta})


def check_engines(bundle: Bundle, precision: str) -> Check:
    from scalecert.runtime.pipelines.tensorrt import engine_compatibility, gpu_identity, require_tensorrt

    fix = f"run `scalecert build {bundle.path} --backend trt --precision {precision}` on this device"
    entry = bundle.engines(precision)
    if not entry:
        return Check("engines", False, f"no TensorRT engines for {precision}", fix)
    try:
        trt = require_tensorrt()
        name, capability = gpu_identity()
    except ScaleCertError as exc:
        return Check("engines", False, str(exc), "use a machine with an NVIDIA GPU and TensorRT")
    reason = engine_compatibility(entry, trt.__version__, name, capability)
    if reason:
        return Check("engines", False, reason.split("; rebuild")[0], fix)
    return Check("engines", True, f"built for {entry['gpu']} with TensorRT {entry['tensorrt']}, as here")


# -- on-device probes ------------------------------------------------------------------------------


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
    got = probes.answers(certifier, bundle)
    if expected is None:
        return Check("known answer", False, f"no answers recorded for {backend} at {precision}",
                     f"run `scalecert build {bundle.path} --backend {backend} --precision {precision}`"), got
    problems = probes.differences(expected, got, slack)
    data = {"images": len(got), "reference": source, "slack": slack, "differences": problems}
    if problems:
        return Check("known answer", False, f"{len(problems)} of the {len(got)} probe images differ from the recorded "
                     f"{source} answers ({problems[0]})",
                     "this device computes other answers than recorded: do not certify here; rebuild or report", data), got
    statuses = ", ".join(a["status"] for a in got)
    return Check("known answer", True, f"{len(got)} probe images as recorded for {source} ({statuses})", data=data), got


def probe_latency(certifier, bundle: Bundle) -> Check:
    image = os.path.join(bundle.path, bundle.probe_images[0]) if bundle.probe_images else None
    pixels = certifier.prepare(image) if image else probes.synthetic_images(bundle.image_hw, 1)[0]
    certifier.certify(pixels)  # warm-up: sessions, allocators, kernel choice
    results = [certifier.certify(pixels) for _ in range(LATENCY_RUNS)]
    median = float(np.median([r.latency_ms for r in results]))
    data = {"latency_ms": median, "prefix_ms": float(np.median([r.prefix_ms for r in results])),
            "suffix_ms": float(np.median([r.suffix_ms for r in results])), "windows": results[0].windows_evaluated}
    return Check("latency", None, f"{median:.2f} ms per image (median of {LATENCY_RUNS}; prefix {data['prefix_ms']:.2f}, "
                 f"suffix {data['suffix_ms']:.2f} ms, {data['windows']} windows)", data=data)


def probe_pixels(bundle: Bundle) -> np.ndarray:
    """The image the locality and spread probes patch: the first probe image, else a synthetic one."""
    from scalecert.runtime.images import load_image

    if bundle.probe_images:
        return load_image(os.path.join(bundle.path, bundle.probe_images[0]), bundle.input_spec)
    return probes.synthetic_images(bundle.image_hw, 1)[0]


# -- the whole run ---------------------------------------------------------------------------------


def resolve_backend(backend: str, bundle: Bundle, precision: str) -> str:
    """`auto`: ort-cuda where its margin was measured and it runs here, else ort-cpu (as certify)."""
    if backend != "auto":
        return pipelines.canonical(backend)
    try:
        return pipelines.pick("auto", precision, bundle)
    except ScaleCertError:
        return "ort-cpu"


def run(path: str, backend: str = "auto", precision: str = "fp32", threads: int | None = None) -> Report:
    """Every check on this device; raises ScaleCertError only when `path` is no bundle at all."""
    from scalecert.runtime.certifier import Certifier

    bundle = Bundle.open(path, verify=False)
    if precision not in manifest_io.PRECISIONS:
        raise ScaleCertError(f"unknown precision {precision!r} ({', '.join(manifest_io.PRECISIONS)})")
    backend = resolve_backend(backend, bundle, precision)
    report = Report(path, backend, precision, environment(backend, threads))
    checks = report.checks
    checks.append(check_integrity(path))
    checks.append(check_backend(backend))
    checks.append(check_margin(bundle, backend, precision))
    if backend == "trt" and checks[1].ok:
        checks.append(check_engines(bundle, precision))
    try:
        bundle.files(precision)
    except ScaleCertError as exc:
        checks.append(Check("variant", False, str(exc), f"run `scalecert build {path} --precision {precision}`"))
    if not all(c.ok for c in checks):
        checks.append(Check("probes", None, "not run: fix the failures above first"))
        return report
    with Certifier(bundle, backend, precision, threads=threads) as certifier:
        checks.extend(device_probes(certifier, bundle, backend, precision))
    return report


def device_probes(certifier, bundle: Bundle, backend: str, precision: str, spread: bool = True) -> list[Check]:
    pixels = probe_pixels(bundle)
    checks = [probe_locality(certifier.pipeline, bundle, pixels)]
    if spread:
        checks.append(probe_spread(certifier.pipeline, bundle, pixels, certifier.delta))
    checks.append(probe_known_answers(certifier, bundle, backend, precision)[0])
    checks.append(probe_latency(certifier, bundle))
    return checks


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
            got = probes.answers(certifier, bundle)
            reference = bundle.probe_answers("ort-cpu", "fp32")
            if precision == "fp32" and reference is not None and key != "ort-cpu-fp32":
                slack = max(certifier.delta, bundle.margin("ort-cpu", "fp32") or 0.0) + CROSS_ENGINE_FP32
                problems = probes.differences(reference, got, slack)
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
