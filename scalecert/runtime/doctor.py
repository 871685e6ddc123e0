"""`scalecert doctor`: is this bundle sound and fast on this device, with this engine? (no torch)

The report. Checks, in order; each is a `Check` (passed, failed with one line saying what to do, or
informational):

  integrity     every bundle file matches its sha256 in the manifest
  backend       the engine runs here (ONNX Runtime provider, TensorRT)
  margin        a numeric margin was measured for this backend and precision
  engines       (trt) the engines were built for this GPU and TensorRT version
  proof         the prefix is the file whose locality export or build proved and checked
  locality, spread, known answer, latency
                the device probes (runtime/probes.py), which `scalecert build --backend B` also
                runs and records (`probes.record_build`)
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from scalecert.bundle import Bundle
from scalecert.bundle import manifest as manifest_io
from scalecert.errors import ScaleCertError
from scalecert.runtime import pipelines
from scalecert.runtime.probes import (Check, environment, probe_known_answers, probe_latency, probe_locality,
                                      probe_pixels, probe_spread)


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


def check_proof(bundle: Bundle, precision: str) -> Check:
    """The prefix is the file whose locality export or build proved and checked (docs/design.md §3.1)."""
    try:
        name = os.path.basename(bundle.proven_prefix(precision))
    except ScaleCertError as exc:
        return Check("proof", False, str(exc), "re-export the bundle (or rebuild the precision) with this scalecert")
    check = bundle.manifest["locality"][name]["check"]
    return Check("proof", True, f"{name} proven local at export and checked at {check['positions']} patch positions",
                 data={"file": name, **check})


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
    else:
        checks.append(check_proof(bundle, precision))
    if not all(c.ok for c in checks):
        checks.append(Check("probes", None, "not run: fix the failures above first"))
        return report
    with Certifier(bundle, backend, precision, threads=threads) as certifier:
        checks.extend(device_probes(certifier, bundle, backend, precision))
    return report


def device_probes(certifier, bundle: Bundle, backend: str, precision: str, spread: bool = True) -> list[Check]:
    """The device probes (runtime/probes.py) through the certifier's own pipeline, in the report's order."""
    pixels = probe_pixels(bundle)
    checks = [probe_locality(certifier.pipeline, bundle, pixels)]
    if spread:
        checks.append(probe_spread(certifier.pipeline, bundle, pixels, certifier.delta))
    checks.append(probe_known_answers(certifier, bundle, backend, precision)[0])
    checks.append(probe_latency(certifier, bundle))
    return checks
