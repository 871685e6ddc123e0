"""What `certify --out/--ray` and `bench --ray` share: the --ray value and the folder run's summary."""
from __future__ import annotations

import json
import os
import sys

import click

from scalecert.errors import ScaleCertError


def check_ray_address(value: str | None) -> str | None:
    """None (run here), "auto" (bare --ray) or a cluster address; a path is a misplaced --ray."""
    if value is None or value == "auto":
        return value
    if not value.strip():
        raise ScaleCertError("--ray: empty address (write --ray alone, or --ray=HOST:PORT / ray://HOST:10001)")
    if os.path.exists(value):
        raise ScaleCertError(f"--ray {value}: that is a path, not a cluster address; put a bare --ray after the "
                             "arguments, or write --ray=HOST:PORT")
    return value


def certify_folder_command(bundle, images, out, labels_csv, ray_address, workers, png_dir, as_json, options) -> None:
    from scalecert.evaluation.folder import certify_folder

    ray_address = check_ray_address(ray_address)
    if out is None:
        flag = "--ray" if ray_address is not None else "--labels" if labels_csv is not None else "--workers"
        raise ScaleCertError(f"{flag} certifies a data folder into a file: add --out results.jsonl (or .parquet)")
    if len(images) != 1 or not os.path.isdir(images[0]):
        what = f"{len(images)} paths" if len(images) != 1 else f"{images[0]} (not a folder)"
        raise ScaleCertError(f"--out: expected one data folder, got {what}")
    if png_dir:
        raise ScaleCertError("--png-dir: not with --out (certify a few images without --out to draw them)")
    if options["batch"] < 1:
        raise ScaleCertError(f"--batch {options['batch']}: expected a positive number of windows")
    if options["threads"] is not None and options["threads"] < 1:
        raise ScaleCertError(f"--threads {options['threads']}: expected a positive number")
    if workers is not None and workers < 1:
        raise ScaleCertError(f"--workers {workers}: expected a positive number")
    if workers is not None and ray_address is None:
        raise ScaleCertError("--workers: only with --ray (a local run is one process)")
    from scalecert.evaluation.results_file import output_format

    output_format(out)
    counts = certify_folder(bundle, images[0], out, labels_csv, ray_address=ray_address,
                            workers=workers, **options)
    errors = counts.get("error", 0)
    if as_json:
        click.echo(json.dumps({"out": out, **counts}))
    else:
        statuses = ", ".join(f"{counts[s]} {s}" for s in ("certified", "alert", "uncertified", "error") if s in counts)
        click.echo(f"{out}: {counts['images']} images ({statuses}); {counts['written']} written now "
                   f"({counts['replaced']} replacing stale rows), {counts['skipped']} reused")
    if errors:
        click.echo(f"{errors} of {counts['images']} images could not be processed (status \"error\" in {out})", err=True)
        sys.exit(1)
