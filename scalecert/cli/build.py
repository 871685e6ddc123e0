"""`scalecert build`: precision variants, margins and engines."""
from __future__ import annotations

import click

from scalecert.cli import options
from scalecert.cli.app import main

VARIANT_KEYS = ("prefix", "suffix", "family", "float_kept", "accepted_loss", "vs_fp32")


@main.command()
@click.argument("bundle")
@options.precision("the variant to add: fp16 (explicit casts), int8 (static QDQ, needs --calib); fp32 measures "
                   "the margin only")
@options.calib("int8 activation scales (a quarter held back to judge the variant)", limit=64)
@options.backend("engine to measure the numeric margin on (trt: also build the TensorRT suffix engine)", auto=False)
@click.option("--workspace-mb", default=4096, show_default=True, help="TensorRT builder workspace limit")
@click.option("--max-windows", default=128, show_default=True, help="TensorRT profile: most windows per suffix call")
@click.option("--max-images", type=int, hidden=True, help="no longer used: TensorRT runs only the suffix")
@click.option("--min-agreement", default=0.95, show_default=True,
              help="int8: least top-1 agreement with fp32 on held-back calibration images")
@click.option("--accept-loss", is_flag=True, help="int8: keep a variant below the floor (agreement, certified rate)")
@options.threads()
@options.as_json("print one JSON object at the end: the variant, its margin")
@options.quiet()
def build(bundle, precision, calib, calib_limit, backend, workspace_mb, max_windows, max_images, min_agreement,
          accept_loss, threads, as_json, quiet):
    """Add a precision variant, its numeric margin and (with --backend trt) engines to BUNDLE."""
    from scalecert.compile.build import build as run_build
    from scalecert.errors import ScaleCertError

    for flag, value in (("--calib-limit", calib_limit), ("--workspace-mb", workspace_mb),
                        ("--max-windows", max_windows)):
        if value < 1:
            raise ScaleCertError(f"{flag} {value}: expected a positive number")
    if max_images is not None:  # the TensorRT prefix engine is gone: every backend runs the prefix on ORT CPU
        click.echo("deprecated: --max-images is ignored (TensorRT runs only the suffix; the prefix runs on ONNX "
                   "Runtime CPU)", err=True)
    from scalecert.runtime.pipelines import canonical

    backend = canonical(backend)
    say = options.say_for(quiet, as_json)
    if calib is not None:
        from scalecert.runtime.datasets import image_set

        say(image_set(calib, limit=calib_limit).describe())  # the data rule, checked before the bundle is staged

    with options.ort_threads(threads):
        manifest = run_build(bundle, precision=precision, calib=calib, backend=backend, calib_limit=calib_limit,
                             workspace_mb=workspace_mb, max_windows=max_windows, say=say, accept_loss=accept_loss,
                             min_agreement=min_agreement)
    variant = _variant(manifest, precision)
    deviation = variant.get("vs_fp32")
    if deviation and precision != "int8":  # int8's comparison is printed by build itself
        say(f"{precision} vs fp32: top-1 agreement {deviation['top1_agreement']:.1%}, largest logit difference "
            f"{deviation['max_abs_logit_diff']:.3g} ({deviation['images']} images x "
            f"{deviation['windows_per_image']} windows)")
    say(f"updated {bundle}")
    if as_json:
        from scalecert.bundle.manifest import margin_key

        key = margin_key(backend, precision)
        options.print_json({"bundle": bundle, "precision": precision, "backend": backend,
                            "variant": {k: variant[k] for k in VARIANT_KEYS if k in variant},
                            "margin": {key: manifest["margin"].get(key)},
                            **({"engines": manifest["engines"][f"trt-{precision}"]} if backend == "trt" else {})})


def _variant(manifest, precision: str) -> dict:
    from scalecert.bundle.manifest import FP32_FILES

    variants = (manifest or {}).get("precisions") or {}
    return variants.get(precision) or (dict(FP32_FILES) if precision == "fp32" else {})
