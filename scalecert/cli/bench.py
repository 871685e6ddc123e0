"""`scalecert bench`: accuracy, certified accuracy, false alerts and latency against the baseline."""
from __future__ import annotations

import json

import click

from scalecert.cli.app import main
from scalecert.errors import ScaleCertError


def _floats(text):
    return [float(v) for v in text.split(",")] if text else None


def _ints(text):
    return [int(v) for v in text.split(",")] if text else None


@main.command()
@click.argument("bundle")
@click.option("--data", required=True, help="ImageFolder tree, or a flat folder with --labels")
@click.option("--labels", "labels_csv", help="CSV file,index (default: labels.csv beside the images)")
@click.option("--limit", type=int, help="at most N images")
@click.option("--seed", type=int, help="shuffle with this seed before --limit")
@click.option("--prune-rate", "prune_rates", help="comma-separated pruning rates to sweep (bundle's by default)")
@click.option("--stride", "strides", help="comma-separated occluding strides to sweep (bundle's by default)")
@click.option("--precision", "precisions", help="comma-separated precisions to sweep: fp32,fp16,int8 (fp32 by default)")
@click.option("--threshold", "thresholds", help="comma-separated confidence thresholds T to report "
              "(docs/design.md §7), e.g. 0,0.5,0.8,0.95 [default: the bundle's]")
@click.option("--baseline", is_flag=True, help="also run the PyTorch-eager pixel-masking baseline")
@click.option("--baseline-engine", type=click.Choice(["torch", "ort", "both"]), default="torch", show_default=True)
@click.option("--masks", default=6, show_default=True, help="baseline masks per axis (6 -> 36 masks)")
@click.option("--model", help="model file for the baseline (default: the bundle's source)")
@click.option("--arch", help="--arch for --model")
@click.option("--batch", default=64, show_default=True, help="windows per suffix call")
@click.option("--threads", type=int, help="threads for every engine (default: all cores)")
@click.option("--report", "report_path", help="write the JSON report here")
@click.option("--plot", "plot_path", help="write a PNG: certified accuracy vs latency / windows, histogram")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON (no progress bar)")
def bench(bundle, data, labels_csv, limit, seed, prune_rates, strides, precisions, thresholds, baseline, baseline_engine,
          masks, model, arch, batch, threads, report_path, plot_path, as_json):
    """Benchmark BUNDLE on labelled images: accuracy, certified accuracy, false alerts, latency."""
    from scalecert.evaluation.bench import run_bench
    from scalecert.evaluation.report import bench_table, plot

    from scalecert.core.decision import check_threshold

    try:
        rates, stride_list, threshold_list = _floats(prune_rates), _ints(strides), _floats(thresholds)
    except ValueError:
        raise ScaleCertError("--prune-rate, --stride and --threshold take comma-separated numbers, e.g. 0,0.3,0.5") from None
    for threshold in threshold_list or ():
        check_threshold(threshold)
    engines = () if not baseline else (("torch", "ort") if baseline_engine == "both" else (baseline_engine,))
    report = run_bench(bundle, data, labels_csv, limit, seed, rates, stride_list, engines, masks, model, arch, batch,
                       threads, quiet=as_json, precisions=precisions.split(",") if precisions else None,
                       thresholds=threshold_list)
    if report_path:
        with open(report_path, "w") as f:
            json.dump(report, f, indent=2)
    if plot_path:
        plot(report, plot_path)
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(bench_table(report))
