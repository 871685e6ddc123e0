"""`scalecert bench --mode recover`: certified recovery (double masking, docs/design.md §10) of a
bundle against PatchCleanser's pixel-space baseline on the same images, in one run.

Per system: accuracy of the un-occluded prediction, accuracy of the recovered label (the fast
path), certified recovery accuracy (every pair predicts the true label), latency of the fast path
on every image and of certification over all pairs (no early exit) on the first `timing_images`.
Certification for the accuracy columns exits early (evaluation/recovery_eval.certification: same
label and verdict). Baselines run in a process of their own each, as in bench.py.
"""
from __future__ import annotations

import datetime
import os
import shutil
import tempfile

import numpy as np

from scalecert.bundle import Bundle
from scalecert.errors import ScaleCertError
from scalecert.evaluation.report import SCHEMA

PAIR_BATCH = 128


def _stats(values) -> dict:
    values = np.asarray(values, float)
    if not len(values):
        return {}
    return {"median": float(np.median(values)), "mean": float(values.mean()), "p90": float(np.percentile(values, 90)),
            "n": int(len(values))}


def summarise(labels, plain, fast, certified, timed) -> dict:
    """One system's row: `plain` un-occluded predictions, `fast` fast-path Outcomes, `certified`
    early-exit certification Outcomes (all images), `timed` all-pairs Outcomes (a prefix of them)."""
    labels = np.asarray(labels)
    recovered = np.array([o.label for o in fast])
    ok = np.array([o.certified and o.label == y for o, y in zip(certified, labels)])
    return {
        "images": int(len(labels)),
        "plain_accuracy": float(np.mean(np.asarray(plain) == labels)),
        "recovered_accuracy": float(np.mean(recovered == labels)),
        "certified_recovery_accuracy": float(ok.mean()),
        "certified_recovery_count": int(ok.sum()),
        "cases": {case: int(sum(o.case == case for o in fast)) for case in ("agreed", "disagreer", "majority")},
        "fast_label_equals_certification_label": int(sum(a.label == b.label for a, b in zip(fast, certified))),
        "fast_path_ms": _stats([o.latency_ms for o in fast]),
        "fast_path_rows": _stats([o.evaluated for o in fast]),
        "certification_ms": _stats([o.latency_ms for o in timed]),
        "certification_rows": int(timed[0].evaluated) if timed else None,
        "timed_certified_agree": int(sum(a.certified == b.certified and a.label == b.label
                                         for a, b in zip(timed, certified))),
    }


def evaluate_system(n: int, items, predictor_for, plain_for, timing_images: int, quiet: bool, desc: str) -> dict:
    from scalecert.evaluation.recovery_eval import certification, fast_path

    from scalecert.evaluation.bench import _progress

    bar = _progress(len(items), desc, quiet)
    plain, fast, certified, timed = [], [], [], []
    fast_path(n, predictor_for(items[0]))  # warm-up
    for k, item in enumerate(items):
        plain.append(plain_for(item))
        fast.append(fast_path(n, predictor_for(item)))
        certified.append(certification(n, predictor_for(item), PAIR_BATCH, early_exit=True, fast=fast[-1]))
        if k < timing_images:
            timed.append(certification(n, predictor_for(item)))
        if bar:
            bar.update()
    if bar:
        bar.close()
    return plain, fast, certified, timed


def run_recovery_bench(bundle: str, data: str, labels_csv=None, limit=None, seed=None, baseline_engines=(),
                       masks_per_axis=6, model=None, arch=None, batch=64, threads=None, quiet=False,
                       timing_images: int = 50) -> dict:
    from scalecert.bundle.summary import summary
    from scalecert.evaluation.bench import _baselines, _machine, _versions
    from scalecert.evaluation.recovery_eval import BundleRecovery
    from scalecert.runtime import Certifier
    from scalecert.runtime.certifier import EMPTY_WINDOW
    from scalecert.runtime.datasets import check_labels, image_set
    from scalecert.runtime.images import load_image, normalize

    opened = Bundle.open(bundle)
    items = image_set(data, labels_csv, limit, seed)
    if any(label is None for _, label in items):
        raise ScaleCertError(f"{data}: images without labels ({items.layout}; use an ImageFolder tree, labels.csv "
                             "or --labels CSV)")
    check_labels(items, opened.manifest.get("num_classes"), f"--data {data}")
    if not quiet:
        import sys

        print(items.describe(), file=sys.stderr)
    spec = opened.input_spec
    pixels = np.stack([load_image(path, spec) for path, _ in items])
    labels = np.array([label for _, label in items])
    report = {"schema": SCHEMA, "mode": "recover", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": _machine(), "versions": _versions(),
              "data": {"path": os.path.abspath(data), "layout": items.layout, "images": len(items), "limit": limit,
                       "seed": seed},
              "bundle": summary(opened.manifest), "timing_images": min(timing_images, len(items)),
              "recovery": {}, "baseline": {}, "ratios": {},
              "pairs_path": "one suffix row per pair (both rectangles), no dedupe on the gate"}
    with Certifier.load(bundle, backend="ort", batch=batch, threads=threads) as cert:
        evaluator = BundleRecovery(cert)

        def plain_for(px):
            features, _ = cert.features(px[None])
            return int(cert.window_logits(cert.pipeline.select(features, 0), EMPTY_WINDOW).argmax())

        outcome = evaluate_system(evaluator.n, pixels, evaluator.predictor, plain_for, timing_images, quiet,
                                  "recovery (bundle, ort fp32)")
        report["recovery"]["fp32 ort"] = {"windows": evaluator.n, "pairs": evaluator.n * (evaluator.n + 1) // 2,
                                          **summarise(labels, *outcome)}
    if baseline_engines:
        scratch = tempfile.mkdtemp(prefix="scalecert-bench-")
        try:
            _baselines(report, opened, normalize(pixels, spec), labels, baseline_engines, masks_per_axis, model, arch,
                       threads, quiet, scratch, worker=_recovery_baseline_process, extra=(timing_images,))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        ours = report["recovery"]["fp32 ort"]
        for engine, row in report["baseline"].items():
            report["ratios"][f"vs_{engine}"] = {
                "certification_ratio_of_medians": row["certification_ms"]["median"] / ours["certification_ms"]["median"],
                "fast_path_ratio_of_medians": row["fast_path_ms"]["median"] / ours["fast_path_ms"]["median"]}
    return report


def _recovery_baseline_process(engine: str, path: str, arch, images: str, masks, labels, threads, quiet: bool,
                               scratch: str, timing_images: int):
    """Runs in a spawned process: PatchCleanser on every image with one engine."""
    from scalecert.evaluation.baseline import PatchCleanserBaseline
    from scalecert.evaluation.bench import open_baseline

    baseline = open_baseline(PatchCleanserBaseline, engine, path, arch, masks, threads, scratch)
    x = np.load(images)
    with baseline:
        plain_for = lambda k: int(next(iter(baseline.runner.infer({"image": x[k:k + 1]}).values())).argmax())
        outcome = evaluate_system(len(masks), list(range(len(x))), lambda k: baseline.predictor(x[k:k + 1]),
                                  plain_for, timing_images, quiet, f"PatchCleanser ({engine})")
    row = {"masks": len(masks), "pairs": len(masks) * (len(masks) + 1) // 2, "engine": engine,
           "model": os.path.abspath(path), **summarise(labels, *outcome)}
    return row, np.array([o.latency_ms for o in outcome[3]])


def recovery_table(report: dict) -> str:
    """Plain-text table of a recovery report: one line per system, then the speed ratios."""
    rows = [("system", "plain", "recovered", "cert. recovery", "fast ms (med)", "cert. ms (med)", "rows/cert")]
    systems = [(f"scalecert {name} ({r['windows']} windows)", r) for name, r in report["recovery"].items()]
    systems += [(f"PatchCleanser {engine} ({r['masks']} masks)", r) for engine, r in report["baseline"].items()]
    for name, r in systems:
        rows.append((name, f"{r['plain_accuracy']:.1%}", f"{r['recovered_accuracy']:.1%}",
                     f"{r['certified_recovery_accuracy']:.1%}", f"{r['fast_path_ms'].get('median', float('nan')):.2f}",
                     f"{r['certification_ms'].get('median', float('nan')):.2f}", str(r["certification_rows"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.append(f"{report['data']['images']} images; certification latency over all pairs on the first "
                 f"{report['timing_images']}")
    for engine, ratio in report["ratios"].items():
        lines.append(f"speed {engine}: certification {ratio['certification_ratio_of_medians']:.2f}x, fast path "
                     f"{ratio['fast_path_ratio_of_medians']:.2f}x (ratio of medians)")
    return "\n".join(lines)
