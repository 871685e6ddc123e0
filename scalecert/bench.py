"""`scalecert bench`: offline benchmark of a bundle (and variants) against the pixel-masking
baseline on the same images, in one run.

Report schema "scalecert-bench/1" (JSON): {schema, date, machine, versions, data, bundle (inspect
summary), configs: [ {precision, prune_rate, stride, windows_total, <metrics>} ], baseline: {torch|ort:
<metrics> + masks}, ratios: {config index: {vs_torch, vs_ort}}}. <metrics>: images, clean_accuracy,
certified_accuracy, false_alert_rate (alerts among clean images), accuracy_non_alerted,
windows_evaluated_mean/p95, latency_ms_median/p95/mean, images_per_s, prefix_ms_median,
suffix_ms_median, peak_rss_mb (process peak so far). Ratios are per image (baseline latency over
scalecert latency on the same image), summarised by their median, plus the ratio of medians.
"""
from __future__ import annotations

import datetime
import os
import platform
import resource
import shutil
import tempfile

import numpy as np

from . import manifest as manifest_io
from .errors import ScaleCertError

SCHEMA = "scalecert-bench/1"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def metrics(labels, preds, certified, latencies, prefix_ms=None, suffix_ms=None, evaluated=None) -> dict:
    y, p, c = np.asarray(labels), np.asarray(preds), np.asarray(certified, bool)
    lat = np.asarray(latencies, float)
    correct = p == y
    out = {
        "images": int(len(y)),
        "clean_accuracy": float(correct.mean()),
        "certified_accuracy": float((correct & c).mean()),
        "false_alert_rate": float((~c).mean()),
        "accuracy_non_alerted": float(correct[c].mean()) if c.any() else None,
        "latency_ms_median": float(np.median(lat)),
        "latency_ms_p95": float(np.percentile(lat, 95)),
        "latency_ms_mean": float(lat.mean()),
        "images_per_s": float(1e3 / lat.mean()),
        "peak_rss_mb": _peak_rss_mb(),
    }
    if evaluated is not None:
        ev = np.asarray(evaluated)
        out.update({"windows_evaluated_mean": float(ev.mean()), "windows_evaluated_p95": float(np.percentile(ev, 95))})
    if prefix_ms is not None:
        out.update({"prefix_ms_median": float(np.median(prefix_ms)), "suffix_ms_median": float(np.median(suffix_ms))})
    return out


def _progress(total: int, desc: str, quiet: bool):
    if quiet:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="img", leave=True)


def run_config(bundle: str, pixels, labels, batch: int, threads, quiet: bool, desc: str, precision: str = "fp32"):
    """-> (metrics row, per-image latencies, per-image windows evaluated)."""
    from .runtime import Certifier

    bar = _progress(len(pixels), desc, quiet)
    with Certifier.load(bundle, backend="ort", batch=batch, threads=threads, precision=precision) as cert:
        cert.certify(pixels[0])  # warm-up
        results = []
        for px in pixels:
            results.append(cert.certify(px))
            if bar:
                bar.update()
        windows_total = len(cert.windows)
    if bar:
        bar.close()
    lat = np.array([r.latency_ms for r in results])
    out = metrics(labels, [r.label for r in results], [r.status == "certified" for r in results], lat,
                  [r.prefix_ms for r in results], [r.suffix_ms for r in results], [r.windows_evaluated for r in results])
    out["windows_total"] = windows_total
    out["kept_fraction_mean"] = float(np.mean([r.kept_fraction for r in results]))
    return out, lat, [r.windows_evaluated for r in results]


def run_baseline(baseline, x_normalised, labels, quiet: bool) -> tuple[dict, np.ndarray]:
    bar = _progress(len(x_normalised), f"baseline ({baseline.engine})", quiet)
    baseline.certify(x_normalised[:1])  # warm-up
    rows = []
    for i in range(len(x_normalised)):
        rows.append(baseline.certify(x_normalised[i:i + 1]))
        if bar:
            bar.update()
    if bar:
        bar.close()
    lat = np.array([r["latency_ms"] for r in rows])
    out = metrics(labels, [r["label"] for r in rows], [r["certified"] for r in rows], lat)
    out["masks"] = rows[0]["masks"]
    out["engine"] = baseline.engine
    return out, lat


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("scalecert", "onnxruntime", "onnx", "numpy", "torch"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def run_bench(bundle: str, data: str, labels_csv=None, limit=None, seed=None, prune_rates=None, strides=None,
              baseline_engines=(), masks_per_axis=6, model=None, arch=None, batch=64, threads=None, quiet=False,
              precisions=None) -> dict:
    from .calibration.data import image_set
    from .inspect import summary
    from .runtime.preprocess import load_image, normalize

    manifest = manifest_io.read(bundle)
    items = image_set(data, labels_csv, limit, seed)
    if any(label is None for _, label in items):
        raise ScaleCertError(f"{data}: images without labels (use an ImageFolder tree or --labels CSV)")
    spec = manifest["input"]
    pixels = np.stack([load_image(p, spec) for p, _ in items])
    labels = np.array([label for _, label in items])
    rates = prune_rates or [manifest["sin"]["prune_rate"]]
    strides = strides or [manifest["windows"]["stride"]]
    precisions = precisions or ["fp32"]
    missing = [p for p in precisions if p not in manifest.get("precisions", {"fp32": None})]
    if missing:
        raise ScaleCertError(f"{bundle} has no {missing[0]} variant; add it with `scalecert build {bundle} "
                             f"--precision {missing[0]} --calib DIR`")
    report = {"schema": SCHEMA, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": _machine(), "versions": _versions(),
              "data": {"path": os.path.abspath(data), "images": len(items), "limit": limit, "seed": seed},
              "bundle": summary(manifest), "configs": [], "baseline": {}, "ratios": {}, "windows_evaluated_hist": {}}
    latencies = []
    scratch = tempfile.mkdtemp(prefix="scalecert-bench-")
    try:
        from .variants import derive

        for precision in precisions:
            for rate in rates:
                for stride in strides:
                    variant = derive(bundle, os.path.join(scratch, f"r{rate}-s{stride}"), prune_rate=rate, stride=stride)
                    name = f"{precision} prune {rate} stride {stride}"
                    row, lat, evaluated = run_config(variant, pixels, labels, batch, threads, quiet, name, precision)
                    report["configs"].append({"precision": precision, "prune_rate": rate, "stride": stride, **row})
                    report["windows_evaluated_hist"][f"{precision} r{rate} s{stride}"] = evaluated
                    latencies.append(lat)
                    shutil.rmtree(variant, ignore_errors=True)
        if baseline_engines:
            base_lat = _baselines(report, manifest, normalize(pixels, spec), labels, baseline_engines, masks_per_axis,
                                  model, arch, threads, quiet, scratch)
            for i, lat in enumerate(latencies):
                report["ratios"][str(i)] = {
                    f"vs_{engine}": {"median_of_per_image_ratios": float(np.median(b / lat)),
                                     "ratio_of_medians": float(np.median(b) / np.median(lat))}
                    for engine, b in base_lat.items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def _baselines(report, manifest, x, labels, engines, masks_per_axis, model, arch, threads, quiet, scratch) -> dict:
    from .baseline import PixelMaskingBaseline, mask_set
    from .exporter.loading import load_model

    source = manifest["source"]
    path = model or source.get("path")
    arch = arch or source.get("arch")
    if path is None or not os.path.exists(path):
        raise ScaleCertError("--baseline needs the model: pass --model FILE (and --arch) ")
    loaded = load_model(path, arch)
    masks = mask_set(manifest["threat_model"]["image"], manifest["threat_model"]["patch"], (masks_per_axis,) * 2)
    out = {}
    for engine in engines:
        if engine == "torch":
            module = loaded.model.module() if loaded.kind == "exported" else loaded.model
            baseline = PixelMaskingBaseline.torch_eager(module, masks, threads)
        elif engine == "ort":
            import onnx_ir as ir

            from .exporter.to_onnx import to_onnx

            full, _ = to_onnx(loaded)
            full_path = os.path.join(scratch, "full.onnx")
            ir.save(full, full_path)
            baseline = PixelMaskingBaseline.onnx_runtime(full_path, masks, threads)
        else:
            raise ScaleCertError(f"unknown baseline engine {engine!r} (torch, ort)")
        row, lat = run_baseline(baseline, x, labels, quiet)
        report["baseline"][engine] = row
        out[engine] = lat
    return out


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    configs = report["configs"]
    for ax, key, xlabel in ((axes[0], "latency_ms_median", "median latency per image (ms)"),
                            (axes[1], "windows_evaluated_mean", "windows evaluated per image (mean)")):
        ax.scatter([c[key] for c in configs], [100 * c["certified_accuracy"] for c in configs], label="scalecert")
        for c in configs:
            ax.annotate(f"{c.get('precision', 'fp32')} r{c['prune_rate']} s{c['stride']}", (c[key], 100 * c["certified_accuracy"]), fontsize=8)
        for engine, b in report["baseline"].items():
            bx = b["latency_ms_median"] if key == "latency_ms_median" else b["masks"]
            ax.scatter([bx], [100 * b["certified_accuracy"]], marker="x", s=80, label=f"baseline ({engine})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("certified accuracy (%)")
        ax.set_xscale("log" if key == "latency_ms_median" else "linear")
        ax.legend(fontsize=8)
    hist = report.get("windows_evaluated_hist", {})
    if hist:
        every = np.concatenate([np.asarray(v) for v in hist.values()])
        step = max(1, int(np.ceil((every.max() - every.min() + 1) / 40)))
        bins = np.arange(every.min(), every.max() + step + 1, step) - 0.5
    for label, values in hist.items():
        axes[2].hist(values, bins=bins, alpha=0.5, label=label)
    axes[2].set_xlabel("windows evaluated per image")
    axes[2].set_ylabel("images")
    if hist:
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
