"""FP16 and INT8 variants of prefix.onnx / suffix.onnx (scalecert.compile.precision, docs/design.md §3.7).

Real bundles exported with the CLI's export command (conftest), real ONNX Runtime CPU sessions, real images:
- the variants keep the graph inputs/outputs and agree with fp32 (random-weight ResNet-20s on generated
  images; under -m slow the pretrained ResNet-20 on real CIFAR-10);
- every scale is a static initializer (and a dynamically quantized model is caught);
- the prefix gate stays local: a patch changes gate and features only inside its footprint;
- the window masks stay exact and unconverted, and the gate comparison stays float32.
"""
from __future__ import annotations

import glob
import os
import platform
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import CIFAR_TRAIN, bits, cifar_files, need, patch_contents, patch_positions, real_cifar_files
from scalecert.bundle import manifest as manifest_io
from scalecert.compile import precision
from scalecert.core import geometry
from scalecert.export.receptive import RF, receptive_fields
from scalecert.runtime.images import load_image, normalize
from scalecert.runtime.pipelines.onnxruntime import OrtRunner

EMPTY = np.zeros((1, 4), np.int64)
PRECISIONS = ("fp16", "int8")
# Agreement with fp32: pretrained ResNet-20, 50 CIFAR-10 test images x (empty + 36 windows), prefix
# and suffix both in the variant's precision, int8 calibrated on 40 train images. Measured here:
# fp16 99.95% top-1, max |logit diff| 0.031; int8 95.7%, 2.4 (on 200 images: 99.99% / 0.029, 94.7% / 2.7).
FP16_MIN_AGREEMENT, FP16_MAX_LOGIT_DIFF = 0.99, 0.1
INT8_MIN_AGREEMENT, INT8_MAX_LOGIT_DIFF = 0.92, 5.0
# The random-weight bundles (generated images; their logits are < 1): measured fp16 100% top-1, max
# |logit diff| 0.2% of the largest |logit|; int8 98% and 2% (tiny_pruned_bundle).
FP16_MAX_RELATIVE_DIFF, INT8_MAX_RELATIVE_DIFF = 0.01, 0.1


def _windows(m: dict) -> np.ndarray:
    feature_hw = tuple(m["layer"]["shape"][1:])
    return geometry.window_family(tuple(m["windows"]["footprint"]), m["windows"]["stride"], feature_hw)


def _build(bundle: str, out: str, images: np.ndarray) -> dict[str, dict[str, str]]:
    """{precision: {"prefix": path, "suffix": path}}, INT8 calibrated on `images`."""
    m = manifest_io.read(bundle)
    files = {"fp32": {kind: os.path.join(bundle, f"{kind}.onnx") for kind in ("prefix", "suffix")}}
    with OrtRunner(files["fp32"]["prefix"]) as prefix:
        features = prefix.infer({"image": images})["features"]
    windows = np.concatenate([EMPTY, _windows(m)[::2][:40]])
    feeds = {"prefix": [{"image": images[i:i + 8]} for i in range(0, len(images), 8)],
             "suffix": [{"features": f[None], "windows": windows} for f in features]}
    for name in PRECISIONS:
        files[name] = {}
        for kind in ("prefix", "suffix"):
            dst = os.path.join(out, f"{kind}.{name}.onnx")
            if name == "fp16":
                info = precision.to_fp16(files["fp32"][kind], dst, kind)
            else:
                info = precision.to_int8(files["fp32"][kind], dst, kind, feeds[kind])
            assert info["kind"] == kind
            files[name][kind] = dst
    return files


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """Builds each bundle's variants once: variants(bundle_fixture_name, request) -> files."""
    built = {}

    def get(name: str, request) -> tuple[str, dict]:
        bundle = request.getfixturevalue(name)
        if name not in built:
            m = manifest_io.read(bundle)
            if name.startswith("r20"):
                paths = [p for cls in sorted(os.listdir(need(CIFAR_TRAIN)))  # 4 train images a class
                         for p in sorted(glob.glob(os.path.join(CIFAR_TRAIN, cls, "*.jpg")))[:4]]
            else:
                folder = request.getfixturevalue("calib_dir")
                paths = [os.path.join(folder, f) for f in sorted(os.listdir(folder))]
            images = np.concatenate([normalize(load_image(p, m["input"]), m["input"]) for p in paths])
            built[name] = _build(bundle, str(tmp_path_factory.mktemp(f"prec-{name}")), images)
        return bundle, built[name]

    return get


def _io(path: str) -> list:
    with OrtRunner(path) as runner:
        session = runner.session
        return [(v.name, v.type, v.shape) for v in [*session.get_inputs(), *session.get_outputs()]]


def _pipeline(files: dict, images: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """(N, len(windows), K) logits: prefix on all images, then the suffix per image."""
    with OrtRunner(files["prefix"]) as prefix, OrtRunner(files["suffix"]) as suffix:
        features = prefix.infer({"image": images})["features"]
        return np.stack([suffix.infer({"features": f[None], "windows": windows})["logits"] for f in features])


@pytest.mark.parametrize("name", PRECISIONS)
@pytest.mark.parametrize("bundle_fixture", ["tiny_pruned_bundle", "tiny_blank_bundle",
                                            pytest.param("r20_bundle", marks=pytest.mark.slow)])
def test_variant_keeps_io_and_agrees_with_fp32_on_cifar(bundle_fixture, name, variants, request):
    """The random-weight bundles on 50 generated images; the pretrained ResNet-20 on real CIFAR-10
    under -m slow. The logit bound scales with the model's logits (random weights give small ones)."""
    bundle, files = variants(bundle_fixture, request)
    m = manifest_io.read(bundle)
    for kind in ("prefix", "suffix"):
        assert _io(files[name][kind]) == _io(files["fp32"][kind]), f"{name} {kind} changed its inputs/outputs"
    paths = real_cifar_files(5) if bundle_fixture == "r20_bundle" else cifar_files(5)
    images = np.concatenate([normalize(load_image(p, m["input"]), m["input"]) for p in paths])
    windows = np.concatenate([EMPTY, _windows(m)[1::2][:36]])  # other windows than calibration's
    ref = _pipeline(files["fp32"], images, windows)
    out = _pipeline(files[name], images, windows)
    agreement = float((out.argmax(-1) == ref.argmax(-1)).mean())
    diff = float(np.abs(out - ref).max())
    min_agreement, max_diff = (FP16_MIN_AGREEMENT, FP16_MAX_LOGIT_DIFF) if name == "fp16" else (
        INT8_MIN_AGREEMENT, INT8_MAX_LOGIT_DIFF)
    if bundle_fixture != "r20_bundle":
        max_diff = (FP16_MAX_RELATIVE_DIFF if name == "fp16" else INT8_MAX_RELATIVE_DIFF) * float(np.abs(ref).max())
    assert agreement >= min_agreement, f"{name}: top-1 agrees with fp32 on {agreement:.3f} of windows"
    assert diff <= max_diff, f"{name}: logits differ from fp32 by up to {diff:.3g}"
    assert diff > 0, "the variant should not be the fp32 model"
    sorted_logits = np.sort(out, -1)
    assert (sorted_logits[..., -1] > sorted_logits[..., -2]).all(), "tied top logits (quantized logits?)"


def test_static_precision_check(variants, request, tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    _, files = variants("tiny_pruned_bundle", request)
    for name in ("fp32", *PRECISIONS):
        for kind, path in files[name].items():
            assert precision.check_static_precision(path) == [], (name, kind)
    # negative control 1: dynamic quantisation (DynamicQuantizeLinear computes scales at run time)
    dynamic = str(tmp_path / "suffix.dynamic.onnx")
    quantize_dynamic(files["fp32"]["suffix"], dynamic)
    assert "DynamicQuantizeLinear" in Counter(n.op_type for n in onnx.load(dynamic).graph.node)
    problems = precision.check_static_precision(dynamic)
    assert problems and any("dynamic" in p for p in problems), problems
    # negative control 2: a scale that the caller can override (an initializer that is also a graph input)
    model = onnx.load(files["int8"]["suffix"])
    scale = next(n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear")
    init = next(i for i in model.graph.initializer if i.name == scale)
    model.graph.input.append(onnx.helper.make_tensor_value_info(scale, init.data_type, list(init.dims)))
    overridable = str(tmp_path / "suffix.overridable.onnx")
    onnx.save(model, overridable)
    assert any(scale in p for p in precision.check_static_precision(overridable))


def _protected(path: str) -> tuple[ir.Graph, list[ir.Node]]:
    model = ir.from_proto(onnx.shape_inference.infer_shapes(onnx.load(path), strict_mode=True))
    return model.graph, [n for n in model.graph if n.name.startswith(precision.PROTECTED)]


def _images(bundle_fixture: str, m: dict, request) -> list[np.ndarray]:
    if bundle_fixture.startswith("r20"):
        paths = real_cifar_files(1)[:2]  # real test images
    else:
        folder = request.getfixturevalue("calib_dir")
        paths = [os.path.join(folder, f) for f in sorted(os.listdir(folder))[-2:]]
    return [normalize(load_image(p, m["input"]), m["input"]) for p in paths]


def _patch_outside_changes(prefix_path: str, m: dict, images: list[np.ndarray], every: int = 3):
    """Paste patches (every border position and a grid inside; random, saturated and
    out-of-range contents) -> (patches that moved gate or features outside their footprint,
    patches that flipped a gate, patches tried)."""
    patch_hw = tuple(m["threat_model"]["patch"])
    _, h, w = m["input"]["input_size"]
    rf = m["layer"]["receptive_field"]
    rf_yx = (tuple(rf["y"]), tuple(rf["x"]))
    feature_hw = tuple(m["layer"]["shape"][1:])
    rng = np.random.default_rng(7)
    leaks, flipped, total = [], 0, 0
    with OrtRunner(prefix_path) as prefix:
        for clean in images:
            ref = prefix.infer({"image": clean})
            ref_gate, ref_feat = ref["gate"][0], ref["features"][0]
            assert 0 < ref_gate.mean() < 1
            jobs = []
            for i, (py, px) in enumerate(patch_positions(patch_hw, (h, w), rng, every)):
                image = clean[0].copy()
                image[:, py:py + patch_hw[0], px:px + patch_hw[1]] = patch_contents(rng, patch_hw, m["input"], i % 3)
                jobs.append(((py, px), image))
            for start in range(0, len(jobs), 64):  # in batches: the other images must not matter either
                part = jobs[start:start + 64]
                out = prefix.infer({"image": np.stack([image for _, image in part])})
                for ((py, px), _), gate, feat in zip(part, out["gate"], out["features"]):
                    y0, x0, y1, x1 = geometry.footprint((py, px), patch_hw, rf_yx, feature_hw)
                    outside = np.ones(feature_hw, bool)
                    outside[y0:y1, x0:x1] = False
                    moved = (gate != ref_gate) | (bits(feat) != bits(ref_feat)).any(axis=0)
                    if (moved & outside).any():
                        leaks.append((py, px))
                    flipped += bool((gate != ref_gate).any())
                    total += 1
    return leaks, flipped, total


@pytest.mark.parametrize("name", PRECISIONS)
@pytest.mark.parametrize("bundle_fixture", ["tiny_pruned_bundle", "tiny_deep_pruned_bundle",
                                            pytest.param("r20_pruned_bundle", marks=pytest.mark.slow)])
def test_variant_gate_is_local(bundle_fixture, name, variants, request):
    """A patch changes the variant prefix's gate and features only inside its footprint, bitwise."""
    bundle, files = variants(bundle_fixture, request)
    m = manifest_io.read(bundle)
    # statically: what the gate and the features are computed from has the manifest's receptive field
    rf = m["layer"]["receptive_field"]
    graph, protected = _protected(files[name]["prefix"])
    rfs = receptive_fields(graph)
    sources = {v for n in protected for v in n.inputs if v is not None and v.producer() not in protected
               and not v.is_initializer()}
    expected = RF(tuple(rf["y"]), tuple(rf["x"]))
    assert sources and all(rfs[v] == expected for v in sources), {v.name: rfs[v] for v in sources}
    # and by running it
    leaks, flipped, total = _patch_outside_changes(files[name]["prefix"], m, _images(bundle_fixture, m, request))
    assert not leaks, f"{name}: patches at {leaks[:5]} changed gate or features outside their footprints"
    assert flipped >= total // 10, f"only {flipped}/{total} patches flipped a gate: the test would not see a leak"


def test_dynamic_quantization_breaks_locality(variants, request, tmp_path):
    """Negative control for the test above: quantize_dynamic's run-time scale lets a patch move
    features everywhere, and check_static_precision says so."""
    from onnxruntime.quantization import quantize_dynamic

    bundle, files = variants("tiny_pruned_bundle", request)
    m = manifest_io.read(bundle)
    dynamic = str(tmp_path / "prefix.dynamic.onnx")
    quantize_dynamic(files["fp32"]["prefix"], dynamic)
    assert any("dynamic" in p for p in precision.check_static_precision(dynamic))
    leaks, _, total = _patch_outside_changes(dynamic, m, _images("tiny_pruned_bundle", m, request)[:1], every=8)
    assert len(leaks) >= total // 4, f"only {len(leaks)}/{total} patches leaked through the dynamic scale"


@pytest.mark.parametrize("name", PRECISIONS)
def test_window_masks_stay_exact(name, variants, request):
    """Occluding window W in the variant suffix equals feeding features zeroed in W with the
    empty window, bit for bit; and the mask nodes are the fp32 ones, fed straight from the inputs."""
    bundle, files = variants("tiny_deep_pruned_bundle", request)
    m = manifest_io.read(bundle)
    graph, protected = _protected(files[name]["suffix"])
    _, reference = _protected(files["fp32"]["suffix"])
    assert sorted((n.name, n.op_type) for n in protected) == sorted((n.name, n.op_type) for n in reference)
    for node in protected:
        for value in node.inputs:
            assert value.is_graph_input() or value.is_initializer() or value.producer() in protected, (
                f"{node.name} reads {value.name} from {value.producer().op_type}: the mask is no longer exact")
        for value in [*node.inputs, *node.outputs]:
            assert value.dtype not in (ir.DataType.FLOAT16, ir.DataType.INT8, ir.DataType.UINT8), node.name

    folder = request.getfixturevalue("calib_dir")
    image = normalize(load_image(os.path.join(folder, sorted(os.listdir(folder))[0]), m["input"]), m["input"])
    windows = _windows(m)
    with OrtRunner(files["fp32"]["prefix"]) as prefix:
        features = prefix.infer({"image": image})["features"]
    masks = geometry.window_masks(windows, features.shape[2:])
    with OrtRunner(files[name]["suffix"]) as suffix:
        for k in np.linspace(0, len(windows) - 1, 8).astype(int):
            occluded = suffix.infer({"features": features, "windows": windows[k:k + 1]})["logits"]
            zeroed = np.where(masks[k].reshape(1, 1, *features.shape[2:]), np.float32(0), features)
            direct = suffix.infer({"features": zeroed, "windows": EMPTY})["logits"]
            assert np.array_equal(bits(occluded), bits(direct)), f"{name}: window {windows[k].tolist()}"
            other = len(windows) - 1 - k  # a pair in one row (recovery) zeroes the union, exactly as well
            pair = np.concatenate([windows[k], windows[other]])[None]
            occluded = suffix.infer({"features": features, "windows": pair})["logits"]
            zeroed = np.where((masks[k] | masks[other]).reshape(1, 1, *features.shape[2:]), np.float32(0), features)
            direct = suffix.infer({"features": zeroed, "windows": EMPTY})["logits"]
            assert np.array_equal(bits(occluded), bits(direct)), f"{name}: pair {pair.tolist()}"


def _with_occluded_output(path: str, out: str) -> str:
    model = onnx.load(path)
    model.graph.output.append(onnx.helper.make_tensor_value_info("occluded_features", onnx.TensorProto.FLOAT, None))
    onnx.save(model, out)
    return out


def _occlusion_fill(suffix_path: str, shape) -> np.ndarray:
    """The suffix's window fill (--fill blank), or zeros (--fill zero)."""
    for init in onnx.load(suffix_path).graph.initializer:
        if init.name == "occlusion_fill":
            return onnx.numpy_helper.to_array(init).reshape(shape)
    return np.zeros(shape, np.float32)


@pytest.mark.parametrize("fixture,fill", (("tiny_blank_bundle", "blank"), ("tiny_pruned_bundle", "zero")))
@pytest.mark.parametrize("name", ("fp32", *PRECISIONS))
def test_occlusion_ignores_what_it_hides(name, fixture, fill, variants, request, tmp_path):
    """Whatever the window hides (NaN, +-inf, -0, huge values) the occluded tensor holds the fill
    there (+0, or the blank image's features), bit for bit, and the logits do not move; outside it
    the features pass unchanged (-0 as +0, non-finite as 0). docs/design.md §2: the mask is
    F - F * U (+ fill * U) on F made finite, not a Where; a plain F * (1 - U) leaves -0 and NaN
    under the window and fails here."""
    bundle, files = variants(fixture, request)
    m = manifest_io.read(bundle)
    assert m["windows"]["fill"] == fill
    windows = _windows(m)
    suffix = _with_occluded_output(files[name]["suffix"], str(tmp_path / "suffix.onnx"))
    shape = (1, *m["layer"]["shape"])
    filling = _occlusion_fill(files[name]["suffix"], shape)
    assert (filling != 0).any() == (fill == "blank")
    rng = np.random.default_rng(0)
    features = rng.standard_normal(shape).astype(np.float32)
    features[..., 0, 0] = -0.0  # passes as +0 where no window covers it
    masks = geometry.window_masks(windows, shape[2:])
    junk = np.array([np.nan, np.inf, -np.inf, -0.0, 3e38, -3e38], np.float32)
    with OrtRunner(suffix) as runner:
        for k in np.linspace(0, len(windows) - 1, 5).astype(int):
            inside = masks[k].reshape(1, 1, *shape[2:])
            hidden = np.where(inside, rng.choice(junk, shape).astype(np.float32), features)
            clean = runner.infer({"features": features, "windows": windows[k:k + 1]})
            dirty = runner.infer({"features": hidden, "windows": windows[k:k + 1]})
            occluded = dirty["occluded_features"]
            assert np.array_equal(bits(occluded), bits(clean["occluded_features"])), f"window {k}"
            under = np.broadcast_to(inside, occluded.shape)
            assert np.array_equal(bits(occluded)[under], bits(filling + np.float32(0))[under])  # no -0
            assert np.array_equal(bits(dirty["logits"]), bits(clean["logits"])), f"{name}: window {k}"
            expected = np.where(inside, filling, features) + np.float32(0)  # -0 -> +0
            assert np.array_equal(bits(occluded), bits(expected))
        outside = np.where(masks[0].reshape(1, 1, *shape[2:]), features, np.float32(np.inf))
        occluded = runner.infer({"features": outside, "windows": windows[:1]})["occluded_features"]
        assert np.isfinite(occluded).all() and (occluded[np.isinf(np.broadcast_to(outside, occluded.shape))] == 0).all()


@pytest.mark.parametrize("name", PRECISIONS)
def test_gate_comparison_stays_float32(name, variants, request):
    _, files = variants("tiny_deep_pruned_bundle", request)
    graph, protected = _protected(files[name]["prefix"])
    by_name = {n.name: n for n in protected}
    _, reference = _protected(files["fp32"]["prefix"])
    threshold = next(n for n in reference if n.op_type == "Greater").inputs[1].const_value.numpy()
    keep = by_name["scalecert/sin_keep"]
    assert keep.op_type == "Greater"
    score, tau = keep.inputs
    assert score.dtype == tau.dtype == ir.DataType.FLOAT
    assert tau.is_initializer() and tau.const_value.numpy() == threshold
    assert score.producer() is by_name["scalecert/sin_score"]
    for node in ("scalecert/sin_score", "scalecert/sin_weighted", "scalecert/sin_magnitude"):
        assert all(v.dtype == ir.DataType.FLOAT for v in [*by_name[node].inputs, *by_name[node].outputs]
                   if v.dtype not in (ir.DataType.INT64,)), node


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="ONNX Runtime x86 kernels")
def test_int8_suffix_runs_fused_on_ort_cpu(variants, request, tmp_path):
    """Every Conv of the int8 suffix becomes an integer QLinearConv in ONNX Runtime CPU (the
    one-Q/DQ-pair-per-consumer rewrite is what lets it through at residual fan-outs)."""
    import onnxruntime as ort

    _, files = variants("tiny_pruned_bundle", request)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(files["int8"]["suffix"], options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    convs = Counter(n.op_type for n in onnx.load(files["fp32"]["suffix"]).graph.node)["Conv"]
    assert ops["QLinearConv"] == convs and ops["Conv"] == 0 and ops["FusedConv"] == 0, dict(ops)


def _mobile_block(path: str) -> None:
    """A real ONNX file shaped like a mobile network's start: stem conv (3->8, stride 2), depthwise
    3x3, pointwise 1x1 (8->16), then a stride-2 pointwise conv and a pooled linear head."""
    rng = np.random.default_rng(0)
    h = onnx.helper

    def weight(name, shape):
        return onnx.numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)

    nodes = [h.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="stem", strides=[2, 2], pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["c0"], ["r0"], name="r0"),
             h.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["c1"], ["r1"], name="r1"),
             h.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="pointwise"),
             h.make_node("Conv", ["c2", "w3", "b3"], ["c3"], name="low_resolution", strides=[2, 2]),
             h.make_node("GlobalAveragePool", ["c3"], ["pooled"], name="pool"),
             h.make_node("Flatten", ["pooled"], ["flat"], name="flat"),
             h.make_node("Gemm", ["flat", "w4", "b4"], ["logits"], name="head", transB=1)]
    inits = [weight("w0", (8, 3, 3, 3)), weight("b0", (8,)), weight("w1", (8, 1, 3, 3)), weight("b1", (8,)),
             weight("w2", (16, 8, 1, 1)), weight("b2", (16,)), weight("w3", (16, 16, 1, 1)), weight("b3", (16,)),
             weight("w4", (10, 16)), weight("b4", (10,))]
    graph = h.make_graph(nodes, "mobile", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 3, 16, 16])],
                         [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [None, 10])], inits)
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), path)


def _weight_codes(path: str) -> dict[str, np.ndarray]:
    """{conv name: its int8 weight codes} of a QDQ model."""
    model = onnx.load(path)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    dq_input = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name: inits[dq_input[n.input[1]]] for n in model.graph.node
            if n.op_type == "Conv" and n.input[1] in dq_input and dq_input[n.input[1]] in inits}


def test_int8_depthwise_weights_get_the_full_range_and_float_steps_pick_convolutions(tmp_path):
    """CPU family: 7-bit weights (|code| <= 64) everywhere except depthwise convolutions, which use
    [-127, 127]; KEEP_FLOAT 'first' leaves the stem float, 'high_resolution' every convolution at half
    the input's width or more (stem, depthwise, pointwise here), never the stride-2 one after them."""
    src = str(tmp_path / "mobile.onnx")
    _mobile_block(src)
    feeds = [{"x": np.random.default_rng(i).normal(0, 1, (4, 3, 16, 16)).astype(np.float32)} for i in range(3)]
    out = {}
    for keep, wide in (("none", False), ("none", True), ("first", True), ("high_resolution", True)):
        dst = str(tmp_path / f"{keep}-{wide}.onnx")
        info = precision.to_int8(src, dst, "suffix", feeds, activations="uint8", reduce_range=True,
                                 full_range_depthwise=wide, keep_float=keep)
        out[keep, wide] = (_weight_codes(dst), info)
    narrow, _ = out["none", False]
    wide, info = out["none", True]
    assert set(narrow) == set(wide) == {"stem", "depthwise", "pointwise", "low_resolution"}
    assert all(np.abs(codes).max() <= 64 for codes in narrow.values())
    assert np.abs(wide["depthwise"]).max() == 127 and "full range for 1 depthwise" in info["weight_type"]
    assert all(np.array_equal(wide[name], narrow[name]) for name in ("stem", "pointwise", "low_resolution"))
    assert set(out["first", True][0]) == {"depthwise", "pointwise", "low_resolution"}
    assert set(out["high_resolution", True][0]) == {"low_resolution"}
    with pytest.raises(ValueError, match="keep_float"):
        precision.to_int8(src, str(tmp_path / "bad.onnx"), "suffix", feeds, keep_float="everything")
