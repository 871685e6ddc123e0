"""Model file -> ScaleCert bundle (prefix.onnx, suffix.onnx, manifest.json).

`export_bundle` runs the stages in order; each is a function with a typed result:

  load_model        the model file (or --arch weights) and how its inputs are prepared  (loading.py)
  check_request     every option checked before any long work                (request.py)
  to_onnx           one onnx-ir graph: image -> logits, batch made symbolic   (to_onnx.py, batch.py)
  check labels      calibration labels that fit the model; class names       (labels.py)
  choose_plan       superficial layer, footprint, stride, window family      (planning.py, plan.py)
  channel_importance  static SIN alpha                                     (calibrate.py)
  build_suffix      the occluding suffix, dead channels removed           (split.py, channels.py)
  choose_gate       pruning rate and static threshold tau                 (calibrate.py)
  build_prefix      the gated prefix                                      (split.py)
  measure_margin    the numeric margin on ONNX Runtime CPU, probe image 0 (measure.py, core/margin.py)
  manifest_for      every choice, statistic, hash and tool version        (record.py; schema: bundle/manifest.py)
  confirm_locality  the saved prefix proven local and checked by patching  (locality.py)
  known_answers     the probe images and their answers                     (measure.py)

docs/design.md §3 says why each stage keeps the certificate sound.
"""
from __future__ import annotations

import datetime
import os
import time

import numpy as np

from scalecert.bundle import manifest as manifest_io
from scalecert.bundle.staging import staging
from scalecert.export.calibrate import CalibrationSet, blank_features, channel_importance, choose_gate
from scalecert.export.channels import dead_channel_plan
from scalecert.export.labels import check_calibration_labels, label_fit, model_classes
from scalecert.export.loading import describe_input, load_model
from scalecert.export.locality import confirm as confirm_locality
from scalecert.export.measure import check_sample, known_answers, measure_margin, removal_savings, write_probe_images
from scalecert.export.options import ExportOptions, Request
from scalecert.export.planning import choose_plan
from scalecert.export.record import manifest_for
from scalecert.export.request import check_request, source_sized_patch
from scalecert.export.split import build_prefix, build_suffix
from scalecert.export.stats import graph_stats, with_shapes
from scalecert.export.to_onnx import to_onnx
from scalecert.graph import save_checked
from scalecert.runtime.images import load_image

__all__ = ["ExportOptions", "Request", "export_bundle", "check_request", "choose_plan", "label_fit", "source_sized_patch"]


class StageSeconds(dict):
    """Seconds per export stage, for manifest["export_seconds"]: where an export's time goes."""

    def __init__(self):
        super().__init__()
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self[stage] = round(self.get(stage, 0.0) + now - self.last, 2)
        self.last = now


def export_bundle(opts: ExportOptions) -> str:
    """Export a model to a bundle at opts.output; returns its path. Raises ScaleCertError (one
    line) on bad input before writing anything; the bundle appears complete or not at all."""
    started, seconds = datetime.datetime.now(datetime.timezone.utc), StageSeconds()
    loaded = load_model(opts.model, opts.arch, opts.input_size, opts.trust_pickle, opts.pretrained, opts.mean, opts.std,
                        opts.resize)
    given = {name for name in ("mean", "std", "resize") if getattr(opts, name) is not None}
    opts.say(describe_input(loaded.preprocess, given | ({"mean", "std", "resize"} if loaded.arch else set())))
    request = check_request(opts, loaded)
    seconds.lap("load")
    model, program = to_onnx(loaded)
    seconds.lap("to_onnx")
    if loaded.batch_note:
        opts.say(loaded.batch_note)
    num_classes, classes = model_classes(opts.classes, model, loaded)
    if request.calibration_items is not None:
        from scalecert.runtime.datasets import check_labels

        check_labels(request.calibration_items, num_classes, f"--calib {opts.calib}")
        opts.say(f"reading {len(request.calibration_items)} calibration images")
    calibration = CalibrationSet.load(request.calibration_items, request.input_spec) if request.calibration_items else None
    if calibration is not None and calibration.labelled and num_classes:
        check_calibration_labels(model, calibration, num_classes, opts.calib)
        opts.say("calibrating the SIN gate (channel importances, threshold)")
    seconds.lap("calibration_images")
    with staging(request.output) as work:
        plan, plan_record = choose_plan(opts, request, model, program, calibration)
        seconds.lap("plan")
        opts.say(plan.describe())
        importance = channel_importance(model, program, plan.layer, calibration, request.record, opts.phi,
                                        float(opts.channel_prune), work)
        live = importance.alpha > 0
        removable, why = dead_channel_plan(model, plan.layer, importance.alpha)
        if removable and not opts.remove_dead_channels:
            removable, why = False, "kept by request (--keep-dead-channels)"
        kept_channels = int(live.sum()) if removable else plan.layer.shape[0]
        dense_fill = fill = None  # dense: every channel, dead ones 0
        if opts.fill == "blank":
            dense_fill = blank_features(model, plan.layer, request.input_spec["input_size"], work)
            dense_fill = np.where(live[:, None, None], dense_fill, np.float32(0))
            fill = dense_fill[live] if removable else dense_fill
            if not fill.any():  # always at the image layer: a blank image is 0 there
                dense_fill = fill = None
                opts.fill = "zero"
                if plan.layer.index:
                    opts.say("--fill blank: a blank image's features are 0 at this layer, the same as --fill zero")
        seconds.lap("sin_importance")
        suffix = build_suffix(model, plan.layer, kept_channels, np.flatnonzero(live) if removable else None, fill)
        save_checked(suffix, os.path.join(work, "suffix.onnx"))
        seconds.lap("suffix")
        rate = str(plan_record["chosen"]["prune_rate"]) if plan_record.get("chosen") else opts.prune_rate
        gate = choose_gate(importance, calibration, request.record, live, rate, opts.phi)
        for note in gate.notes:
            opts.say(note)
        prefix = build_prefix(model, plan.layer, importance.alpha, gate.threshold, opts.phi, remove_dead=removable)
        save_checked(prefix, os.path.join(work, "prefix.onnx"))
        seconds.lap("gate_and_prefix")
        stats = {"full": graph_stats(model), "prefix": graph_stats(with_shapes(prefix)),
                 "suffix": graph_stats(with_shapes(suffix))}
        seconds.lap("stats")
        sample = check_sample(stats["suffix"]["macs"], len(plan.windows))
        if sample.describe():
            opts.say(sample.describe())
        probe_names = write_probe_images(work, request, sample.probe_images)
        probe_pixels = load_image(os.path.join(work, probe_names[0]), request.input_spec)
        margin, margin_calls = measure_margin(work, request.input_spec, probe_pixels, plan.windows,
                                              stats["suffix"]["macs"], sample.every_row)
        seconds.lap("margin")
        opts.say(f"numeric margin: largest logit spread across batch compositions {margin['spread']:g} "
                 f"-> delta {margin['delta']:g} (ONNX Runtime CPU, fp32)")
        sin_info = {"phi": opts.phi, "importance": importance.note}
        if gate.threshold_by_rate is not None:
            sin_info["threshold_by_rate"] = gate.threshold_by_rate
        sin_info.update({"prune_rate": gate.rate, "threshold": gate.threshold, "alpha": [float(a) for a in importance.alpha],
                         "channel_prune": float(opts.channel_prune),
                         "dead_channels": np.flatnonzero(~live).tolist(),
                         "dead_channels_removed": bool(removable and not live.all()), "dead_channels_note": why,
                         "calibration_images": len(calibration.images) if calibration is not None else 0})
        if sin_info["dead_channels_removed"]:
            sin_info["removal_savings"] = removal_savings(model, plan, opts.phi, stats, dense_fill)
            opts.say(f"removed {int((~live).sum())} dead channels: {sin_info['removal_savings']}")
        record = manifest_for(opts, loaded, request, plan, num_classes, classes, kept_channels, sin_info, margin, stats,
                              started, work)
        record.plan = plan_record
        record.decision = {"threshold": opts.threshold, "mode": opts.mode}
        manifest = record.to_json()
        manifest["locality"] = {"prefix.onnx": confirm_locality(work, manifest, "prefix.onnx", probe_pixels, say=opts.say)}
        seconds.lap("locality")
        manifest["probes"] = known_answers(work, manifest, probe_names, margin_calls)
        seconds.lap("probes")
        manifest["export_seconds"] = dict(seconds)
        manifest["files"] = manifest_io.describe_files(work, ["prefix.onnx", "suffix.onnx", *manifest["probes"]["images"]])
        manifest_io.write(work, manifest)
    return request.output
