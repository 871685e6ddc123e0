"""`scalecert bench`: offline benchmark of a bundle (and variants) against the pixel-masking
baseline on the same images, in one run. The report's schema is in evaluation/report.py."""
from __future__ import annotations

import datetime
import os
import platform
import shutil
import tempfile

import numpy as np

from scalecert.bundle import Bundle
from scalecert.evaluation.report import SCHEMA, accuracy_metrics, metrics
from scalecert.errors import ScaleCertError



def _progress(total: int, desc: str, quiet: bool):
    """A progress bar on a terminal only: never drawn into a pipe or a log file."""
    import sys

    if quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="img", leave=True)


def run_config(bundle: str, pixels, labels, batch: int, threads, quiet: bool, desc: str, precision: str = "fp32",
               thresholds=(0.0,), pool=None):
    """-> (metrics row, per-image latencies, per-image windows evaluated, where it ran). Every window
    is evaluated (no early exit), so the decision at each confidence threshold comes from the same
    predictions. `pool` (evaluation/distributed.py): on Ray actors, each image timed on its worker."""
    if pool is not None:
        results, where = pool.bench_results(bundle, pixels, quiet)
        opened = Bundle.open(bundle)
        windows_total, delta = len(opened.windows()), opened.margin("ort-cpu", precision)
    else:
        results, windows_total, delta = _certify_here(bundle, pixels, batch, threads, quiet, desc, precision)
        where = {"where": "local", "processes": 1}
    return (*summarise(results, labels, thresholds, windows_total, delta), where)


def _certify_here(bundle, pixels, batch, threads, quiet, desc, precision):
    from scalecert.runtime import Certifier

    bar = _progress(len(pixels), desc, quiet)
    with Certifier.load(bundle, backend="ort", batch=batch, threads=threads, precision=precision,
                        threshold=0.0, evaluation=True) as cert:
        cert.certify(pixels[0])  # warm-up
        results = []
        for px in pixels:
            results.append(cert.certify(px))
            if bar:
                bar.update()
        windows_total, delta = len(cert.windows), cert.delta
    if bar:
        bar.close()
    return results, windows_total, delta


def summarise(results, labels, thresholds, windows_total: int, delta: float):
    """certify() Results (no early exit) -> (metrics row, latencies, windows evaluated)."""
    from scalecert.core import decision

    lat = np.array([r.latency_ms for r in results])
    preds = [r.label for r in results]
    out = metrics(labels, preds, [r.status for r in results], lat, [r.prefix_ms for r in results],
                  [r.suffix_ms for r in results], [r.windows_evaluated for r in results])
    out["thresholds"] = {}
    for threshold in thresholds:
        statuses = [decision.decide(r.label, r.base_margin, r.window_labels, r.window_margins, delta, r.base_logconf,
                                    r.window_logconf, threshold).status for r in results]
        out["thresholds"][f"{threshold:g}"] = accuracy_metrics(labels, preds, statuses)
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
    out = metrics(labels, [r["label"] for r in rows], ["certified" if r["certified"] else "alert" for r in rows], lat)
    out["masks"] = rows[0]["masks"]
    out["engine"] = baseline.engine
    return out, lat


def _versions() -> dict:
    from scalecert.bundle.manifest import tool_versions

    return tool_versions()


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
              precisions=None, thresholds=None, ray_address=None, workers=None) -> dict:
    from scalecert.runtime.datasets import image_set
    from scalecert.bundle.summary import summary
    from scalecert.runtime.images import load_image, normalize

    opened = Bundle.open(bundle)
    manifest = opened.manifest
    precisions = precisions or ["fp32"]
    thresholds = thresholds or [opened.default_threshold]
    missing = [p for p in precisions if p not in opened.precisions]
    if missing:
        raise ScaleCertError(f"{bundle} has no {missing[0]} variant; add it with `scalecert build {bundle} "
                             f"--precision {missing[0]} --calib DIR`")
    for stride in strides or []:
        if stride > max(opened.feature_hw):
            raise ScaleCertError(f"--stride {stride}: larger than the {opened.feature_hw[0]}x{opened.feature_hw[1]} "
                                 "feature map; expected 1 ... " + str(max(opened.feature_hw)))
    pool = None
    if ray_address is not None:  # joined, and the pool checked against the cluster, before any image
        from scalecert.evaluation.distributed import Pool

        pool = Pool.plan(ray_address, opened, "ort-cpu", dict(batch=batch, threads=threads, precision="fp32",
                                                              threshold=0.0), workers)
    items = image_set(data, labels_csv, limit, seed)
    if any(label is None for _, label in items):
        raise ScaleCertError(f"{data}: {sum(label is None for _, label in items)} of {len(items)} images without "
                             f"labels ({items.layout}; use an ImageFolder tree, labels.csv or --labels CSV)")
    from scalecert.runtime.datasets import check_labels

    check_labels(items, manifest.get("num_classes"), f"--data {data}")
    if not quiet:
        import sys

        print(items.describe(), file=sys.stderr)
    spec = opened.input_spec
    decoded, errors = [], []
    for path, label in items:
        try:
            decoded.append((load_image(path, spec), label))
        except ScaleCertError as exc:  # one bad image is reported, the rest of the run goes on
            errors.append({"image": items.relative(path), "status": "error", "error": str(exc)})
    if not decoded:
        raise ScaleCertError(f"{data}: none of the {len(items)} images could be read ({errors[0]['error']})")
    pixels = np.stack([px for px, _ in decoded])
    labels = np.array([label for _, label in decoded])
    rates = prune_rates or [manifest["sin"]["prune_rate"]]
    strides = strides or [opened.stride]
    report = {"schema": SCHEMA, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": _machine(), "versions": _versions(),
              "data": {"path": os.path.abspath(data), "layout": items.layout, "images": len(decoded),
                       "limit": limit, "seed": seed},
              "errors": errors,
              "bundle": summary(manifest), "configs": [], "baseline": {}, "ratios": {}, "windows_evaluated_hist": {}}
    latencies = []
    scratch = tempfile.mkdtemp(prefix="scalecert-bench-")
    try:
        from scalecert.compile.variants import derive

        for precision in precisions:
            for rate in rates:
                for stride in strides:
                    variant = derive(bundle, os.path.join(scratch, f"r{rate}-s{stride}"), prune_rate=rate, stride=stride)
                    name = f"{precision} prune {rate} stride {stride}"
                    row, lat, evaluated, where = run_config(variant, pixels, labels, batch, threads, quiet, name,
                                                            precision, thresholds, pool and pool.for_precision(precision))
                    report["configs"].append({"precision": precision, "prune_rate": rate, "stride": stride, **row,
                                              "ran_on": where})
                    report["ran_on"] = {k: v for k, v in where.items() if not k.startswith("wall")}
                    report["windows_evaluated_hist"][f"{precision} r{rate} s{stride}"] = evaluated
                    latencies.append(lat)
                    shutil.rmtree(variant, ignore_errors=True)
        if baseline_engines:
            base_lat = _baselines(report, opened, normalize(pixels, spec), labels, baseline_engines, masks_per_axis,
                                  model, arch, threads, quiet, scratch)
            for i, lat in enumerate(latencies):
                report["ratios"][str(i)] = {
                    f"vs_{engine}": {"median_of_per_image_ratios": float(np.median(b / lat)),
                                     "ratio_of_medians": float(np.median(b) / np.median(lat))}
                    for engine, b in base_lat.items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def _baselines(report, bundle: Bundle, x, labels, engines, masks_per_axis, model, arch, threads, quiet, scratch,
               worker=None, extra=()) -> dict:
    """Each baseline engine in a process of its own (spawned, nothing else loaded), so no ONNX
    Runtime thread pool of ours competes with PyTorch's and neither pays for the other's memory;
    images arrive decoded and normalised, as the bundle's do. `worker` runs there (detection's
    _baseline_process unless given; recovery's is evaluation/recovery_bench.py's), with `extra`."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from scalecert.evaluation.baseline import mask_set

    source = bundle.manifest["source"]
    path = model or source.get("path")
    arch = arch or source.get("arch")
    if path is None or not os.path.exists(path):
        raise ScaleCertError("--baseline needs the model: pass --model FILE (and --arch)")
    masks = mask_set(bundle.image_hw, bundle.patch_hw, (masks_per_axis,) * 2)
    images = os.path.join(scratch, "baseline-images.npy")
    np.save(images, x)
    out = {}
    for engine in engines:
        if engine not in ("torch", "ort"):
            raise ScaleCertError(f"unknown baseline engine {engine!r} (torch, ort)")
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            row, lat = pool.submit(worker or _baseline_process, engine, path, arch, images, masks, labels, threads,
                                   quiet, scratch, *extra).result()
        row["process"] = "own (spawned)"
        report["baseline"][engine] = row
        out[engine] = lat
    return out


def _baseline_process(engine: str, path: str, arch, images: str, masks, labels, threads, quiet: bool, scratch: str):
    """Runs in the spawned process: load the model, run the baseline on every image."""
    from scalecert.evaluation.baseline import PixelMaskingBaseline

    with open_baseline(PixelMaskingBaseline, engine, path, arch, masks, threads, scratch) as baseline:
        return run_baseline(baseline, np.load(images), labels, quiet)


def open_baseline(kind, engine: str, path: str, arch, masks, threads, scratch: str):
    """A baseline (`kind`: PixelMaskingBaseline or PatchCleanserBaseline) over the model at `path`:
    the module in PyTorch eager, or its ONNX export (written to `scratch`) on ONNX Runtime."""
    from scalecert.export.loading import load_model

    loaded = load_model(path, arch)
    threads = threads or os.cpu_count()
    if engine == "torch":
        return kind.torch_eager(loaded.model.module() if loaded.kind == "exported" else loaded.model, masks, threads)
    import onnx_ir as ir

    from scalecert.export.to_onnx import to_onnx

    full, _ = to_onnx(loaded)
    full_path = os.path.join(scratch, "full.onnx")
    ir.save(full, full_path)
    return kind.onnx_runtime(full_path, masks, threads)
