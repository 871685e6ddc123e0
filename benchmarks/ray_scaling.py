"""Images per second of `certify DIR --out` in one process and on a local Ray with 1 and 2 actors,
and Ray's overhead per image, on real data: CIFAR-10 test JPEGs with the pretrained ResNet-20
(--patch 5) and ImageNet sample images with EfficientNet-Lite0 (--pretrained --patch 32).

    python benchmarks/ray_scaling.py [--cifar 520] [--imagenet 100] [--out benchmarks/results/ray_scaling.json]

Every run certifies the same images into a fresh results file (no early exit, all windows), so the
work is the same; threads are pinned (ORT intra-op threads = 1 per actor and for the 1-thread local
run; the 2-thread local run is `certify`'s default on this 2-core machine). Ray is started once,
with num_cpus = the machine's cores; its start-up is reported on its own. The rows of every Ray
run are checked equal (status, label, windows evaluated, alert windows) to the local run's.

Ray's overhead per image, two ways: the wall-time difference between Ray with 1 actor and the local
1-thread run, divided by the images (start-up of the actor pool included); and the difference in
wall time spent outside certification (wall - the sum of per-image latencies / actors), which is
less sensitive to how fast the shared machine happened to compute during each run.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHARED = os.environ.get("SCALECERT_SHARED", "/work/shared")
SAME = ("status", "label", "windows_evaluated", "alert_windows")
RUNS = (("local_1_thread", dict(threads=1)), ("local_2_threads", dict(threads=2)),
        ("ray_1_worker", dict(threads=1, ray_address="auto", workers=1)),
        ("ray_2_workers", dict(threads=1, ray_address="auto", workers=2)))


def subset(scratch: str, name: str, files: list[str], labels: dict | None = None) -> str:
    """A folder of symbolic links to `files` (ImageFolder by parent folder, or flat + labels.csv)."""
    root = os.path.join(scratch, name)
    for path in files:
        where = os.path.join(root, os.path.basename(os.path.dirname(path))) if labels is None else root
        os.makedirs(where, exist_ok=True)
        os.symlink(path, os.path.join(where, os.path.basename(path)))
    if labels is not None:
        with open(os.path.join(root, "labels.csv"), "w") as f:
            f.writelines(f"{os.path.basename(p)},{labels[os.path.basename(p)]}\n" for p in files)
    return root


def export(scratch: str, name: str, *args) -> str:
    from scalecert.cli import main

    out = os.path.join(scratch, name)
    main.commands["export"].main(args=[*args, "-o", out, "--quiet"], prog_name="scalecert export",
                                 standalone_mode=False)
    return out


def timed_run(bundle, data, scratch, tag, **kw) -> tuple[dict, dict]:
    from scalecert.evaluation.folder import certify_folder

    out = os.path.join(scratch, f"{tag}.jsonl")
    start = time.perf_counter()
    counts = certify_folder(bundle, data, out, quiet=True, log=lambda line: None, **kw)
    wall = time.perf_counter() - start
    with open(out) as f:
        rows = {r["path"]: r for r in map(json.loads, f)}
    lat = sorted(r["latency_ms"] for r in rows.values() if "latency_ms" in r)
    n, parallel = counts["images"], kw.get("workers") or 1
    # wall time not spent certifying (decode, scheduling, transfer, start-up), per image
    outside = (wall - sum(lat) / 1e3 / parallel) / n
    return {"images": n, "wall_s": round(wall, 3), "images_per_s": round(n / wall, 3),
            "latency_ms_median": round(lat[len(lat) // 2], 3), "certify_s_total": round(sum(lat) / 1e3, 3),
            "outside_certify_ms_per_image": round(outside * 1e3, 2), "errors": counts.get("error", 0)}, rows


def one_model(name, bundle, data, scratch) -> dict:
    runs, reference = {}, None
    for tag, kw in RUNS:
        row, rows = timed_run(bundle, data, scratch, f"{name}-{tag}", **kw)
        if reference is None:
            reference = rows
        row["same_rows_as_local"] = rows.keys() == reference.keys() and all(
            all(rows[p].get(k) == reference[p].get(k) for k in SAME) for p in rows)
        runs[tag] = row
        print(f"{name} {tag}: {row}", file=sys.stderr, flush=True)
    n = runs["local_1_thread"]["images"]
    overhead = (runs["ray_1_worker"]["wall_s"] - runs["local_1_thread"]["wall_s"]) / n
    outside = runs["ray_1_worker"]["outside_certify_ms_per_image"] - runs["local_1_thread"]["outside_certify_ms_per_image"]
    return {"runs": runs, "ray_overhead_ms_per_image_wall": round(overhead * 1e3, 2),
            "ray_overhead_ms_per_image_outside_certify": round(outside, 2),
            "ray_2_vs_1_worker": round(runs["ray_2_workers"]["images_per_s"] / runs["ray_1_worker"]["images_per_s"], 3),
            "ray_2_workers_vs_local_2_threads": round(runs["ray_2_workers"]["images_per_s"]
                                                      / runs["local_2_threads"]["images_per_s"], 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=int, default=520, help="CIFAR-10 test images (spread over the classes)")
    parser.add_argument("--imagenet", type=int, default=100, help="ImageNet sample images")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ray_scaling.json"))
    args = parser.parse_args()
    import logging

    import ray

    from scalecert.runtime.datasets import read_labels

    scratch = tempfile.mkdtemp(prefix="ray-scaling-")
    try:
        per_class = -(-args.cifar // 10)
        cifar = [p for cls in sorted(os.listdir(f"{SHARED}/data/cifar10-test"))
                 for p in sorted(glob.glob(f"{SHARED}/data/cifar10-test/{cls}/*.jpg"))[:per_class]]
        imagenet = sorted(glob.glob(f"{SHARED}/data/imagenet-sample/images/*.JPEG"))[:args.imagenet]
        labels = read_labels(f"{SHARED}/data/imagenet-sample/labels.csv")
        models = {
            "resnet20_cifar10": (export(scratch, "r20", f"{SHARED}/models/resnet20-cifar10.th", "--arch",
                                        "resnet20-cifar", "--patch", "5"), subset(scratch, "cifar", cifar)),
            "efficientnet_lite0_imagenet": (export(scratch, "effnet", "--arch", "efficientnet-lite0", "--pretrained",
                                                   "--patch", "32"),
                                            subset(scratch, "imagenet", imagenet, labels)),
        }
        start = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
        ray_start = time.perf_counter() - start
        report = {"machine": {"cores": os.cpu_count(), "load_average_at_start": os.getloadavg(),
                              "note": "shared machine, other jobs running: numbers under load"},
                  "ray": ray.__version__, "ray_init_s": round(ray_start, 3), "models": {}}
        for name, (bundle, data) in models.items():
            report["models"][name] = one_model(name, bundle, data, scratch)
        report["machine"]["load_average_at_end"] = os.getloadavg()
        ray.shutdown()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
