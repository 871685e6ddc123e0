"""Soundness by attack: patch every position of certified images and run the REAL runtime.

A test and benchmark harness, not part of the shipped package: tests/ imports it as
`attack_harness`, benchmarks/attack.py and benchmarks/source_patch.py put tests/ on sys.path.

Claim under test (docs/design.md §3): if the runtime certifies image ``x`` with label ``y``, then
for any ``x'`` equal to ``x`` outside one axis-aligned ``ph x pw`` patch (the bundle's
``threat_model.patch``, network-input pixels, uint8 values), the runtime outputs ``y`` or ALERT on
``x'``. A *violation* is an attacked image given a label other than ``y`` without an alert.

For each certified image the harness places a patch at EVERY top-left position
(``(H-ph+1) * (W-pw+1)``, 784 for a 5x5 patch on 32x32) with these contents:

``noise``    uniform random uint8 values.
``extreme``  saturated values; variants ``zeros`` (all 0), ``ones`` (all 255), ``checker`` (0/255
             checkerboard), ``channel`` (each pixel and channel independently 0 or 255).
``donor``    pixels cut from an image of another class; variants ``same`` (the same location in the
             donor) and ``shift`` (a random location in the donor).
``pgd``      a gradient-optimised patch: sign-gradient ascent in [0, 255] pixel space through the
             plain-PyTorch reference (prefix, static SIN gate, suffix) on the un-occluded features
             AND on the ``pgd_views`` windows *of the attacked certifier's family* that overlap the
             patch footprint most (the windows that, in a sound system, hide the patch), maximising
             ``min(z_t - max_{j != t} z_j, kappa)`` averaged over those views for a target ``t != y``
             (the clean runner-up by default). This is the attack that would exploit a footprint
             computed too small, a gap in the window family or a non-local prefix op.

By default a content with variants gives each position ONE variant, cycling with the position
index (so every variant covers a quarter or half of the positions and every position is hit by
every content); ``all_variants=True`` gives every position every variant.

PGD is about 10-50x dearer per position than a runtime certification, so it runs at a subset of
positions: ``pgd_positions`` is ``"all"`` or an int N (N positions drawn at random per image, seeded).
CI (tests/test_soundness.py) uses a few dozen PGD positions per image; benchmark mode
(``python benchmarks/attack.py --pgd-positions all``) attacks all of them, and the recorded
benchmark run says which it used.

Every attacked image goes through ``Certifier.certify_batch`` (prefix batched over images; each
image's windows through the suffix, exactly the deployed code path). Early exit, when the
certifier has it on, only shortens alerts: an image is certified only after every window agreed.

Recovery mode (docs/design.md §10): pass a ``runtime.recovery.Recoverer`` instead of a Certifier.
The clean images are certified for recovery (every pair of windows), the attacked ones go through
the fast path a device runs; there is no alert, so a violation is any label other than the clean
one. PGD's views are then the windows overlapping the footprint most among those that do NOT
contain it (the ones whose first-round vote the attacker can move).

Command line (benchmark mode, benchmarks/attack.py)::

    python benchmarks/attack.py --bundle B --model M --arch A --data DIR --images 40 \\
        --contents noise,extreme,donor,pgd --pgd-positions all --out results.json
"""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

CONTENTS = ("noise", "extreme", "donor", "pgd")
VARIANTS = {
    "noise": ("uniform",),
    "extreme": ("zeros", "ones", "checker", "channel"),
    "donor": ("same", "shift"),
    "pgd": ("pgd",),
}
# a violation: another label than the certified one, without an alert (certified or not: §7)
# recovery (no alert): the fast path's label counts as uncertified_same when it is the clean one;
# first_round_split counts attacked images whose first round was not unanimous (the patch bit)
COUNT_KEYS = ("attacked", "certified_same", "alert", "uncertified_same", "violations", "base_flipped",
              "first_round_split")


# -- geometry ----------------------------------------------------------------------------------
def patch_size(certifier) -> tuple[int, int]:
    ph, pw = certifier.bundle.patch_hw
    return int(ph), int(pw)


def image_size(certifier) -> tuple[int, int]:
    h, w = certifier.bundle.image_hw
    return int(h), int(w)


def all_positions(image_hw, patch_hw) -> np.ndarray:
    """(n, 2) int64 top-left (y, x) of every patch placement, row-major."""
    (h, w), (ph, pw) = image_hw, patch_hw
    ys, xs = np.meshgrid(np.arange(h - ph + 1), np.arange(w - pw + 1), indexing="ij")
    return np.stack([ys.ravel(), xs.ravel()], axis=1).astype(np.int64)


def paste(pixels: np.ndarray, positions: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """One uint8 image (H,W,3) and n patches (n,ph,pw,3) -> n attacked copies (n,H,W,3)."""
    out = np.repeat(pixels[None], len(positions), axis=0)
    ph, pw = patches.shape[1:3]
    for k, (y, x) in enumerate(positions):
        out[k, y:y + ph, x:x + pw] = patches[k]
    return out


def footprint_of(certifier, position) -> tuple[int, int, int, int]:
    """Feature-space footprint of the patch at `position`, as the bundle's receptive field says."""
    from scalecert.core import geometry

    return geometry.footprint(tuple(int(v) for v in position), patch_size(certifier),
                              certifier.bundle.receptive_field, certifier.feature_hw)


def overlap_windows(windows: np.ndarray, rect, k: int, exclude_containing: bool = False) -> np.ndarray:
    """Indices of the k windows with the largest overlap with rect (ties: family order). With
    `exclude_containing`, windows that contain rect come last (recovery: those are the windows the
    attacker cannot move, so PGD aims at the others)."""
    y0, x0, y1, x1 = rect
    dy = np.clip(np.minimum(windows[:, 2], y1) - np.maximum(windows[:, 0], y0), 0, None)
    dx = np.clip(np.minimum(windows[:, 3], x1) - np.maximum(windows[:, 1], x0), 0, None)
    score = dy * dx
    if exclude_containing:
        contains = (windows[:, 0] <= y0) & (windows[:, 1] <= x0) & (windows[:, 2] >= y1) & (windows[:, 3] >= x1)
        score = np.where(contains, -1, score)
    return np.argsort(-score, kind="stable")[:k]


def is_recovery(certifier) -> bool:
    """Recovery mode (runtime/recovery.py::Recoverer): no alert path; a violation is any other label."""
    return getattr(certifier, "mode", "detect") == "recover"


def status(result) -> str:
    """A detection Result's status; for recovery, "certified" or "recovered" (no alert path)."""
    if hasattr(result, "status"):
        return str(result.status)
    return "certified" if result.certified else "recovered"


def run_images(certifier, pixels: np.ndarray, names=None, clean: bool = False) -> list:
    """The deployed code path on a batch of images. Recovery: the fast path, plus certification
    over all pairs for the clean images (which decides which images are attacked)."""
    if is_recovery(certifier):
        return certifier.certify_batch(pixels, names, certify=clean)
    return certifier.certify_batch(pixels, names)


# -- contents ----------------------------------------------------------------------------------
def noise_patches(rng, n: int, patch_hw) -> np.ndarray:
    return rng.integers(0, 256, size=(n, *patch_hw, 3), dtype=np.uint8)


def extreme_patches(rng, variants, patch_hw) -> np.ndarray:
    ph, pw = patch_hw
    out = np.empty((len(variants), ph, pw, 3), np.uint8)
    checker = ((np.add.outer(np.arange(ph), np.arange(pw)) % 2) * 255).astype(np.uint8)[..., None]
    for k, v in enumerate(variants):
        if v == "zeros":
            out[k] = 0
        elif v == "ones":
            out[k] = 255
        elif v == "checker":
            out[k] = checker if k % 2 == 0 else 255 - checker
        elif v == "channel":
            out[k] = rng.integers(0, 2, size=(ph, pw, 3), dtype=np.uint8) * 255
        else:
            raise ValueError(f"unknown extreme variant {v!r}")
    return out


def plain_patches(content: str, rng, positions, variants, patch_hw, donors):
    """Patches of a content that needs no gradient (noise, extreme, donor); None for pgd."""
    if content == "noise":
        return noise_patches(rng, len(positions), patch_hw)
    if content == "extreme":
        return extreme_patches(rng, variants, patch_hw)
    if content == "donor":
        return donor_patches(rng, donors, positions, variants, patch_hw)
    return None


def donor_patches(rng, donors: np.ndarray, positions, variants, patch_hw) -> np.ndarray:
    """Patches cut from donor images (n_donors,H,W,3): at the same location or a random one."""
    ph, pw = patch_hw
    h, w = donors.shape[1:3]
    out = np.empty((len(positions), ph, pw, 3), np.uint8)
    picks = rng.integers(0, len(donors), size=len(positions))
    for k, ((y, x), v) in enumerate(zip(positions, variants)):
        if v == "shift":
            y, x = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
        out[k] = donors[picks[k], y:y + ph, x:x + pw]
    return out


def pgd_patches(reference, pixels: np.ndarray, target: int, positions: np.ndarray, windows: np.ndarray,
                footprints, patch_hw, steps: int = 10, views: int = 2, batch: int = 64, kappa: float = 10.0,
                rng=None, recovery: bool = False) -> np.ndarray:
    """Sign-gradient ascent on the patch at each position (see the module docstring).

    Objective per position: mean over views of min(z_t - max_{j!=t} z_j, kappa); the views are the
    un-occluded gated features and the `views` windows (rows of `windows`, the attacked certifier's
    family) overlapping that position's footprint most. Steps decay linearly from 64 to 4 pixel
    levels; the best iterate (by objective, after rounding to uint8) is returned. With `recovery`
    the views are the windows overlapping the footprint most among those that do not contain it:
    to change the recovered label the attacker must turn the first round (the majority, or every
    window) to the target, and windows containing the footprint cannot be moved.
    """
    torch = reference.torch
    rng = rng if rng is not None else np.random.default_rng(0)
    ph, pw = patch_hw
    fh, fw = reference.feature_hw
    base = torch.from_numpy(np.ascontiguousarray(pixels)).float().permute(2, 0, 1)  # 3,H,W in 0..255
    out = np.empty((len(positions), ph, pw, 3), np.uint8)
    views = min(int(views), len(windows))
    sel = np.stack([overlap_windows(windows, fp, views, recovery) for fp in footprints]) if views else None
    for lo in range(0, len(positions), batch):
        pos = positions[lo:lo + batch]
        n = len(pos)
        keep = None
        if views:
            w = windows[sel[lo:lo + n]]  # n, views, 4
            rows, cols = np.arange(fh), np.arange(fw)
            inside = ((rows[None, None, :, None] >= w[:, :, 0, None, None]) & (rows[None, None, :, None] < w[:, :, 2, None, None])
                      & (cols[None, None, None, :] >= w[:, :, 1, None, None]) & (cols[None, None, None, :] < w[:, :, 3, None, None]))
            keep = torch.from_numpy(~inside).float().unsqueeze(2)  # n, views, 1, fh, fw
        delta = torch.from_numpy(rng.uniform(0, 255, size=(n, 3, ph, pw)).astype(np.float32))
        best = delta.round().clone()
        best_obj = torch.full((n,), -float("inf"))
        for step in range(steps + 1):
            delta = delta.detach().round() if step == steps else delta.detach()  # last: score the rounded patch
            delta.requires_grad_(step < steps)
            x = base.expand(n, -1, -1, -1).clone()
            for k, (y, xx) in enumerate(pos):
                x[k, :, y:y + ph, xx:xx + pw] = delta[k]
            xn = (x / 255.0 - reference.mean) / reference.std
            with torch.set_grad_enabled(step < steps):
                s = reference.gated(reference.superficial(xn))
                stack = [s]
                if keep is not None:
                    stack.append((s.unsqueeze(1) * keep).reshape(n * views, *s.shape[1:]))
                z = reference.suffix(torch.cat(stack))
                zt = z[:, target]
                others = z.clone()
                others[:, target] = -float("inf")
                margin = torch.clamp(zt - others.max(1).values, max=kappa)
                per_view = torch.cat([margin[:n, None], margin[n:].reshape(n, views)], 1) if views else margin[:, None]
                obj = per_view.mean(1)
            with torch.no_grad():
                improved = obj.detach() > best_obj
                best_obj = torch.where(improved, obj.detach(), best_obj)
                best[improved] = delta.detach().round()[improved]
            if step == steps:
                break
            (grad,) = torch.autograd.grad(obj.sum(), delta)
            size = 4.0 + 60.0 * (1 - step / max(1, steps - 1))
            delta = (delta.detach() + size * grad.sign()).clamp(0, 255)
        out[lo:lo + n] = best.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


# -- bookkeeping -------------------------------------------------------------------------------
class Tally:
    """Counts per content and variant, per image, and the first violations in full."""

    def __init__(self, keep_violations: int = 50):
        self.content = defaultdict(lambda: dict.fromkeys(COUNT_KEYS, 0))
        self.variant = defaultdict(lambda: dict.fromkeys(COUNT_KEYS, 0))
        self.images = []
        self.violations = []
        self.keep = keep_violations

    def add(self, image: str, label: int, content: str, variants, positions, patches, results) -> dict:
        row = dict.fromkeys(COUNT_KEYS, 0)
        for v, pos, patch, res in zip(variants, positions, patches, results):
            alert, same = status(res) == "alert", res.label == label
            c = {"attacked": 1, "certified_same": int(status(res) == "certified" and same), "alert": int(alert),
                 "uncertified_same": int(status(res) in ("uncertified", "recovered") and same),
                 "violations": int(not alert and not same), "base_flipped": int(not same),
                 "first_round_split": int(getattr(res, "case", "agreed") != "agreed")}
            for target in (row, self.content[content], self.variant[f"{content}:{v}"]):
                for key in COUNT_KEYS:
                    target[key] += c[key]
            if c["violations"] and len(self.violations) < self.keep:
                self.violations.append({"image": image, "label": int(label), "content": content, "variant": v,
                                        "position": [int(pos[0]), int(pos[1])], "status": status(res), "output_label": int(res.label),
                                        "patch": np.asarray(patch).tolist()})
        return row

    def merge(self, other: dict) -> None:
        """Add the counts of another Tally's as_dict() (a worker's)."""
        for src, dst in ((other["per_content"], self.content), (other["per_variant"], self.variant)):
            for key, counts in src.items():
                for k in COUNT_KEYS:
                    dst[key][k] += counts[k]
        self.images.extend(other["images"])
        self.violations.extend(other["violations_detail"][:max(0, self.keep - len(self.violations))])

    def totals(self) -> dict:
        return {key: sum(c[key] for c in self.content.values()) for key in COUNT_KEYS}

    def as_dict(self) -> dict:
        return {"total": self.totals(), "per_content": dict(self.content), "per_variant": dict(self.variant),
                "images": self.images, "violations_detail": self.violations}


def _variants_for(content: str, n: int, offset: int, all_variants: bool) -> list[list[str]]:
    """Rounds of per-position variants: one round cycling through them, or one round per variant."""
    names = VARIANTS[content]
    if all_variants:
        return [[v] * n for v in names]
    return [[names[(k + offset) % len(names)] for k in range(n)]]


# -- attacks -----------------------------------------------------------------------------------
def _pgd_subset(rng, positions: np.ndarray, pgd_positions) -> np.ndarray:
    if isinstance(pgd_positions, str):
        if pgd_positions != "all":
            raise ValueError(f"pgd_positions {pgd_positions!r}: 'all', an int or an (n, 2) array")
        return positions
    chosen = np.asarray(pgd_positions)
    if chosen.ndim == 2:  # explicit top-left positions
        return chosen.astype(np.int64)
    n = int(chosen)
    if n >= len(positions):
        return positions
    return positions[np.sort(rng.choice(len(positions), n, replace=False))]


def attack_image(certifier, pixels: np.ndarray, label: int, *, contents=("noise", "extreme", "donor"),
                 reference=None, donors: np.ndarray | None = None, pgd_positions="all", pgd_steps: int = 10,
                 pgd_views: int = 2, pgd_target: int | None = None, all_variants: bool = False,
                 mix: bool = False, rng=None, tally: Tally | None = None, name: str = "<array>", index: int = 0,
                 chunk: int = 1024) -> dict:
    """Attack one certified uint8 image at every patch position; returns this image's counts.

    `label` is the label the runtime certified. `donors` (n,H,W,3) uint8 holds images of other
    classes (needed for "donor"); `reference` (a TorchReference) is needed for "pgd".
    `pgd_positions`: "all", an int N (N random positions) or an explicit (n, 2) array of top-left
    positions. `mix=True` (the cheap CI mode) gives each position ONE of the non-pgd contents,
    cycling with the position index, instead of every content at every position: all positions
    are still attacked, and every content covers 1/len(contents) of them.
    """
    rng = rng if rng is not None else np.random.default_rng(index)
    tally = tally if tally is not None else Tally()
    patch_hw = patch_size(certifier)
    positions = all_positions(image_size(certifier), patch_hw)
    plain = [c for c in contents if c != "pgd"]
    row = {"image": name, "label": int(label), **dict.fromkeys(COUNT_KEYS, 0), "seconds": {}}
    for content in contents:
        start = time.perf_counter()
        if content not in CONTENTS:
            raise ValueError(f"unknown content {content!r} (known: {', '.join(CONTENTS)})")
        if content == "pgd":
            if reference is None:
                raise ValueError("pgd needs a TorchReference")
            pos = _pgd_subset(rng, positions, pgd_positions)
            target = pgd_target
            if target is None:  # the clean runner-up under the reference
                with reference.torch.no_grad():
                    z = reference.suffix(reference.gated(reference.superficial(reference.normalize(pixels[None]))))[0]
                target = next(int(c) for c in z.argsort(descending=True) if int(c) != label)
            rounds = [(pos, ["pgd"] * len(pos))]
        else:
            if content == "donor" and (donors is None or len(donors) == 0):
                raise ValueError("donor needs donor images of another class")
            pos = positions
            if mix and len(plain) > 1:
                pos = positions[(np.arange(len(positions)) + index) % len(plain) == plain.index(content)]
            rounds = [(pos, vs) for vs in _variants_for(content, len(pos), index, all_variants)]
        for pos, variants in rounds:
            for lo in range(0, len(pos), chunk):
                p, v = pos[lo:lo + chunk], variants[lo:lo + chunk]
                patches = plain_patches(content, rng, p, v, patch_hw, donors)
                if patches is None:
                    fps = [footprint_of(certifier, q) for q in p]
                    patches = pgd_patches(reference, pixels, target, p, certifier.windows, fps, patch_hw,
                                          steps=pgd_steps, views=pgd_views, rng=rng, recovery=is_recovery(certifier))
                results = run_images(certifier, paste(pixels, p, patches))
                counts = tally.add(name, label, content, v, p, patches, results)
                for key in COUNT_KEYS:
                    row[key] += counts[key]
        row["seconds"][content] = round(time.perf_counter() - start, 2)
    tally.images.append(row)
    return row


def attack_images(certifier, pixels: np.ndarray, *, labels=None, names=None, max_images: int | None = None,
                  contents=("noise", "extreme", "donor"), reference=None, donor_pool=None, donor_labels=None,
                  pgd_positions="all", pgd_steps: int = 10, pgd_views: int = 2, all_variants: bool = False,
                  mix: bool = False, seed: int = 0, progress: bool = False, log=None, workers: int = 1,
                  worker_spec: dict | None = None, checkpoint=None) -> dict:
    """Certify `pixels` (n,H,W,3 uint8), attack up to `max_images` of the certified ones.

    Donor patches come from `donor_pool` (default: `pixels` itself) restricted to images whose
    class (`donor_labels`, default `labels`, default the runtime's base labels) differs from the
    certified label. Returns a JSON-able dict: totals, per content, per variant, per image,
    violations (first 50 with their patches), and how many images were scanned / certified.

    `workers > 1` with `worker_spec` (dict: bundle, backend, early_exit, model, arch, input_size)
    attacks images in that many spawned processes, each with its own single-threaded Certifier
    (and TorchReference when `model` is set); the counts are the same, only faster on several cores.
    `checkpoint(partial_dict)` is called after every image (the CLI writes it to --out, so a run
    stopped early still leaves its counts).
    """
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    names = names if names is not None else [f"<array {i}>" for i in range(len(pixels))]
    clean = run_images(certifier, pixels, names, clean=True)
    base_labels = np.array([r.label for r in clean])
    certified = [i for i, r in enumerate(clean) if status(r) == "certified"]
    chosen = certified[:max_images] if max_images is not None else certified
    if donor_pool is None:
        donor_pool = pixels
        donor_labels = np.asarray(labels) if labels is not None else base_labels
    elif donor_labels is None:
        donor_labels = np.array([r.label for r in run_images(certifier, donor_pool)])
    donor_labels = np.asarray(donor_labels)
    tally = Tally()
    jobs = []
    for n, i in enumerate(chosen):
        y = int(clean[i].label)
        cls = int(labels[i]) if labels is not None else y
        donors = None
        if "donor" in contents:
            donors = donor_pool[(donor_labels != cls) & (donor_labels != y)]
            if len(donors) == 0:  # a pool of one class: any other image still makes a foreign patch
                donors = donor_pool[np.any(donor_pool != pixels[i], axis=(1, 2, 3))]
        jobs.append(dict(pixels=pixels[i], label=y, contents=contents, donors=donors, pgd_positions=pgd_positions,
                         pgd_steps=pgd_steps, pgd_views=pgd_views, all_variants=all_variants, mix=mix,
                         rng=np.random.default_rng(rng.integers(2**32)), name=names[i], index=n))
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), desc="certified images", unit="img")
        except ImportError:
            pass

    def done(part: dict) -> None:
        tally.merge(part)
        row = part["images"][0]
        if log is not None:
            log(f"{row['image']}: label {row['label']}, {row['attacked']} attacked, {row['certified_same']} certified "
                f"same, {row['alert']} alerts ({row['base_flipped']} base flips), {row['violations']} VIOLATIONS "
                f"{row['seconds']}")
        if bar is not None:
            bar.update(1)
        if checkpoint is not None:
            checkpoint({**tally.as_dict(), "partial": True, "images_done": len(tally.images)})

    if workers > 1 and worker_spec is not None and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(worker_spec,)) as pool:
            for future in as_completed([pool.submit(_worker_image, job) for job in jobs]):
                done(future.result())
        tally.images.sort(key=lambda r: names.index(r["image"]))
    else:
        for job in jobs:
            part = Tally()
            attack_image(certifier, reference=reference, tally=part, **job)
            done(part.as_dict())
    if bar is not None:
        bar.close()
    out = tally.as_dict()
    out.update({
        "images_scanned": len(pixels),
        "images_certified": len(certified),
        "images_attacked": len(chosen),
        "patch": list(patch_size(certifier)),
        "positions_per_image": int(len(all_positions(image_size(certifier), patch_size(certifier)))),
        "windows": int(len(certifier.windows)),
        "contents": list(contents),
        "all_variants": all_variants,
        "mix": mix,
        "pgd": {"positions_per_image": pgd_positions if isinstance(pgd_positions, (int, str)) else len(pgd_positions), "steps": pgd_steps, "views": pgd_views} if "pgd" in contents else None,
        "mode": "recover" if is_recovery(certifier) else "detect",
        "backend": certifier.backend,
        "early_exit": bool(getattr(certifier, "early_exit", False)),
        "workers": workers if worker_spec is not None else 1,
        "seconds": round(time.perf_counter() - start, 1),
    })
    return out


_WORKER: dict = {}


def _worker_init(spec: dict) -> None:
    from scalecert.runtime import Certifier

    _WORKER["certifier"] = Certifier.load(spec["bundle"], backend=spec.get("backend", "ort"),
                                          early_exit=spec.get("early_exit", False), threads=spec.get("threads", 1),
                                          precision=spec.get("precision", "fp32"), threshold=spec.get("threshold"))
    if spec.get("mode") == "recover":
        from scalecert.runtime.recovery import Recoverer

        _WORKER["certifier"] = Recoverer(_WORKER["certifier"])
    _WORKER["reference"] = None
    if spec.get("model"):
        import torch

        from scalecert.export.loading import load_model
        from scalecert.training.reference import TorchReference

        torch.set_num_threads(spec.get("threads", 1))
        loaded = load_model(spec["model"], arch=spec.get("arch"), input_size=spec.get("input_size"))
        _WORKER["reference"] = TorchReference(loaded, spec["bundle"])


def _worker_image(job: dict) -> dict:
    tally = Tally()
    attack_image(_WORKER["certifier"], reference=_WORKER["reference"], tally=tally, **job)
    return tally.as_dict()


# -- source-space placement (docs/design.md §8) -------------------------------------------------
def source_positions(smap, patch_hw, rng, random: int = 16, per_edge: int = 8) -> np.ndarray:
    """Top-left (y, x) of source patches: along every border (`per_edge` evenly spaced, corners
    included), straddling each side of the crop window, where a patch reaches the most input
    pixels on each axis, and `random` drawn at random. Unique, row-major."""
    from source_scan import widest_position

    (sh, sw), (ph, pw) = smap.source_hw, patch_hw
    ymax, xmax = sh - ph, sw - pw
    ys, xs = np.linspace(0, ymax, per_edge).round().astype(int), np.linspace(0, xmax, per_edge).round().astype(int)
    points = [(0, x) for x in xs] + [(ymax, x) for x in xs] + [(y, 0) for y in ys] + [(y, xmax) for y in ys]
    y0, x0, y1, x1 = smap.window()
    wy, wx = widest_position(smap.y, ph), widest_position(smap.x, pw)
    for y in (y0 - ph // 2, y1 - ph // 2):
        points += [(y, wx), (y, x0 - pw // 2), (y, x1 - pw // 2)]
    for x in (x0 - pw // 2, x1 - pw // 2):
        points.append((wy, x))
    points.append((wy, wx))
    points += list(zip(rng.integers(0, ymax + 1, random), rng.integers(0, xmax + 1, random)))
    out = np.array([(min(max(int(y), 0), ymax), min(max(int(x), 0), xmax)) for y, x in points], np.int64)
    return np.unique(out, axis=0)


def attack_source_image(certifier, source: np.ndarray, label: int, patch_hw, positions: np.ndarray, *,
                        contents=("noise", "extreme", "donor"), donors: np.ndarray | None = None, rng=None,
                        tally: Tally | None = None, name: str = "<source>", index: int = 0, chunk: int = 32) -> dict:
    """Patches of `patch_hw` SOURCE pixels pasted into the uint8 source image at `positions`; each
    attacked source goes through the runtime's preprocessing (resize_to_input) and then
    certify_batch. `label`: the label the runtime certified on the clean source. `donors`: source-
    size images of other classes. Every content at every position (variants cycle). Returns counts."""
    from PIL import Image

    from scalecert.runtime.images import resize_to_input

    rng = rng if rng is not None else np.random.default_rng(index)
    tally = tally if tally is not None else Tally()
    row = {"image": name, "label": int(label), **dict.fromkeys(COUNT_KEYS, 0), "seconds": {}}
    for content in contents:
        start = time.perf_counter()
        if content == "donor" and (donors is None or len(donors) == 0):
            raise ValueError("donor needs donor images of another class")
        (variants,) = _variants_for(content, len(positions), index, False)
        for lo in range(0, len(positions), chunk):
            p, v = positions[lo:lo + chunk], variants[lo:lo + chunk]
            patches = plain_patches(content, rng, p, v, patch_hw, donors)
            if patches is None:
                raise ValueError(f"source-space attacks take noise, extreme and donor contents, not {content!r}")
            attacked = np.stack([resize_to_input(Image.fromarray(s), certifier.input_spec)
                                 for s in paste(source, p, patches)])
            counts = tally.add(name, label, content, v, p, patches, certifier.certify_batch(attacked))
            for key in COUNT_KEYS:
                row[key] += counts[key]
        row["seconds"][content] = round(time.perf_counter() - start, 2)
    tally.images.append(row)
    return row
