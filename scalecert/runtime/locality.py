"""The locality check: patch an image and compare the prefix's features and gate bit for bit outside
each patch's footprint (docs/design.md §3.1). No torch.

The receptive-field pass proves locality from the graph; this is the second, independent line. It
runs the prefix through the pipeline that certifies (ONNX Runtime CPU, in batches, beside the
clean image run alone) with patches at positions across the whole input, every border included,
and with random, extreme (0/255, checkerboard), out-of-range and adversarially chosen contents (a
gradient-free search for the patch that moves the features most). It samples: it can refute a
proof, never replace one. Export and build refuse a bundle it refutes (export/locality.py);
`scalecert doctor` runs it on the device.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from scalecert.core import geometry
from scalecert.runtime.images import normalize

BATCH = 16
MAX_POSITIONS = 256
KINDS = ("random", "black", "white", "checkerboard", "out-of-range", "huge")
SEARCH_ROUNDS, SEARCH_CANDIDATES = 3, 8  # the adversarial search, at the corners and the centre


@dataclass
class Leak:
    position: tuple[int, int]
    kind: str
    feature: tuple[int, int]
    footprint: tuple[int, int, int, int]

    def line(self, patch_hw) -> str:
        y0, x0, y1, x1 = self.footprint
        return (f"a {patch_hw[0]}x{patch_hw[1]} patch at ({self.position[0]}, {self.position[1]}) with {self.kind} "
                f"contents changed the features or gate at ({self.feature[0]}, {self.feature[1]}), outside its "
                f"footprint rows {y0}..{y1 - 1}, columns {x0}..{x1 - 1}")


@dataclass
class LocalityReport:
    positions: int
    patched_images: int
    kinds: list
    leaks: list = field(default_factory=list)
    moved_inside: int = 0
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.leaks

    def to_json(self, patch_hw) -> dict:
        return {"passed": self.passed, "positions": self.positions, "patched_images": self.patched_images,
                "contents": self.kinds + ["adversarial"], "leaking": len(self.leaks),
                "first_leak": self.leaks[0].line(patch_hw) if self.leaks else None,
                "moved_inside": self.moved_inside, "seconds": round(self.seconds, 2)}


def positions_across(patch_hw, image_hw, limit: int = MAX_POSITIONS) -> list[tuple[int, int]]:
    """Top-left patch positions on a grid over the whole input whose last row and column are flush
    with the far borders (every border is covered), the step the smallest that keeps <= limit."""
    (ph, pw), (h, w) = patch_hw, image_hw
    last_y, last_x = h - ph, w - pw
    step = max(1, -(-min(ph, pw) // 2))
    while True:
        ys = sorted(set(range(0, last_y + 1, step)) | {last_y})
        xs = sorted(set(range(0, last_x + 1, step)) | {last_x})
        if len(ys) * len(xs) <= limit or step > max(h, w):
            return [(y, x) for y in ys for x in xs]
        step += 1


def contents(kind: str, rng, patch_hw, spec: dict) -> np.ndarray:
    """(C, ph, pw) in network input space."""
    ph, pw = patch_hw
    channels = spec["input_size"][0]
    if kind == "out-of-range":
        return rng.uniform(-30, 30, (channels, ph, pw)).astype(np.float32)
    if kind == "huge":
        return (rng.choice([-1.0, 1.0], (channels, ph, pw)) * 1e4).astype(np.float32)
    if kind == "random":
        pixels = rng.integers(0, 256, (ph, pw, 3))
    elif kind == "checkerboard":
        pixels = np.broadcast_to(((np.add.outer(np.arange(ph), np.arange(pw)) % 2) * 255)[:, :, None], (ph, pw, 3))
    else:
        pixels = np.full((ph, pw, 3), 0 if kind == "black" else 255)
    _, h, w = spec["input_size"]
    image = np.zeros((h, w, 3), np.uint8)
    image[:ph, :pw] = pixels.astype(np.uint8)
    return normalize(image, spec)[0, :, :ph, :pw]


def bits(array: np.ndarray) -> np.ndarray:
    """Bit patterns of an array (floats compared bitwise: -0.0 != 0.0)."""
    array = np.ascontiguousarray(array)
    return array.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[array.dtype.itemsize])


class _Probe:
    def __init__(self, prefix, clean: np.ndarray, patch_hw, rf, feature_hw):
        self.prefix, self.clean, self.patch_hw, self.rf, self.feature_hw = prefix, clean, patch_hw, rf, feature_hw
        features, gate = prefix(clean)
        self.want_f, self.want_g = bits(features[0]), bits(np.reshape(gate[0], feature_hw))
        self.features0 = features[0].astype(np.float64)

    def run(self, patched: list) -> list:
        """[(position, kind, contents)] -> per patched image (changed map, L1 change of the features)."""
        out = []
        for lo in range(0, len(patched), BATCH):
            chunk = patched[lo:lo + BATCH]
            batch = np.repeat(self.clean, len(chunk), axis=0)
            for k, ((y, x), _, values) in enumerate(chunk):
                batch[k, :, y:y + self.patch_hw[0], x:x + self.patch_hw[1]] = values
            got_f, got_g = self.prefix(batch)
            for k in range(len(chunk)):
                changed = (bits(got_f[k]) != self.want_f).any(axis=0)
                changed |= bits(np.reshape(got_g[k], self.feature_hw)) != self.want_g
                moved = np.nan_to_num(np.abs(got_f[k].astype(np.float64) - self.features0), nan=1e30, posinf=1e30)
                out.append((changed, float(moved.sum())))
        return out

    def judge(self, patched: list, report: LocalityReport) -> list:
        results = self.run(patched)
        for ((y, x), kind, _), (changed, _) in zip(patched, results):
            y0, x0, y1, x1 = geometry.footprint((y, x), self.patch_hw, self.rf, self.feature_hw)
            inside = np.zeros(self.feature_hw, bool)
            inside[y0:y1, x0:x1] = True
            outside = np.argwhere(changed & ~inside)
            if len(outside):
                report.leaks.append(Leak((y, x), kind, tuple(int(v) for v in outside[0]), (y0, x0, y1, x1)))
            report.moved_inside += bool((changed & inside).any())
        report.patched_images += len(patched)
        return results


def check_locality(prefix, pixels: np.ndarray, spec: dict, patch_hw, rf, feature_hw, seed: int = 0,
                   limit: int = MAX_POSITIONS, search: bool = True) -> LocalityReport:
    """`prefix`: normalised (N, C, H, W) -> (features, gate), as the runtime runs it. `pixels`: one
    uint8 HxWx3 network-size image. `rf`: the receptive field the footprints are computed from."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    image_hw = tuple(spec["input_size"][1:])
    probe = _Probe(prefix, normalize(pixels[None], spec), patch_hw, rf, feature_hw)
    positions = positions_across(patch_hw, image_hw, limit)
    report = LocalityReport(len(positions), 0, list(KINDS))
    (ph, pw), (h, w) = patch_hw, image_hw
    corners = [(0, 0), (0, w - pw), (h - ph, 0), (h - ph, w - pw)]
    patched = [(p, KINDS[i % len(KINDS)], None) for i, p in enumerate(positions)]
    patched += [(p, kind, None) for p in corners for kind in KINDS]  # every kind at every corner
    patched = [(p, kind, contents(kind, rng, patch_hw, spec)) for p, kind, _ in patched]
    probe.judge(patched, report)
    if search:  # gradient-free: keep the contents that move the features most, mutate them, repeat
        centre = ((h - ph) // 2, (w - pw) // 2)
        for position in corners + [centre]:
            best, best_moved = contents("random", rng, patch_hw, spec), -1.0
            for _ in range(SEARCH_ROUNDS):
                scale = np.float32(30.0 * rng.uniform(0.1, 1.0))
                candidates = [(position, "adversarial", best + scale * rng.standard_normal(best.shape).astype(np.float32))
                              for _ in range(SEARCH_CANDIDATES)]
                for (_, _, values), (_, moved) in zip(candidates, probe.judge(candidates, report)):
                    if moved > best_moved:
                        best, best_moved = values, moved
    report.seconds = time.perf_counter() - start
    return report
