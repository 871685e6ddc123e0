"""The certificate in source (camera) pixels, docs/design.md §8: the reach computed from the resize
kernel's support (core/source.py) against perturbation scans through the real preprocessing, a
negative control one pixel past the bound, attacks pasted in SOURCE pixels through the real
runtime, and the CLI (certify's source report and --source-patch, export --for-source).

Photos: scikit-image's, resized and cropped to several sizes and aspect ratios (larger and smaller
than the network input) and saved as PNG files, read back by the runtime's own decoder."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import in_process, run_cli
from PIL import Image

import attack_harness as attack
from source_scan import (
    compare_axis,
    past_bound_witness,
    patch_reach,
    scan_axis,
    scan_pixels,
    widest_position,
)
from scalecert.runtime.images import read_image
from scalecert.runtime.source import source_map

IMAGENET = {"input_size": (3, 224, 224), "resize_short": 256}  # EfficientNet-Lite0's: short side, centre crop
CIFAR = {"input_size": (3, 32, 32)}  # direct resize
# name -> (photo, (height, width), how): resized, or a centre crop of the photo at that size
SOURCES = {
    "chelsea-300x451": ("chelsea", (300, 451), "native"),
    "coffee-240x320": ("coffee", (240, 320), "crop"),
    "rocket-375x500": ("rocket", (375, 500), "resize"),
    "astronaut-64x64": ("astronaut", (64, 64), "resize"),
    "chelsea-48x96": ("chelsea", (48, 96), "resize"),
    "rocket-30x20": ("rocket", (30, 20), "resize"),
}
FULL_SCAN_MAX = 330  # longer axes are scanned at every 5th index plus both ends (CI time)


@pytest.fixture(scope="module")
def sources(photo_dir, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("sources")
    out = {}
    for name, (photo, (h, w), how) in SOURCES.items():
        img = Image.open(os.path.join(photo_dir, f"{photo}.png")).convert("RGB")
        if how == "crop":
            left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
            img = img.crop((left, top, left + w, top + h))
        elif how == "resize":
            img = img.resize((w, h), Image.BILINEAR)
        assert img.size == (w, h), (name, img.size)
        out[name] = str(folder / f"{name}.png")
        img.save(out[name])
    return out


def _pixels(path: str) -> np.ndarray:
    return np.asarray(read_image(path))


GEOMETRY = [("cifar", n) for n in SOURCES] + [("imagenet", n) for n in ("chelsea-300x451", "coffee-240x320",
                                                                       "astronaut-64x64", "chelsea-48x96", "rocket-30x20")]


@pytest.mark.parametrize("spec_name,source", GEOMETRY)
def test_computed_reach_matches_perturbation_scan(sources, spec_name, source):
    spec = CIFAR if spec_name == "cifar" else IMAGENET
    pixels = _pixels(sources[source])
    smap = source_map(pixels.shape[:2], spec)
    rows = []
    for axis, amap in ((0, smap.y), (1, smap.x)):
        n = pixels.shape[axis]
        indices = None if n <= FULL_SCAN_MAX else np.unique(np.r_[0:n:5, n - 1])
        lo, hi = scan_axis(pixels, spec, axis, indices)
        out = compare_axis(amap, lo, hi, indices)
        rows.append(out)
        assert out["escapes"] == 0, out  # no input pixel outside the computed reach ever changed
        assert out["reach_computed_max"] - out["reach_observed_max"] <= 1, out
        if indices is None:
            assert out["bound_below_observed"] == 0 and out["bound_gap_max"] <= 1, out  # sound, and tight to 1 pixel
    rng = np.random.default_rng(0)
    positions = np.stack([rng.integers(0, pixels.shape[0], 40), rng.integers(0, pixels.shape[1], 40)], 1)
    px = scan_pixels(pixels, spec, smap, positions)
    assert px["escapes"] == 0, px
    assert px["changed"] > 0
    print(f"\n[scan {spec_name} {source}] rows {rows[0]} cols {rows[1]} pixels {px}")


@pytest.mark.slow
def test_imagenet_photos_at_native_size_scan_inside_the_reach():
    """ImageNet sample photos (../shared) at their own sizes through the EfficientNet preprocessing:
    every 7th row and column, and single pixels, change nothing outside the computed reach. (The
    default run scans scikit-image's photos at native and other sizes the same way, above.)"""
    from conftest import IMAGENET as IMAGENET_DIR
    from conftest import need

    folder = os.path.join(need(IMAGENET_DIR), "images")
    for name in sorted(os.listdir(folder))[:3]:
        pixels = _pixels(os.path.join(folder, name))
        smap = source_map(pixels.shape[:2], IMAGENET)
        for axis, amap in ((0, smap.y), (1, smap.x)):
            n = pixels.shape[axis]
            indices = np.unique(np.r_[0:n:7, n - 1])
            out = compare_axis(amap, *scan_axis(pixels, IMAGENET, axis, indices), indices)
            assert out["escapes"] == 0 and out["extra_pixels_max"] <= 1, (name, axis, out)
        rng = np.random.default_rng(1)
        positions = np.stack([rng.integers(0, pixels.shape[0], 20), rng.integers(0, pixels.shape[1], 20)], 1)
        assert scan_pixels(pixels, IMAGENET, smap, positions)["escapes"] == 0


@pytest.mark.parametrize("spec_name,source,patch", [("cifar", n, 5) for n in SOURCES] +
                         [("imagenet", n, 32) for n in ("coffee-240x320", "astronaut-64x64", "chelsea-48x96")])
def test_one_pixel_past_the_bound_exceeds_the_input_patch(sources, spec_name, source, patch):
    """Negative control: at the bound a contrast patch at its worst position changes at most the
    bundle's patch; one source pixel more (per axis) changes more input pixels than the patch has."""
    spec = CIFAR if spec_name == "cifar" else IMAGENET
    pixels = _pixels(sources[source])
    smap = source_map(pixels.shape[:2], spec)
    h, w = smap.covered_patch((patch, patch))
    assert h >= 1 and w >= 1
    top, left = widest_position(smap.y, h), widest_position(smap.x, w)
    seen = patch_reach(pixels, spec, top, left, (h, w))
    assert seen[0] <= patch and seen[1] <= patch, (seen, (h, w))
    for axis, amap, size in ((0, smap.y, (h + 1, w)), (1, smap.x, (h, w + 1))):
        if size[axis] > amap.source:
            continue
        witness = past_bound_witness(pixels, spec, smap, size, axis, patch)
        assert witness is not None, (axis, size)
        print(f"[{spec_name} {source}] bound {h}x{w} reaches {seen}; {size} at {witness[0]} reaches {witness[1]}")


def test_cropped_region_is_unconstrained_and_reported(sources):
    pixels = _pixels(sources["chelsea-300x451"])
    smap = source_map(pixels.shape[:2], IMAGENET)
    _, x0, _, x1 = smap.window()
    assert x0 > 0 and x1 < pixels.shape[1]  # a landscape photo loses its sides to the centre crop
    assert smap.influence(0, 0, (pixels.shape[0], x0))[3] <= smap.influence(0, 0, (pixels.shape[0], x0))[1]
    clean = attack.paste(pixels, np.array([[0, 0]]), np.zeros((1, pixels.shape[0], x0, 3), np.uint8))[0]
    from source_scan import preprocess

    assert np.array_equal(preprocess(clean, IMAGENET), preprocess(pixels, IMAGENET))  # a patch there changes nothing


# -- attacks in source pixels through the real runtime ---------------------------------------------
def _resized_sources(files: list[str], folder) -> dict[str, str]:
    """32x32 CIFAR-shaped images resized and cropped to other sizes and aspect ratios, as PNG files:
    what a CIFAR-style bundle sees from a camera that is not 32x32."""
    shapes = [(64, 64), (72, 96), (56, 40), (24, 28), (48, 48), (96, 128)]
    out = {}
    for k, path in enumerate(files):
        h, w = shapes[k % len(shapes)]
        img = Image.open(path).convert("RGB")
        img = img.crop((2, 2, 30, 26)) if (h, w) == (24, 28) else img.resize((w, h), Image.BILINEAR)
        out[f"{os.path.basename(os.path.dirname(path))}-{h}x{w}"] = str(folder / f"{k}-{h}x{w}.png")
        img.save(out[f"{os.path.basename(os.path.dirname(path))}-{h}x{w}"])
    return out


@pytest.fixture(scope="module")
def cifar_sources(tmp_path_factory) -> dict[str, str]:
    """The generated CIFAR-shaped filler (conftest.cifar_files), one per class, at other sizes."""
    from conftest import cifar_files

    return _resized_sources(cifar_files(1, offset=3), tmp_path_factory.mktemp("cifar-sources"))


@pytest.fixture(scope="module")
def real_cifar_sources(tmp_path_factory) -> dict[str, str]:
    """CIFAR-10 test photos (../shared), one per class, at other sizes (for the pretrained ResNet-20)."""
    from conftest import real_cifar_files

    return _resized_sources(real_cifar_files(1, offset=3), tmp_path_factory.mktemp("real-cifar-sources"))


# the random-weight ResNet-20 on generated images; the pretrained one on real CIFAR-10 under -m slow
CIFAR_ATTACKS = [("tiny_bundle", "cifar_sources"),
                 pytest.param("r20_bundle", "real_cifar_sources", marks=pytest.mark.slow)]


def _attack_sources(bundle, sources, names, rng_seed=0, per_edge=6, random=12):
    from scalecert.runtime import Certifier

    rng = np.random.default_rng(rng_seed)
    tally = attack.Tally()
    attacked_images, counts = 0, []
    with Certifier.load(bundle, early_exit=True, threads=1) as cert:
        for k, name in enumerate(names):
            result = cert.certify(sources[name])
            if result.status != "certified":
                continue
            pixels = _pixels(sources[name])
            covered = tuple(result.source.covered_patch)
            smap = source_map(pixels.shape[:2], cert.input_spec)
            positions = attack.source_positions(smap, covered, rng, random=random, per_edge=per_edge)
            donors = np.stack([np.asarray(read_image(sources[o]).resize(pixels.shape[1::-1], Image.BILINEAR))
                               for o in names if o != name])
            row = attack.attack_source_image(cert, pixels, result.label, covered, positions, donors=donors, rng=rng,
                                             tally=tally, name=name, index=k)
            attacked_images += 1
            counts.append((name, covered, len(positions), row["attacked"], row["alert"], row["violations"]))
    return tally, attacked_images, counts


def _report(tag, tally, counts):
    t = tally.totals()
    print(f"\n[{tag}] {len(counts)} certified sources attacked, {t['attacked']} attacked images: "
          f"{t['certified_same']} certified same, {t['alert']} alerts ({t['base_flipped']} base flips), "
          f"{t['violations']} violations")
    for row in counts:
        print("   ", row)


def test_source_patches_at_the_bound_never_certified_wrong_tiny(tiny_bundle, sources):
    names = ["coffee-240x320", "astronaut-64x64", "rocket-30x20"]
    tally, n, counts = _attack_sources(tiny_bundle, sources, names, per_edge=3, random=3)
    _report("tiny source-space", tally, counts)
    assert n >= 2, counts
    t = tally.totals()
    assert t["violations"] == 0, tally.violations[:2]
    assert t["attacked"] == t["certified_same"] + t["uncertified_same"] + t["alert"]


@pytest.mark.parametrize("bundle_fixture, sources_fixture", CIFAR_ATTACKS)
def test_source_patches_at_the_bound_never_certified_wrong_resnet20(bundle_fixture, sources_fixture, request):
    bundle, cifar_sources = request.getfixturevalue(bundle_fixture), request.getfixturevalue(sources_fixture)
    tally, n, counts = _attack_sources(bundle, cifar_sources, list(cifar_sources), per_edge=4, random=6)
    _report(f"{bundle_fixture} source-space", tally, counts)
    assert n >= 2, counts
    t = tally.totals()
    assert t["violations"] == 0, tally.violations[:2]
    assert t["alert"] > 0, "no source patch raised an alert: the attacks are too weak to mean anything"


@pytest.mark.parametrize("bundle_fixture, sources_fixture", CIFAR_ATTACKS)
def test_negative_control_whole_source_donor_is_counted(bundle_fixture, sources_fixture, request):
    """The harness does count violations: a 'patch' as large as the source (another photo) is
    far past the bound and turns some certified label into another, certified."""
    from scalecert.runtime import Certifier

    sources = request.getfixturevalue(sources_fixture)
    names = list(sources)
    tally = attack.Tally()
    with Certifier.load(request.getfixturevalue(bundle_fixture), threads=1) as cert:
        for name in names:
            result = cert.certify(sources[name])
            if result.status != "certified":
                continue
            pixels = _pixels(sources[name])
            donors = np.stack([np.asarray(read_image(sources[o]).resize(pixels.shape[1::-1], Image.BILINEAR))
                               for o in names if o != name])
            attack.attack_source_image(cert, pixels, result.label, pixels.shape[:2], np.zeros((len(donors), 2), np.int64),
                                       contents=("donor",), donors=donors, tally=tally, name=name)
    print(f"\n[negative control, whole-source donors] {tally.totals()}")
    assert tally.totals()["violations"] > 0


# -- the CLI ------------------------------------------------------------------------------------
def test_certify_reports_source_patch_and_refuses_uncoverable(tiny_bundle, sources):
    files = [sources["coffee-240x320"], sources["rocket-30x20"]]
    proc = run_cli("scalecert", "certify", tiny_bundle, *files, "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    for row, path in zip(rows, files):
        pixels = _pixels(path)
        assert row["source"]["size"] == list(pixels.shape[:2])
        assert row["source"]["covered_patch"] == list(source_map(pixels.shape[:2], CIFAR).covered_patch((5, 5)))
    table = run_cli("scalecert", "certify", tiny_bundle, files[0])
    assert "source patch HxW" in table.stdout and "of 240x320" in table.stdout
    ok = run_cli("scalecert", "certify", tiny_bundle, files[0], "--json", "--source-patch", "20x30")
    assert ok.returncode == 0 and json.loads(ok.stdout)["source"]["requested_patch"] == [20, 30]
    for bad, words in (("2x", "expected N, HxW or P%"), ("50%", "needs a bundle exported for"), ("999", "does not fit")):
        proc = run_cli("scalecert", "certify", tiny_bundle, *files, "--source-patch", bad)
        assert proc.returncode != 0 and proc.stdout == "", (bad, proc.stdout)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (bad, proc.stderr)


def test_sixteen_bit_sources_have_no_source_bound(tiny_bundle, tmp_path):
    """read_image scales a 16-bit image by its brightest pixel: one pixel changes all of them."""
    path = str(tmp_path / "g16.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 65535, (40, 50)).astype(np.uint16)).save(path)
    proc = run_cli("scalecert", "certify", tiny_bundle, path, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["source"]["covered_patch"] is None
    proc = run_cli("scalecert", "certify", tiny_bundle, path, "--source-patch", "3")
    assert proc.returncode != 0 and "16/32-bit" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_export_for_source_sizes_the_input_patch(tiny_checkpoint, tmp_path):
    out = str(tmp_path / "cam")
    in_process("export", tiny_checkpoint, "--arch", "resnet20-cifar", "--patch", "2%", "--for-source", "320x240",
               "-o", out, "--quiet")
    with open(os.path.join(out, "manifest.json")) as f:
        threat = json.load(f)["threat_model"]
    assert threat["for_source"] == {"size": [240, 320], "patch": [40, 40], "patch_spec": "2%"}
    assert threat["patch"] == list(source_map((240, 320), CIFAR).needed_patch((40, 40)))
    assert source_map((240, 320), CIFAR).covered_patch(threat["patch"]) >= (40, 40)
    proc = run_cli("scalecert-export", tiny_checkpoint, "--arch", "resnet20-cifar", "--patch", "2%",
                   "--for-source", "320by240", "-o", str(tmp_path / "bad"))
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1 and "WIDTHxHEIGHT" in proc.stderr
    assert not os.path.exists(tmp_path / "bad")
