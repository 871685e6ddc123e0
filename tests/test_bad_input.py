"""Bad input across every command, through the real click commands in this process (the same
one-line error guard as the console scripts, without an interpreter start per case).

Each case: the documented exit code (2: refused before any work; 1: some images could not be
read, the others were processed), one `error:` line per problem and no traceback, nothing
half-written (no `.scalecert-*` folder or file left anywhere), nothing the user owns deleted, and
valid images in the same call still processed. CASES lists them; the data-input rule and the
--force rule have their own tests below.
"""
from __future__ import annotations

import json
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import PHOTOS

# --- the world the cases run in ---------------------------------------------------------------------


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height (a decompression bomb as it arrives): the pixel
    limit must refuse it before anything is decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def world(tmp_path_factory, tiny_bundle, tiny_checkpoint):
    """Good images, bad images and labelled folders, made once (read-only for the cases)."""
    root = tmp_path_factory.mktemp("bad-input")
    rng = np.random.default_rng(0)
    good = root / "good"
    good.mkdir()
    paths = {"bundle": tiny_bundle, "ckpt": tiny_checkpoint, "root": str(root)}
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(good / f"g{i}.png")
    paths["good"] = [str(good / f"g{i}.png") for i in range(3)]
    bad = root / "bad"
    bad.mkdir()
    _png_header_only(bad / "bomb.png", 20000, 20000)
    _png_header_only(bad / "big.png", 10001, 10001)
    whole = (good / "g0.png").read_bytes()
    (bad / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image at all\n")
    (bad / "folder.png").mkdir()
    paths.update({k: str(bad / f) for k, f in (("bomb", "bomb.png"), ("big", "big.png"), ("truncated", "truncated.png"),
                                                 ("empty", "empty.png"), ("text", "text.jpg"), ("folder", "folder.png"))})
    # labelled sets, 10 classes (the tiny model's)
    tree = root / "tree"
    for c in range(3):
        (tree / f"c{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tree / f"c{c}" / f"{i:04d}.png")
    paths["tree"] = str(tree)
    one = root / "oneclass" / "cats"
    one.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(one / f"{i}.png")
    paths["oneclass"] = str(root / "oneclass")
    images_only = root / "images_only" / "images"
    images_only.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images_only / f"{i}.png")
    paths["images_only"] = str(root / "images_only")
    for name, rows in (("out_of_range", "file,index\n0.png,50\n1.png,1\n2.png,2\n"),
                       ("bad_index", "file,index\n0.png,1\n1.png,cat\n2.png,2\n"),
                       ("names_none", "file,index\nx.png,1\ny.png,2\n")):
        folder = root / name
        (folder / "images").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
        (folder / "labels.csv").write_text(rows)
        paths[name] = str(folder)
    mixed = root / "mixed"
    (mixed / "sub").mkdir(parents=True)
    for p in (mixed / "a.png", mixed / "sub" / "b.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
    paths["mixed"] = str(mixed)
    unlabelled = root / "unlabelled"
    unlabelled.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(unlabelled / f"{i}.png")
    paths["unlabelled"] = str(unlabelled)
    with_bomb = root / "with_bomb"
    for c in range(2):
        (with_bomb / f"c{c}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(with_bomb / f"c{c}" / "0500.png")
    _png_header_only(with_bomb / "c1" / "0501.png", 20000, 20000)
    paths["with_bomb"] = str(with_bomb)
    notbundle = root / "notbundle"
    notbundle.mkdir()
    (notbundle / "notes.txt").write_text("mine")
    paths["notbundle"] = str(notbundle)
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "manifest.json").write_text("{not json")
    paths["corrupt"] = str(corrupt)
    paths["file"] = str(good / "g0.png")
    return paths


# --- cases --------------------------------------------------------------------------------------------


@dataclass
class Case:
    args: Callable  # (world, case dir) -> argv for `scalecert` (first item the command, or "scalecert-export")
    code: int
    needles: tuple = ()
    ok_rows: int = 0  # valid images that must still be reported (exit 1 cases)
    setup: Callable | None = None  # (world, case dir) -> None
    env: dict | None = None
    cwd: bool = False  # run inside the case dir
    json_rows: bool = False  # stdout is one JSON object per image


def _own_file(w, d):
    (d / "out").mkdir()
    (d / "out" / "data.csv").write_text("a,b\n1,2\n")


def _existing_file(name):
    def setup(w, d):
        (d / name).write_text("keep me")
    return setup


def _access_as_owner(real):
    """os.access as a non-root owner of the files sees it: the owner's permission bits decide. Root
    passes every check (and writes anywhere), so on a root CI box the unwritable cases put this in
    place of os.access, which is what the CLI asks before it writes."""
    def access(path, mode, *args, **kwargs):
        if not real(path, os.F_OK, *args, **kwargs):
            return False
        bits = os.stat(path).st_mode
        wanted = ((os.R_OK, stat.S_IRUSR), (os.W_OK, stat.S_IWUSR), (os.X_OK, stat.S_IXUSR))
        return all(bits & bit for flag, bit in wanted if mode & flag)

    return access


def _locked_dir(w, d):
    (d / "locked").mkdir()
    os.chmod(d / "locked", stat.S_IRUSR | stat.S_IXUSR)


B = lambda w: w["bundle"]  # noqa: E731
G = lambda w: w["good"]  # noqa: E731
EXPORT = lambda w: ["scalecert-export", w["ckpt"], "--arch", "resnet20-cifar"]  # noqa: E731

CASES = {
    # certify: options
    "certify/missing-bundle": Case(lambda w, d: ["certify", d / "nope", *G(w)], 2, ("no such bundle",)),
    "certify/not-a-bundle": Case(lambda w, d: ["certify", w["notbundle"], *G(w)], 2, ("not a scalecert bundle",)),
    "certify/corrupt-manifest": Case(lambda w, d: ["certify", w["corrupt"], *G(w)], 2, ("corrupt manifest",)),
    "certify/batch-0": Case(lambda w, d: ["certify", B(w), "--batch", "0", *G(w)], 2, ("--batch 0",)),
    "certify/threads-negative": Case(lambda w, d: ["certify", B(w), "--threads", "-2", *G(w)], 2, ("--threads -2",)),
    "certify/batch-not-a-number": Case(lambda w, d: ["certify", B(w), "--batch", "many", *G(w)], 2,
                                       ("'--batch'", "not a valid integer")),
    "certify/backend-unknown": Case(lambda w, d: ["certify", B(w), "--backend", "foo", *G(w)], 2,
                                    ("Invalid value for '--backend'",)),
    "certify/precision-fp8": Case(lambda w, d: ["certify", B(w), "--precision", "fp8", *G(w)], 2,
                                  ("Invalid value for '--precision'",)),
    "certify/precision-not-built": Case(lambda w, d: ["certify", B(w), "--precision", "int8", *G(w)], 2,
                                        ("no int8 variant", "scalecert build")),
    "certify/png-dir-is-file": Case(lambda w, d: ["certify", B(w), "--png-dir", w["file"], *G(w)], 2,
                                    ("--png-dir", "is a file")),
    "certify/png-dir-unwritable": Case(lambda w, d: ["certify", B(w), "--png-dir", d / "locked" / "png", *G(w)], 2,
                                       ("--png-dir", "cannot create"), setup=_locked_dir),
    "certify/png-dir-under-a-file": Case(lambda w, d: ["certify", B(w), "--png-dir", os.path.join(w["file"], "png"),
                                                       *G(w)], 2, ("--png-dir", "cannot create")),
    "certify/no-images": Case(lambda w, d: ["certify", B(w)], 2, ("Missing argument",)),
    "certify/unknown-option": Case(lambda w, d: ["certify", B(w), "--fast", *G(w)], 2, ("No such option",)),
    "certify/threads-0": Case(lambda w, d: ["certify", B(w), "--threads", "0", *G(w)], 2, ("--threads 0",)),
    "certify/threads-text": Case(lambda w, d: ["certify", B(w), "--threads", "x", *G(w)], 2, ("--threads x",)),
    "certify/data-without-output": Case(lambda w, d: ["certify", B(w), "--data", w["tree"]], 2, ("add -o",)),
    "certify/data-and-images": Case(lambda w, d: ["certify", B(w), "--data", w["tree"], "-o", d / "r.jsonl", *G(w)], 2,
                                    ("not both",)),
    "certify/data-is-file": Case(lambda w, d: ["certify", B(w), "--data", w["file"], "-o", d / "r.jsonl"], 2,
                                 ("--data", "is a file")),
    "certify/output-not-jsonl": Case(lambda w, d: ["certify", B(w), "--data", w["tree"], "-o", d / "r.csv"], 2,
                                     (".jsonl or .parquet",)),
    # certify: per-image errors, the rest still certified
    "certify/bomb": Case(lambda w, d: ["certify", B(w), w["bomb"], *G(w)], 1, ("bomb.png", "pixel limit"), ok_rows=3),
    "certify/100-megapixels": Case(lambda w, d: ["certify", B(w), *G(w), w["big"]], 1, ("big.png", "pixel limit"),
                                   ok_rows=3),
    "certify/truncated": Case(lambda w, d: ["certify", B(w), w["truncated"], *G(w)], 1,
                              ("truncated.png", "cannot decode"), ok_rows=3),
    "certify/empty-file": Case(lambda w, d: ["certify", B(w), w["empty"], *G(w)], 1, ("empty file",), ok_rows=3),
    "certify/text-as-jpeg": Case(lambda w, d: ["certify", B(w), w["text"], *G(w)], 1, ("text.jpg", "cannot decode"),
                                 ok_rows=3),
    "certify/missing-image": Case(lambda w, d: ["certify", B(w), d / "gone.png", *G(w)], 1, ("no such file",), ok_rows=3),
    "certify/directory-as-image": Case(lambda w, d: ["certify", B(w), w["folder"], *G(w)], 1, ("is a directory",),
                                       ok_rows=3),
    "certify/json-bomb": Case(lambda w, d: ["certify", B(w), "--json", w["bomb"], *G(w)], 1, ("pixel limit",), ok_rows=3,
                              json_rows=True),
    "certify/json-truncated": Case(lambda w, d: ["certify", B(w), "--json", *G(w), w["truncated"]], 1, ("cannot decode",),
                                   ok_rows=3, json_rows=True),
    "certify/max-pixels-env": Case(lambda w, d: ["certify", B(w), *G(w)], 1, ("pixel limit", "SCALECERT_MAX_PIXELS"),
                                   env={"SCALECERT_MAX_PIXELS": "100"}),
    "certify/max-pixels-env-bad": Case(lambda w, d: ["certify", B(w), *G(w)], 2, ("SCALECERT_MAX_PIXELS='lots'",),
                                       env={"SCALECERT_MAX_PIXELS": "lots"}),
    "bench/max-pixels-env-bad": Case(lambda w, d: ["bench", B(w), "--data", w["tree"]], 2,
                                     ("SCALECERT_MAX_PIXELS='lots'",), env={"SCALECERT_MAX_PIXELS": "lots"}),
    "certify/bomb-with-png-dir": Case(lambda w, d: ["certify", B(w), "--png-dir", d / "png", w["bomb"], *G(w)], 1,
                                      ("pixel limit",), ok_rows=3),
    # export
    "export/patch-150%": Case(lambda w, d: [*EXPORT(w), "--patch", "150%", "-o", d / "b"], 2, ("between 0% and 100%",)),
    "export/patch-whole-image": Case(lambda w, d: [*EXPORT(w), "--patch", "32", "-o", d / "b"], 2, ("covers the whole",)),
    "export/patch-0": Case(lambda w, d: [*EXPORT(w), "--patch", "0", "-o", d / "b"], 2, ("must be positive",)),
    "export/patch-text": Case(lambda w, d: [*EXPORT(w), "--patch", "big", "-o", d / "b"], 2, ("expected N, HxW or P%",)),
    "export/force-over-user-folder": Case(lambda w, d: [*EXPORT(w), "--patch", "5", "-o", d / "out", "--force"], 2,
                                          ("no scalecert bundle", "data.csv"), setup=_own_file),
    "export/over-user-folder": Case(lambda w, d: [*EXPORT(w), "--patch", "5", "-o", d / "out"], 2,
                                    ("no scalecert bundle",), setup=_own_file),
    "export/force-over-file": Case(lambda w, d: [*EXPORT(w), "--patch", "5", "-o", d / "f.txt", "--force"], 2,
                                   ("is a file",), setup=_existing_file("f.txt")),
    "export/force-dot": Case(lambda w, d: [*EXPORT(w), "--patch", "5", "-o", ".", "--force"], 2,
                             ("current folder",), cwd=True, setup=_existing_file("mine.txt")),
    "export/force-parent": Case(lambda w, d: [*EXPORT(w), "--patch", "5", "-o", "..", "--force"], 2,
                                ("current folder",), cwd=True),
    "export/bundle-exists": Case(lambda w, d: [*EXPORT(w), "--patch", "5", "-o", B(w)], 2, ("already exists", "--force")),
    "export/parent-a-file": Case(lambda w, d: [*EXPORT(w), "--patch", "5", "-o", d / "no" / "b"], 2,
                                 ("is a file, not a folder",), setup=_existing_file("no")),
    "export/calib-limit-0": Case(lambda w, d: [*EXPORT(w), "--calib", w["tree"], "--calib-limit", "0", "-o", d / "b"], 2,
                                 ("--calib-limit 0",)),
    "export/window-budget-0": Case(lambda w, d: [*EXPORT(w), "--window-budget", "0", "-o", d / "b"], 2,
                                   ("--window-budget 0",)),
    "export/budget-0": Case(lambda w, d: [*EXPORT(w), "--budget", "0", "-o", d / "b"], 2, ("--budget 0",)),
    "export/threshold-1": Case(lambda w, d: [*EXPORT(w), "--threshold", "1", "-o", d / "b"], 2, ("--threshold 1",)),
    "export/max-growth-0": Case(lambda w, d: [*EXPORT(w), "--max-growth", "0", "-o", d / "b"], 2, ("--max-growth",)),
    "export/prune-rate-1": Case(lambda w, d: [*EXPORT(w), "--prune-rate", "1", "-o", d / "b"], 2, ("--prune-rate",)),
    "export/channel-prune-0.99": Case(lambda w, d: [*EXPORT(w), "--channel-prune", "0.99", "-o", d / "b"], 2,
                                      ("--channel-prune",)),
    "export/phi-unknown": Case(lambda w, d: [*EXPORT(w), "--phi", "sq", "-o", d / "b"], 2, ("Invalid value for '--phi'",)),
    "export/unknown-option": Case(lambda w, d: [*EXPORT(w), "--fast", "-o", d / "b"], 2, ("No such option",)),
    "export/threads-0": Case(lambda w, d: [*EXPORT(w), "--threads", "0", "-o", d / "b"], 2, ("--threads 0",)),
    "export/mode-unknown": Case(lambda w, d: [*EXPORT(w), "--mode", "both", "-o", d / "b"], 2,
                                ("Invalid value for '--mode'",)),
    "export/calib-images-without-labels": Case(lambda w, d: [*EXPORT(w), "--calib", w["images_only"], "-o", d / "b"], 2,
                                               ("no labels.csv beside it",)),
    "export/calib-one-class": Case(lambda w, d: [*EXPORT(w), "--calib", w["oneclass"], "-o", d / "b"], 2,
                                   ("one class", "10-class")),
    "export/calib-label-out-of-range": Case(lambda w, d: [*EXPORT(w), "--calib", w["out_of_range"], "-o", d / "b"], 2,
                                            ("class index 50", "out of range")),
    "export/calib-label-not-integer": Case(lambda w, d: [*EXPORT(w), "--calib", w["bad_index"], "-o", d / "b"], 2,
                                           ("labels.csv:3", "not an integer")),
    "export/calib-is-file": Case(lambda w, d: [*EXPORT(w), "--calib", w["file"], "-o", d / "b"], 2, ("is a file",)),
    "export/calib-mixed-layout": Case(lambda w, d: [*EXPORT(w), "--calib", w["mixed"], "-o", d / "b"], 2,
                                      ("both image files and class subfolders",)),
    # build
    "build/backend-unknown": Case(lambda w, d: ["build", B(w), "--backend", "foo"], 2, ("Invalid value for '--backend'",)),
    "build/precision-fp8": Case(lambda w, d: ["build", B(w), "--precision", "fp8"], 2, ("Invalid value for '--precision'",)),
    "build/not-a-bundle": Case(lambda w, d: ["build", w["notbundle"], "--precision", "fp16"], 2, ("not a scalecert bundle",)),
    "build/calib-missing": Case(lambda w, d: ["build", B(w), "--precision", "int8", "--calib", d / "nope"], 2,
                                ("no such directory",)),
    "build/calib-limit-0": Case(lambda w, d: ["build", B(w), "--precision", "int8", "--calib", w["tree"],
                                              "--calib-limit", "0"], 2, ("--calib-limit 0",)),
    "build/int8-without-calib": Case(lambda w, d: ["build", B(w), "--precision", "int8"], 2, ("needs --calib",)),
    "build/threads-text": Case(lambda w, d: ["build", B(w), "--threads", "x"], 2, ("--threads x",)),
    # bench: options, checked before any image is read
    "bench/limit-0": Case(lambda w, d: ["bench", B(w), "--data", w["tree"], "--limit", "0"], 2, ("--limit 0",)),
    "bench/limit-negative": Case(lambda w, d: ["bench", B(w), "--data", w["tree"], "--limit", "-5"], 2, ("--limit -5",)),
    "bench/batch-0": Case(lambda w, d: ["bench", B(w), "--data", w["tree"], "--batch", "0"], 2, ("--batch 0",)),
    "bench/threads-negative": Case(lambda w, d: ["bench", B(w), "--data", w["tree"], "--threads", "-2"], 2,
                                   ("--threads -2",)),
    "bench/masks-0": Case(lambda w, d: ["bench", B(w), "--data", w["tree"], "--masks", "0"], 2, ("--masks 0",)),
    "bench/stride-100": Case(lambda w, d: ["bench", B(w), "--data", w["tree"], "--stride", "100"], 2,
                             ("--stride 100", "larger than")),
    "bench/stride-0": Case(lambda w, d: ["bench", B(w), "--data", w["tree"], "--stride", "0"], 2, ("--stride 0",)),
    "bench/prune-rate-1.5": Case(lambda w, d: ["bench", B(w), "--data", w["tree"], "--prune-rate", "1.5"], 2,
                                 ("--prune-rate 1.5",)),
    "bench/prune-rate-text": Case(lambda w, d: ["bench", B(w), "--data", w["tree"], "--prune-rate", "half"], 2,
                                  ("comma-separated numbers",)),
    "bench/precision-fp8": Case(lambda w, d: ["bench", B(w), "--data", w["tree"], "--precision", "fp8"], 2,
                                ("Invalid value for '--precision'", "'fp8'")),
    "bench/precision-list-fp8": Case(lambda w, d: ["bench", B(w), "--data", w["tree"], "--precision", "fp32,fp8"], 2,
                                     ("Invalid value for '--precision'", "'fp8'")),
    "bench/precision-not-built": Case(lambda w, d: ["bench", B(w), "--data", w["tree"], "--precision", "int8"], 2,
                                      ("no int8 variant",)),
    "bench/output-parent-a-file": Case(lambda w, d: ["bench", B(w), "--data", w["tree"], "-o", d / "no" / "x.json"],
                                       2, ("--output", "is a file, not a folder"), setup=_existing_file("no")),
    "bench/plot-parent-a-file": Case(lambda w, d: ["bench", B(w), "--data", w["tree"], "--plot", d / "no" / "x.png"], 2,
                                     ("--plot", "is a file, not a folder"), setup=_existing_file("no")),
    "bench/output-exists": Case(lambda w, d: ["bench", B(w), "--data", w["tree"], "-o", d / "r.json"], 2,
                                ("already exists", "--force"), setup=_existing_file("r.json")),
    "bench/output-is-folder": Case(lambda w, d: ["bench", B(w), "--data", w["tree"], "-o", d], 2, ("is a folder",)),
    "bench/output-and-plot-same": Case(lambda w, d: ["bench", B(w), "--data", w["tree"], "-o", d / "x",
                                                     "--plot", d / "x"], 2, ("same file",)),
    "bench/report-and-output-differ": Case(lambda w, d: ["bench", B(w), "--data", w["tree"], "--report", d / "a.json",
                                                         "-o", d / "b.json"], 2, ("both given",)),
    "bench/data-missing": Case(lambda w, d: ["bench", B(w), "--data", d / "nope"], 2, ("no such directory",)),
    "bench/data-option-missing": Case(lambda w, d: ["bench", B(w)], 2, ("Missing option '--data'",)),
    "bench/data-unlabelled": Case(lambda w, d: ["bench", B(w), "--data", w["unlabelled"]], 2, ("without labels",)),
    "bench/images-without-labels-csv": Case(lambda w, d: ["bench", B(w), "--data", w["images_only"]], 2,
                                            ("no labels.csv beside it",)),
    "bench/one-class": Case(lambda w, d: ["bench", B(w), "--data", w["oneclass"]], 2, ("one class",)),
    "bench/labels-file-missing": Case(lambda w, d: ["bench", B(w), "--data", w["unlabelled"], "--labels", d / "l.csv"], 2,
                                      ("no such labels file",)),
    "bench/labels-name-no-image": Case(lambda w, d: ["bench", B(w), "--data", w["names_none"]], 2, ("names none",)),
    "bench/label-out-of-range": Case(lambda w, d: ["bench", B(w), "--data", w["out_of_range"]], 2, ("out of range",)),
    # bench: one bad image among valid ones
    "bench/bomb-among-valid": Case(lambda w, d: ["bench", B(w), "--data", w["with_bomb"], "--quiet"], 1,
                                   ("0501.png", "pixel limit", "1 of 3 images")),
    # tune (all refused before the model is even loaded)
    "tune/output-exists": Case(lambda w, d: ["tune", w["ckpt"], "--arch", "resnet20-cifar", "--data", w["tree"],
                                             "-o", d / "t.pt"], 2, ("already exists", "--force"),
                               setup=_existing_file("t.pt")),
    "tune/last-exists": Case(lambda w, d: ["tune", w["ckpt"], "--arch", "resnet20-cifar", "--data", w["tree"],
                                           "-o", d / "t.pt"], 2, ("t.pt.last", "already exists"),
                             setup=_existing_file("t.pt.last")),
    "tune/output-is-folder": Case(lambda w, d: ["tune", w["ckpt"], "--arch", "resnet20-cifar", "--data", w["tree"],
                                                "-o", d], 2, ("is a folder",)),
    "tune/output-parent-a-file": Case(lambda w, d: ["tune", w["ckpt"], "--arch", "resnet20-cifar", "--data", w["tree"],
                                                    "-o", d / "no" / "t.pt"], 2, ("is a file, not a folder",),
                                      setup=_existing_file("no")),
    "tune/epochs-0": Case(lambda w, d: ["tune", w["ckpt"], "--arch", "resnet20-cifar", "--data", w["tree"],
                                        "--epochs", "0", "-o", d / "t.pt"], 2, ("--epochs",)),
    "tune/occlusions-negative": Case(lambda w, d: ["tune", w["ckpt"], "--arch", "resnet20-cifar", "--data", w["tree"],
                                                   "--occlusions", "-1", "-o", d / "t.pt"], 2, ("--occlusions -1",)),
    "tune/prune-rate-2": Case(lambda w, d: ["tune", w["ckpt"], "--arch", "resnet20-cifar", "--data", w["tree"],
                                            "--prune-rate", "2", "-o", d / "t.pt"], 2, ("--prune-rate 2",)),
    "tune/data-one-class": Case(lambda w, d: ["tune", w["ckpt"], "--arch", "resnet20-cifar", "--data", w["oneclass"],
                                              "-o", d / "t.pt"], 2, ("one class",)),
    "tune/val-out-of-range": Case(lambda w, d: ["tune", w["ckpt"], "--arch", "resnet20-cifar", "--data", w["tree"],
                                                "--val", w["out_of_range"], "-o", d / "t.pt"], 2, ("out of range",)),
    "tune/arch-missing": Case(lambda w, d: ["tune", w["ckpt"], "--data", w["tree"], "-o", d / "t.pt"], 2,
                              ("Missing option '--arch'",)),
    "tune/threads-0": Case(lambda w, d: ["tune", w["ckpt"], "--arch", "resnet20-cifar", "--data", w["tree"],
                                         "--threads", "0", "-o", d / "t.pt"], 2, ("--threads 0",)),
    "tune/mode-unknown": Case(lambda w, d: ["tune", w["ckpt"], "--arch", "resnet20-cifar", "--data", w["tree"],
                                            "--mode", "both", "-o", d / "t.pt"], 2, ("Invalid value for '--mode'",)),
    "doctor/threads-0": Case(lambda w, d: ["doctor", B(w), "--threads", "0"], 2, ("--threads 0",)),
    # demo, inspect, the group
    "demo/output-is-file": Case(lambda w, d: ["demo", "-o", w["file"]], 2, ("--output", "is a file")),
    "inspect/missing": Case(lambda w, d: ["inspect", d / "nope"], 2, ("no such bundle",)),
    "inspect/corrupt-manifest": Case(lambda w, d: ["inspect", w["corrupt"]], 2, ("corrupt manifest",)),
    "scalecert/unknown-command": Case(lambda w, d: ["certfy", B(w)], 2, ("No such command 'certfy'",)),
}


def _run(argv, env=None):
    from scalecert.cli import export_main, main

    runner = CliRunner()
    command = export_main if argv[0] == "scalecert-export" else main
    args = [str(a) for a in (argv[1:] if argv[0] == "scalecert-export" else argv)]
    return runner.invoke(command, args, env=env, catch_exceptions=True)


def _listing(folder) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, folder)] = None if os.path.isdir(path) else open(path, "rb").read()
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, world, tmp_path, monkeypatch):
    case = CASES[name]
    if "unwritable" in name and os.geteuid() == 0:  # root passes every permission check: answer as its owner would
        monkeypatch.setattr(os, "access", _access_as_owner(os.access))
    if case.setup:
        case.setup(world, tmp_path)
    if case.cwd:
        monkeypatch.chdir(tmp_path)
    before_case, before_world = _listing(tmp_path), _listing(world["root"])
    bundle_parent = os.path.dirname(world["bundle"])
    before_bundle = _listing(bundle_parent)
    result = _run(case.args(world, tmp_path), case.env)
    out, err = result.stdout, result.stderr
    assert result.exit_code == case.code, f"exit {result.exit_code}\n{out}\n{err}\n{result.exception!r}"
    assert "Traceback" not in out + err and "Warning" not in err, err
    if case.code == 2:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert "wrote" not in out and "updated" not in out, out  # progress lines at most, no result
    else:
        assert all(line.startswith("error: ") or "could not be" in line for line in err.splitlines()), err
    text = err + out
    for needle in case.needles:
        assert needle in text, f"{needle!r} not in {text}"
    if case.json_rows:
        rows = [json.loads(line) for line in out.splitlines()]
        assert sum(r["status"] == "error" for r in rows) == 1
        assert sum(r["status"] in ("certified", "alert") for r in rows) == case.ok_rows
    elif case.ok_rows:
        assert sum(os.path.basename(p) in out for p in world["good"]) == case.ok_rows, out
    # nothing half-written, nothing of the user's deleted or changed
    after_case = _listing(tmp_path)
    assert not [p for p in after_case if os.path.basename(p).startswith(".scalecert")], after_case
    for path, content in before_case.items():
        assert after_case.get(path, "gone") == content, f"{path} was changed or deleted"
    if case.code == 2:
        assert set(after_case) - set(before_case) <= {"locked"}, set(after_case) - set(before_case)
    assert _listing(world["root"]) == before_world
    assert _listing(bundle_parent) == before_bundle


def test_there_are_enough_cases():
    commands = {name.split("/")[0] for name in CASES}
    assert len(CASES) >= 60 and {"certify", "export", "build", "bench", "tune", "inspect"} <= commands


# --- --force ------------------------------------------------------------------------------------------


def test_force_never_deletes_a_folder_that_is_no_bundle(world, tmp_path):
    target = tmp_path / "sandbox" / "sub"
    target.mkdir(parents=True)
    (target / "data.csv").write_text("x,y\n")
    result = _run(["scalecert-export", world["ckpt"], "--arch", "resnet20-cifar", "--patch", "5", "-o", target,
                   "--force", "--quiet"])
    assert result.exit_code == 2 and "data.csv" in result.stderr
    assert (target / "data.csv").read_text() == "x,y\n"
    assert sorted(os.listdir(tmp_path / "sandbox")) == ["sub"]


def test_force_replaces_a_bundle_and_leaves_no_temporary_folders(world, tmp_path):
    import shutil

    from scalecert.bundle.staging import replace_dir

    old = tmp_path / "b"
    shutil.copytree(world["bundle"], old)
    (old / "extra.txt").write_text("old")
    new = tmp_path / ".work"
    shutil.copytree(world["bundle"], new)
    replace_dir(str(new), str(old))
    assert not (old / "extra.txt").exists() and (old / "manifest.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["b"]


# --- the data-input rule ------------------------------------------------------------------------------


def _labelled_layouts(photo_dir, root):
    """The same real photos as a flat folder with labels.csv and as images/ + labels.csv."""
    import shutil

    rows = "file,index,name\n" + "".join(f"{n}.png,{i},{n}\n" for i, n in enumerate(PHOTOS))
    flat, nested = root / "flat", root / "nested"
    flat.mkdir()
    (nested / "images").mkdir(parents=True)
    for n in PHOTOS:
        shutil.copy(os.path.join(photo_dir, f"{n}.png"), flat / f"{n}.png")
        shutil.copy(os.path.join(photo_dir, f"{n}.png"), nested / "images" / f"{n}.png")
    (flat / "labels.csv").write_text(rows)
    (nested / "labels.csv").write_text(rows)
    return str(flat), str(nested)


def test_images_plus_labels_csv_matches_flat_layout(tiny_bundle, photo_dir, tmp_path):
    from scalecert.evaluation.bench import run_bench
    from scalecert.runtime.datasets import image_set

    flat, nested = _labelled_layouts(photo_dir, tmp_path)
    a, b = image_set(flat), image_set(nested)
    assert a.layout == "flat folder + labels.csv" and b.layout == "images/ + labels.csv"
    assert sorted(a) == sorted((os.path.join(flat, f"{n}.png"), i) for i, n in enumerate(PHOTOS))
    assert [lb for _, lb in a] == [lb for _, lb in b]
    assert image_set(os.path.join(nested, "images")).layout == "images/ + ../labels.csv"
    ra, rb = (run_bench(tiny_bundle, d, quiet=True) for d in (flat, nested))
    keys = ("clean_accuracy", "certified_accuracy", "false_alert_rate", "images")
    assert [ra["configs"][0][k] for k in keys] == [rb["configs"][0][k] for k in keys]
    assert ra["data"]["images"] == len(PHOTOS)


def test_images_plus_labels_csv_matches_imagefolder_on_cifar(tiny_bundle, tmp_path):
    """30 CIFAR-10-shaped files (the generated stand-in tree): the same accuracy from an ImageFolder
    tree, a flat folder with labels.csv and images/ + labels.csv, and it is the accuracy of the
    model's own answers against the labels given (so every layout paired each file with its label).
    Every other file is labelled with the random model's own answer, the rest keep their stand-in
    class, so about half are right and some of those certified."""
    import shutil

    from conftest import CIFAR_CLASSES, cifar_files
    from scalecert.evaluation.bench import run_bench
    from scalecert.runtime import Certifier

    files = cifar_files(3)
    with Certifier.load(tiny_bundle) as cert:
        results = [cert.certify(path) for path in files]
    truth = [int(r.label) if i % 2 == 0 else CIFAR_CLASSES.index(os.path.basename(os.path.dirname(path)))
             for i, (path, r) in enumerate(zip(files, results))]  # odd files: all ten classes occur
    tree, flat, nested = tmp_path / "tree", tmp_path / "flat", tmp_path / "nested"
    rows = "file,index\n"
    (nested / "images").mkdir(parents=True)
    flat.mkdir()
    for i, (path, label) in enumerate(zip(files, truth)):
        cls = CIFAR_CLASSES[label]
        name = f"{i:02d}_{os.path.basename(path)}"
        (tree / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tree / cls / name)
        shutil.copy(path, flat / name)
        shutil.copy(path, nested / "images" / name)
        rows += f"{name},{label}\n"
    assert sorted(os.listdir(tree)) == sorted(CIFAR_CLASSES)
    (flat / "labels.csv").write_text(rows)
    (nested / "labels.csv").write_text(rows)
    reports = [run_bench(tiny_bundle, str(d), quiet=True) for d in (tree, flat, nested)]
    assert [r["data"]["layout"] for r in reports] == ["ImageFolder (class subfolders)", "flat folder + labels.csv",
                                                      "images/ + labels.csv"]
    right = [r.label == t for r, t in zip(results, truth)]
    expected = (sum(right) / len(files), sum(ok and r.status == "certified" for ok, r in zip(right, results)) / len(files))
    assert 0.5 <= expected[0] < 1 and expected[1] > 0, expected  # a misplaced label would show
    accuracy = [(r["configs"][0]["clean_accuracy"], r["configs"][0]["certified_accuracy"]) for r in reports]
    assert accuracy == [pytest.approx(expected)] * 3, (accuracy, expected)


def test_explicit_labels_win_over_subfolders(tmp_path):
    from scalecert.runtime.datasets import image_set

    for name in ("a", "b"):
        (tmp_path / "sub" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "sub" / name / "x.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "top.png")
    (tmp_path / "other.csv").write_text("top.png,7\n")
    found = image_set(str(tmp_path), str(tmp_path / "other.csv"))
    assert list(found) == [(str(tmp_path / "top.png"), 7)] and "--labels" in found.describe()


def _imagenet_sample_replica(root) -> str:
    """The layout of ../shared/data/imagenet-sample, generated: images/<wnid>_<name>.JPEG of varied
    sizes and labels.csv with file,index,wnid,name for the even ImageNet classes (one image each)."""
    from conftest import smooth_image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = ["file,index,wnid,name"]
    for index in range(0, 1000, 2):
        file = f"n{index:08d}_class{index}.JPEG"
        if index < 6:  # a few real pixels; the resolver reads names, not images
            Image.fromarray(smooth_image(rng, (40 + index, 60))).save(root / "images" / file, format="JPEG")
        else:
            (root / "images" / file).write_bytes(b"")
        rows.append(f"{file},{index},n{index:08d},class{index}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return str(root)


@pytest.mark.parametrize("where", ["replica", pytest.param("shared", marks=pytest.mark.slow)])
def test_imagenet_sample_layout_is_resolved(where, tmp_path):
    """The team's ImageNet sample (../shared, under -m slow) and a generated replica of its layout."""
    from conftest import IMAGENET, need
    from scalecert.runtime.datasets import image_set

    found = image_set(need(IMAGENET) if where == "shared" else _imagenet_sample_replica(tmp_path / "imagenet-sample"))
    assert found.layout == "images/ + labels.csv" and len(found) == 500 and found.num_classes == 500
    assert all(label is not None and label % 2 == 0 for _, label in found)
    assert "500 images, 500 classes" in found.describe()


# --- decoding -------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    from scalecert.runtime.images import read_image

    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "phone.jpg", exif=exif)
    assert read_image(str(tmp_path / "phone.jpg")).size == (20, 40)


def test_pixel_limit_is_settable(tmp_path, monkeypatch):
    from scalecert.errors import ScaleCertError
    from scalecert.runtime.images import read_image

    Image.new("RGB", (50, 50)).save(tmp_path / "a.png")
    monkeypatch.setenv("SCALECERT_MAX_PIXELS", "2000")
    with pytest.raises(ScaleCertError, match="pixel limit"):
        read_image(str(tmp_path / "a.png"))
    monkeypatch.setenv("SCALECERT_MAX_PIXELS", "0")
    assert read_image(str(tmp_path / "a.png")).size == (50, 50)


def test_png_names_and_rows_never_collide(tiny_bundle, world, tmp_path):
    tree = world["with_bomb"]
    images = [os.path.join(tree, "c0", "0500.png"), os.path.join(tree, "c1", "0500.png")]
    result = _run(["certify", tiny_bundle, "--png-dir", tmp_path / "png", *images])
    assert result.exit_code == 0, result.stderr
    assert sorted(os.path.relpath(os.path.join(dp, f), tmp_path / "png")
                  for dp, _, fs in os.walk(tmp_path / "png") for f in fs) == [os.path.join("c0", "0500.png"),
                                                                              os.path.join("c1", "0500.png")]
    assert os.path.join("c0", "0500.png") in result.stdout and os.path.join("c1", "0500.png") in result.stdout


def test_calibration_refuses_labels_that_do_not_fit_the_model(tiny_bundle, tiny_checkpoint, tmp_path):
    """40 generated images labelled with the random ResNet-20's own answers ("true") and with every
    label shifted by one class ("shifted"): the model agrees with none of the shifted labels but
    sorts the images exactly as they do, and export refuses to calibrate against them; the true
    labels pass."""
    import shutil

    from conftest import cifar_files, in_process
    from scalecert.errors import ScaleCertError
    from scalecert.runtime import Certifier

    files = cifar_files(4)
    with Certifier.load(tiny_bundle) as cert:  # the dense model's answers (tiny_bundle gates nothing)
        answers = [int(cert.certify(path).label) for path in files]
    assert len(set(answers)) > 1, answers
    for name, shift in (("shifted", 1), ("true", 0)):
        folder = tmp_path / name
        folder.mkdir()
        rows = "file,index\n"
        for i, (path, answer) in enumerate(zip(files, answers)):
            target = f"{i:02d}.jpg"
            shutil.copy(path, folder / target)
            rows += f"{target},{(answer + shift) % 10}\n"
        (folder / "labels.csv").write_text(rows)
    args = (tiny_checkpoint, "--arch", "resnet20-cifar", "--patch", "5", "--prune-rate", "0.3", "--quiet")
    with pytest.raises(ScaleCertError, match="agrees with .* of these labels"):
        in_process("export", *args, "--calib", tmp_path / "shifted", "-o", tmp_path / "bad.scalecert")
    assert not (tmp_path / "bad.scalecert").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".scalecert")]
    in_process("export", *args, "--calib", tmp_path / "true", "-o", tmp_path / "good.scalecert")
    assert (tmp_path / "good.scalecert" / "manifest.json").exists()


def test_label_fit_tells_renamed_classes_from_a_weak_model():
    from scalecert.export import label_fit

    labels = np.repeat(np.arange(10), 5)
    assert label_fit(labels, labels) == (1.0, 1.0)
    accuracy, agreement = label_fit((labels + 1) % 10, labels)  # right grouping, wrong class order
    assert accuracy == 0.0 and agreement == 1.0
    accuracy, agreement = label_fit(np.zeros_like(labels), labels)  # a model that says one class
    assert accuracy == 0.1 and agreement == 0.1
