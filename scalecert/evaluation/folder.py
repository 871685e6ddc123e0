"""`scalecert certify BUNDLE DIR --out FILE`: every image of a data folder (runtime/datasets.py,
the one data-input rule) certified into a results file (evaluation/results_file.py), in this
process or on a Ray cluster (evaluation/distributed.py), resuming what an earlier run finished."""
from __future__ import annotations

import sys

from scalecert.errors import ScaleCertError
from scalecert.evaluation.results_file import ResultsFile, error_row, result_row


def certify_item(cert, image: str, rel: str, true_label, data: bytes | None = None) -> dict:
    """One image -> its results row; an image that cannot be certified is an error row. `data`:
    the file's bytes where a Ray worker read them; decoding is the same as from the path."""
    from scalecert.runtime.images import load_image

    try:
        pixels = load_image(image, cert.input_spec, data)
        result = cert.certify(pixels, name=image)
    except ScaleCertError as exc:
        return error_row(image, rel, true_label, str(exc))
    return result_row(result.to_json(), rel, true_label)


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
        for image, rel, label in todo:
            yield certify_item(cert, image, rel, label)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()


def certify_folder(bundle: str, data: str, out: str, labels_csv=None, backend="auto", precision="fp32", batch=64,
                   early_exit=False, threads=None, threshold=None, quiet=False, ray_address=None, workers=None,
                   log=lambda line: print(line, file=sys.stderr)) -> dict:
    """Certify every image of DATA not yet in OUT; -> counts {images, skipped, written, <status>: n}.
    `ray_address`: None runs here; "auto" a local Ray (or RAY_ADDRESS's cluster); else that address."""
    from scalecert.bundle import Bundle
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
    with ResultsFile(out) as results:
        todo = [(path, items.relative(path), label) for path, label in items
                if items.relative(path) not in results.done]
        log(f"{items.describe()}; {results.resumed} already in {out} (skipped), {len(todo)} to certify")
        if ray_address is None:
            rows = _local_rows(bundle, todo, options, quiet)
        else:
            log(pool.describe())
            rows = pool.certify_rows(bundle, todo, quiet)
        for row in rows:
            results.add(row)
        for image, rel, label in todo:  # every image gets its row, whatever the cluster did
            results.add(error_row(image, rel, label, f"{image}: no result came back from the workers"))
        counts = {"images": len(items), "skipped": results.resumed, "written": results.added}
        for row in results.done.values():
            counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts
