"""`scalecert build`: precision variants, margins and engines."""
from __future__ import annotations

import click

from scalecert.bundle.manifest import PRECISIONS
from scalecert.cli.app import main
from scalecert.runtime import pipelines


@main.command()
@click.argument("bundle")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(PRECISIONS))
@click.option("--calib", help="calibration images (needed for int8 activation scales)")
@click.option("--calib-limit", default=64, show_default=True)
@click.option("--backend", default="ort", show_default=True, type=click.Choice(("ort", *pipelines.BACKENDS)),
              help="engine to measure the numeric margin on (trt: also build TensorRT engines)")
@click.option("--workspace-mb", default=4096, show_default=True, help="TensorRT builder workspace limit")
@click.option("--max-windows", default=128, show_default=True, help="TensorRT profile: most windows per suffix call")
@click.option("--max-images", default=16, show_default=True, help="TensorRT profile: most images per prefix call")
@click.option("--min-agreement", default=0.95, show_default=True,
              help="int8: least top-1 agreement with fp32 on held-back calibration images")
@click.option("--accept-loss", is_flag=True, help="int8: keep a variant below the floor (agreement, certified rate)")
@click.option("--quiet", is_flag=True, help="print nothing but errors")
def build(bundle, precision, calib, calib_limit, backend, workspace_mb, max_windows, max_images, min_agreement,
          accept_loss, quiet):
    """Add a precision variant, its numeric margin and (with --backend trt) engines to BUNDLE."""
    from scalecert.compile.build import build as run_build
    from scalecert.errors import ScaleCertError

    for flag, value in (("--calib-limit", calib_limit), ("--workspace-mb", workspace_mb),
                        ("--max-windows", max_windows), ("--max-images", max_images)):
        if value < 1:
            raise ScaleCertError(f"{flag} {value}: expected a positive number")
    if calib is not None:
        from scalecert.runtime.datasets import image_set

        found = image_set(calib, limit=calib_limit)  # the data rule, checked before the bundle is staged
        if not quiet:
            click.echo(found.describe())

    manifest = run_build(bundle, precision, calib, backend, calib_limit, workspace_mb, max_windows, max_images,
                         say=(lambda _: None) if quiet else click.echo, accept_loss=accept_loss,
                         min_agreement=min_agreement)
    deviation = ((manifest or {}).get("precisions", {}).get(precision) or {}).get("vs_fp32")
    if deviation and not quiet and precision != "int8":  # int8's comparison is printed by build itself
        click.echo(f"{precision} vs fp32: top-1 agreement {deviation['top1_agreement']:.1%}, largest logit difference "
                   f"{deviation['max_abs_logit_diff']:.3g} ({deviation['images']} images x "
                   f"{deviation['windows_per_image']} windows)")
    click.echo(f"updated {bundle}")
