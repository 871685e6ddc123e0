"""`scalecert bench --mode recover`: certified recovery (double masking, docs/design.md §10) of a
bundle against PatchCleanser's pixel-space baseline on the same images, in one run.

Both systems run the one recovery procedure (runtime/recovery.py::PairRecovery): the bundle through
the runtime's Recoverer, exactly what a device runs (the prefix, the fast path, then every pair after
the exact dedupe), PatchCleanser over its pixel masks. Per system: accuracy of the un-occluded
prediction, of the recovered label (the fast path) and of certified recovery (every pair predicts
the true label), rows run, and the latency of the fast path and of certification on the first
`timing_images`. Baselines run in a process of their own each, as in bench.py.
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

def _stats(values) -> dict:
    values = np.asarray(values, float)
    if not len(values):
        return {}
    return {"median": float(np.median(values)), "mean": float(values.mean()), "p90": float(np.percentile(values, 90)),
            "n": int(len(values))}


def summarise(labels, plain, outcomes, timing_images: int) -> dict:
    """One system's row: `plain` un-occluded predictions; `outcomes` per image (label, case,
    certified, fast-path ms, fast-path rows, certification ms, certification rows), every image
    certified over all pairs; latencies of the first `timing_images`."""
    labels = np.asarray(labels)
    recovered = np.array([o[0] for o in outcomes])
    ok = np.array([bool(o[2]) and o[0] == y for o, y in zip(outcomes, labels)])
    timed = outcomes[:timing_images]
    return {
        "images": int(len(labels)),
        "plain_accuracy": float(np.mean(np.asarray(plain) == labels)),
        "recovered_accuracy": float(np.mean(recovered == labels)),
        "certified_recovery_accuracy": float(ok.mean()),
        "certified_recovery_count": int(ok.sum()),
        "cases": {case: int(sum(o[1] == case for o in outcomes)) for case in ("agreed", "disagreer", "majority")},
        "fast_path_ms": _stats([o[3] for o in timed]),
        "fast_path_rows": _stats([o[4] for o in outcomes]),
        "certification_ms": _stats([o[5] for o in timed]),
        "certification_rows": _stats([o[6] for o in outcomes]),
    }


def evaluate_system(items, recover, plain_for, quiet: bool, desc: str) -> tuple[list, list]:
    """(plain predictions, outcomes) of one system; `recover(item)` -> the outcome tuple of summarise."""
    from scalecert.evaluation.bench import _progress

    bar = _progress(len(items), desc, quiet)
    recover(items[0])  # warm-up
    plain, outcomes = [], []
    for item in items:
        plain.append(plain_for(item))
        outcomes.append(recover(item))
        if bar:
            bar.update()
    if bar:
        bar.close()
    return plain, outcomes


def run_recovery_bench(bundle: str, data: str, labels_csv=None, limit=None, seed=None, baseline_engines=(),
                       masks_per_axis=6, model=None, arch=None, batch=64, threads=None, quiet=False,
                       timing_images: int = 50) -> dict:
    from scalecert.bundle.summary import summary
    from scalecert.evaluation.bench import _baselines, _machine, _versions
    from scalecert.runtime.certifier import EMPTY_WINDOW
    from scalecert.runtime.recovery import Recoverer
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
              "pairs_path": "the runtime's Recoverer: one suffix row per distinct pair (exact dedupe on the gate)"}
    with Recoverer.load(bundle, backend="ort", batch=batch, threads=threads) as rec:
        cert = rec.certifier

        def plain_for(px):
            features, _ = cert.features(px[None])
            return int(cert.window_logits(cert.pipeline.select(features, 0), EMPTY_WINDOW).argmax())

        def recover(px):  # the deployed path: prefix, fast path, then every pair after dedupe
            r = rec.recover(px, certify=True)
            return (r.label, r.case, r.certified, r.latency_ms, r.windows_evaluated + r.pairs_evaluated, r.certify_ms,
                    r.certification_pairs_evaluated)

        plain, outcomes = evaluate_system(pixels, recover, plain_for, quiet, "recovery (bundle, ort fp32)")
        report["recovery"]["fp32 ort"] = {"windows": len(rec.windows), "pairs": len(rec.pairs),
                                          **summarise(labels, plain, outcomes, timing_images)}
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
        def recover(k):
            o = baseline.recover(x[k:k + 1])
            return (o.verdict.label, o.verdict.case, o.certified, o.fast_ms, o.first_rows + o.second_rows, o.certify_ms,
                    o.certification_rows)

        plain, outcomes = evaluate_system(list(range(len(x))), recover, plain_for, quiet, f"PatchCleanser ({engine})")
    row = {"masks": len(masks), "pairs": len(masks) * (len(masks) + 1) // 2, "engine": engine,
           "model": os.path.abspath(path), **summarise(labels, plain, outcomes, timing_images)}
    return row, np.array([o[5] for o in outcomes[:timing_images]])


def recovery_table(report: dict) -> str:
    """Plain-text table of a recovery report: one line per system, then the speed ratios."""
    rows = [("system", "plain", "recovered", "cert. recovery", "fast ms (med)", "cert. ms (med)", "rows/cert")]
    systems = [(f"scalecert {name} ({r['windows']} windows)", r) for name, r in report["recovery"].items()]
    systems += [(f"PatchCleanser {engine} ({r['masks']} masks)", r) for engine, r in report["baseline"].items()]
    for name, r in systems:
        rows.append((name, f"{r['plain_accuracy']:.1%}", f"{r['recovered_accuracy']:.1%}",
                     f"{r['certified_recovery_accuracy']:.1%}", f"{r['fast_path_ms'].get('median', float('nan')):.2f}",
                     f"{r['certification_ms'].get('median', float('nan')):.2f}",
                     f"{r['certification_rows'].get('median', float('nan')):.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.append(f"{report['data']['images']} images; certification latency over all pairs on the first "
                 f"{report['timing_images']}")
    for engine, ratio in report["ratios"].items():
        lines.append(f"speed {engine}: certification {ratio['certification_ratio_of_medians']:.2f}x, fast path "
                     f"{ratio['fast_path_ratio_of_medians']:.2f}x (ratio of medians)")
    return "\n".join(lines)
