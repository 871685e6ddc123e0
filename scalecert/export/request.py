"""Every option checked before any long work (patch, rates, calibration data, the tune record)."""
from __future__ import annotations

import os

from scalecert.bundle import manifest as manifest_io
from scalecert.bundle.staging import check_output
from scalecert.core import decision, geometry
from scalecert.errors import ScaleCertError
from scalecert.export.loading import LoadedModel
from scalecert.export.options import ExportOptions, Request


def check_request(opts: ExportOptions, loaded: LoadedModel) -> Request:
    from scalecert.runtime.datasets import image_set

    output = opts.output or os.path.splitext(os.path.basename(loaded.source))[0] + ".scalecert"
    check_output(output, opts.force)
    record = apply_tune_defaults(opts, loaded.tuned)
    _, image_h, image_w = loaded.preprocess.input_size
    source = None
    if opts.for_source:
        patch_hw, source = source_sized_patch(opts.patch, opts.for_source, loaded.preprocess.to_json())
    else:
        patch_hw = geometry.parse_patch(opts.patch, (image_h, image_w))
    for label, value, low, high in (("--prune-rate", opts.prune_rate, 0, 0.99), ("--channel-prune", opts.channel_prune, 0, 0.95)):
        if value != "auto":
            try:
                if not low <= float(value) <= high:
                    raise ValueError
            except ValueError:
                raise ScaleCertError(f"{label} {value!r}: expected a number in [{low}, {high}]" + (" or auto" if label == "--prune-rate" else "")) from None
    if opts.calib_limit is not None and opts.calib_limit < 1:
        raise ScaleCertError(f"--calib-limit {opts.calib_limit}: expected a positive number of images")
    if opts.budget <= 0:
        raise ScaleCertError(f"--budget {opts.budget:g}: expected a positive number of full forwards per image")
    decision.check_threshold(opts.threshold)
    manifest_io.check_mode(opts.mode)
    if opts.window_budget < 1:
        raise ScaleCertError(f"--window-budget {opts.window_budget}: expected a positive number of windows")
    if not opts.max_growth > 0:
        raise ScaleCertError(f"--max-growth {opts.max_growth}: expected a number above 0")
    calib_items = image_set(opts.calib, limit=opts.calib_limit) if opts.calib else None
    if calib_items is not None:
        opts.say(calib_items.describe())
    if float(opts.channel_prune) > 0 and calib_items is None and record is None:
        raise ScaleCertError("--channel-prune needs --calib: channel importances come from calibration images")
    if opts.prune_rate not in ("auto", "0", "0.0") and float(opts.prune_rate) > 0 and calib_items is None and record is None:
        raise ScaleCertError("--prune-rate above 0 needs --calib DIR: the gate threshold is calibrated on images")
    return Request(output, loaded.preprocess.to_json(), (image_h, image_w), patch_hw, calib_items, record, source)


def source_sized_patch(patch: str, for_source: str, input_spec: dict) -> tuple[tuple[int, int], dict]:
    """--patch in pixels of a WxH source -> the smallest input patch containing its influence
    through the runtime's resize and crop (runtime/source.py), and the record for the manifest."""
    from scalecert.core.source import parse_size_wh, parse_source_patch
    from scalecert.runtime.source import source_map

    source_hw = parse_size_wh(for_source, "--for-source")
    requested = parse_source_patch(patch, source_hw, "--patch")
    needed = source_map(source_hw, input_spec).needed_patch(requested)
    _, h, w = input_spec["input_size"]
    if needed[0] >= h and needed[1] >= w:
        raise ScaleCertError(f"--patch {patch} --for-source {for_source}: a {requested[0]}x{requested[1]} source patch "
                             f"reaches the whole {h}x{w} input; nothing can be certified")
    return needed, {"size": list(source_hw), "patch": list(requested), "patch_spec": str(patch)}


def apply_tune_defaults(opts: ExportOptions, tuned: dict | None) -> dict | None:
    """Fill unset knobs from a `scalecert tune` record; return its SIN parameters when they apply
    (no --calib given, same phi), so the exported gate is the one the weights were tuned with."""
    settings = (tuned or {}).get("settings", {})
    opts.patch = opts.patch or settings.get("patch") or "2%"
    opts.layer = opts.layer or settings.get("layer_name") or "auto"
    opts.stride = opts.stride or (str(settings["stride_chosen"]) if "stride_chosen" in settings else "auto")
    opts.prune_rate = opts.prune_rate or "auto"  # auto with a tune record: the rate it was tuned at
    opts.mode = opts.mode or settings.get("target") or manifest_io.DEFAULT_MODE
    if opts.fill in (None, "auto"):  # tune trains with zeroed windows (training/split_program.py)
        opts.fill = settings.get("fill", "zero") if tuned else "blank"
    if opts.window_budget is None:
        from scalecert.export.plan import WINDOW_BUDGET

        opts.window_budget = WINDOW_BUDGET.get(opts.mode, WINDOW_BUDGET["detect"])
    if tuned:
        opts.say(f"tuned checkpoint: patch {opts.patch}, layer {opts.layer}, stride {opts.stride}, mode {opts.mode} "
                 f"(tune settings unless given here)")
    record = (tuned or {}).get("sin")
    if record is None or opts.calib or record.get("phi", "abs") != opts.phi:
        return None
    return record
