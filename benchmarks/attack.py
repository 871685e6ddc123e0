"""Soundness by attack at scale: the command line of tests/attack_harness.py (see its docstring).

    python benchmarks/attack.py --bundle B --model M --arch A --data DIR --images 40 \\
        --contents noise,extreme,donor,pgd --pgd-positions all --out results.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from attack_harness import CONTENTS, attack_images  # noqa: E402  (the harness lives with the tests)


def _image_files(data: str) -> tuple[list[str], list[int] | None, list]:
    """The data-input rule (scalecert/runtime/datasets.py) -> files interleaved over classes (so
    the first N cover every class), labels (None when unlabelled), the class indices present."""
    from scalecert.runtime.datasets import image_set

    items = image_set(data)
    print(items.describe(), file=sys.stderr, flush=True)
    if not items.labelled:
        return [path for path, _ in items], None, []
    classes = sorted({label for _, label in items})
    per = {c: [path for path, label in items if label == c] for c in classes}
    files, labels = [], []
    for k in range(max(len(p) for p in per.values())):
        for c in classes:
            if k < len(per[c]):
                files.append(per[c][k])
                labels.append(c)
    return files, labels, classes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--model", help="model file (for the PyTorch reference used by pgd)")
    parser.add_argument("--arch", help="--arch of the model, as given to scalecert-export")
    parser.add_argument("--input-size", help="CxHxW for .pt2/.pt models without a fixed size")
    parser.add_argument("--data", required=True, help="images, by the data-input rule (README: Data folders)")
    parser.add_argument("--images", type=int, default=40, help="certified images to attack")
    parser.add_argument("--scan", type=int, default=None, help="clean images to scan for certified ones "
                        "(default: 4x --images, more if too few certify)")
    parser.add_argument("--contents", default="noise,extreme,donor,pgd")
    parser.add_argument("--pgd-positions", default="all", help="'all' or N random positions per image")
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--pgd-views", type=int, default=2, help="windows overlapping the patch most, "
                        "attacked together with the un-occluded features")
    parser.add_argument("--all-variants", action="store_true", help="every variant at every position")
    parser.add_argument("--backend", default="ort")
    parser.add_argument("--precision", default="fp32", help="bundle variant: fp32, fp16 or int8 (scalecert build)")
    parser.add_argument("--threshold", type=float, default=None, help="confidence threshold T (default: the bundle's)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores; "
                        "1 per worker with --workers)")
    parser.add_argument("--workers", type=int, default=1, help="attack images in this many processes "
                        "(single-threaded each: no thread spinning on a shared box)")
    parser.add_argument("--early-exit", action=argparse.BooleanOptionalAction, default=True,
                        help="stop at the first disagreeing window (deployment mode; certified outcomes "
                        "are identical, alerts are cheaper)")
    parser.add_argument("--donors", type=int, default=200, help="donor images scanned beside the targets")
    parser.add_argument("--mode", choices=("detect", "recover"), default="detect",
                        help="recover: attack certified recovery (docs/design.md §10) through the fast path")
    parser.add_argument("--mix", action="store_true", help="one cheap content per position, cycling (CI's mode)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the counts here as JSON")
    args = parser.parse_args(argv)

    from scalecert.export.loading import load_model, parse_input_size
    from scalecert.runtime import Certifier

    contents = [c.strip() for c in args.contents.split(",") if c.strip()]
    unknown = sorted(set(contents) - set(CONTENTS))
    if unknown:
        parser.error(f"unknown content(s) {unknown}; known: {', '.join(CONTENTS)}")
    pgd_positions = args.pgd_positions if args.pgd_positions == "all" else int(args.pgd_positions)
    certifier = Certifier.load(args.bundle, backend=args.backend, early_exit=args.early_exit, threads=args.threads,
                               precision=args.precision, threshold=args.threshold)
    if args.mode == "recover":
        from scalecert.runtime.recovery import Recoverer

        certifier = Recoverer(certifier)
    reference = None
    if "pgd" in contents:
        if not args.model:
            parser.error("pgd needs --model (and --arch) for the PyTorch reference")
        from scalecert.training.reference import TorchReference

        size = parse_input_size(args.input_size) if args.input_size else None
        reference = TorchReference(load_model(args.model, arch=args.arch, input_size=size), args.bundle)

    spec = None
    if args.workers > 1:
        spec = {"bundle": args.bundle, "backend": args.backend, "precision": args.precision, "early_exit": args.early_exit,
                "threshold": args.threshold, "mode": args.mode,
                "threads": args.threads or 1, "model": args.model if "pgd" in contents else None,
                "arch": args.arch, "input_size": parse_input_size(args.input_size) if args.input_size else None}
    files, labels, classes = _image_files(args.data)
    scan = args.scan or 4 * args.images
    say = (lambda m: print(m, file=sys.stderr, flush=True))

    def write(data: dict) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, args.out)

    pixels = np.stack([certifier.prepare(f) for f in files[:scan]])
    names = [os.path.relpath(f, args.data) for f in files[:scan]]
    lab = np.asarray(labels[:scan]) if labels is not None else None
    # donors: images after the scanned ones (never the targets themselves), else the scanned ones
    donor_files, donor_labels = files[scan:scan + args.donors], labels[scan:scan + args.donors] if labels else None
    if not donor_files:
        donor_files, donor_labels = files[:scan], labels[:scan] if labels else None
    donor_pool = np.stack([certifier.prepare(f) for f in donor_files])
    if donor_labels is None:
        donor_labels = [r.label for r in certifier.certify_batch(donor_pool)]
    donor_labels = np.asarray(donor_labels)
    say(f"bundle {args.bundle}: patch {certifier.manifest['threat_model']['patch']}, {len(certifier.windows)} windows, "
        f"backend {certifier.backend}, early exit {certifier.early_exit}; scanning {len(pixels)} images for "
        f"{args.images} certified; contents {contents}; pgd positions {pgd_positions}")
    out = attack_images(certifier, pixels, labels=lab, names=names, max_images=args.images, contents=contents,
                        reference=reference, donor_pool=donor_pool, donor_labels=donor_labels,
                        pgd_positions=pgd_positions, pgd_steps=args.pgd_steps, pgd_views=args.pgd_views,
                        all_variants=args.all_variants, mix=args.mix, seed=args.seed, progress=True, log=say,
                        workers=args.workers, worker_spec=spec, checkpoint=write if args.out else None)
    out["command"] = " ".join(["python", "benchmarks/attack.py", *(argv if argv is not None else sys.argv[1:])])
    out["bundle"] = os.path.abspath(args.bundle)
    out["classes"] = classes
    t = out["total"]
    print(f"certified images attacked: {out['images_attacked']} (of {out['images_certified']} certified among "
          f"{out['images_scanned']} scanned), positions per image {out['positions_per_image']}")
    for content, c in out["per_content"].items():
        print(f"  {content:8s} attacked {c['attacked']:7d}  certified-same {c['certified_same']:7d}  "
              f"uncertified-same {c['uncertified_same']:6d}  alert {c['alert']:7d} (base flipped {c['base_flipped']:6d})"
              f"  violations {c['violations']}")
    print(f"  {'TOTAL':8s} attacked {t['attacked']:7d}  certified-same {t['certified_same']:7d}  "
          f"uncertified-same {t['uncertified_same']:6d}  alert {t['alert']:7d} (base flipped {t['base_flipped']:6d})"
          f"  violations {t['violations']}")
    print(f"  {out['seconds']} s")
    if args.out:
        write(out)
        print(f"wrote {args.out}")
    if out["images_attacked"] < args.images:
        print(f"warning: only {out['images_attacked']} certified images among {len(pixels)} scanned "
              "(raise --scan)", file=sys.stderr)
    return 1 if t["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
