"""Labelled image sets: ImageFolder trees (class subfolders in sorted order) and flat folders
with a labels CSV (`file,index[,...]`), read in a deterministic order (no torch)."""
from __future__ import annotations

import csv
import os
import random

from scalecert.errors import ScaleCertError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def _read_labels(csv_path: str) -> dict[str, int]:
    labels = {}
    with open(csv_path, newline="") as f:
        for row in csv.reader(f):
            if len(row) < 2 or row[0] == "file":
                continue
            try:
                labels[os.path.basename(row[0])] = int(row[1])
            except ValueError:
                continue
    return labels


def image_set(root: str, labels_csv: str | None = None, limit: int | None = None,
              seed: int | None = None) -> list[tuple[str, int | None]]:
    """(path, label or None) pairs. Labels come from --labels, from a labels.csv in the folder or
    its parent, or from class subfolders. A seed shuffles before the limit is applied."""
    if not os.path.isdir(root):
        raise ScaleCertError(f"{root}: no such directory")
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    items: list[tuple[str, int | None]] = []
    if labels_csv is None:
        for candidate in (os.path.join(root, "labels.csv"), os.path.join(os.path.dirname(os.path.abspath(root)), "labels.csv")):
            if os.path.isfile(candidate):
                labels_csv = candidate
                break
    flat = sorted(f for f in os.listdir(root) if _is_image(f) and os.path.isfile(os.path.join(root, f)))
    if flat or not subdirs:
        labels = _read_labels(labels_csv) if labels_csv else {}
        items = [(os.path.join(root, f), labels.get(f)) for f in flat]
    else:
        for index, sub in enumerate(subdirs):
            files = sorted(f for f in os.listdir(os.path.join(root, sub)) if _is_image(f))
            items += [(os.path.join(root, sub, f), index) for f in files]
    if not items:
        raise ScaleCertError(f"{root}: no images found (expected image files or class subfolders of images)")
    if seed is not None:
        random.Random(seed).shuffle(items)
    elif limit is not None and limit < len(items) and not flat:
        # spread a limited ImageFolder sample over every class, deterministically
        items = items[:: max(1, len(items) // limit)]
    return items[:limit] if limit else items
