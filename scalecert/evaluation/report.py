"""The `scalecert bench` report: schema, metrics, table and plot.

Report schema "scalecert-bench/1" (JSON): {schema, date, machine, versions, data, bundle (inspect
summary), configs: [ {precision, prune_rate, stride, windows_total, <metrics>} ], baseline: {torch|ort:
<metrics> + masks}, ratios: {config index: {vs_torch, vs_ort}}, errors: [ {image, status: "error", error} ]
for images that could not be read (the others are still benchmarked)}; data: {path, layout, images, limit, seed}.
<metrics>: images, clean_accuracy, certified_accuracy, accuracy_without_alert, false_alert_rate
(alerts among clean images), uncertified_rate, accuracy_non_alerted,
windows_evaluated_mean/p95, latency_ms_median/p95/mean, images_per_s, prefix_ms_median,
suffix_ms_median, peak_rss_mb (process peak so far). Ratios are per image (baseline latency over
scalecert latency on the same image), summarised by their median, plus the ratio of medians.
Each config also has "thresholds": {T: accuracy metrics at confidence threshold T} (docs/design.md §7),
decided from the same window predictions. Each baseline ran in a process of its own ("process").
"ran_on" says where scalecert's configs ran: {where: "local", processes: 1}, or with `--ray` {where:
"ray", address, ray (version), nodes, cluster_cpus, cluster_gpus, workers, threads_per_worker}; each
config's own "ran_on" adds, on Ray, wall_s and wall_images_per_s (actor start-up included). On Ray
the latency figures are the workers' own per-image timings, so they mean what a local run's mean.
"""
from __future__ import annotations

import resource

import numpy as np

from scalecert.tables import format_table

SCHEMA = "scalecert-bench/1"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def accuracy_metrics(labels, preds, statuses) -> dict:
    """Over clean images: certified accuracy, accuracy without alert, false alerts (alerts on clean
    images), and the share that is neither certified nor alerted (thresholds above 0)."""
    y, p, s = np.asarray(labels), np.asarray(preds), np.asarray(statuses)
    correct, certified, alert = p == y, s == "certified", s == "alert"
    return {
        "clean_accuracy": float(correct.mean()),
        "certified_accuracy": float((correct & certified).mean()),
        "accuracy_without_alert": float((correct & ~alert).mean()),
        "false_alert_rate": float(alert.mean()),
        "uncertified_rate": float((s == "uncertified").mean()),
        "accuracy_non_alerted": float(correct[~alert].mean()) if (~alert).any() else None,
    }


def metrics(labels, preds, statuses, latencies, prefix_ms=None, suffix_ms=None, evaluated=None) -> dict:
    lat = np.asarray(latencies, float)
    out = {
        "images": int(len(labels)),
        **accuracy_metrics(labels, preds, statuses),
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


def bench_table(report) -> str:
    header = ("config", "clean", "certified", "false alerts", "windows run", "median ms", "p95 ms", "x torch", "x ort")
    rows = []
    for i, c in enumerate(report["configs"]):
        ratio = report["ratios"].get(str(i), {})
        rows.append((f"{c.get('precision', 'fp32')} prune {c['prune_rate']} stride {c['stride']} ({c['windows_total']} win)",
                     f"{c['clean_accuracy']:.1%}", f"{c['certified_accuracy']:.1%}", f"{c['false_alert_rate']:.1%}",
                     f"{c['windows_evaluated_mean']:.1f}", f"{c['latency_ms_median']:.1f}", f"{c['latency_ms_p95']:.1f}",
                     *(f"{ratio[k]['median_of_per_image_ratios']:.2f}" if k in ratio else "-" for k in ("vs_torch", "vs_ort"))))
        for threshold, t in c.get("thresholds", {}).items():
            if float(threshold) > 0:
                rows.append((f"  at confidence threshold {threshold}", "", f"{t['certified_accuracy']:.1%}",
                             f"{t['false_alert_rate']:.1%}", "", "", "", "", ""))
    for engine, b in report["baseline"].items():
        rows.append((f"baseline {engine} ({b['masks']} masks)", f"{b['clean_accuracy']:.1%}", f"{b['certified_accuracy']:.1%}",
                     f"{b['false_alert_rate']:.1%}", str(b["masks"]), f"{b['latency_ms_median']:.1f}",
                     f"{b['latency_ms_p95']:.1f}", "-", "-"))
    return format_table(header, rows)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
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
    for c in configs:  # the alert operating points: certified accuracy against false alerts, per threshold
        points = sorted((float(t), v) for t, v in c.get("thresholds", {}).items())
        if points:
            xs, ys = [100 * v["false_alert_rate"] for _, v in points], [100 * v["certified_accuracy"] for _, v in points]
            axes[3].plot(xs, ys, marker="o", label=f"{c.get('precision', 'fp32')} r{c['prune_rate']} s{c['stride']}")
            for (t, _), x, y in zip(points, xs, ys):
                axes[3].annotate(f"T={t:g}", (x, y), fontsize=7)
    for engine, b in report["baseline"].items():
        axes[3].scatter([100 * b["false_alert_rate"]], [100 * b["certified_accuracy"]], marker="x", s=80,
                        label=f"baseline ({engine})")
    axes[3].set_xlabel("false alerts on clean images (%)")
    axes[3].set_ylabel("certified accuracy (%)")
    axes[3].set_title("confidence thresholds")
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
