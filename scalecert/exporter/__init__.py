"""Model file -> ScaleCert bundle (prefix.onnx, suffix.onnx, manifest.json)."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .. import __version__, manifest as manifest_io
from ..errors import ScaleCertError
from ..runtime import geometry
from ..runtime.backends import OrtRunner
from .loading import load_model
from .receptive import RF
from .split import Layer, build_prefix, build_suffix, choose_layer, dead_channel_plan, list_layers, slice_suffix_inputs
from .stats import graph_stats, with_shapes
from .to_onnx import to_onnx

AUTO_RATES = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


@dataclass
class ExportOptions:
    model: str | None
    output: str | None = None
    arch: str | None = None
    input_size: tuple | None = None
    patch: str | None = None  # None: the tune record's, else "2%"
    layer: str | None = None  # None: the tune record's, else "auto"
    prune_rate: str | None = None  # None: the tune record's, else "auto"
    stride: str | None = None  # None: the tune record's, else "auto"
    window_budget: int = 100
    max_growth: float = 2.0
    calib: str | None = None
    calib_limit: int = 128
    prune_tolerance: float = 0.01
    channel_prune: float = 0.0
    remove_dead_channels: bool = True
    phi: str = "abs"
    classes: str | None = None
    trust_pickle: bool = False
    pretrained: bool = False
    force: bool = False
    log: list = field(default_factory=list)

    def say(self, message: str) -> None:
        self.log.append(message)


def _save(model: ir.Model, path: str) -> None:
    import onnx

    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def _feature_model(model: ir.Model, layer: Layer) -> ir.Model:
    """The ungated prefix (image -> superficial tensor), for calibration."""
    alpha = np.ones(layer.shape[0], np.float32)
    prefix = build_prefix(model, layer, alpha, -1.0, "abs", remove_dead=False)
    return prefix


def _run(path: str, feeds_list, output: str) -> np.ndarray:
    with OrtRunner(path) as runner:
        return np.concatenate([runner.infer(f)[output] for f in feeds_list])


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


def _choose_stride(spec: str, window_hw, feature_hw, budget: int) -> int:
    if spec != "auto":
        try:
            stride = int(spec)
            if stride < 1:
                raise ValueError
        except ValueError:
            raise ScaleCertError(f"--stride {spec!r}: expected a positive integer or auto") from None
        return stride
    for stride in range(1, max(feature_hw) + 1):
        if geometry.count_windows(window_hw, stride, feature_hw) <= budget:
            return stride
    return max(feature_hw)


def _accuracy(logits: np.ndarray, reference) -> float:
    return float(np.mean(logits.argmax(1) == np.asarray(reference)))


def export_bundle(opts: ExportOptions) -> str:
    from ..calibration import sin
    from ..calibration.data import image_set
    from ..runtime.preprocess import load_image, normalize

    started = datetime.datetime.now(datetime.timezone.utc)
    loaded = load_model(opts.model, opts.arch, opts.input_size, opts.trust_pickle, opts.pretrained)
    output = opts.output or os.path.splitext(os.path.basename(loaded.source))[0] + ".scalecert"
    if os.path.exists(output) and not opts.force:
        raise ScaleCertError(f"{output}: already exists (pass --force to replace it)")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ScaleCertError(f"{output}: cannot write there (no such directory or not writable)")
    record = _apply_tune_defaults(opts, loaded.tuned)
    input_spec = loaded.preprocess.to_json()
    _, image_h, image_w = loaded.preprocess.input_size
    patch_hw = geometry.parse_patch(opts.patch, (image_h, image_w))
    for label, value, low, high in (("--prune-rate", opts.prune_rate, 0, 0.99), ("--channel-prune", opts.channel_prune, 0, 0.95)):
        if value != "auto":
            try:
                if not low <= float(value) <= high:
                    raise ValueError
            except ValueError:
                raise ScaleCertError(f"{label} {value!r}: expected a number in [{low}, {high}]" + (" or auto" if label == "--prune-rate" else "")) from None
    calib_items = image_set(opts.calib, limit=opts.calib_limit) if opts.calib else None
    if float(opts.channel_prune) > 0 and calib_items is None and record is None:
        raise ScaleCertError("--channel-prune needs --calib: channel importances come from calibration images")
    if opts.prune_rate not in ("auto", "0", "0.0") and float(opts.prune_rate) > 0 and calib_items is None and record is None:
        raise ScaleCertError("--prune-rate above 0 needs --calib DIR: the gate threshold is calibrated on images")

    model, program = to_onnx(loaded)
    layers = list_layers(model)
    layer = choose_layer(layers, opts.layer, patch_hw, (image_h, image_w), opts.max_growth, model=model)
    rf: RF = layer.rf
    feature_hw = layer.shape[1:]
    window_hw = geometry.window_size(patch_hw, (image_h, image_w), (rf.y, rf.x), feature_hw)
    stride = _choose_stride(opts.stride, window_hw, feature_hw, opts.window_budget)
    windows = geometry.window_family(window_hw, stride, feature_hw)
    num_classes = model.graph.outputs[0].shape[-1] if model.graph.outputs[0].shape else None
    num_classes = num_classes if isinstance(num_classes, int) else None
    classes = _read_classes(opts.classes, num_classes)
    if classes is None and loaded.arch is not None:
        from .archs import REGISTRY, class_names

        default = class_names(REGISTRY[loaded.arch].classes)
        classes = default if default is not None and len(default) == num_classes else None
    opts.say(f"layer {layer.name} ({layer.scope or 'root'}): features {layer.shape}, receptive field "
             f"{rf.size()}, window {window_hw}, stride {stride}, {len(windows)} windows")

    with manifest_io.staging(output) as work:
        sin_info: dict = {"phi": opts.phi}
        channels = layer.shape[0]
        alpha = np.ones(channels, np.float32)
        calib_x = calib_labels = features = None
        if calib_items is not None:
            calib_x = normalize(np.stack([load_image(p, input_spec) for p, _ in calib_items]), input_spec)
            calib_labels = [label for _, label in calib_items]
            feature_path = os.path.join(work, "features.onnx")
            _save(_feature_model(model, layer), feature_path)
            features = _run(feature_path, [{"image": calib_x[i:i + 32]} for i in range(0, len(calib_x), 32)], "features")
            os.remove(feature_path)
            taylor = None
            if program is not None:
                from ..calibration.taylor import taylor_scores

                taylor = taylor_scores(program, layer.name, calib_x, calib_labels if None not in calib_labels else None)
            if taylor is not None:
                alpha, sin_info["importance"] = sin.taylor_importance(*taylor), "taylor |A*dL/dA|"
            else:
                alpha, sin_info["importance"] = sin.gradient_free_importance(features, opts.phi), "inverse mean magnitude"
            alpha = sin.kill_channels(alpha, float(opts.channel_prune))
        elif record is not None:
            alpha = sin.kill_channels(np.asarray(record["alpha"], np.float32), float(opts.channel_prune))
            sin_info["importance"] = f"{record['importance']} (from the scalecert tune record)"
        else:
            sin_info["importance"] = "uniform (no calibration data)"
        live = alpha > 0
        removable, why = dead_channel_plan(model, layer, alpha)
        if removable and not opts.remove_dead_channels:
            removable, why = False, "kept by request (--keep-dead-channels)"
        kept_channels = int(live.sum()) if removable else channels
        suffix = build_suffix(model, layer, kept_channels)
        if removable:
            slice_suffix_inputs(suffix, np.flatnonzero(live))
        suffix_path = os.path.join(work, "suffix.onnx")
        _save(suffix, suffix_path)

        rate, threshold, auto_table = 0.0, -1.0, None
        if calib_items is not None:
            score = sin.scores(features, alpha, opts.phi)
            # thresholds for every rate 0.00 .. 0.99, so `scalecert bench` can sweep rates without re-export
            sin_info["threshold_by_rate"] = [sin.threshold_for_rate(score, r / 100) for r in range(100)]
            suffix_feats = features[:, live] if removable else features * live.reshape(1, -1, 1, 1)

            def logits_at(tau):
                gated = suffix_feats * sin.gate(score, tau)[:, None]
                return _run(suffix_path, [{"features": gated[i:i + 1], "windows": np.zeros((1, 4), np.int64)}
                                          for i in range(len(gated))], "logits")

            dense_logits = logits_at(-1.0)
            labelled = None not in calib_labels
            reference = calib_labels if labelled else dense_logits.argmax(1)
            if opts.prune_rate == "auto":
                dense_acc = _accuracy(dense_logits, reference)
                auto_table = {"metric": "accuracy" if labelled else "agreement with the dense model",
                              "dense": dense_acc, "tolerance": opts.prune_tolerance, "candidates": {}}
                for candidate in AUTO_RATES:
                    tau = sin.threshold_for_rate(score, candidate)
                    acc = _accuracy(logits_at(tau), reference)
                    auto_table["candidates"][str(candidate)] = acc
                    if acc >= dense_acc - opts.prune_tolerance:
                        rate, threshold = candidate, tau
                        break
                opts.say(f"--prune-rate auto chose {rate} ({auto_table['metric']} within "
                         f"{opts.prune_tolerance:.0%} of dense {dense_acc:.1%} on {len(calib_x)} calibration images)")
            else:
                rate = float(opts.prune_rate)
                threshold = sin.threshold_for_rate(score, rate)
        elif record is not None:
            sin_info["threshold_by_rate"] = table = record["threshold_by_rate"]
            rate = record["prune_rate"] if opts.prune_rate == "auto" else float(opts.prune_rate)
            if abs(round(rate * 100) - rate * 100) > 1e-9:
                raise ScaleCertError(f"--prune-rate {rate}: a tuned checkpoint's thresholds come in steps of 0.01")
            threshold = table[round(rate * 100)] if rate > 0 else -1.0
            opts.say(f"SIN gate from the tune record: prune rate {rate}, threshold {threshold:.6g}")
        elif opts.prune_rate == "auto":
            opts.say("--prune-rate auto chose 0 (no --calib images to measure its accuracy cost)")
        sin_info.update({"prune_rate": rate, "threshold": threshold, "alpha": [float(a) for a in alpha], "prune_rate_auto": auto_table,
                         "channel_prune": float(opts.channel_prune), "dead_channels": np.flatnonzero(~live).tolist(),
                         "dead_channels_removed": bool(removable and not live.all()),
                         "dead_channels_note": why, "calibration_images": len(calib_x) if calib_x is not None else 0})
        prefix = build_prefix(model, layer, alpha, threshold, opts.phi, remove_dead=removable)
        _save(prefix, os.path.join(work, "prefix.onnx"))
        full_stats = graph_stats(model)
        prefix_stats, suffix_stats = graph_stats(with_shapes(prefix)), graph_stats(with_shapes(suffix))
        margin = _measure_margin(work, input_spec, calib_x, windows, suffix_stats["macs"])
        opts.say(f"numeric margin: largest logit spread across batch compositions {margin['spread']:g} "
                 f"-> delta {margin['delta']:g} (ONNX Runtime CPU, fp32)")
        if sin_info["dead_channels_removed"]:
            dense_prefix = graph_stats(with_shapes(build_prefix(model, layer, np.ones(channels, np.float32), -1.0, opts.phi, False)))
            dense_suffix = graph_stats(with_shapes(build_suffix(model, layer, channels)))
            sin_info["removal_savings"] = {
                "prefix_params": dense_prefix["params"] - prefix_stats["params"],
                "prefix_macs": dense_prefix["macs"] - prefix_stats["macs"],
                "suffix_params": dense_suffix["params"] - suffix_stats["params"],
                "suffix_macs_per_window": dense_suffix["macs"] - suffix_stats["macs"]}
            opts.say(f"removed {int((~live).sum())} dead channels: {sin_info['removal_savings']}")
        manifest = {
            "schema_version": manifest_io.SCHEMA_VERSION,
            "created": started.isoformat(timespec="seconds"),
            "source": {"file": os.path.basename(loaded.source), "path": os.path.abspath(loaded.source),
                       "sha256": manifest_io.sha256(loaded.source), "pretrained": opts.pretrained,
                       "kind": loaded.kind, "arch": loaded.arch},
            "input": input_spec,
            "num_classes": num_classes,
            "classes": classes,
            "threat_model": {"patch": list(patch_hw), "patch_spec": str(opts.patch), "image": [image_h, image_w]},
            "layer": {"name": layer.name, "scope": layer.scope, "requested": opts.layer, "shape": list(layer.shape),
                      "channels_kept": kept_channels,
                      "receptive_field": {"y": list(rf.y), "x": list(rf.x), "size": list(rf.size())},
                      "max_growth": opts.max_growth},
            "windows": {"footprint": list(window_hw), "stride": stride,
                        "size": [int(windows[0, 2] - windows[0, 0]), int(windows[0, 3] - windows[0, 1])],
                        "count": len(windows), "budget": opts.window_budget if opts.stride == "auto" else None},
            "sin": sin_info,
            "margin": {"ort-cpu-fp32": margin["delta"]},
            "margin_measurement": {"ort-cpu-fp32": margin},
            "tensors": {"prefix": {"inputs": ["image"], "outputs": ["features", "gate"]},
                        "suffix": {"inputs": ["features", "windows"], "outputs": ["logits"]}},
            "stats": {"full": full_stats, "prefix": prefix_stats, "suffix": suffix_stats},
            "tools": _tool_versions(),
            "files": manifest_io.describe_files(work, ["prefix.onnx", "suffix.onnx"]),
        }
        manifest_io.write(work, manifest)
    return output


def _apply_tune_defaults(opts: ExportOptions, tuned: dict | None) -> dict | None:
    """Fill unset knobs from a `scalecert tune` record; return its SIN parameters when they apply
    (no --calib given, same phi), so the exported gate is the one the weights were tuned with."""
    settings = (tuned or {}).get("settings", {})
    opts.patch = opts.patch or settings.get("patch") or "2%"
    opts.layer = opts.layer or settings.get("layer_name") or "auto"
    opts.stride = opts.stride or (str(settings["stride_chosen"]) if "stride_chosen" in settings else "auto")
    opts.prune_rate = opts.prune_rate or "auto"  # auto with a tune record: the rate it was tuned at
    if tuned:
        opts.say(f"tuned checkpoint: patch {opts.patch}, layer {opts.layer}, stride {opts.stride} "
                 f"(tune settings unless given here)")
    record = (tuned or {}).get("sin")
    if record is None or opts.calib or record.get("phi", "abs") != opts.phi:
        return None
    return record


def _measure_margin(work: str, input_spec: dict, calib_x, windows: np.ndarray, suffix_macs: float) -> dict:
    """Through the same ONNX Runtime CPU pipeline the runtime will use (see build.measure_margin)."""
    from ..build import measure_margin
    from ..runtime.backends import OrtCpuPipeline, window_parallel

    if calib_x is not None:
        image = calib_x[:1]
    else:
        _, h, w = input_spec["input_size"]
        pixels = np.random.default_rng(0).integers(0, 256, (1, h, w, 3), dtype=np.uint8)
        from ..runtime.preprocess import normalize

        image = normalize(pixels, input_spec)
    with OrtCpuPipeline(os.path.join(work, "prefix.onnx"), os.path.join(work, "suffix.onnx"),
                        window_parallel=window_parallel("fp32", suffix_macs)) as pipeline:
        return measure_margin(pipeline, image, windows)


def _tool_versions() -> dict:
    import importlib.metadata as md

    versions = {"scalecert": __version__}
    for name in ("torch", "onnx", "onnx-ir", "onnxruntime", "onnxscript", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions
