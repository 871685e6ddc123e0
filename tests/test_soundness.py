"""Soundness by attack through the real runtime (tests/attack_harness.py is the harness;
benchmarks/attack.py is its command line). docs/design.md §3.8 (the chain), §6.

A certified image patched anywhere (every one of the (H-ph+1)*(W-pw+1) top-left positions) with
random, saturated, foreign (donor) or gradient-optimised (PGD, at a subset of positions here; the
benchmark mode runs it at more) contents must come back as an alert or with the certified label:
a *violation* (certified with another label) is a security bug. A negative control shows the
same harness does find violations when the window family is deliberately made unsound, so the
zero counts below are not vacuous.

Sizes are kept for a 2-core CI box: "mix" mode gives each position one of the cheap contents
(cycling), so every position is attacked and every content covers a share of the positions.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from conftest import CIFAR_TEST, CIFAR_TRAIN, R20, export, in_process, need, real_cifar_files, skimage_photos
from scalecert.core import geometry
import attack_harness as attack
from scalecert.runtime import Certifier

POSITIONS_5x5_32 = (32 - 5 + 1) ** 2  # 784


def _report(tag: str, out: dict) -> None:
    t = out["total"]
    print(f"\n[{tag}] {out['images_attacked']} certified images attacked ({out['images_certified']} certified of "
          f"{out['images_scanned']} scanned), {t['attacked']} attacked images: {t['certified_same']} certified "
          f"same label, {t['alert']} alerts ({t['base_flipped']} base predictions flipped), "
          f"{t['violations']} violations; {out['seconds']} s")
    for content, c in out["per_content"].items():
        print(f"    {content:8s} {c}")


def _assert_sound(out: dict, min_images: int, min_attacked: int) -> None:
    t = out["total"]
    assert out["images_attacked"] >= min_images, f"too few certified images to attack: {out['images_attacked']}"
    assert t["attacked"] >= min_attacked, t
    assert t["attacked"] == t["certified_same"] + t["uncertified_same"] + t["alert"] + t["violations"]
    assert t["violations"] == 0, out["violations_detail"][:3]
    # every certified image was attacked at every position (pgd positions come on top)
    plain = sum(c["attacked"] for name, c in out["per_content"].items() if name != "pgd")
    assert plain >= out["images_attacked"] * out["positions_per_image"]


# -- a tiny CNN, trained for a few seconds, shipped as a torch.export archive ---------------------
def _tiny_module():
    import torch.nn as nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 16, 3, padding=1)
            self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
            self.c3 = nn.Conv2d(32, 32, 3, stride=2, padding=1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = self.c1(x).relu()
            x = self.c2(x).relu()
            x = self.c3(x).relu()
            return self.fc(x.mean((2, 3)))

    return Tiny()


def _crops(photos: dict, n_per: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random 32x32 views of the scikit-image photos (downscaled crops). Label: 2 * photo + mirrored,
    so pairs of classes differ only by orientation and the classifier keeps thin margins that a
    patch can move (photo identity alone is too easy: nothing would ever flip)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, photo in enumerate(photos.values()):
        h, w = photo.shape[:2]
        for k in range(n_per):
            side = int(rng.integers(min(h, w) // 4, min(h, w) // 2))
            y, x = rng.integers(0, h - side), rng.integers(0, w - side)
            crop = np.ascontiguousarray(photo[y:y + side, x:x + side, :3])
            mirrored = k % 2
            if mirrored:
                crop = np.ascontiguousarray(crop[:, ::-1])
            images.append(np.asarray(Image.fromarray(crop).resize((32, 32), Image.BILINEAR), np.uint8))
            labels.append(2 * label + mirrored)
    return np.stack(images), np.asarray(labels)


def _read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    images = np.stack([np.asarray(Image.open(f).convert("RGB").resize((32, 32)), np.uint8) for f in files])
    classes = sorted(os.listdir(os.path.dirname(os.path.dirname(files[0]))))
    return images, np.asarray([classes.index(os.path.basename(os.path.dirname(f))) for f in files])


def _train_data():
    """(images, labels, training steps): CIFAR-10 train when present, else photo crops."""
    if os.path.isdir(CIFAR_TRAIN):
        import glob

        files = []
        for cls in sorted(os.listdir(CIFAR_TRAIN)):
            files += sorted(glob.glob(os.path.join(CIFAR_TRAIN, cls, "*.jpg")))[:80]
        return (*_read(files), 300)
    return (*_crops(skimage_photos(), 120, seed=1), 300)


def _target_data():
    """CIFAR-10 test images when ../shared has them, else photo crops (the test never skips)."""
    if os.path.isdir(CIFAR_TEST):
        files = real_cifar_files(6)
        images, labels = _read(files)
        return images, labels, [os.path.relpath(f, CIFAR_TEST) for f in files]
    images, labels = _crops(skimage_photos(), 15, seed=2)
    return images, labels, [f"crop{i}" for i in range(len(images))]


def _trained_tiny_cnn(tmp_path_factory, folder: str) -> str:
    """The tiny CNN trained for ~300 steps (seeded), saved with torch.export; its path."""
    import torch

    torch.manual_seed(0)
    model = _tiny_module()
    x, y, steps = _train_data()
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    xs = (torch.from_numpy(x).float().permute(0, 3, 1, 2) / 255 - mean) / std
    ys = torch.from_numpy(y).long()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(xs), (128,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path = str(tmp_path_factory.mktemp(folder) / "tiny.pt2")
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(model, (torch.zeros(2, 3, 32, 32),), dynamic_shapes=({0: batch},)), path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, trained_tiny_cnn):
    """(bundle, TorchReference, images, labels, names) for a tiny CNN trained for ~300 steps
    (conftest's trained_tiny_cnn: _trained_tiny_cnn, once per run)."""

    from scalecert.export.loading import load_model
    from scalecert.training.reference import TorchReference

    path = trained_tiny_cnn
    bundle = export(tmp_path_factory, "tinycnn-bundle", path, "--input-size", "3x32x32", "--patch", "5",
                    "--layer", "auto")
    reference = TorchReference(load_model(path, input_size=(3, 32, 32)), bundle)
    images, labels, names = _target_data()
    return bundle, reference, images, labels, names


def _thinnest(certifier, images, labels, names, n):
    """The n certified images with the thinnest base margins (the ones patches can move at all)."""
    clean = certifier.certify_batch(images)
    chosen = sorted((i for i, r in enumerate(clean) if r.status == "certified"), key=lambda i: clean[i].base_margin)[:n]
    return images[chosen], labels[chosen], [names[i] for i in chosen]


def _load(bundle, cls=Certifier, **kw):
    return cls.load(bundle, backend="ort", **kw)


# -- (i) tiny CNN, every position, noise + extreme + donor, PGD at a subset ----------------------
def test_tiny_cnn_attacked_everywhere_never_certified_wrong(tiny):
    bundle, reference, images, labels, names = tiny
    certifier = _load(bundle, early_exit=True)
    assert attack.patch_size(certifier) == (5, 5)
    thin = _thinnest(certifier, images, labels, names, 3)
    out = attack.attack_images(certifier, thin[0], labels=thin[1], names=thin[2],
                               donor_pool=images, donor_labels=labels,
                               contents=("noise", "extreme", "donor", "pgd"), reference=reference,
                               pgd_positions=32, pgd_steps=10, pgd_views=2, seed=0)
    _report("tiny", out)
    assert out["positions_per_image"] == POSITIONS_5x5_32
    _assert_sound(out, min_images=2, min_attacked=2 * 3 * POSITIONS_5x5_32)
    assert out["total"]["alert"] > 0, "no attack raised an alert: the attacks are too weak to mean anything"
    assert out["total"]["certified_same"] > 0
    assert out["per_content"]["pgd"]["base_flipped"] > 0, "PGD never moved the base prediction"


# -- (ii) pretrained ResNet-20, dense gates ------------------------------------------------------
def _cifar_targets(per_class: int):
    files = real_cifar_files(per_class)
    images, labels = _read(files)
    return images, labels, [os.path.relpath(f, CIFAR_TEST) for f in files]


@pytest.fixture(scope="module")
def r20_model():
    from scalecert.export.loading import load_model

    return load_model(R20, arch="resnet20-cifar")


@pytest.mark.slow
def test_resnet20_attacked_everywhere_never_certified_wrong(r20_bundle, r20_model):
    from scalecert.training.reference import TorchReference

    certifier = _load(r20_bundle)  # the default path: no early exit
    reference = TorchReference(r20_model, r20_bundle)
    images, labels, names = _cifar_targets(2)
    out = attack.attack_images(certifier, images, labels=labels, names=names, max_images=3, mix=True,
                               contents=("noise", "extreme", "donor", "pgd"), reference=reference,
                               pgd_positions=16, pgd_steps=8, pgd_views=2, seed=1)
    _report("resnet20", out)
    _assert_sound(out, min_images=2, min_attacked=2 * POSITIONS_5x5_32)
    assert out["total"]["alert"] > 0


# -- (iii) pretrained ResNet-20 with 30% of positions gated off by static thresholds -------------
@pytest.mark.slow
def test_resnet20_pruned_gates_attacked_everywhere_never_certified_wrong(r20_pruned_bundle, r20_model):
    from scalecert.training.reference import TorchReference

    certifier = _load(r20_pruned_bundle, early_exit=True)
    assert certifier.manifest["sin"]["prune_rate"] > 0
    reference = TorchReference(r20_model, r20_pruned_bundle)
    images, labels, names = _cifar_targets(2)
    out = attack.attack_images(certifier, images, labels=labels, names=names, max_images=2, mix=True,
                               contents=("noise", "extreme", "donor", "pgd"), reference=reference,
                               pgd_positions=12, pgd_steps=8, pgd_views=2, seed=2)
    _report("resnet20-pruned", out)
    _assert_sound(out, min_images=1, min_attacked=POSITIONS_5x5_32)


# -- (iv) negative control: deliberately unsound window families are caught ----------------------
class _UnsoundCertifier(Certifier):
    """A Certifier whose window family is replaced by `unsound_family()` after loading (the
    manifest check passes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.windows = self.unsound_family()
        self.masks = geometry.window_masks(self.windows, self.feature_hw)


class _NoWindows(_UnsoundCertifier):
    """No occlusion at all: certifies whatever the base prediction is."""

    def unsound_family(self):
        return self.windows[:0]


class _HoleInTheMiddle(_UnsoundCertifier):
    """Drops every window that meets the central 6x6 feature positions: a patch there is never
    hidden by any window (the 'gap in the window family' bug that docs/design.md §3.4 rules out)."""

    def unsound_family(self):
        w = self.windows
        return w[~((w[:, 0] < 19) & (w[:, 2] > 13) & (w[:, 1] < 19) & (w[:, 3] > 13))]


def test_negative_control_harness_finds_violations_in_unsound_certifiers(tiny):
    """The same harness reports violations > 0 once the certifier is unsound, so 0 above means
    something. Without any window, any base flip (noise/extreme/donor/PGD) is a violation. With a
    hole in the window family, only patches inside the hole can win, and only by flipping every
    remaining window at once: PGD at the hole's positions does it (the tiny CNN averages its last
    feature map, so a saturated 5x5 patch moves every window's logits)."""
    bundle, reference, images, labels, names = tiny
    nothing = _load(bundle, cls=_NoWindows, early_exit=True)
    assert len(nothing.windows) == 0
    thin = _thinnest(_load(bundle), images, labels, names, 2)
    out = attack.attack_images(nothing, thin[0], labels=thin[1], names=thin[2], mix=True,
                               donor_pool=images, donor_labels=labels,
                               contents=("noise", "extreme", "donor", "pgd"), reference=reference,
                               pgd_positions=24, pgd_steps=10, pgd_views=0, seed=3)
    _report("negative: no windows", out)
    assert out["total"]["violations"] > 0
    assert out["total"]["violations"] == out["total"]["base_flipped"]  # no window: every flip is certified

    # hole in the family vs the real family, same images (certified by both), same positions, same PGD
    sound = _load(bundle, early_exit=True)
    holed = _load(bundle, cls=_HoleInTheMiddle, early_exit=True)
    assert 0 < len(holed.windows) < len(sound.windows)
    clean = sound.certify_batch(images)
    # the certified images with the thinnest base margins: the ones a 5x5 patch can flip at all
    chosen = sorted((i for i, r in enumerate(clean) if r.status == "certified"), key=lambda i: clean[i].base_margin)[:6]
    assert chosen, "the tiny CNN certified none of the target images"
    centre = np.array([(y, x) for y in range(12, 17) for x in range(12, 17)])  # footprints inside the hole
    found = {}
    for tag, certifier in (("hole in the window family", holed), ("sound family, same attack", sound)):
        out = attack.attack_images(certifier, images[chosen], labels=labels[chosen],
                                   names=[names[i] for i in chosen], contents=("pgd",), reference=reference,
                                   pgd_positions=centre, pgd_steps=20, pgd_views=2, seed=4)
        _report(f"negative: {tag}", out)
        assert out["images_attacked"] == len(chosen)
        found[tag] = out
    holed_out, sound_out = found["hole in the window family"], found["sound family, same attack"]
    assert holed_out["total"]["violations"] > 0, "PGD found no violation through a gap in the window family"
    for v in holed_out["violations_detail"]:
        assert 12 <= v["position"][0] <= 16 and 12 <= v["position"][1] <= 16
    assert sound_out["total"]["violations"] == 0


class _FootprintTooSmall(_UnsoundCertifier):
    """The window family of a footprint 2 smaller than the true one (window_family(footprint-2)):
    the 'footprint computed too small' bug that docs/design.md §3.2 rules out. Most footprints then
    stick out of every window by one feature row or column, which only the patch's border pixels reach."""

    def unsound_family(self):
        return geometry.window_family(tuple(v - 2 for v in self.bundle.footprint), self.bundle.stride,
                                      self.feature_hw)


@pytest.mark.slow
def test_negative_control_footprint_too_small_is_caught(tiny):
    """Subtle negative control (~50 s): PGD through the one-feature leak at every position whose true
    footprint no window of the shrunken family contains. On the tiny CNN with CIFAR-10 images this
    finds a handful of violations (6 of 3200 attacked images with the seed below), the sound family
    none. With the photo-crop fallback (no ../shared) the tiny CNN is a different model, so the
    check needs the CIFAR images."""
    need(CIFAR_TEST)
    bundle, reference, images, labels, names = tiny
    sound = _load(bundle, early_exit=True)
    small = _load(bundle, cls=_FootprintTooSmall, early_exit=True)

    def contained(certifier, position) -> bool:
        y0, x0, y1, x1 = attack.footprint_of(certifier, position)
        w = certifier.windows
        return bool(((w[:, 0] <= y0) & (w[:, 1] <= x0) & (w[:, 2] >= y1) & (w[:, 3] >= x1)).any())

    positions = attack.all_positions((32, 32), (5, 5))
    assert all(contained(sound, p) for p in positions)  # the real family covers every footprint
    gap = np.array([p for p in positions if not contained(small, p)])
    assert len(gap) > 0
    clean = sound.certify_batch(images)
    chosen = sorted((i for i, r in enumerate(clean) if r.status == "certified"), key=lambda i: clean[i].base_margin)[:6]
    out = attack.attack_images(small, images[chosen], labels=labels[chosen], names=[names[i] for i in chosen],
                               contents=("pgd",), reference=reference, pgd_positions=gap, pgd_steps=20,
                               pgd_views=3, seed=5)
    _report("negative: footprint too small", out)
    assert out["total"]["violations"] > 0, "PGD found no violation through a footprint computed too small"
    for v in out["violations_detail"]:
        assert not contained(small, v["position"])


# -- (v) the int8 variant (static QDQ) of pretrained ResNet-20: its own certificate holds -------
@pytest.mark.slow
def test_resnet20_int8_variant_attacked_everywhere_never_certified_wrong(r20_bundle, tmp_path):
    bundle = str(tmp_path / "r20-int8")
    shutil.copytree(r20_bundle, bundle)
    in_process("build", bundle, "--precision", "int8", "--calib", need(CIFAR_TRAIN), "--calib-limit", "64", "--quiet")
    certifier = _load(bundle, precision="int8", early_exit=True)
    images, labels, names = _cifar_targets(2)
    out = attack.attack_images(certifier, images, labels=labels, names=names, max_images=2, mix=True,
                               contents=("noise", "extreme", "donor"), seed=3)
    _report("resnet20-int8", out)
    _assert_sound(out, min_images=1, min_attacked=POSITIONS_5x5_32)


# -- (v) the confidence-threshold decision (docs/design.md §7) -----------------------------------
@pytest.mark.parametrize("threshold", [0.3, 0.5])
def test_threshold_decision_attacked_everywhere_never_wrong_without_alert(tiny, threshold):
    """At T > 0 a window only alerts when it disagrees confidently, and certification needs every
    window confident. Certified images attacked at every position: the output is the certified
    label or an alert, never another label without alert (certified or uncertified)."""
    bundle, reference, images, labels, names = tiny
    certifier = _load(bundle, early_exit=True, threshold=threshold)
    assert certifier.threshold == threshold
    thin = _thinnest(certifier, images, labels, names, 2)
    assert len(thin[0]) >= 1, f"nothing certifies at T={threshold}"
    out = attack.attack_images(certifier, thin[0], labels=thin[1], names=thin[2], mix=True,
                               donor_pool=images, donor_labels=labels,
                               contents=("noise", "extreme", "donor", "pgd"), reference=reference,
                               pgd_positions=16, pgd_steps=8, pgd_views=2, seed=5)
    _report(f"tiny, T={threshold}", out)
    _assert_sound(out, min_images=1, min_attacked=POSITIONS_5x5_32)
    assert out["total"]["alert"] + out["total"]["uncertified_same"] > 0


def test_threshold_negative_control_is_caught(tiny):
    """The same harness at T = 0.5 on a certifier without windows (it certifies any base prediction
    at least 50% confident): every base flip is a violation, and the harness finds them."""
    bundle, reference, images, labels, names = tiny
    nothing = _load(bundle, cls=_NoWindows, early_exit=True, threshold=0.5)
    thin = _thinnest(nothing, images, labels, names, 2)  # the least confident images it certifies
    out = attack.attack_images(nothing, thin[0], labels=thin[1], names=thin[2], mix=True,
                               donor_pool=images, donor_labels=labels,
                               contents=("noise", "extreme", "donor", "pgd"), reference=reference,
                               pgd_positions=24, pgd_steps=10, pgd_views=0, seed=3)
    _report("negative at T=0.5: no windows", out)
    assert out["total"]["violations"] > 0


# -- (v) a ViT split at its patch embedding: the class token reads the batch size, not pixels -----
@pytest.fixture(scope="module")
def vit_split(tmp_path_factory):
    """(bundle, TorchReference, photos) for the ViT look-alike of tests/zoo.py saved as a torch.export
    archive, cut at its patch embedding (8x8 tokens of 8x8 pixels, 36 windows of 3x3 tokens)."""
    import zoo
    from PIL import Image

    from scalecert.export.loading import load_model
    from scalecert.runtime.images import resize_to_input
    from scalecert.training.reference import TorchReference

    root = tmp_path_factory.mktemp("vit-split")
    model = zoo.build("vit")
    path = zoo.save_formats(model, str(root), ["pt2"])["pt2"]
    bundle = export(tmp_path_factory, "vit-split", path, "--patch", "2%")
    certifier = _load(bundle)
    assert certifier.manifest["layer"]["receptive_field"]["size"] == [8, 8]
    spec = certifier.manifest["input"]
    photos = np.stack([resize_to_input(Image.fromarray(a).convert("RGB"), spec) for a in skimage_photos().values()])
    loaded = load_model(path)
    loaded.kind, loaded.model = "torch", model  # the archive's program is fixed at batch 1: trace the module
    return bundle, TorchReference(loaded, bundle), photos


def test_vit_patch_embedding_split_attacked_everywhere_never_certified_wrong(vit_split):
    """Every 10x10 patch position of a certified photo, noise, extreme and donor contents, PGD through
    the torch reference at a subset, on the ViT whose suffix expands its class token to the batch
    of its own occluded rows (export/split.py::OcclusionSuffix)."""
    bundle, reference, photos = vit_split
    certifier = _load(bundle)
    out = attack.attack_images(certifier, photos, max_images=1, donor_pool=photos,
                               contents=("noise", "extreme", "donor", "pgd"), reference=reference,
                               pgd_positions=8, pgd_steps=8, pgd_views=2, seed=2)
    _report("vit", out)
    assert out["positions_per_image"] == 55 * 55
    _assert_sound(out, min_images=1, min_attacked=3 * 55 * 55)
    assert out["total"]["alert"] > 0, "no attack raised an alert: the attacks are too weak to mean anything"
