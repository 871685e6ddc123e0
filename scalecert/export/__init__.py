"""Model file -> ScaleCert bundle (prefix.onnx, suffix.onnx, manifest.json).

`export_bundle` runs the stages in order; each is a function with a typed result:

  load_model        the model file (or --arch weights) and how its inputs are prepared
  check_request     every option checked before any long work (patch, rates, calibration data)
  to_onnx           one onnx-ir graph: image -> logits
  plan_split        superficial layer, footprint, stride, window family   (plan.py)
  channel_importance  static SIN alpha                                     (calibrate.py)
  build_suffix      the occluding suffix, dead channels removed           (split.py, channels.py)
  choose_gate       pruning rate and static threshold tau                 (calibrate.py)
  build_prefix      the gated prefix                                      (split.py)
  measure_margin    the numeric margin on ONNX Runtime CPU                (core/margin.py)
  confirm_locality  the saved prefix proven local and checked by patching  (locality.py)
  write_manifest    every choice, statistic, hash and tool version

docs/design.md §3 says why each stage keeps the certificate sound.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from scalecert import __version__
from scalecert.bundle import manifest as manifest_io
from scalecert.bundle.staging import check_output, staging
from scalecert.core import decision, geometry
from scalecert.errors import ScaleCertError
from scalecert.export.calibrate import CalibrationSet, blank_features, channel_importance, choose_gate
from scalecert.export.channels import dead_channel_plan
from scalecert.export.loading import LoadedModel, load_model
from scalecert.export.locality import confirm as confirm_locality
from scalecert.export.plan import SplitPlan, plan_split
from scalecert.export.split import WINDOWS_LAYOUT, build_prefix, build_suffix
from scalecert.export.stats import graph_stats, with_shapes
from scalecert.export.to_onnx import to_onnx
from scalecert.graph import save_checked

PLAN_IMAGES = 128  # calibration images the measured plan scores candidates on (--calib-limit caps them too)


@dataclass
class ExportOptions:
    model: str | None
    output: str | None = None
    arch: str | None = None
    input_size: tuple | None = None
    patch: str | None = None  # None: the tune record's, else "2%"
    for_source: str | None = None  # "WxH": --patch is in pixels of a source (camera) of this size
    layer: str | None = None  # None: the tune record's, else "auto"
    prune_rate: str | None = None  # None: the tune record's, else "auto"
    stride: str | None = None  # None: the tune record's, else "auto"
    window_budget: int | None = None  # None: plan.WINDOW_BUDGET of the mode
    max_growth: float = 2.0
    calib: str | None = None
    calib_limit: int = 128
    budget: float = 37.0  # full-model forwards per image: the pixel baseline's clean + 36 masked
    threshold: float = 0.0
    mode: str | None = None  # the bundle's default certify mode (bundle/manifest.py MODES); None: the tune
    # record's target (a checkpoint tuned --for recover exports for recovery), else detect
    fill: str | None = None  # what windows hold: "blank" or "zero"; None/"auto": zero for a tuned checkpoint, else blank
    channel_prune: float = 0.0
    remove_dead_channels: bool = True
    phi: str = "abs"
    classes: str | None = None
    mean: tuple | None = None  # None: the arch's, else ImageNet's (assumed, and export says so)
    std: tuple | None = None
    resize: str | None = None  # short side in pixels, or "none" (straight to the input size); None: assumed
    trust_pickle: bool = False
    pretrained: bool = False
    force: bool = False
    log: list = field(default_factory=list)
    echo: object = None  # called with each line as it happens (the CLI's click.echo), besides `log`

    def say(self, message: str) -> None:
        self.log.append(message)
        if self.echo is not None:
            self.echo(message)


@dataclass
class Request:
    """What the options ask for, checked before any long work."""

    output: str
    input_spec: dict
    image_hw: tuple[int, int]
    patch_hw: tuple[int, int]
    calibration_items: list | None
    record: dict | None  # the tune record's SIN gate, when it applies
    source: dict | None = None  # --for-source: the camera size and source patch the input patch was sized for


def export_bundle(opts: ExportOptions) -> str:
    """Export a model to a bundle at opts.output; returns its path. Raises ScaleCertError (one
    line) on bad input before writing anything; the bundle appears complete or not at all."""
    started = datetime.datetime.now(datetime.timezone.utc)
    loaded = load_model(opts.model, opts.arch, opts.input_size, opts.trust_pickle, opts.pretrained, opts.mean, opts.std,
                        opts.resize)
    from scalecert.export.loading import describe_input

    given = {name for name in ("mean", "std", "resize") if getattr(opts, name) is not None}
    opts.say(describe_input(loaded.preprocess, given | ({"mean", "std", "resize"} if loaded.arch else set())))
    request = check_request(opts, loaded)
    model, program = to_onnx(loaded)
    if loaded.batch_note:
        opts.say(loaded.batch_note)
    num_classes, classes = _classes(opts.classes, model, loaded)
    if request.calibration_items is not None:
        from scalecert.runtime.datasets import check_labels

        check_labels(request.calibration_items, num_classes, f"--calib {opts.calib}")
        opts.say(f"reading {len(request.calibration_items)} calibration images")
    calibration = CalibrationSet.load(request.calibration_items, request.input_spec) if request.calibration_items else None
    if calibration is not None and calibration.labelled and num_classes:
        _check_calibration_labels(model, calibration, num_classes, opts.calib)
        opts.say("calibrating the SIN gate (channel importances, threshold)")
    with staging(request.output) as work:
        plan, plan_record = choose_plan(opts, request, model, program, calibration)
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
        suffix = build_suffix(model, plan.layer, kept_channels, np.flatnonzero(live) if removable else None, fill)
        save_checked(suffix, os.path.join(work, "suffix.onnx"))
        rate = str(plan_record["chosen"]["prune_rate"]) if plan_record.get("chosen") else opts.prune_rate
        gate = choose_gate(importance, calibration, request.record, live, rate, opts.phi)
        for note in gate.notes:
            opts.say(note)
        prefix = build_prefix(model, plan.layer, importance.alpha, gate.threshold, opts.phi, remove_dead=removable)
        save_checked(prefix, os.path.join(work, "prefix.onnx"))
        stats = {"full": graph_stats(model), "prefix": graph_stats(with_shapes(prefix)),
                 "suffix": graph_stats(with_shapes(suffix))}
        margin = _measure_margin(work, request.input_spec, calibration, plan.windows, stats["suffix"]["macs"])
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
            sin_info["removal_savings"] = _removal_savings(model, plan, opts.phi, stats, dense_fill)
            opts.say(f"removed {int((~live).sum())} dead channels: {sin_info['removal_savings']}")
        manifest = _manifest(opts, loaded, request, plan, num_classes, classes, kept_channels, sin_info, margin, stats,
                             started, work)
        manifest["plan"] = plan_record
        manifest["decision"] = {"threshold": opts.threshold, "mode": opts.mode}
        manifest["locality"] = {"prefix.onnx": confirm_locality(work, manifest, "prefix.onnx", _check_pixels(request),
                                                                say=opts.say)}
        manifest["probes"] = _known_answers(work, manifest, request)
        manifest["files"] = manifest_io.describe_files(work, ["prefix.onnx", "suffix.onnx", *manifest["probes"]["images"]])
        manifest_io.write(work, manifest)
    return request.output


def choose_plan(opts: ExportOptions, request: Request, model: ir.Model, program, calibration) -> tuple[SplitPlan, dict]:
    """The split: measured on the calibration images when any of layer, stride and rate is auto
    (export/plan.py: the best certified rate within --budget), else as given; without calibration
    images the geometric rule of layers.choose_layer and the stride window budget."""
    import tempfile

    from scalecert.export.layers import choose_layer, list_layers

    recover = opts.mode == "recover"
    searching = calibration is not None and "auto" in (opts.layer, opts.stride, *(() if recover else (opts.prune_rate,)))
    if not searching:
        geometric = calibration is None and "auto" in (opts.layer, opts.stride) and request.record is None
        if geometric:
            opts.say(f"no --calib images: the layer by the geometric rule (--max-growth), the stride the smallest within "
                     f"{opts.budget:g} full forwards per image (--budget); calibrating on ~64 of your own images "
                     "(--calib DIR) measures a better split")
        plan = plan_split(model, request.image_hw, request.patch_hw, opts.layer, opts.stride, opts.window_budget,
                          opts.max_growth, budget=opts.budget if geometric else None, filled=opts.fill == "blank")
        return plan, {"method": "given" if "auto" not in (opts.layer, opts.stride) else "geometric"}
    from scalecert.export.plan import PlanSearch, candidate_layers

    images = calibration.images[:PLAN_IMAGES]
    labels = calibration.labels[:PLAN_IMAGES] if calibration.labelled else None
    layers = list_layers(model)
    layers = (candidate_layers(layers, request.patch_hw, request.image_hw) if opts.layer == "auto" else
              [choose_layer(layers, opts.layer, request.patch_hw, request.image_hw, opts.max_growth, model=model)])
    alphas: dict = {}

    def alpha_for(layer):
        if layer.name not in alphas:
            subset = CalibrationSet(images, calibration.labels[:PLAN_IMAGES])
            alphas[layer.name] = channel_importance(model, program, layer, subset, None, opts.phi, 0.0, scratch).alpha
        return alphas[layer.name]

    opts.say(f"plan: scoring {len(layers)} layers on {len(images)} calibration images "
             f"({'certified accuracy' if labels is not None else 'certified rate of own predictions'}), "
             f"budget {opts.budget:g} full forwards per image")
    if recover:  # pairs cost the square of the windows: single windows score the split, as a proxy
        opts.say(f"--mode recover: candidates with at most {opts.window_budget} windows, scored by detection (every "
                 "window agrees) as a proxy for every pair agreeing; no gate")
    with tempfile.TemporaryDirectory(prefix="scalecert-plan-") as scratch:
        search = PlanSearch(model, program, images, labels, request.image_hw, request.patch_hw, opts.budget, opts.phi,
                            scratch, opts.say, opts.fill)
        table, best = search.search(layers, opts.stride, "0" if recover and opts.prune_rate == "auto" else opts.prune_rate,
                                    alpha_for, opts.window_budget if recover else None)
    window_hw = geometry.window_size(request.patch_hw, request.image_hw, (best.layer.rf.y, best.layer.rf.x),
                                     best.layer.shape[1:])
    plan = SplitPlan(best.layer, request.patch_hw, request.image_hw, window_hw, best.stride,
                     geometry.window_family(window_hw, best.stride, best.layer.shape[1:]))
    record = {"method": "measured", "budget_forwards": opts.budget, "images": len(images),
              "metric": "certified accuracy" if labels is not None else "certified rate (own predictions)",
              "candidates": [c.row() for c in table], "chosen": best.row(),
              **({"max_windows": opts.window_budget, "scored_for_recovery_by": "detection (every window agrees)"}
                 if recover else {})}
    opts.say(f"plan chose layer {best.layer.name}, stride {best.stride}, rate {best.rate:g}: certified {best.certified:.1%} "
             f"at {best.cost:.1f} full forwards per image")
    return plan, record


def check_request(opts: ExportOptions, loaded: LoadedModel) -> Request:
    from scalecert.runtime.datasets import image_set

    output = opts.output or os.path.splitext(os.path.basename(loaded.source))[0] + ".scalecert"
    check_output(output, opts.force)
    record = _apply_tune_defaults(opts, loaded.tuned)
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


def label_fit(predicted, labels) -> tuple[float, float]:
    """(accuracy, agreement): top-1 agreement of the model's predictions with the labels, and with
    the labels under the best one-to-one renaming of classes (greedy matching of the confusion
    counts). Labels in the wrong class order or layout show as low accuracy with high agreement:
    the model sorts the images consistently, only under other names."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    pairs = {}
    for p, y in zip(predicted.tolist(), labels.tolist()):
        pairs[(y, p)] = pairs.get((y, p), 0) + 1
    used_y, used_p, matched = set(), set(), 0
    for (y, p), count in sorted(pairs.items(), key=lambda kv: -kv[1]):
        if y not in used_y and p not in used_p:
            used_y.add(y)
            used_p.add(p)
            matched += count
    return float((predicted == labels).mean()), matched / len(labels)


def _check_calibration_labels(model: ir.Model, calibration, num_classes: int, where: str) -> None:
    """Refuse calibration labels that make the dense model look broken: top-1 accuracy below
    chance while the model's own predictions agree with a renaming of the same labels (the labels'
    class order or layout does not belong to this model). No rate or importance is chosen against
    such labels. A model that sorts the images no better than chance under any naming is left alone."""
    import tempfile

    from scalecert.export.calibrate import run_onnx

    if len(calibration.labels) < 10 or num_classes < 2:
        return
    with tempfile.TemporaryDirectory(prefix=".scalecert-check-") as scratch:
        path = os.path.join(scratch, "full.onnx")
        ir.save(model, path)
        name = model.graph.inputs[0].name
        feeds = [{name: calibration.images[i:i + 32]} for i in range(0, len(calibration.images), 32)]
        logits = run_onnx(path, feeds, model.graph.outputs[0].name)
    accuracy, agreement = label_fit(logits.argmax(1), calibration.labels)
    chance = 1.0 / num_classes
    if accuracy < chance and agreement >= 0.5:
        raise ScaleCertError(f"--calib {where}: the dense model agrees with {accuracy:.1%} of these labels (chance is "
                             f"{chance:.1%}) but with {agreement:.0%} once the classes are renamed: the labels' class "
                             "order or layout does not fit the model; refusing to calibrate against them "
                             "(pass --labels CSV)")


def _classes(path: str | None, model: ir.Model, loaded: LoadedModel):
    """(number of classes, class names or None): from --classes, else the arch's default list."""
    num_classes = model.graph.outputs[0].shape[-1] if model.graph.outputs[0].shape else None
    num_classes = num_classes if isinstance(num_classes, int) else None
    classes = _read_classes(path, num_classes)
    if classes is None and loaded.arch is not None:
        from scalecert.export.archs import REGISTRY, class_names

        default = class_names(REGISTRY[loaded.arch].classes)
        classes = default if default is not None and len(default) == num_classes else None
    return num_classes, classes


def _read_classes(path: str | None, count: int | None):
    if path is None:
        return None
    try:
        with open(path) as f:
            names = [line.strip() for line in f if line.strip()]
    except OSError as exc:
        raise ScaleCertError(f"--classes {path}: {exc.strerror}") from None
    if count is not None and len(names) != count:
        raise ScaleCertError(f"--classes {path}: {len(names)} names for {count} model outputs")
    return names


def _removal_savings(model: ir.Model, plan: SplitPlan, phi: str, stats: dict, dense_fill) -> dict:
    channels = plan.layer.shape[0]
    dense_prefix = graph_stats(with_shapes(build_prefix(model, plan.layer, np.ones(channels, np.float32), -1.0, phi, False)))
    dense_suffix = graph_stats(with_shapes(build_suffix(model, plan.layer, channels, fill=dense_fill)))
    return {"prefix_params": dense_prefix["params"] - stats["prefix"]["params"],
            "prefix_macs": dense_prefix["macs"] - stats["prefix"]["macs"],
            "suffix_params": dense_suffix["params"] - stats["suffix"]["params"],
            "suffix_macs_per_window": dense_suffix["macs"] - stats["suffix"]["macs"]}


def _manifest(opts, loaded, request, plan: SplitPlan, num_classes, classes, kept_channels, sin_info, margin, stats,
              started, work) -> dict:
    layer, rf = plan.layer, plan.layer.rf
    return {
        "schema_version": manifest_io.SCHEMA_VERSION,
        "created": started.isoformat(timespec="seconds"),
        "source": {"file": os.path.basename(loaded.source), "path": os.path.abspath(loaded.source),
                   "sha256": manifest_io.sha256(loaded.source), "pretrained": opts.pretrained,
                   "kind": loaded.kind, "arch": loaded.arch,
                   **({"batch": loaded.batch_note} if loaded.batch_note else {})},
        "input": request.input_spec,
        "num_classes": num_classes,
        "classes": classes,
        "threat_model": {"patch": list(plan.patch_hw), "patch_spec": str(opts.patch), "image": list(plan.image_hw),
                         **({"for_source": request.source} if request.source else {})},
        "layer": {"name": layer.name, "scope": layer.scope, "requested": opts.layer, "shape": list(layer.shape),
                  "channels_kept": kept_channels,
                  "receptive_field": {"y": list(rf.y), "x": list(rf.x), "size": list(rf.size())},
                  "max_growth": opts.max_growth},
        "windows": {"footprint": list(plan.window_hw), "stride": plan.stride, "size": list(plan.window_size),
                    "count": len(plan.windows), "budget": opts.window_budget if opts.stride == "auto" else None,
                    "fill": opts.fill},
        "sin": sin_info,
        "margin": {manifest_io.margin_key("ort-cpu", "fp32"): margin["delta"]},
        "margin_measurement": {manifest_io.margin_key("ort-cpu", "fp32"): margin},
        "tensors": {"prefix": {"inputs": ["image"], "outputs": ["features", "gate"]},
                    "suffix": {"inputs": ["features", "windows"], "outputs": ["logits"], "windows": WINDOWS_LAYOUT,
                               **({"max_batch": loaded.max_batch} if loaded.max_batch else {})}},
        "stats": stats,
        "tools": _tool_versions(),
        "files": manifest_io.describe_files(work, ["prefix.onnx", "suffix.onnx"]),
    }


def _apply_tune_defaults(opts: ExportOptions, tuned: dict | None) -> dict | None:
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


def _measure_margin(work: str, input_spec: dict, calibration, windows: np.ndarray, suffix_macs: float) -> dict:
    """Through the same ONNX Runtime CPU pipeline the runtime will use."""
    from scalecert.core.margin import measure_margin
    from scalecert.runtime.images import normalize
    from scalecert.runtime.pipelines.onnxruntime import OrtCpuPipeline, window_parallel

    if calibration is not None:
        image = calibration.images[:1]
    else:
        _, h, w = input_spec["input_size"]
        image = normalize(np.random.default_rng(0).integers(0, 256, (1, h, w, 3), dtype=np.uint8), input_spec)
    with OrtCpuPipeline(os.path.join(work, "prefix.onnx"), os.path.join(work, "suffix.onnx"),
                        window_parallel=window_parallel("fp32", suffix_macs)) as pipeline:
        return measure_margin(pipeline, image, windows)


def _check_pixels(request: Request) -> np.ndarray:
    """The image the locality check patches: the first calibration image, else a synthetic one."""
    from scalecert.runtime import probes
    from scalecert.runtime.images import load_image

    if request.calibration_items:
        return load_image(request.calibration_items[0][0], request.input_spec)
    return probes.synthetic_images(request.image_hw, 1)[0]


def _known_answers(work: str, manifest: dict, request: Request) -> dict:
    """Probe images (up to half from the calibration set, the rest seeded synthetic) and the ONNX
    Runtime CPU fp32 answers for them, which `scalecert doctor` compares on the target."""
    from scalecert.bundle import Bundle
    from scalecert.runtime import probes
    from scalecert.runtime.certifier import Certifier
    from scalecert.runtime.images import load_image

    real = [load_image(path, request.input_spec) for path, _ in (request.calibration_items or [])[:probes.COUNT // 2]]
    synthetic = probes.synthetic_images(request.image_hw, probes.COUNT - len(real))
    names = probes.write_images(work, np.concatenate([np.stack(real), synthetic]) if real else synthetic)
    bundle = Bundle(work, {**manifest, "probes": {"images": names}})
    with Certifier(bundle, "ort-cpu", "fp32") as certifier:
        recorded = probes.answers(certifier, bundle)
    return {"images": names, "answers": {manifest_io.margin_key("ort-cpu", "fp32"): recorded}}


def _tool_versions() -> dict:
    import importlib.metadata as md

    versions = {"scalecert": __version__}
    for name in ("torch", "onnx", "onnx-ir", "onnxruntime", "onnxscript", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions
