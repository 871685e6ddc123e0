"""Command line: scalecert {export, inspect, certify} and the scalecert-export entry point."""
from __future__ import annotations

import json
import os
import sys

import click

from .errors import ScaleCertError


class _Group(click.Group):
    def invoke(self, ctx):
        return _guard(lambda: super(_Group, self).invoke(ctx))


def _guard(call):
    """One clear line and a non-zero exit for bad input; a traceback only with SCALECERT_DEBUG=1."""
    try:
        return call()
    except ScaleCertError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("SCALECERT_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        click.echo(f"error: internal failure ({type(exc).__name__}: {first}); rerun with SCALECERT_DEBUG=1 "
                   "for the traceback", err=True)
        sys.exit(3)


@click.group(cls=_Group)
@click.version_option(package_name="scalecert")
def main():
    """Certified detection of adversarial patches (ScaleCert), compiled to ONNX bundles."""


def _export_options(f):
    options = [
        click.argument("model", required=False),
        click.option("--arch", help="built-in architecture for a state_dict checkpoint (see --list-archs)"),
        click.option("--pretrained", is_flag=True, help="use the weights shipped for --arch (efficientnet-lite0)"),
        click.option("--input-size", help="CxHxW, e.g. 3x224x224 (default: from --arch or the model)"),
        click.option("--patch", help="patch size: N, HxW or P% of the input area [default: 2%, or a tuned checkpoint's]"),
        click.option("--layer", help="superficial layer: auto, an ONNX tensor or a module path [default: auto, or tuned]"),
        click.option("--prune-rate", help="fraction of feature positions gated off, or auto [default: auto; tuned: its rate]"),
        click.option("--stride", help="occluding stride in feature positions, or auto [default: auto, or tuned]"),
        click.option("--window-budget", default=100, show_default=True, help="most windows per image for --stride auto"),
        click.option("--max-growth", default=2.0, show_default=True, help="--layer auto: window share / patch share bound"),
        click.option("--calib", type=str, help="calibration images (folder) for SIN importances and threshold"),
        click.option("--calib-limit", default=128, show_default=True, help="calibration images used at most"),
        click.option("--prune-tolerance", default=0.01, show_default=True, help="--prune-rate auto: accuracy loss allowed"),
        click.option("--channel-prune", default=0.0, show_default=True, help="fraction of least important channels removed"),
        click.option("--keep-dead-channels", is_flag=True, help="zero channels with alpha = 0 instead of cutting them out"),
        click.option("--phi", type=click.Choice(["abs", "relu"]), default="abs", show_default=True),
        click.option("--classes", help="text file with one class name per line"),
        click.option("--trust-pickle", is_flag=True, help="allow unpickling a whole nn.Module (runs code from the file)"),
        click.option("-o", "--output", help="bundle directory (default: MODEL stem + .scalecert)"),
        click.option("--force", is_flag=True, help="replace an existing bundle"),
        click.option("--list-archs", is_flag=True, help="list built-in architectures and exit"),
        click.option("--quiet", is_flag=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _do_export(model, arch, pretrained, input_size, patch, layer, prune_rate, stride, window_budget, max_growth,
               calib, calib_limit, prune_tolerance, channel_prune, keep_dead_channels, phi, classes, trust_pickle, output, force,
               list_archs, quiet):
    if list_archs:
        from .exporter.archs import REGISTRY

        for name, spec in REGISTRY.items():
            click.echo(f"{name:20s} {'x'.join(map(str, spec.preprocess.input_size)):10s} {spec.description}")
        return
    from .exporter import ExportOptions, export_bundle
    from .exporter.loading import parse_input_size

    opts = ExportOptions(model=model, output=output, arch=arch, pretrained=pretrained,
                         input_size=parse_input_size(input_size) if input_size else None, patch=patch, layer=layer,
                         prune_rate=prune_rate, stride=stride, window_budget=window_budget, max_growth=max_growth,
                         calib=calib, calib_limit=calib_limit, prune_tolerance=prune_tolerance,
                         channel_prune=channel_prune, remove_dead_channels=not keep_dead_channels, phi=phi, classes=classes, trust_pickle=trust_pickle, force=force)
    path = export_bundle(opts)
    if not quiet:
        for line in opts.log:
            click.echo(line)
        click.echo(f"wrote {path}")


@main.command("export")
@_export_options
def export_cmd(**kwargs):
    """Export MODEL to a ScaleCert bundle."""
    _do_export(**kwargs)


@click.command("scalecert-export")
@_export_options
def export_main(**kwargs):
    """Export MODEL to a ScaleCert bundle (same as `scalecert export`)."""
    _guard(lambda: _do_export(**kwargs))


@main.command()
@click.argument("bundle")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def inspect(bundle, as_json):
    """Summarise a bundle: layer, receptive field, footprint, windows, pruning, sizes."""
    from . import manifest as manifest_io
    from .inspect import summary, render

    info = summary(manifest_io.read(bundle))
    click.echo(json.dumps(info, indent=2) if as_json else render(info))


@main.command()
@click.argument("bundle")
@click.argument("images", nargs=-1, required=True)
@click.option("--backend", default="auto", show_default=True, help="auto, ort, ort-cuda or trt")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "int8"]),
              help="bundle variant (fp16/int8 come from `scalecert build`)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line per image")
@click.option("--batch", default=64, show_default=True, help="windows per suffix call")
@click.option("--early-exit", is_flag=True, help="stop at the first disagreeing window (deployment)")
@click.option("--png-dir", help="write a PNG per image: input, gate map, disagreeing windows")
@click.option("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
def certify(bundle, images, backend, precision, as_json, batch, early_exit, png_dir, threads):
    """Certify IMAGES against BUNDLE: a label no patch could force, or an alert."""
    from .runtime import Certifier

    if png_dir:
        os.makedirs(png_dir, exist_ok=True)
    failed = 0
    rows = []
    with Certifier.load(bundle, backend=backend, batch=batch, early_exit=early_exit, threads=threads,
                        precision=precision) as cert:
        for path in images:
            try:
                pixels = cert.prepare(path)
                result = cert.certify(pixels, name=path)
            except ScaleCertError as exc:
                failed += 1
                if as_json:
                    click.echo(json.dumps({"image": path, "status": "error", "error": str(exc)}))
                else:
                    click.echo(f"error: {exc}", err=True)
                continue
            if png_dir:
                from .visualize import save_png

                stem = os.path.splitext(os.path.basename(path))[0]
                save_png(os.path.join(png_dir, stem + ".png"), pixels, result, cert.manifest)
            if as_json:
                click.echo(json.dumps(result.to_json()))
            else:
                rows.append(result)
    if rows:
        click.echo(_table(rows))
    if failed:
        click.echo(f"{failed} of {len(images)} images could not be processed", err=True)
        sys.exit(1)


def _table(results) -> str:
    header = ("image", "status", "label", "class", "windows run", "ms")
    lines = [(os.path.basename(r.image), r.status, str(r.label), (r.class_name or "-")[:28],
              f"{r.windows_evaluated}/{r.windows_total}", f"{r.latency_ms:.1f}") for r in results]
    return _format_table(header, lines)


def _format_table(header, rows) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


@main.command()
@click.argument("bundle")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "int8"]))
@click.option("--calib", help="calibration images (needed for int8 activation scales)")
@click.option("--calib-limit", default=64, show_default=True)
@click.option("--backend", default="ort", show_default=True, type=click.Choice(["ort", "ort-cuda", "trt"]),
              help="engine to measure the numeric margin on (trt: also build TensorRT engines)")
@click.option("--workspace-mb", default=4096, show_default=True, help="TensorRT builder workspace limit")
@click.option("--max-windows", default=128, show_default=True, help="TensorRT profile: most windows per suffix call")
@click.option("--max-images", default=16, show_default=True, help="TensorRT profile: most images per prefix call")
@click.option("--quiet", is_flag=True)
def build(bundle, precision, calib, calib_limit, backend, workspace_mb, max_windows, max_images, quiet):
    """Add a precision variant, its numeric margin and (with --backend trt) engines to BUNDLE."""
    from .build import build as run_build

    run_build(bundle, precision, calib, backend, calib_limit, workspace_mb, max_windows, max_images,
              say=(lambda _: None) if quiet else click.echo)
    click.echo(f"updated {bundle}")


@main.command()
@click.argument("model", required=False)
@click.option("--arch", required=True, help="built-in architecture of the state_dict (see scalecert-export --list-archs)")
@click.option("--pretrained", is_flag=True, help="start from the weights shipped for --arch")
@click.option("--data", required=True, help="training images: ImageFolder tree, or flat folder with labels.csv")
@click.option("--val", help="validation images (default: hold out 5% of --data, at most --val-limit)")
@click.option("--patch", default="2%", show_default=True, help="patch size: N, HxW or P% of the input area")
@click.option("--layer", default="auto", show_default=True, help="superficial layer, as for export")
@click.option("--prune-rate", default=0.5, show_default=True, help="fraction of feature positions gated off in training")
@click.option("--stride", default="auto", show_default=True, help="occluding stride, as for export")
@click.option("--window-budget", default=100, show_default=True)
@click.option("--epochs", default=3, show_default=True)
@click.option("--batch", default=128, show_default=True)
@click.option("--lr", default=0.01, show_default=True, help="peak learning rate (one-cycle, SGD with momentum)")
@click.option("--occlusions", default=1, show_default=True, help="occluded copies per training image")
@click.option("--limit", type=int, help="use at most N training images")
@click.option("--val-limit", default=1000, show_default=True)
@click.option("--cert-limit", default=200, show_default=True, help="validation images certified each epoch")
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="continue from OUTPUT.last")
@click.option("--threads", type=int, help="torch threads (default: torch's choice)")
@click.option("-o", "--output", required=True, help="tuned checkpoint (.pt); OUTPUT.last holds the resumable state")
@click.option("--quiet", is_flag=True)
def tune(**kwargs):
    """Fine-tune MODEL for its superficial split, SIN gates and window occlusion."""
    from .tune import TuneOptions, tune as run_tune

    quiet = kwargs["quiet"]
    result = run_tune(TuneOptions(**kwargs), say=(lambda _: None) if quiet else click.echo)
    best = result["best"]
    click.echo(f"wrote {result['output']} (epoch {best['epoch']}: val clean {best['clean_accuracy']:.1%}, "
               f"certified {best['certified_accuracy']:.1%})")


@main.command()
@click.option("--out", default="scalecert-demo", show_default=True, help="folder for the bundle, photos and PNGs")
@click.option("--patch", default="2%", show_default=True)
@click.option("--fresh", is_flag=True, help="re-export even if the bundle exists")
def demo(out, patch, fresh):
    """Export pretrained EfficientNet-Lite0 (pip-shipped weights) and certify scikit-image photos."""
    from .demo import bundle_is_current, write_photos
    from .exporter import ExportOptions, export_bundle

    bundle = os.path.join(out, "efficientnet-lite0.scalecert")
    os.makedirs(out, exist_ok=True)
    if fresh or not bundle_is_current(bundle):
        click.echo(f"exporting EfficientNet-Lite0 with a {patch} patch -> {bundle}")
        opts = ExportOptions(model=None, arch="efficientnet-lite0", pretrained=True, patch=patch,
                             output=bundle, force=True)
        export_bundle(opts)
        for line in opts.log:
            click.echo("  " + line)
    from . import manifest as manifest_io
    from .inspect import render, summary

    click.echo(render(summary(manifest_io.read(bundle))))
    click.echo("")
    photos = write_photos(os.path.join(out, "images"))
    ctx = click.get_current_context()
    ctx.invoke(certify, bundle=bundle, images=tuple(photos), backend="auto", precision="fp32", as_json=False, batch=64,
               early_exit=False, png_dir=os.path.join(out, "png"), threads=None)
    click.echo(f"\nPNGs (image, gate map, disagreeing windows) in {os.path.join(out, 'png')}")


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
def bench(bundle, data, labels_csv, limit, seed, prune_rates, strides, precisions, baseline, baseline_engine, masks, model, arch,
          batch, threads, report_path, plot_path, as_json):
    """Benchmark BUNDLE on labelled images: accuracy, certified accuracy, false alerts, latency."""
    from .bench import plot, run_bench

    try:
        rates, stride_list = _floats(prune_rates), _ints(strides)
    except ValueError:
        raise ScaleCertError("--prune-rate and --stride take comma-separated numbers, e.g. 0,0.3,0.5") from None
    engines = () if not baseline else (("torch", "ort") if baseline_engine == "both" else (baseline_engine,))
    report = run_bench(bundle, data, labels_csv, limit, seed, rates, stride_list, engines, masks, model, arch, batch,
                       threads, quiet=as_json, precisions=precisions.split(",") if precisions else None)
    if report_path:
        with open(report_path, "w") as f:
            json.dump(report, f, indent=2)
    if plot_path:
        plot(report, plot_path)
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(_bench_table(report))


def _bench_table(report) -> str:
    header = ("config", "clean", "certified", "false alerts", "windows run", "median ms", "p95 ms", "x torch", "x ort")
    rows = []
    for i, c in enumerate(report["configs"]):
        ratio = report["ratios"].get(str(i), {})
        rows.append((f"{c.get('precision', 'fp32')} prune {c['prune_rate']} stride {c['stride']} ({c['windows_total']} win)",
                     f"{c['clean_accuracy']:.1%}", f"{c['certified_accuracy']:.1%}", f"{c['false_alert_rate']:.1%}",
                     f"{c['windows_evaluated_mean']:.1f}", f"{c['latency_ms_median']:.1f}", f"{c['latency_ms_p95']:.1f}",
                     *(f"{ratio[k]['median_of_per_image_ratios']:.2f}" if k in ratio else "-" for k in ("vs_torch", "vs_ort"))))
    for engine, b in report["baseline"].items():
        rows.append((f"baseline {engine} ({b['masks']} masks)", f"{b['clean_accuracy']:.1%}", f"{b['certified_accuracy']:.1%}",
                     f"{b['false_alert_rate']:.1%}", str(b["masks"]), f"{b['latency_ms_median']:.1f}",
                     f"{b['latency_ms_p95']:.1f}", "-", "-"))
    return _format_table(header, rows)
