"""Labelled image sets: the one data-input rule every command that reads a folder uses
(export --calib, build --calib, bench --data, tune --data/--val, the attack benchmark). No torch.

`image_set(DIR, labels=None)` resolves DIR by the first rule that applies:

1. `--labels CSV` given: the CSV labels the image files directly in DIR (or in DIR/images when
   DIR has none). An explicit CSV always wins over class subfolders and any labels.csv.
2. `DIR/labels.csv` and image files directly in DIR: a flat labelled folder.
3. `DIR/labels.csv` and `DIR/images/`: the layout public sets ship in (ImageNet sample:
   `images/*.JPEG` + `labels.csv` beside the folder). Passing `DIR/images` itself also finds the
   `labels.csv` beside it (in DIR), and only then: no other parent folder is ever read.
4. Class subfolders holding images: an ImageFolder tree, classes in sorted folder order (0, 1, ...).
5. Image files and no labels anywhere: an unlabelled folder (certify, calibration without labels).

A labels CSV has rows `file,index[,...]` (an optional header row whose second field is not a
number); `file` is a name or a path relative to the folder, matched by relative path, then by
base name. A row whose index is not an integer is refused (with its line number). A folder that
fits no rule, or fits two at once (image files and class subfolders, no labels.csv), is refused.

Every command prints `describe()` of what it read: layout, image count and class count, in one
line. `check_labels` refuses a labelled set whose classes cannot belong to the model (indices out
of range; one class only for a multi-class model).
"""
from __future__ import annotations

import csv
import os
import random

from scalecert.errors import DataError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
LABELS = "labels.csv"


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS and not name.startswith(".")


class ImageSet(list):
    """[(path, label or None)] plus where it came from: `root` (paths are relative to it in
    outputs), `layout` (which rule applied), `labels_csv`."""

    def __init__(self, items, root: str, layout: str, labels_csv: str | None = None):
        super().__init__(items)
        self.root, self.layout, self.labels_csv = root, layout, labels_csv

    @property
    def labelled(self) -> bool:
        return bool(self) and all(label is not None for _, label in self)

    @property
    def num_classes(self) -> int:
        return len({label for _, label in self if label is not None})

    def describe(self) -> str:
        n = self.num_classes
        classes = f", {n} class{'es' if n != 1 else ''}" if self.labelled else (
            ", unlabelled" if all(lb is None for _, lb in self) else
            f", {sum(lb is None for _, lb in self)} without labels")
        return f"data {self.root}: {self.layout}, {len(self)} images{classes}"

    def relative(self, path: str) -> str:
        return os.path.relpath(path, self.root)


def read_labels(csv_path: str) -> dict[str, int]:
    """`file -> index` from a labels CSV (header row optional); bad rows are refused."""
    if os.path.isdir(csv_path) or not os.path.isfile(csv_path):
        raise DataError(f"{csv_path}: no such labels file")
    labels: dict[str, int] = {}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            for number, row in enumerate(csv.reader(f), 1):
                if not row or not "".join(row).strip():
                    continue
                if len(row) < 2:
                    raise DataError(f"{csv_path}:{number}: expected file,index[,...], got {','.join(row)[:60]!r}")
                try:
                    index = int(row[1].strip())
                except ValueError:
                    if number == 1:  # a header row
                        continue
                    raise DataError(f"{csv_path}:{number}: class index {row[1][:30]!r} is not an integer") from None
                labels[os.path.normpath(row[0].strip())] = index
    except UnicodeDecodeError:
        raise DataError(f"{csv_path}: not a text CSV file") from None
    except csv.Error as exc:
        raise DataError(f"{csv_path}: not a CSV file ({exc})") from None
    if not labels:
        raise DataError(f"{csv_path}: no file,index rows")
    return labels


def _flat(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if _is_image(f) and os.path.isfile(os.path.join(folder, f)))


def _label_flat(folder: str, root: str, csv_path: str) -> list[tuple[str, int | None]]:
    labels = read_labels(csv_path)
    by_base = {}
    for key, index in labels.items():
        by_base.setdefault(os.path.basename(key), index)
    items = []
    for name in _flat(folder):
        path = os.path.join(folder, name)
        rel = os.path.normpath(os.path.relpath(path, root))
        label = labels.get(rel, labels.get(os.path.normpath(os.path.relpath(path, os.path.dirname(csv_path))),
                                           by_base.get(name)))
        items.append((path, label))
    if items and all(label is None for _, label in items):
        raise DataError(f"{csv_path}: names none of the {len(items)} images in {folder}")
    return items


def resolve(root: str, labels_csv: str | None = None) -> ImageSet:
    """Every image of DIR with its label, by the rule in the module docstring (no limit)."""
    if not os.path.exists(root):
        raise DataError(f"{root}: no such directory")
    if not os.path.isdir(root):
        raise DataError(f"{root}: is a file, expected a folder of images")
    try:
        entries = sorted(os.listdir(root))
    except PermissionError:
        raise DataError(f"{root}: cannot read the folder (permission denied)") from None
    flat = _flat(root)
    images_dir = os.path.join(root, "images")
    own_csv = os.path.join(root, LABELS)
    beside_csv = os.path.join(os.path.dirname(os.path.abspath(root)), LABELS)
    if labels_csv is not None:
        folder = root if flat or not os.path.isdir(images_dir) else images_dir
        layout = f"{'flat folder' if folder == root else 'images/'} + --labels {labels_csv}"
        return ImageSet(_label_flat(folder, root, labels_csv), root, layout, labels_csv)
    if os.path.isfile(own_csv) and flat:
        return ImageSet(_label_flat(root, root, own_csv), root, "flat folder + labels.csv", own_csv)
    if os.path.isfile(own_csv) and os.path.isdir(images_dir):
        return ImageSet(_label_flat(images_dir, root, own_csv), root, "images/ + labels.csv", own_csv)
    if flat and os.path.basename(os.path.abspath(root)) == "images" and os.path.isfile(beside_csv):
        return ImageSet(_label_flat(root, os.path.dirname(os.path.abspath(root)), beside_csv), root,
                        "images/ + ../labels.csv", beside_csv)
    classes = [d for d in entries if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")]
    classes = [d for d in classes if _flat(os.path.join(root, d))]
    if flat and classes:
        raise DataError(f"{root}: holds both image files and class subfolders ({classes[0]}/, ...); "
                             f"add a {LABELS} or pass --labels CSV for the files, or point at a folder with one layout")
    if flat:
        return ImageSet([(os.path.join(root, f), None) for f in flat], root, "flat folder, no labels.csv")
    if classes == ["images"]:
        raise DataError(f"{root}: images/ has no {LABELS} beside it; pass --labels CSV (file,index rows), "
                             "or use class subfolders")
    if classes:
        items = [(os.path.join(root, d, f), index) for index, d in enumerate(classes)
                 for f in _flat(os.path.join(root, d))]
        return ImageSet(items, root, "ImageFolder (class subfolders)")
    raise DataError(f"{root}: no images found (expected image files, images/ + {LABELS}, "
                         "or class subfolders of images)")


def image_set(root: str, labels_csv: str | None = None, limit: int | None = None,
              seed: int | None = None) -> ImageSet:
    """(path, label or None) pairs, by the module's rule. A seed shuffles before the limit is
    applied; without one a limited ImageFolder sample is spread over every class."""
    if limit is not None and limit < 1:
        raise DataError(f"--limit {limit}: expected a positive number of images")
    found = resolve(root, labels_csv)
    items = list(found)
    if seed is not None:
        random.Random(seed).shuffle(items)
    elif limit is not None and limit < len(items) and found.layout.startswith("ImageFolder"):
        items = items[:: max(1, len(items) // limit)]  # spread over every class, deterministically
    if limit:
        items = items[:limit]
    return ImageSet(items, found.root, found.layout, found.labels_csv)


def check_labels(items, num_classes: int | None, what: str) -> None:
    """Refuse labels that cannot belong to a `num_classes`-way model."""
    labels = [label for _, label in items if label is not None]
    if not labels or not num_classes:
        return
    bad = [lb for lb in labels if not 0 <= lb < num_classes]
    if bad:
        raise DataError(f"{what}: class index {bad[0]} is out of range for a {num_classes}-class model "
                             f"({len(bad)} of {len(labels)} labels); check the labels or the model")
    distinct = set(labels)
    if num_classes > 1 and len(distinct) == 1 and len(labels) > 1:
        layout = getattr(items, "layout", "")
        raise DataError(f"{what}: all {len(labels)} images carry the one class {labels[0]} ({layout or 'labels'}) "
                             f"for a {num_classes}-class model; wrong layout? pass --labels CSV")
