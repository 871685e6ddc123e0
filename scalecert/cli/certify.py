"""`scalecert certify`: a label no patch could force, or an alert, per image."""
from __future__ import annotations

import json
import os
import sys

import click

from scalecert.cli import options
from scalecert.cli.app import main
from scalecert.errors import ScaleCertError


def display_names(paths) -> list[str]:
    """Each path relative to the folder all the images share: unique, never just a base name."""
    absolute = [os.path.abspath(p) for p in paths]
    try:
        common = os.path.commonpath([os.path.dirname(p) for p in absolute]) if absolute else ""
    except ValueError:  # different drives
        common = ""
    return [os.path.relpath(p, common) if common else p for p in absolute]


def png_names(names) -> list[str]:
    """PNG file names (relative to --png-dir) that never collide: the image's relative path with
    .png, and a counter where two would still meet (a.jpg and a.png)."""
    taken, out = set(), []
    for name in names:
        stem = os.path.splitext(name)[0]
        candidate, n = stem + ".png", 1
        while candidate.lower() in taken:
            n += 1
            candidate = f"{stem}-{n}.png"
        taken.add(candidate.lower())
        out.append(candidate)
    return out


def check_png_dir(png_dir: str) -> None:
    if os.path.exists(png_dir) and not os.path.isdir(png_dir):
        raise ScaleCertError(f"--png-dir {png_dir}: is a file, expected a folder")
    if os.path.isdir(png_dir):
        if not os.access(png_dir, os.W_OK | os.X_OK):
            raise ScaleCertError(f"--png-dir {png_dir}: is not writable")
        return
    parent = os.path.dirname(os.path.abspath(png_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ScaleCertError(f"--png-dir {png_dir}: cannot create it ({parent} is not a writable folder)")


@main.command()
@click.argument("bundle")
@click.argument("images", nargs=-1)
@options.backend(help="engine (auto: ort-cuda where measured and available, else ort-cpu)")
@options.precision()
@options.as_json("one JSON object per line per image, as each finishes")
@click.option("--batch", default=64, show_default=True, help="windows per suffix call")
@click.option("--early-exit", is_flag=True, help="stop at the first disagreeing window (deployment)")
@click.option("--png-dir", help="write a PNG per image (input, gate map, disagreeing windows), named by its path")
@options.threads()
@click.option("--threshold", type=float, help="confidence threshold T: only windows at least this confident "
              "raise the alert (docs/design.md §7) [default: the bundle's]")
@options.mode("detect: a certified label or an alert; recover: a label by double masking (docs/design.md §10) "
              "[default: the bundle's]")
@click.option("--certify-recovery", is_flag=True, help="with --mode recover: also check every pair of windows, "
              "and say whether the recovered label is certified (evaluation; costs all pairs)")
@click.option("--source-patch", help="certify against a patch in SOURCE pixels: HxW, N or P% of each image's area; "
              "refused if the bundle's input patch cannot cover it at an image's size (docs/design.md §8)")
@options.quiet()
@options.data("certify every image of this folder into -o FILE, one row per image, instead of IMAGES")
@options.output("with --data: the .jsonl or .parquet results file; rerunning reuses the rows of unchanged images "
                "certified by the same bundle and settings", aliases=("--out",))
@options.labels()
@click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
              help="with --data: run on Ray (`--ray`: RAY_ADDRESS's cluster or a local one; `--ray=ADDRESS`)")
@click.option("--workers", type=int, help="with --ray: actors in the pool (default: as many as the cluster holds)")
def certify(bundle, images, backend, precision, as_json, batch, early_exit, png_dir, threads, threshold, mode=None,
            certify_recovery=False, quiet=False, source_patch=None, data=None, output=None, labels_csv=None,
            ray_address=None, workers=None):
    """Certify IMAGES against BUNDLE: a label no patch could force, or an alert (--mode detect);
    or a recovered label (--mode recover).

    With --data DIR -o FILE, every image of the data folder gets a row in FILE (docs/cluster.md)."""
    from scalecert.runtime import Certifier
    from scalecert.runtime.recovery import Recoverer, recovery_options

    if data is None and output is not None and len(images) == 1 and os.path.isdir(images[0]):
        options.deprecated("certify BUNDLE DIR", "certify BUNDLE --data DIR")
        data, images = images[0], ()
    if data is not None and images:
        raise ScaleCertError("give IMAGES or --data DIR, not both")
    if data is None and not images:
        raise click.UsageError("Missing argument 'IMAGES...' (image files, or --data DIR -o FILE)")
    mode = recovery_options(bundle, mode, certify_recovery, early_exit=early_exit, png_dir=png_dir,
                            threshold=threshold)
    if data is not None or output is not None or ray_address is not None or labels_csv is not None \
            or workers is not None:
        if mode == "recover" or source_patch:
            raise ScaleCertError("--data certifies data folders in detect mode, against the input-space patch; "
                                 "--mode recover and --source-patch work on images given one by one")
        from scalecert.cli.dataset import certify_folder_command

        return certify_folder_command(bundle, data, images, output, labels_csv, ray_address, workers, png_dir,
                                      as_json, dict(backend=backend, precision=precision, batch=batch,
                                                    early_exit=early_exit, threads=threads, threshold=threshold,
                                                    quiet=quiet))
    if batch < 1:
        raise ScaleCertError(f"--batch {batch}: expected a positive number of windows")
    if png_dir:
        check_png_dir(png_dir)
    from scalecert.runtime.images import max_pixels

    max_pixels()  # a bad SCALECERT_MAX_PIXELS is refused once, before any image
    from scalecert.runtime import source as source_space

    requested = source_space.check_requests(bundle, images, source_patch) if source_patch else {}
    names = display_names(images)
    pngs = png_names(names) if png_dir else None
    failed = 0
    rows = []
    bar = None
    if not as_json and not quiet and len(images) > 1 and sys.stderr.isatty():
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(images), desc="certifying", unit="img", leave=False, file=sys.stderr)
        except ImportError:
            bar = None
    if mode == "recover":
        opened = Recoverer.load(bundle, backend=backend, batch=batch, threads=threads, precision=precision,
                                certify=certify_recovery)
    else:
        opened = Certifier.load(bundle, backend=backend, batch=batch, early_exit=early_exit, threads=threads,
                                precision=precision, threshold=threshold, evaluation=bool(png_dir))
    with opened as cert:
        if png_dir:
            os.makedirs(png_dir, exist_ok=True)
        for i, (path, name) in enumerate(zip(images, names)):
            try:
                pixels, source_hw = cert.prepare_source(path)
                run = cert.recover if mode == "recover" else cert.certify
                result = run(pixels, name=path, source=cert.source_report(
                    source_hw, requested.get(path), source_space.describe(path).global_scale))
                if png_dir:
                    from scalecert.evaluation.visualize import save_png

                    target = os.path.join(png_dir, pngs[i])
                    try:
                        os.makedirs(os.path.dirname(target), exist_ok=True)
                        save_png(target, pixels, result, cert.bundle)
                    except OSError as exc:
                        raise ScaleCertError(f"{target}: cannot write the PNG ({exc.strerror or exc})") from None
            except ScaleCertError as exc:
                failed += 1
                if as_json:
                    click.echo(json.dumps({"image": path, "status": "error", "error": str(exc)}))
                    sys.stdout.flush()
                elif bar is not None:
                    bar.write(f"error: {exc}", file=sys.stderr)
                else:
                    click.echo(f"error: {exc}", err=True)
                if bar is not None:
                    bar.update()
                continue
            if as_json:
                click.echo(json.dumps(result.to_json()))
                sys.stdout.flush()
            else:
                rows.append((name, result))
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    if rows and not quiet:
        click.echo(_table(rows) if mode == "detect" else _recovery_table(rows))
    if failed:
        click.echo(f"{failed} of {len(images)} images could not be processed", err=True)
        sys.exit(1)


def _table(results) -> str:
    """(display name, Result) rows -> the table."""
    header = ("image", "status", "label", "class", "windows run", "ms", "source patch HxW")
    lines = [(name, r.status, str(r.label), (r.class_name or "-")[:28],
              f"{r.windows_evaluated}/{r.windows_total}", f"{r.latency_ms:.1f}", _source_cell(r.source)) for name, r in results]
    from scalecert.tables import format_table

    return format_table(header, lines)


def _recovery_table(results) -> str:
    """(display name, RecoveryResult) rows -> the table of --mode recover."""
    certified = results[0][1].certified is not None
    header = ("image", "label", "class", *(("certified",) if certified else ()), "case", "disagreers",
              "rows run", "ms", "source patch HxW")
    lines = [(name, str(r.label), (r.class_name or "-")[:28], *((("yes" if r.certified else "no"),) if certified else ()),
              r.case, str(len(r.disagreers)), str(r.windows_evaluated + r.pairs_evaluated), f"{r.latency_ms:.1f}",
              _source_cell(r.source)) for name, r in results]
    from scalecert.tables import format_table

    return format_table(header, lines)


def _source_cell(source) -> str:
    """The source-patch column: runtime/source.py::cell of the result's report (typed or its JSON)."""
    from scalecert.runtime import source as source_space

    return source_space.cell(source.to_json() if hasattr(source, "to_json") else source)
