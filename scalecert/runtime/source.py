"""The certificate in source (camera) pixels for the runtime's own preprocessing (no torch).

`source_map(source_hw, input_spec)` is core.source's SourceMap for the resize and crop that
runtime/images.py::resize_to_input applies to a source image of that size (read from the same
resize_plan). `report(...)` is what `scalecert certify` prints per image. See docs/design.md §8.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from scalecert.core.source import SourceMap, parse_source_patch
from scalecert.errors import ScaleCertError
from scalecert.runtime.images import resize_plan

# decoded modes whose conversion to 8 bits is global (read_image scales by the image's maximum):
# one pixel can change every pixel, so no source patch is bounded
GLOBAL_SCALE_MODES = ("I;16", "I;16B", "I;16L", "I")
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def source_map(source_hw, input_spec: dict) -> SourceMap:
    _, h, w = input_spec["input_size"]
    return _cached_map(tuple(int(v) for v in source_hw), (int(h), int(w)), input_spec.get("resize_short"))


@functools.lru_cache(maxsize=64)
def _cached_map(source_hw, input_hw, resize_short) -> SourceMap:
    spec = {"input_size": (3, *input_hw), "resize_short": resize_short}
    resized_hw, offset = resize_plan(source_hw, spec)
    return SourceMap.build(source_hw, resized_hw, offset, input_hw)


@dataclass(frozen=True)
class SourceInfo:
    """What the decoder will make of a file, from its header: upright size, mode, EXIF orientation."""

    size_hw: tuple[int, int]  # after EXIF orientation, as read_image returns it
    mode: str
    orientation: int

    @property
    def global_scale(self) -> bool:
        return self.mode in GLOBAL_SCALE_MODES


def describe(path: str, data: bytes | None = None) -> SourceInfo:
    """Header only (no decode). One line (ScaleCertError) if the file cannot be opened as an image.
    `data`: the file's bytes, already read (as read_image's); `path` then only names it."""
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data) if data is not None else path) as img:
                w, h = img.size
                orientation = int(img.getexif().get(0x0112, 1) or 1)
                mode = img.mode
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError,
            IndexError, KeyError, TypeError, ZeroDivisionError, MemoryError) as exc:  # as read_image: one line
        raise ScaleCertError(f"{path}: cannot read the image header ({type(exc).__name__})") from None
    if orientation in TRANSPOSING_ORIENTATIONS:
        h, w = w, h
    return SourceInfo((h, w), mode, orientation)


def report(source_hw, input_spec: dict, patch_hw, requested_hw=None, global_scale: bool = False) -> dict:
    """The per-image source-space statement: source size, the covered source patch (HxW, source
    pixels, anywhere), the source window that reaches the input, and, for a requested source
    patch, the input patch it needs."""
    out = {"size": [int(source_hw[0]), int(source_hw[1])]}
    if global_scale:
        out.update(covered_patch=None, note="16/32-bit image: the runtime scales it by its brightest pixel, "
                                            "so one pixel changes every input pixel; no source patch is bounded")
        return out
    smap = source_map(source_hw, input_spec)
    out["covered_patch"] = list(smap.covered_patch(patch_hw))
    out["window"] = list(smap.window())
    if requested_hw is not None:
        out["requested_patch"] = [int(v) for v in requested_hw]
        out["needed_input_patch"] = list(smap.needed_patch(requested_hw))
    return out


def check_request(spec: str, source_hw, input_spec: dict, patch_hw, name: str, global_scale: bool = False):
    """The source patch `spec` at this source size -> (h, w), or one line saying it is not covered
    and which input patch to export for it."""
    requested = parse_source_patch(spec, source_hw)
    h, w = source_hw
    if global_scale:
        raise ScaleCertError(f"source patch {spec}: {name} is a 16/32-bit image, which the runtime scales by its "
                             "brightest pixel; no source patch is bounded (convert it to 8 bits)")
    needed = source_map(source_hw, input_spec).needed_patch(requested)
    _, in_h, in_w = input_spec["input_size"]
    if needed[0] > patch_hw[0] or needed[1] > patch_hw[1]:
        fix = (f"it needs a bundle exported for a {needed[0]}x{needed[1]} input patch" if needed[0] < in_h or
               needed[1] < in_w else "it reaches the whole input, which no bundle certifies")
        raise ScaleCertError(f"source patch {spec}: a {requested[0]}x{requested[1]} patch of the {w}x{h} (WxH) source "
                             f"{name} reaches {needed[0]}x{needed[1]} input pixels; this bundle certifies "
                             f"{patch_hw[0]}x{patch_hw[1]}: {fix} (or for a {requested[0]}x{requested[1]} source "
                             f"patch of {w}x{h} sources)")
    return requested


def check_requests(bundle_dir: str, images, spec: str) -> dict:
    """A source patch `spec` checked against every image's size (headers only) before any certification:
    {path: (h, w)}, or one line naming the first image it cannot cover. Unreadable images are left
    to the per-image error path."""
    from scalecert.bundle import Bundle
    from scalecert.core.source import parse_patch_spec

    parse_patch_spec(spec)  # malformed: one line, even before the bundle is read
    bundle = Bundle.open(bundle_dir, verify=False)
    out = {}
    for path in images:
        try:
            info = describe(path)
        except ScaleCertError:
            continue
        out[path] = check_request(spec, info.size_hw, bundle.input_spec, bundle.patch_hw, path, info.global_scale)
    return out


def cell(source: dict | None) -> str:
    """The table's cell: 'HxW of HxW' (covered source patch of the source size); 'none of HxW'
    when no patch is bounded; '-' without a report."""
    if not source or "size" not in source:
        return "-"
    covered = source.get("covered_patch")
    return f"{'x'.join(map(str, covered)) if covered else 'none'} of {'x'.join(map(str, source['size']))}"
