"""`scalecert demo`: export the pretrained EfficientNet-Lite0 and certify scikit-image's photos."""
from __future__ import annotations

import os

import click

from scalecert.cli import options
from scalecert.cli.app import main
from scalecert.cli.certify import certify

PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "camera")


def write_photos(folder: str) -> list[str]:
    from PIL import Image
    from skimage import data

    os.makedirs(folder, exist_ok=True)
    paths = []
    for name in PHOTOS:
        path = os.path.join(folder, f"{name}.png")
        if not os.path.exists(path):
            Image.fromarray(getattr(data, name)()).save(path)
        paths.append(path)
    return paths


def bundle_is_current(path: str) -> bool:
    from scalecert.bundle import Bundle
    from scalecert.errors import ScaleCertError

    try:
        Bundle.open(path)
        return True
    except ScaleCertError:
        return False


@main.command()
@click.option("-o", "--output", default="scalecert-demo", show_default=True, metavar="DIR",
              help="folder for the bundle, photos and PNGs")
@options.alias("--out", "output", "-o/--output", metavar="DIR")
@click.option("--patch", default="2%", show_default=True, help="patch size: N, HxW or P% of the input area")
@click.option("--fresh", is_flag=True, help="re-export even if the bundle exists")
@options.threads()
def demo(output, patch, fresh, threads):
    """Export pretrained EfficientNet-Lite0 (pip-shipped weights) and certify scikit-image photos."""
    from scalecert.export import ExportOptions, export_bundle

    from scalecert.errors import ScaleCertError

    out = output
    bundle = os.path.join(out, "efficientnet-lite0.scalecert")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ScaleCertError(f"--output {out}: is a file, expected a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ScaleCertError(f"--output {out}: cannot create it ({exc.strerror or exc})") from None
    if fresh or not bundle_is_current(bundle):
        from scalecert.core.geometry import parse_patch
        from scalecert.evaluation.baseline import mask_stride

        # scikit-image ships too few photos to measure a plan on; on 128 ImageNet images the measured
        # plan chose the identity prefix at the pixel baseline's 36-mask stride (benchmarks/RESULTS.md)
        stride = mask_stride((224, 224), parse_patch(patch, (224, 224)))[0]
        click.echo(f"exporting EfficientNet-Lite0 with a {patch} patch, pixel-space windows at stride {stride} "
                   f"(what the measured plan picks for these weights) -> {bundle}")
        opts = ExportOptions(model=None, arch="efficientnet-lite0", pretrained=True, patch=patch, layer="image",
                             stride=str(stride), output=bundle, force=True, echo=lambda line: click.echo("  " + line))
        with options.ort_threads(threads):
            export_bundle(opts)
    from scalecert.bundle import Bundle
    from scalecert.bundle.summary import render, summary

    click.echo(render(summary(Bundle.open(bundle).manifest)))
    click.echo("")
    photos = write_photos(os.path.join(out, "images"))
    ctx = click.get_current_context()
    ctx.invoke(certify, bundle=bundle, images=tuple(photos), backend="auto", precision="fp32", as_json=False, batch=64,
               early_exit=False, png_dir=os.path.join(out, "png"), threads=threads, threshold=None)
    click.echo(f"\nPNGs (verdict, agreement heat map, suspected region, gate map) in {os.path.join(out, 'png')}")
