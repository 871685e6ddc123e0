"""`scalecert certify BUNDLE DIR --out FILE`: every image of a data folder (runtime/datasets.py,
the one data-input rule) certified into a results file (evaluation/results_file.py), in this
process or on a Ray cluster (evaluation/distributed.py), resuming what an earlier run finished: a
row is reused only for the same image file certified by the same bundle and settings."""
from __future__ import annotations

import sys

from scalecert.evaluation.results_file import (ResultsFile, certifier_sha256, certify_item, error_row, file_sha256,
                                               run_sha256)


def _local_rows(bundle, todo, options: dict, quiet: bool):
    from scalecert.runtime import Certifier

    bar = None
    if not quiet and sys.stderr.isatty():
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="certifying", unit="img", file=sys.stderr)
        except ImportError:
            pass
    with Certifier.load(bundle, **options) as cert:
        digest = certifier_sha256(cert)
        for image, rel, label in todo:
            yield certify_item(cert, digest, image, rel, label)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()


def _stale(row: dict, digest: str, image: str) -> str | None:
    """Why an earlier row cannot be reused: "bundle" (another bundle or settings, or no key),
    "file" (the file changed, or its row has no file hash), None (it can)."""
    if row.get("bundle_sha256") != digest:
        return "bundle"
    if row.get("file_sha256") is None or row["file_sha256"] != file_sha256(image):
        return "file"
    return None


def plan(items, done: dict, digest: str) -> tuple[list, dict]:
    """-> (todo [(path, relative path, label)], counts {reused, file, bundle, new}): an image is
    certified unless its earlier row has this run's bundle_sha256 and the file's current sha256."""
    todo, counts = [], {"reused": 0, "file": 0, "bundle": 0, "new": 0}
    for path, label in items:
        rel = items.relative(path)
        why = _stale(done[rel], digest, path) if rel in done else "new"
        counts["reused" if why is None else why] += 1
        if why is not None:
            todo.append((path, rel, label))
    return todo, counts


def certify_folder(bundle: str, data: str, out: str, labels_csv=None, backend="auto", precision="fp32", batch=64,
                   early_exit=False, threads=None, threshold=None, quiet=False, ray_address=None, workers=None,
                   log=lambda line: print(line, file=sys.stderr)) -> dict:
    """Certify every image of DATA without a current row in OUT; -> counts {images, skipped (rows
    reused), written, replaced (of those written, rows replacing a stale one), <status>: n}.
    `ray_address`: None runs here; "auto" a local Ray (or RAY_ADDRESS's cluster); else that address."""
    from scalecert.bundle import Bundle
    from scalecert.core.decision import check_threshold
    from scalecert.runtime import pipelines
    from scalecert.runtime.datasets import image_set
    from scalecert.runtime.images import max_pixels

    max_pixels()  # a bad SCALECERT_MAX_PIXELS is refused once, before any image
    if ray_address is not None:
        from scalecert.evaluation import distributed

        distributed.require_ray()
    items = image_set(data, labels_csv)
    opened = Bundle.open(bundle, verify=True)
    opened.files(precision)
    options = dict(batch=batch, early_exit=early_exit, threads=threads, precision=precision, threshold=threshold)
    if ray_address is None:
        options["backend"] = pipelines.pick(backend, precision, opened)
    else:  # joined, and the pool checked against the cluster, before the output is touched
        pool = distributed.Pool.plan(ray_address, opened, backend, options, workers)
    used = options if ray_address is None else pool.options
    digest = run_sha256(opened.manifest, precision, used["backend"], opened.default_threshold if threshold is None
                        else check_threshold(threshold), early_exit, batch)
    with ResultsFile(out) as results:
        todo, planned = plan(items, results.done, digest)
        log(f"{items.describe()}; {out}: {planned['reused']} rows reused, {planned['file'] + planned['bundle']} "
            f"replaced ({planned['file']} changed file, {planned['bundle']} other bundle or settings), "
            f"{planned['new']} new")
        if ray_address is None:
            rows = _local_rows(bundle, todo, options, quiet)
        else:
            log(pool.describe())
            rows = pool.certify_rows(bundle, todo, quiet)
        for row in rows:
            results.add(row)
        for image, rel, label in todo:  # every image gets its row, whatever the cluster did
            results.add(error_row(image, rel, label, f"{image}: no result came back from the workers", digest))
        counts = {"images": len(items), "skipped": planned["reused"], "written": results.added,
                  "replaced": results.replaced}
        for row in results.done.values():
            counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts
