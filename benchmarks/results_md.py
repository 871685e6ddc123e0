"""Render `scalecert bench` reports as the markdown tables of benchmarks/RESULTS.md:
    python benchmarks/results_md.py benchmarks/RESULTS.md REPORT.json..."""
from __future__ import annotations

import contextlib
import json
import os
import sys


def table(report: dict) -> str:
    b = report["bundle"]
    title = report.get("title") or (b["arch"] or b["source"])
    lines = [f"### {title}: {report['data']['images']} images of `{report['data']['path'].split('/shared/')[-1]}`, "
             f"patch {b['patch'][0]}x{b['patch'][1]}, layer `{b['layer']}` ({'x'.join(map(str, b['feature_shape']))})", "",
             "| config | windows | run (mean) | clean | certified | false alerts | median ms | p95 ms | x eager | x ORT |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, c in enumerate(report["configs"]):
        r = report["ratios"].get(str(i), {})
        ratio = lambda k: f"{r[k]['median_of_per_image_ratios']:.2f}" if k in r else "-"  # noqa: E731
        lines.append(f"| {c.get('precision', 'fp32')}, prune {c['prune_rate']}, stride {c['stride']} | {c['windows_total']} | {c['windows_evaluated_mean']:.1f} | "
                     f"{c['clean_accuracy']:.1%} | {c['certified_accuracy']:.1%} | {c['false_alert_rate']:.1%} | "
                     f"{c['latency_ms_median']:.1f} | {c['latency_ms_p95']:.1f} | {ratio('vs_torch')} | {ratio('vs_ort')} |")
    for engine, x in report["baseline"].items():
        lines.append(f"| baseline, {'PyTorch eager' if engine == 'torch' else 'ONNX Runtime'}{report.get('baseline_model', '')} | {x['masks']} masks | {x['masks']} | "
                     f"{x['clean_accuracy']:.1%} | {x['certified_accuracy']:.1%} | {x['false_alert_rate']:.1%} | "
                     f"{x['latency_ms_median']:.1f} | {x['latency_ms_p95']:.1f} | | |")
    return "\n".join(lines)


KEPT = "## Measured runtime choices"  # a hand-written section of RESULTS.md, kept across regenerations


def main(out: str, paths) -> None:
    kept = ""
    if os.path.exists(out):
        text = open(out).read()
        kept = text[text.index(KEPT):] if KEPT in text else ""
    reports = [json.load(open(p)) for p in paths]
    with open(out, "w") as f, contextlib.redirect_stdout(f):
        render(reports)
        if kept:
            print(kept.rstrip())


def render(reports) -> None:
    m = reports[0]["machine"]
    print("# CPU benchmark results\n")
    print(f"Machine: {m['cpu']}, {m['cores']} cores; {reports[0]['date'][:10]}; "
          f"onnxruntime {reports[0]['versions'].get('onnxruntime')}, torch {reports[0]['versions'].get('torch')}.")
    print("Command: `SHARED=../shared benchmarks/cpu.sh` (scalecert-export + scalecert bench --baseline "
          "--baseline-engine both); the ResNet-20 tuned tables come from `benchmarks/tune.sh` (scalecert tune, then "
          "bench). Ratios: baseline latency / scalecert latency per image, median over images.\n")
    for r in reports:
        print(table(r) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
