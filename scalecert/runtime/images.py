"""Image files and uint8 arrays -> normalised network input, as the manifest says (no torch).

Decoding refuses images above a pixel limit before decoding them (decompression bombs): 100
megapixels by default, settable with the environment variable SCALECERT_MAX_PIXELS (a number of
pixels; 0 lifts the limit). Pillow's warnings never reach the terminal; EXIF orientation is
applied (phone photos arrive upright)."""
from __future__ import annotations

import io
import os
import warnings

import numpy as np

from scalecert.errors import ImageError


DEFAULT_MAX_PIXELS = 100_000_000


def max_pixels() -> int | None:
    """The decode limit in pixels (None: no limit), from SCALECERT_MAX_PIXELS."""
    text = os.environ.get("SCALECERT_MAX_PIXELS", "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(text))
    except ValueError:
        raise ImageError(f"SCALECERT_MAX_PIXELS={text!r}: expected a number of pixels (0: no limit)") from None
    return value if value > 0 else None


def read_file(path: str) -> bytes:
    """The file's bytes, read once: a results row hashes and decodes the same bytes (never a file
    that changed in between); the one-line errors are read_image's."""
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a directory, not an image")
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def read_image(path: str, data: bytes | None = None):
    """Decode with Pillow and convert grayscale, RGBA, palette, CMYK and 16-bit images to RGB.
    `data`: the file's bytes, already read (a Ray worker's); `path` then only names it."""
    from PIL import Image, UnidentifiedImageError

    if data is None:
        if os.path.isdir(path):
            raise ImageError(f"{path}: is a directory, not an image")
        if not os.path.exists(path):
            raise ImageError(f"{path}: no such file")
    if (len(data) if data is not None else os.path.getsize(path)) == 0:
        raise ImageError(f"{path}: empty file")
    limit = max_pixels()
    source = io.BytesIO(data) if data is not None else path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning, EXIF and palette notes
            return _decode(source, path, limit)
    except Image.DecompressionBombError:
        raise ImageError(f"{path}: image larger than the {limit or 0:,} pixel limit (a decompression bomb?); "
                             "raise SCALECERT_MAX_PIXELS to allow it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError,
            TypeError, ZeroDivisionError, MemoryError) as exc:
        first = str(exc).replace(repr(source), repr(path)).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise ImageError(f"{path}: cannot decode image ({first})") from None


def _decode(source, path: str, limit: int | None):
    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = limit  # Pillow's own bomb check follows ours (None: off)
    with Image.open(source) as img:
        pixels = img.size[0] * img.size[1]
        if limit is not None and pixels > limit:
            raise ImageError(f"{path}: {img.size[0]}x{img.size[1]} image ({pixels:,} pixels) is above the "
                                 f"{limit:,} pixel limit (a decompression bomb?); raise SCALECERT_MAX_PIXELS to allow it")
        img.load()
        img = ImageOps.exif_transpose(img) or img
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            wide = np.asarray(img, dtype=np.float64)
            scale = 257.0 if wide.max() > 255 else 1.0
            img = Image.fromarray(np.clip(wide / scale, 0, 255).astype(np.uint8))
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, img)
        return img.convert("RGB")


def resize_plan(source_hw: tuple[int, int], input_spec: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized_h, resized_w), (top, left)): the size resize_to_input resizes a source image of
    `source_hw` to, and the top-left of the network-size crop taken from it. The one statement of
    the runtime's geometry (scalecert.runtime.source maps source pixels with it)."""
    _, h, w = input_spec["input_size"]
    src_h, src_w = source_hw
    short = input_spec.get("resize_short")
    if short:
        scale = short / min(src_w, src_h)
        size_w, size_h = max(w, round(src_w * scale)), max(h, round(src_h * scale))
        return (size_h, size_w), ((size_h - h) // 2, (size_w - w) // 2)
    return (h, w), (0, 0)


def resize_to_input(img, input_spec: dict) -> np.ndarray:
    """Resize (short side, then centre crop, or straight to size) -> uint8 HxWx3 network image.
    Pillow's BILINEAR resize (a triangle filter widened by the downscale factor: antialiased)."""
    from PIL import Image

    _, h, w = input_spec["input_size"]
    (size_h, size_w), (top, left) = resize_plan((img.size[1], img.size[0]), input_spec)
    if img.size != (size_w, size_h):
        img = img.resize((size_w, size_h), Image.BILINEAR)
    if (size_h, size_w) != (h, w):
        img = img.crop((left, top, left + w, top + h))
    return np.asarray(img, dtype=np.uint8)


def load_image(path: str, input_spec: dict, data: bytes | None = None) -> np.ndarray:
    return resize_to_input(read_image(path, data), input_spec)


def load_source(path: str, input_spec: dict, data: bytes | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """(network image, the decoded source's (height, width) after EXIF orientation); `data` as in
    read_image."""
    img = read_image(path, data)
    return resize_to_input(img, input_spec), (img.size[1], img.size[0])


def normalize(images: np.ndarray, input_spec: dict) -> np.ndarray:
    """uint8 RGB (N,H,W,3) or (H,W,3) -> float32 (N,C,H,W) normalised; a 1-channel input gets the
    image's luma (ITU-R 601-2, as Pillow's "L"), a per-pixel function: a patch stays a patch."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    c, h, w = input_spec["input_size"]
    if images.ndim != 4 or images.shape[1:] != (h, w, 3):
        raise ImageError(f"image array of shape {images.shape[1:]} does not match the input {h}x{w}x3")
    if c == 1:
        luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        images = np.round(luma)[..., None].astype(np.uint8)
    mean = np.asarray(input_spec["mean"], np.float32).reshape(1, c, 1, 1)
    std = np.asarray(input_spec["std"], np.float32).reshape(1, c, 1, 1)
    out = np.empty((images.shape[0], c, h, w), np.float32)  # in place: 5x faster, the same bits
    np.divide(images.transpose(0, 3, 1, 2), np.float32(255.0), out=out, dtype=np.float32)
    np.subtract(out, mean, out=out)
    return np.divide(out, std, out=out)
