"""Where a certification's time goes: cProfile over Certifier.certify on real images.
    python benchmarks/profile_certify.py BUNDLE DATA_DIR [--images 200] [--precision fp32]"""
from __future__ import annotations

import argparse
import cProfile
import pstats

import numpy as np

from scalecert.runtime.datasets import image_set
from scalecert.runtime import Certifier


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("data")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    with Certifier.load(args.bundle, precision=args.precision) as cert:
        pixels = np.stack([cert.prepare(path) for path, _ in image_set(args.data, limit=args.images)])
        for p in pixels[:5]:
            cert.certify(p)  # warm-up
        profile = cProfile.Profile()
        profile.enable()
        for p in pixels:
            cert.certify(p)
        profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
