"""Known answers: a few probe images stored in the bundle with what the certifier answered for them
(no torch).

Export writes the images (PNG at network size, hashed like every bundle file) and the ONNX Runtime
CPU fp32 answers; `scalecert build --backend B --precision P` records B/P's answers. `scalecert
doctor` certifies the images again on the target and compares (runtime/doctor.py). A difference
counts only where the recorded answer was clear of the noise the certificate already allows: a
label whose recorded margin exceeds `slack` (the backend's numeric margin delta) must come back
the same; a status must come back the same when every margin of that image exceeded it.
"""
from __future__ import annotations

import os

import numpy as np

PROBE_DIR = "probes"
COUNT = 4  # images: up to half from the calibration set, the rest seeded synthetic


def synthetic_images(image_hw, count: int, seed: int = 0) -> np.ndarray:
    """Smooth seeded colour fields with noise, uint8 (count, H, W, 3): image-like, no data needed."""
    from PIL import Image

    h, w = image_hw
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        blocks = Image.fromarray(rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)).resize((w, h), Image.BILINEAR)
        pixels = np.asarray(blocks, np.float64) + rng.normal(0, 20, (h, w, 3))
        out.append(np.clip(pixels, 0, 255).astype(np.uint8))
    return np.stack(out)


def write_images(bundle_dir: str, pixels: np.ndarray) -> list[str]:
    """PNG files under probes/; returns their names relative to the bundle."""
    from PIL import Image

    os.makedirs(os.path.join(bundle_dir, PROBE_DIR), exist_ok=True)
    names = []
    for i, image in enumerate(pixels):
        name = f"{PROBE_DIR}/probe-{i}.png"
        Image.fromarray(image).save(os.path.join(bundle_dir, name))
        names.append(name)
    return names


def answer(result) -> dict:
    """What a certifier Result says about one probe image, as stored in the manifest."""
    return {"status": result.status, "label": int(result.label), "base_margin": round(float(result.base_margin), 6),
            "window_labels": [int(v) for v in result.window_labels],
            "window_margins": [round(float(v), 6) for v in result.window_margins]}


def answers(certifier, bundle) -> list[dict]:
    """The certifier's answers for every probe image of the bundle, in order (every window evaluated)."""
    return [answer(certifier.certify(os.path.join(bundle.path, name))) for name in bundle.probe_images]


def differences(expected: list[dict], got: list[dict], slack: float) -> list[str]:
    """One line per difference that the margin `slack` does not excuse (empty: the answers agree)."""
    if len(expected) != len(got):
        return [f"{len(got)} answers for {len(expected)} probe images"]
    out = []
    for i, (want, have) in enumerate(zip(expected, got)):
        margins = np.asarray(want["window_margins"], np.float64)
        labels_want, labels_have = np.asarray(want["window_labels"]), np.asarray(have["window_labels"])
        if len(labels_want) != len(labels_have):
            out.append(f"probe {i}: {len(labels_have)} windows, expected {len(labels_want)}")
            continue
        if have["label"] != want["label"] and want["base_margin"] > slack:
            out.append(f"probe {i}: label {have['label']}, expected {want['label']} (recorded margin {want['base_margin']:.3g})")
        moved = np.flatnonzero((labels_have != labels_want) & (margins > slack))
        if moved.size:
            out.append(f"probe {i}: {moved.size} window labels differ where the recorded margin exceeded {slack:.3g}")
        clear = want["base_margin"] > slack and bool((margins > slack).all())
        if have["status"] != want["status"] and clear:
            out.append(f"probe {i}: {have['status']}, expected {want['status']}")
    return out
