"""What `certify --data DIR -o FILE [--ray]` and `bench --ray` share: the --ray value, the folder run."""
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


def certify_folder_command(bundle, data, images, out, labels_csv, ray_address, workers, png_dir, as_json,
                           options) -> None:
    """certify --data DIR -o FILE [--ray]: every image of DIR into FILE (IMAGES must be empty)."""
    from scalecert.evaluation.folder import certify_folder

    ray_address = check_ray_address(ray_address)
    if out is None:
        flag = ("--ray" if ray_address is not None else "--labels" if labels_csv is not None
                else "--workers" if workers is not None else "--data")
        raise ScaleCertError(f"{flag} certifies a data folder into a file: add {'' if data else '--data DIR '}"
                             "-o results.jsonl (or .parquet)")
    if data is None:
        what = f"{len(images)} paths" if len(images) != 1 else f"{images[0]} (not a folder)"
        raise ScaleCertError(f"-o/--output: certifies one data folder given as --data DIR, got {what}")
    if not os.path.isdir(data):
        raise ScaleCertError(f"--data {data}: " + ("is a file, expected a folder" if os.path.exists(data)
                                                   else "no such directory"))
    if png_dir:
        raise ScaleCertError("--png-dir: not with --data (certify a few images one by one to draw them)")
    if options["batch"] < 1:
        raise ScaleCertError(f"--batch {options['batch']}: expected a positive number of windows")
    if workers is not None and workers < 1:
        raise ScaleCertError(f"--workers {workers}: expected a positive number")
    if workers is not None and ray_address is None:
        raise ScaleCertError("--workers: only with --ray (a local run is one process)")
    from scalecert.evaluation.results_file import output_format

    output_format(out)
    quiet = {"log": lambda line: None} if options["quiet"] else {}  # else the library's log: stderr
    counts = certify_folder(bundle, data, out, labels_csv, ray_address=ray_address,
                            workers=workers, **options, **quiet)
    errors = counts.get("error", 0)
    if as_json:
        click.echo(json.dumps({"out": out, **counts}))
    elif not options["quiet"]:
        statuses = ", ".join(f"{counts[s]} {s}" for s in ("certified", "alert", "uncertified", "error") if s in counts)
        click.echo(f"{out}: {counts['images']} images ({statuses}); {counts['written']} written now "
                   f"({counts['replaced']} replacing stale rows), {counts['skipped']} reused")
    if errors:
        click.echo(f"{errors} of {counts['images']} images could not be processed (status \"error\" in {out})", err=True)
        sys.exit(1)
