"""`scalecert certify`: a label no patch could force, or an alert, per image."""
from __future__ import annotations

import json
import os
import sys

import click

from scalecert.cli.app import main
from scalecert.bundle.manifest import PRECISIONS
from scalecert.errors import ScaleCertError
from scalecert.runtime import pipelines


@main.command()
@click.argument("bundle")
@click.argument("images", nargs=-1, required=True)
@click.option("--backend", default="auto", show_default=True, type=click.Choice(pipelines.CHOICES))
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(PRECISIONS),
              help="bundle variant (fp16/int8 come from `scalecert build`)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line per image")
@click.option("--batch", default=64, show_default=True, help="windows per suffix call")
@click.option("--early-exit", is_flag=True, help="stop at the first disagreeing window (deployment)")
@click.option("--png-dir", help="write a PNG per image: input, gate map, disagreeing windows")
@click.option("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
@click.option("--threshold", type=float, help="confidence threshold T: only windows at least this confident "
              "raise the alert (docs/design.md §7) [default: the bundle's]")
def certify(bundle, images, backend, precision, as_json, batch, early_exit, png_dir, threads, threshold):
    """Certify IMAGES against BUNDLE: a label no patch could force, or an alert."""
    from scalecert.runtime import Certifier

    if png_dir:
        os.makedirs(png_dir, exist_ok=True)
    failed = 0
    rows = []
    with Certifier.load(bundle, backend=backend, batch=batch, early_exit=early_exit, threads=threads,
                        precision=precision, threshold=threshold) as cert:
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
                from scalecert.evaluation.visualize import save_png

                stem = os.path.splitext(os.path.basename(path))[0]
                save_png(os.path.join(png_dir, stem + ".png"), pixels, result, cert.bundle)
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
    from scalecert.tables import format_table

    return format_table(header, lines)
