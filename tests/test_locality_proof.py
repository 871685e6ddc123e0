"""Issue 24: a prefix is local because it was proven on the file that ships and checked by patching,
never because an op table says so (docs/design.md §3.1).

The two classifiers of the report (3x32x32, 2 classes, a few nodes each), built from its description:
training-mode BatchNormalization is refused at export in one line; the Slice with a start below
-dim is modelled with ONNX's clamping, so its footprint is right and the red patch that forced a
label now raises an alert at all 784 positions (the negative control: the old, unclamped receptive
field certifies forced labels through the same harness, and the export-time check refuses it).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import export, run_cli

MEAN_R = (128 / 255 - 0.485) / 0.229  # a grey pixel's red channel after the default normalisation


def _classifier(path: str, nodes: list, inits: list, feature_pixels: int) -> str:
    """feat -> global average pool -> 2 logits: label 1 when feat's red mean rises a little above a
    grey image's (one 5x5 red patch does it), else 0."""
    nodes = nodes + [helper.make_node("GlobalAveragePool", ["feat"], ["pooled"]),
                     helper.make_node("Flatten", ["pooled"], ["flat"]),
                     helper.make_node("Gemm", ["flat", "W", "b"], ["logits"])]
    shift = MEAN_R + 0.5 * 25 * (2.25 - MEAN_R) / feature_pixels  # half a red patch's effect on the mean
    inits = inits + [numpy_helper.from_array(np.array([[0, 40.0], [0, 0], [0, 0]], np.float32), "W"),
                     numpy_helper.from_array(np.array([0, -40.0 * shift], np.float32), "b")]
    graph = helper.make_graph(nodes, "issue24", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def bn_training_model(tmp_path_factory) -> str:
    """feat = BatchNormalization(Sigmoid(image), training_mode=1)."""
    ones, zeros = np.ones(3, np.float32), np.zeros(3, np.float32)
    nodes = [helper.make_node("Sigmoid", ["image"], ["sig"], name="sigmoid"),
             helper.make_node("BatchNormalization", ["sig", "scale", "bias", "mean", "var"], ["feat", "rm", "rv"],
                              name="bn", training_mode=1)]
    inits = [numpy_helper.from_array(a, n) for a, n in ((ones, "scale"), (zeros, "bias"), (zeros, "mean"), (ones, "var"))]
    return _classifier(str(tmp_path_factory.mktemp("bn") / "bn_training.onnx"), nodes, inits, 32 * 32)


@pytest.fixture(scope="module")
def slice_model(tmp_path_factory) -> str:
    """feat = Relu(Slice(image, starts=[-1000], ends=[30], axes=[2])): rows 0..29."""
    nodes = [helper.make_node("Slice", ["image", "starts", "ends", "axes"], ["rows"], name="slice"),
             helper.make_node("Relu", ["rows"], ["feat"], name="relu")]
    inits = [numpy_helper.from_array(np.array([v], np.int64), n) for v, n in ((-1000, "starts"), (30, "ends"), (2, "axes"))]
    return _classifier(str(tmp_path_factory.mktemp("slice") / "slice_clamp.onnx"), nodes, inits, 30 * 32)


@pytest.fixture(scope="module")
def slice_bundle(tmp_path_factory, slice_model) -> str:
    return export(tmp_path_factory, "slice-bundle", slice_model, "--patch", "5", "--layer", "feat")


def _attack(certifier) -> tuple[int, int, int]:
    """(forced, alerts, positions): a grey image, then one 5x5 red patch at every position."""
    grey = np.full((32, 32, 3), 128, np.uint8)
    clean = certifier.certify(grey)
    assert (clean.status, clean.label) == ("certified", 0)
    forced = alerts = flipped = 0
    for y in range(28):
        for x in range(28):
            image = grey.copy()
            image[y:y + 5, x:x + 5] = (255, 0, 0)
            result = certifier.certify(image)
            forced += result.status == "certified" and result.label != clean.label
            alerts += result.status == "alert"
            flipped += result.label != clean.label
    assert flipped > 0, "the patch must be able to change the label, or the attack proves nothing"
    return forced, alerts, 28 * 28


def test_training_mode_batchnorm_is_refused_in_one_line(bn_training_model, tmp_path):
    for layer in ("feat", "auto"):
        proc = run_cli("scalecert-export", bn_training_model, "--patch", "5", "--layer", layer, "-o", tmp_path / layer)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
        assert "training mode" in lines[0] and "model.eval()" in lines[0]
        assert not os.path.exists(tmp_path / layer)


def test_a_torch_training_mode_export_is_refused(tmp_path, tmp_path_factory):
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    path = str(tmp_path / "trains.onnx")
    torch.onnx.export(model, (torch.rand(1, 3, 32, 32),), path, dynamo=False, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.TRAINING)
    from scalecert.errors import ScaleCertError

    with pytest.raises(ScaleCertError, match=r"training mode: BatchNormalization .*model\.eval\(\)"):
        export(tmp_path_factory, "trains", path, "--patch", "5")


def test_slice_below_minus_dim_is_clamped_and_the_red_patch_alerts(slice_bundle):
    from scalecert.runtime import Certifier

    with open(os.path.join(slice_bundle, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["layer"]["receptive_field"]["y"] == [1, 0, 0]  # ONNX clamps -1000 to row 0
    record = manifest["locality"]["prefix.onnx"]
    assert record["check"]["passed"] and record["check"]["patched_images"] >= 100
    assert record["proof"]["features"] == {"y": [1, 0, 0], "x": [1, 0, 0]}
    with Certifier.load(slice_bundle) as certifier:
        forced, alerts, positions = _attack(certifier)
    assert forced == 0 and alerts > 0, (forced, alerts, positions)


def test_negative_control_the_old_receptive_field_is_caught(slice_bundle):
    """The receptive field the old pass computed (start + dim, unclamped) gives an empty footprint:
    the attack harness finds forced labels through it, and the export-time check refuses it."""
    from scalecert.bundle import Bundle
    from scalecert.core import geometry
    from scalecert.errors import ScaleCertError
    from scalecert.export.locality import check
    from scalecert.export.receptive import RF
    from scalecert.runtime import Certifier

    bundle = Bundle.open(slice_bundle)
    manifest = json.loads(json.dumps(bundle.manifest))
    old_rf = ((1, -968, -968), (1, 0, 0))
    manifest["layer"]["receptive_field"]["y"] = list(old_rf[0])
    footprint = geometry.window_size((5, 5), (32, 32), old_rf, bundle.feature_hw)
    windows = geometry.window_family(footprint, bundle.stride, bundle.feature_hw)
    manifest["windows"].update({"footprint": list(footprint), "count": len(windows)})
    with Certifier(Bundle(slice_bundle, manifest)) as certifier:
        forced, _, positions = _attack(certifier)
    assert forced > positions // 2
    pixels = np.full((32, 32, 3), 128, np.uint8)
    with pytest.raises(ScaleCertError, match=r"not local: a 5x5 patch at \(\d+, \d+\) with .* contents changed"):
        check(os.path.join(slice_bundle, "prefix.onnx"), manifest["input"], (5, 5), RF((1, -968, -968), (1, 0, 0)),
              (30, 32), pixels)


def test_certify_refuses_a_prefix_without_its_proof(slice_bundle, tmp_path):
    from scalecert.bundle import manifest as manifest_io

    old = str(tmp_path / "old")
    shutil.copytree(slice_bundle, old)
    manifest = manifest_io.read(old)
    del manifest["locality"]
    manifest_io.write(old, manifest)
    image = str(tmp_path / "grey.png")
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    proc = run_cli("scalecert", "certify", old, image)
    assert proc.returncode == 2 and "no locality record" in proc.stderr and "re-export" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

    # a prefix swapped for another, with its hash updated too: not the file whose locality was proven
    swapped = str(tmp_path / "swapped")
    shutil.copytree(slice_bundle, swapped)
    prefix = onnx.load(os.path.join(swapped, "prefix.onnx"))
    prefix.doc_string = "swapped"
    onnx.save(prefix, os.path.join(swapped, "prefix.onnx"))
    manifest = manifest_io.read(swapped, verify=False)
    manifest["files"] = manifest_io.describe_files(swapped, list(manifest["files"]))
    manifest_io.write(swapped, manifest)
    proc = run_cli("scalecert", "certify", swapped, image)
    assert proc.returncode == 2 and "not the file whose locality was proven" in proc.stderr, proc.stderr


def test_a_tie_is_not_a_certificate():
    from scalecert.core import decision

    for logits in ([[1.0, 1.0]], [[1.0, 1.0 - 1e-14]], [[0.0, 0.0]], [[3e4, 3e4 - 1e-3]]):
        labels, margins = decision.top2_margin(np.array(logits, np.float32))
        verdict = decision.decide(int(labels[0]), float(margins[0]), labels, margins, delta=0.0)
        assert verdict.status == "uncertified", logits
    labels, margins = decision.top2_margin(np.array([[1.0, 0.99]], np.float32))
    assert decision.decide(0, float(margins[0]), labels, margins).status == "certified"


def test_a_model_with_tied_logits_never_certifies(tmp_path_factory):
    """Random weights with a zero head: every logit ties, so nothing certifies (it did, at margin 0)."""
    path = str(tmp_path_factory.mktemp("tie") / "tie.onnx")
    nodes = [helper.make_node("Relu", ["image"], ["feat"], name="relu")]
    _classifier(path, nodes, [], 32 * 32)
    model = onnx.load(path)
    for init in model.graph.initializer:
        if init.name in ("W", "b"):
            init.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(init)), init.name))
    onnx.save(model, path)
    bundle = export(tmp_path_factory, "tie-bundle", path, "--patch", "5", "--layer", "feat")
    from scalecert.runtime import Certifier

    with Certifier.load(bundle) as certifier:
        result = certifier.certify(np.full((32, 32, 3), 128, np.uint8))
    assert result.status == "uncertified" and result.base_margin < 0


# --- reads of the image's size: the batch is no path, a count of bright pixels is ---------------------------


def _size_reading_model(content: bool) -> onnx.ModelProto:
    """image (N,3,16,16) -> 4x4 stride-4 Conv `feat` -> pooled logits, plus a (N, 2) term built from a
    size read: the image's batch (Shape, start 0, end 1), or, with `content`, the number of pixels
    above 0.5 (the second dimension of NonZero's output, a size that is a function of the pixels)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["image", "Wc"], ["feat"], kernel_shape=[4, 4], strides=[4, 4], name="embed"),
             helper.make_node("GlobalAveragePool", ["feat"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "W", "b"], ["head"])]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 4, 4)).astype(np.float32), "Wc"),
             numpy_helper.from_array(rng.standard_normal((4, 2)).astype(np.float32), "W"),
             numpy_helper.from_array(np.zeros(2, np.float32), "b"),
             numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array([[0.25, -0.25]], np.float32), "term")]
    if content:
        nodes += [helper.make_node("Greater", ["image", "half"], ["bright"]),
                  helper.make_node("NonZero", ["bright"], ["where"]),
                  helper.make_node("Shape", ["where"], ["count"], start=1, end=2, name="count_bright")]
        inits.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
        rows = "count"
    else:
        nodes.append(helper.make_node("Shape", ["image"], ["rows"], start=0, end=1, name="batch_size"))
        rows = "rows"
    nodes += [helper.make_node("Concat", [rows, "two"], ["term_shape"], axis=0),
              helper.make_node("Expand", ["term", "term_shape"], ["terms"])]
    if content:  # (count, 2) -> summed to (1, 2): the logits move with the number of bright pixels
        nodes += [helper.make_node("ReduceSum", ["terms", "axis0"], ["extra"], keepdims=1)]
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "axis0"))
    else:
        nodes.append(helper.make_node("Identity", ["terms"], ["extra"]))
    nodes.append(helper.make_node("Add", ["head", "extra"], ["logits"]))
    graph = helper.make_graph(nodes, "size-read", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return onnx.shape_inference.infer_shapes(model, data_prop=True)


@pytest.mark.parametrize("content", [False, True], ids=["batch-read", "pixel-count-read"])
def test_a_size_read_is_a_path_only_when_pixels_set_it(content):
    """The batch size the class token of a ViT expands to carries no pixel, so the embedding stays a
    cut; a NonZero count of bright pixels does carry them (a patch changes it), so the same layer is
    not a cut and the geometric plan falls back to the image."""
    import onnx_ir as ir

    from scalecert.export.layers import list_layers

    model = ir.from_proto(_size_reading_model(content))
    feat = [layer for layer in list_layers(model) if layer.name == "feat"][0]
    assert feat.usable is not content


def test_the_suffix_reads_the_batch_of_its_own_rows(tmp_path):
    """Cut at the embedding of the batch-reading model: the suffix file reads only `features` and
    `windows`, and its base logits are the whole model's, row for row, at a batch of 3."""
    import onnxruntime as ort

    source = tmp_path / "batch_read.onnx"
    onnx.save(_size_reading_model(False), source)
    bundle = str(tmp_path / "bundle")
    run_cli("scalecert-export", source, "--patch", "4x4", "--layer", "feat", "--stride", "1", "-o", bundle, "--quiet", check=True)
    suffix = onnx.load(os.path.join(bundle, "suffix.onnx"))
    assert [i.name for i in suffix.graph.input if i.name not in {t.name for t in suffix.graph.initializer}] == ["features", "windows"]
    images = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    whole = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]
    prefix = ort.InferenceSession(os.path.join(bundle, "prefix.onnx"), providers=["CPUExecutionProvider"])
    features = prefix.run(["features"], {prefix.get_inputs()[0].name: images})[0]
    rest = ort.InferenceSession(os.path.join(bundle, "suffix.onnx"), providers=["CPUExecutionProvider"])
    logits = rest.run(None, {"features": features, "windows": np.zeros((3, 4), np.int64)})[0]
    np.testing.assert_allclose(logits, whole, rtol=1e-5, atol=1e-5)
