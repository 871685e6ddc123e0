"""`scalecert bench`: accuracy, certified accuracy, false alerts and latency against the baseline."""
from __future__ import annotations

import json
import os
import sys

import click

from scalecert.cli import options
from scalecert.cli.app import main
from scalecert.errors import ScaleCertError


def _numbers(text, kind, flag, low, high=None):
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise ScaleCertError(f"{flag} {text!r}: expected comma-separated numbers, e.g. "
                             + ("0,0.3,0.5" if kind is float else "3,5")) from None
    for v in values:
        if not low <= v <= (high if high is not None else v):
            raise ScaleCertError(f"{flag} {v:g}: expected " + (f"a number in [{low}, {high}]" if high is not None
                                                               else f"a number >= {low}"))
    return values


def check_options(limit, batch, threads, masks, precisions, report_path, plot_path, force):
    """Every option and output path checked before any image is read."""
    from scalecert.bundle.manifest import PRECISIONS
    from scalecert.bundle.staging import check_output_file
    from scalecert.runtime.images import max_pixels

    max_pixels()  # a bad SCALECERT_MAX_PIXELS is refused before any image

    for flag, value in (("--limit", limit), ("--batch", batch), ("--masks", masks)):
        if value is not None and value < 1:
            raise ScaleCertError(f"{flag} {value}: expected a positive number")
    for p in precisions or []:
        if p not in PRECISIONS:
            raise ScaleCertError(f"--precision {p!r}: expected a comma-separated list of {', '.join(PRECISIONS)}")
    if report_path and plot_path and os.path.abspath(report_path) == os.path.abspath(plot_path):
        raise ScaleCertError(f"-o/--output and --plot name the same file {report_path}")
    if report_path:
        check_output_file(report_path, force, "--output ")
    if plot_path:
        check_output_file(plot_path, force, "--plot ")


@main.command()
@click.argument("bundle")
@options.data("labelled images to benchmark on", required=True)
@options.labels()
@click.option("--limit", type=int, help="at most N images")
@click.option("--seed", type=int, help="shuffle with this seed before --limit")
@click.option("--prune-rate", "prune_rates", help="comma-separated pruning rates to sweep (bundle's by default)")
@click.option("--stride", "strides", help="comma-separated occluding strides to sweep (bundle's by default)")
@options.precision("comma-separated precisions to sweep", sweep=True)
@click.option("--threshold", "thresholds", help="comma-separated confidence thresholds T to report "
              "(docs/design.md §7), e.g. 0,0.5,0.8,0.95 [default: the bundle's]")
@click.option("--baseline", is_flag=True, help="also run the PyTorch-eager pixel-masking baseline")
@click.option("--baseline-engine", type=click.Choice(["torch", "ort", "both"]), default="torch", show_default=True)
@click.option("--masks", default=6, show_default=True, help="baseline masks per axis (6 -> 36 masks)")
@click.option("--model", help="model file for the baseline (default: the bundle's source)")
@click.option("--arch", help="--arch for --model")
@click.option("--batch", default=64, show_default=True, help="windows per suffix call")
@options.threads("ONNX Runtime intra-op threads of every engine, and PyTorch's threads for the baseline "
                 "[default: every core]")
@options.mode("detect: certified detection; recover: double masking over the bundle's windows (recovered label, "
              "certified recovery over every pair) against PatchCleanser's pixel masks", default="detect")
@click.option("--timing-images", default=50, show_default=True,
              help="--mode recover: images whose certification runs every pair with no early exit, for latency")
@options.output("write the JSON report here (schema scalecert-bench/1)", aliases=("--report",))
@click.option("--plot", "plot_path", metavar="FILE",
              help="write a PNG: certified accuracy vs latency / windows, histogram")
@click.option("--force", is_flag=True, help="replace existing -o/--output and --plot files")
@options.as_json("print the report as JSON (no progress bar)")
@options.quiet()
@click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
              help="certify on Ray actors (`--ray`: RAY_ADDRESS's cluster or a local one; `--ray=ADDRESS`); "
              "the baseline still runs here (docs/cluster.md)")
@click.option("--workers", type=int, help="with --ray: actors in the pool (default: as many as the cluster holds)")
def bench(bundle, data, labels_csv, limit, seed, prune_rates, strides, precisions, thresholds, baseline, baseline_engine,
          masks, model, arch, batch, threads, mode, timing_images, output, plot_path, force, as_json, quiet,
          ray_address=None, workers=None):
    """Benchmark BUNDLE on labelled images: accuracy, certified accuracy, false alerts, latency."""
    from scalecert.evaluation.bench import run_bench
    from scalecert.evaluation.report import bench_table, plot

    from scalecert.core.decision import check_threshold

    rates = _numbers(prune_rates, float, "--prune-rate", 0.0, 0.99)
    stride_list = _numbers(strides, int, "--stride", 1)
    threshold_list = _numbers(thresholds, float, "--threshold", 0.0)
    for threshold in threshold_list or ():
        check_threshold(threshold)
    check_options(limit, batch, threads, masks, precisions, output, plot_path, force)
    from scalecert.cli.dataset import check_ray_address

    ray_address = check_ray_address(ray_address)
    if workers is not None and (workers < 1 or ray_address is None):
        raise ScaleCertError(f"--workers {workers}: " + ("only with --ray (a local run is one process)"
                                                         if ray_address is None else "expected a positive number"))
    engines = () if not baseline else (("torch", "ort") if baseline_engine == "both" else (baseline_engine,))
    if mode == "recover":
        if ray_address is not None:
            raise ScaleCertError("--ray runs detection benchmarks; bench --mode recover runs in one process")
        return _recover(bundle, data, labels_csv, limit, seed, engines, masks, model, arch, batch, threads,
                        timing_images, output, force, as_json, quiet, (rates, stride_list, precisions,
                                                                            threshold_list, plot_path))
    report = run_bench(bundle, data, labels_csv, limit, seed, rates, stride_list, engines, masks, model, arch, batch,
                       threads, quiet=as_json or quiet, precisions=precisions, thresholds=threshold_list,
                       ray_address=ray_address, workers=workers)
    from scalecert.bundle.staging import write_file_atomic

    if output:
        def write_report(tmp):
            with open(tmp, "w") as f:
                json.dump(report, f, indent=2)

        write_file_atomic(output, write_report)
    if plot_path:
        write_file_atomic(plot_path, lambda tmp: plot(report, tmp))
    for error in report["errors"]:
        click.echo(f"error: {error['error']}", err=True)  # and in the report's "errors"
    if as_json:
        click.echo(json.dumps(report))
    elif not quiet:
        click.echo(bench_table(report))
    if report["errors"]:
        click.echo(f"{len(report['errors'])} of {report['data']['images'] + len(report['errors'])} images could "
                   "not be read; the others were benchmarked", err=True)
        sys.exit(1)


def _recover(bundle, data, labels_csv, limit, seed, engines, masks, model, arch, batch, threads, timing_images,
             report_path, force, as_json, quiet, detection_only):
    """--mode recover: the bundle's fp32 ORT pipelines against PatchCleanser (evaluation/recovery_bench.py)."""
    from scalecert.bundle.staging import write_file_atomic
    from scalecert.evaluation.recovery_bench import recovery_table, run_recovery_bench

    if any(v for v in detection_only):
        raise ScaleCertError("--mode recover takes no --prune-rate, --stride, --precision, --threshold or --plot "
                             "(the bundle's fp32 ORT pipelines)")
    if timing_images < 0:
        raise ScaleCertError(f"--timing-images {timing_images}: expected a number >= 0")
    report = run_recovery_bench(bundle, data, labels_csv, limit, seed, engines, masks, model, arch, batch, threads,
                                quiet=as_json or quiet, timing_images=timing_images)
    if report_path:
        def write_report(tmp):
            with open(tmp, "w") as f:
                json.dump(report, f, indent=2)

        write_file_atomic(report_path, write_report)
    if as_json or not quiet:
        click.echo(json.dumps(report) if as_json else recovery_table(report))
