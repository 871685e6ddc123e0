"""`scalecert demo`: export the pretrained EfficientNet-Lite0 and certify scikit-image's photos."""
from __future__ import annotations

import os

PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "camera")


def write_photos(folder: str) -> list[str]:
    from PIL import Image
    from skimage import data

    os.makedirs(folder, exist_ok=True)
    paths = []
    for name in PHOTOS:
        path = os.path.join(folder, f"{name}.png")
        if not os.path.exists(path):
            Image.fromarray(getattr(data, name)()).save(path)
        paths.append(path)
    return paths


def bundle_is_current(path: str) -> bool:
    from . import manifest as manifest_io
    from .errors import ScaleCertError

    try:
        manifest_io.read(path)
        return True
    except ScaleCertError:
        return False
