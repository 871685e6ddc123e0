"""Issue 26, "your own model": look-alikes of torchvision's families (tests/zoo.py) in the four files
a user brings (TorchScript .pt, torch.export .pt2, ONNX with a fixed batch of 1 as plain
`torch.onnx.export` writes it, ONNX with a dynamic batch): each of the 24 exports, or is refused
in one line, exactly as EXPECTED says; every bundle's base label is torch's top-1 on real photos.

EXPECTED, case by case:
  dynamic    exported; the batch was symbolic already (torch inputs are exported with a dynamic
             batch; a fixed torch.export program whose graph allows it is traced again)
  symbolic   exported; the fixed batch of 1 was made symbolic (export/batch.py), proven and checked
             bit for bit at batches 1 and 3: the ONNX files, and the torch.export programs whose
             graph bakes the batch in (`view(1, ...)`), exported at their batch of 1 first
  kept       exported; the fixed batch of 1 was kept and the suffix runs one window per call:
             ConvNeXt from the dynamo exporter, whose `as_strided` becomes a Gather of the 16
             positions of one image (at batch N it would read the first image only: the batch
             analysis refuses it, rightly)
None of the 24 is refused: the TorchScript ViT, traced under torch.no_grad() so that it records
nn.MultiheadAttention's fused fast-path op, exports through a decomposition of that op; a model
that records nn.TransformerEncoderLayer's fused op is refused in one line
(test_fused_encoder_layer_is_refused_in_one_line), and so is a program fixed at a batch of 2.
"""
from __future__ import annotations

import json
import os
import time
import warnings

import numpy as np
import pytest

import zoo
from conftest import export, in_process, skimage_photos
from scalecert.errors import ScaleCertError

PATCH = "2%"  # 10x10 on the 64x64 input
EXPECTED = {
    ("resnet", "pt"): "dynamic", ("resnet", "pt2"): "symbolic",
    ("resnet", "onnx-fixed"): "symbolic", ("resnet", "onnx-dynamic"): "dynamic",
    ("mobilenet_v3", "pt"): "dynamic", ("mobilenet_v3", "pt2"): "dynamic",
    ("mobilenet_v3", "onnx-fixed"): "symbolic", ("mobilenet_v3", "onnx-dynamic"): "dynamic",
    ("efficientnet", "pt"): "dynamic", ("efficientnet", "pt2"): "dynamic",
    ("efficientnet", "onnx-fixed"): "symbolic", ("efficientnet", "onnx-dynamic"): "dynamic",
    ("regnet_y", "pt"): "dynamic", ("regnet_y", "pt2"): "dynamic",
    ("regnet_y", "onnx-fixed"): "symbolic", ("regnet_y", "onnx-dynamic"): "dynamic",
    ("convnext", "pt"): "dynamic", ("convnext", "pt2"): "dynamic",
    ("convnext", "onnx-fixed"): "kept", ("convnext", "onnx-dynamic"): "dynamic",
    ("vit", "pt"): "dynamic", ("vit", "pt2"): "symbolic",
    ("vit", "onnx-fixed"): "symbolic", ("vit", "onnx-dynamic"): "dynamic",
}
CASES = list(EXPECTED)
assert set(CASES) == {(f, m) for f in zoo.FAMILIES for m in zoo.FORMATS}


def _args(path: str, fmt: str) -> list[str]:
    # a TorchScript archive does not record its input size
    return [path, "--patch", PATCH, *(["--input-size", "x".join(map(str, zoo.INPUT))] if fmt == "pt" else [])]


@pytest.fixture(scope="session")
def zoo_files(tmp_path_factory) -> dict:
    """{(family, format): path}, and the look-alikes themselves under (family, None)."""
    root = tmp_path_factory.mktemp("zoo")
    files = {}
    for family in zoo.FAMILIES:
        model = zoo.build(family)
        files[(family, None)] = model
        for fmt, path in zoo.save_formats(model, str(root / family)).items():
            files[(family, fmt)] = path
    return files


@pytest.fixture(scope="session")
def zoo_exports(zoo_files, tmp_path_factory) -> dict:
    """{case: {"outcome", "bundle" or "error", "seconds"}}: every case through conftest's export."""
    results = {}
    for family, fmt in CASES:
        start = time.perf_counter()
        try:
            bundle = export(tmp_path_factory, f"zoo-{family}-{fmt}", *_args(zoo_files[(family, fmt)], fmt))
        except ScaleCertError as exc:
            results[(family, fmt)] = {"outcome": "refused", "error": str(exc), "seconds": time.perf_counter() - start}
            continue
        with open(os.path.join(bundle, "manifest.json")) as f:
            manifest = json.load(f)
        note = manifest["source"].get("batch") or ""
        outcome = ("kept" if note.startswith("fixed batch 1 kept") else "symbolic" if note.startswith("fixed batch 1 made")
                   else "dynamic")
        results[(family, fmt)] = {"outcome": outcome, "bundle": bundle, "manifest": manifest, "note": note,
                                  "seconds": time.perf_counter() - start}
    return results


@pytest.fixture(scope="session")
def photos() -> dict:
    """scikit-image's photos as the runtime prepares them for the look-alikes' input (uint8 64x64x3)."""
    from PIL import Image

    from scalecert.export.loading import _default_preprocess
    from scalecert.runtime.images import resize_to_input

    spec = _default_preprocess(zoo.INPUT).to_json()
    return {name: resize_to_input(Image.fromarray(array).convert("RGB"), spec) for name, array in skimage_photos().items()}


@pytest.mark.parametrize("case", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_outcome(zoo_exports, case):
    got = zoo_exports[case]
    assert got["outcome"] == EXPECTED[case], got.get("error") or got.get("note")
    m = got["manifest"]
    assert m["layer"]["name"] and m["windows"]["count"] >= 1
    if got["outcome"] == "symbolic":
        assert got["note"] == "fixed batch 1 made symbolic (checked batch 1 and 3 bit for bit)"
    if got["outcome"] == "kept":
        assert got["note"].startswith("fixed batch 1 kept: the suffix runs one window per call (") and "\n" not in got["note"]
        assert m["tensors"]["suffix"]["max_batch"] == 1
        assert all(r["spread"] == 0 for r in m["margin_measurement"].values())  # batch-1 calls only
    else:
        assert "max_batch" not in m["tensors"]["suffix"]


@pytest.mark.parametrize("case", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_base_label_is_torch_top1(zoo_exports, zoo_files, photos, case):
    """The bundle's base label (un-occluded features through prefix and suffix) on each photo is the
    look-alike's top-1 in PyTorch on the same normalised image; the top-2 gap in torch is far above
    rounding, so the comparison means something."""
    import torch

    from scalecert.runtime.certifier import Certifier
    from scalecert.runtime.images import normalize

    got = zoo_exports[case]
    spec = got["manifest"]["input"]
    images = np.stack(list(photos.values()))
    with torch.no_grad():
        logits = zoo_files[(case[0], None)](torch.from_numpy(normalize(images, spec))).numpy()
    top2 = np.sort(logits, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-2
    with Certifier.load(got["bundle"], "ort-cpu") as certifier:
        labels = [certifier.certify(image).label for image in images]
    assert labels == logits.argmax(1).tolist()


PATCH_EMBEDDINGS = {"vit": 8, "convnext": 4}  # the stride of the look-alikes' s x s, stride-s stem


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in PATCH_EMBEDDINGS], ids="-".join)
def test_patch_embedding_is_the_cut(zoo_exports, case):
    """A ViT or ConvNeXt splits at its patch embedding in every format, although the model reads the
    image's batch size (the class token's expand, an as_strided's indices): such a read is no path
    from the pixels, and the suffix reads its own rows' count instead."""
    layer = zoo_exports[case]["manifest"]["layer"]
    stride = PATCH_EMBEDDINGS[case[0]]
    side = zoo.INPUT[1] // stride
    assert layer["shape"][1:] == [side, side], layer["name"]
    assert layer["receptive_field"]["size"] == [stride, stride]


def test_zoo_table(zoo_exports, capsys):
    rows = [("family", "format", "outcome", "layer", "windows", "seconds")]
    for (family, fmt), got in zoo_exports.items():
        m = got.get("manifest", {})
        rows.append((family, fmt, got["outcome"] if "error" not in got else f"refused: {got['error'][:60]}",
                     m.get("layer", {}).get("name", "-"), str(m.get("windows", {}).get("count", "-")),
                     f"{got['seconds']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    with capsys.disabled():
        print()
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    assert len(rows) == 25


def test_export_says_what_it_did_with_the_batch(zoo_files, tmp_path, capsys):
    """The CLI prints one line about the batch (conftest's export runs --quiet)."""
    for fmt, family, line in (("onnx-fixed", "resnet", "fixed batch 1 made symbolic (checked batch 1 and 3 bit for bit)"),
                              ("onnx-fixed", "convnext", "fixed batch 1 kept: the suffix runs one window per call (")):
        capsys.readouterr()
        in_process("export", *_args(zoo_files[(family, fmt)], fmt), "-o", tmp_path / f"{family}-{fmt}")
        assert [l for l in capsys.readouterr().out.splitlines() if l.startswith("fixed batch 1")][0].startswith(line)


def test_kept_batch_runs_one_row_per_call(zoo_exports, tmp_path):
    """The kept case's suffix declares (1, classes) logits; an ONNX Runtime runner splits a window
    batch into rows and gives each the logits it gets alone, bit for bit."""
    import onnx

    from scalecert.runtime.pipelines.onnxruntime import OrtRunner

    got = zoo_exports[("convnext", "onnx-fixed")]
    suffix = os.path.join(got["bundle"], "suffix.onnx")
    dims = onnx.load(suffix).graph.output[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1
    _, h, w = got["manifest"]["layer"]["shape"]
    rng = np.random.default_rng(0)
    features = rng.standard_normal((1, got["manifest"]["layer"]["channels_kept"], h, w)).astype(np.float32)
    windows = np.array([[0, 0, 0, 0], [0, 0, h // 2, w // 2], [1, 2, h, w], [h // 2, 0, h, w // 3], [0, w - 1, h, w]],
                       np.int64)
    with OrtRunner(suffix) as runner:
        together = runner.infer({"features": features, "windows": windows})["logits"]
        alone = np.concatenate([runner.infer({"features": features, "windows": w[None]})["logits"] for w in windows])
    assert together.shape == (5, 10) and together.tobytes() == alone.tobytes()


def test_kept_batch_bundle_builds_int8_and_certifies(zoo_exports, photos, tmp_path):
    """int8 calibration feeds a kept suffix one window per call (compile/build.py::suffix_feeds), the
    variant's margin is measured, and the int8 bundle certifies the photos with fp32's base labels."""
    import shutil

    from scalecert.compile.build import build
    from scalecert.runtime.certifier import Certifier

    bundle = str(tmp_path / "kept")
    shutil.copytree(zoo_exports[("convnext", "onnx-fixed")]["bundle"], bundle)
    calib = tmp_path / "calib"
    calib.mkdir()
    from PIL import Image
    for i, (name, image) in enumerate(photos.items()):
        for flip in range(4):  # 16 calibration images: 4 held back to judge the variant
            Image.fromarray(np.ascontiguousarray(np.rot90(image, flip))).save(calib / f"{name}-{flip}.png")
    manifest = build(bundle, "int8", calib=str(calib), accept_loss=True, say=lambda line: None)
    assert manifest["tensors"]["suffix"]["max_batch"] == 1 and "ort-cpu-int8" in manifest["margin"]
    images = np.stack(list(photos.values()))
    labels = {}
    for precision in ("fp32", "int8"):
        with Certifier.load(bundle, "ort-cpu", precision=precision) as certifier:
            labels[precision] = [certifier.certify(image).label for image in images]
    assert labels["int8"] == labels["fp32"]


# --- the batch pass on the other exporter, and what it refuses -------------------------------------------------


@pytest.fixture(scope="session")
def legacy_files(zoo_files, tmp_path_factory) -> dict:
    """The look-alikes as torch < 2.9's plain torch.onnx.export wrote them (dynamo=False, opset 17)."""
    root = tmp_path_factory.mktemp("zoo-legacy")
    return {f: zoo.save_formats(zoo_files[(f, None)], str(root / f), ["onnx-legacy"])["onnx-legacy"] for f in zoo.FAMILIES}


def test_shape_inference_without_the_weights_infers_the_same(legacy_files):
    """scalecert.graph.infer_shapes (the weights not serialised) gives what onnx's shape inference
    with data propagation gives on the whole file (the legacy ViT: shapes computed by Shape ->
    Gather -> Concat at run time), and the same weights."""
    import onnx

    from scalecert.graph import WEIGHT_BYTES, infer_shapes

    original = onnx.load(legacy_files["vit"])
    assert any(len(t.raw_data) > WEIGHT_BYTES for t in original.graph.initializer)
    ours = infer_shapes(original)
    theirs = onnx.shape_inference.infer_shapes(original, strict_mode=False, data_prop=True)
    assert len(ours.graph.value_info) > 50
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)


@pytest.mark.parametrize("family", list(zoo.FAMILIES))
def test_legacy_exporter_fixed_batch_is_made_symbolic(legacy_files, family):
    """Every family's legacy-exporter file (nn.MultiheadAttention unrolled through [L, N, E]
    reshapes where the batch sits between two axes: the analysis backtracks) is made symbolic,
    checked at batches 1 and 3 bit for bit."""
    import onnx

    from scalecert.export import batch

    original = onnx.load(legacy_files[family])
    rewritten = batch.make_symbolic(original)
    assert batch.check(original, rewritten, zoo.INPUT) == 0.0  # bit for bit at batch 3 too
    dims = rewritten.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"


@pytest.mark.parametrize("family", list(PATCH_EMBEDDINGS))
def test_legacy_exporter_files_split_at_the_patch_embedding(legacy_files, photos, tmp_path_factory, family):
    """The legacy exporter reads the batch size as Shape(image) then Gather 0 (opset 17, no start/end):
    that read is rewritten too, the cut is the patch embedding, and the base labels are torch's."""
    import torch

    from scalecert.runtime.certifier import Certifier
    from scalecert.runtime.images import normalize

    bundle = export(tmp_path_factory, f"legacy-{family}", legacy_files[family], "--patch", PATCH)
    with open(os.path.join(bundle, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["layer"]["receptive_field"]["size"] == [PATCH_EMBEDDINGS[family]] * 2
    images = np.stack(list(photos.values()))
    with torch.no_grad():
        expected = zoo.build(family)(torch.from_numpy(normalize(images, manifest["input"]))).argmax(1).tolist()
    with Certifier.load(bundle, "ort-cpu") as certifier:
        assert [r.label for r in certifier.certify_batch(images)] == expected


def test_the_witness_refuses_a_rewrite_that_mixes_images(legacy_files):
    """Negative control: the legacy ViT's query reshape [L, 1, E] -> [L, 4, 8] with the batch merged
    into L ([-1, 4, 8]: 65N rows) instead of the heads ([65, -1, 8]) still runs at batch 3, and mixes
    the images' tokens; the row-independence check refuses it."""
    import onnx
    from onnx import numpy_helper

    from scalecert.export import batch

    original = onnx.load(legacy_files["vit"])
    rewritten = batch.make_symbolic(original)
    node = next(n for n in rewritten.graph.node if n.name == "/layers/layers.0/self_attention/Reshape_3")
    target = next(i for i in rewritten.graph.initializer if i.name == node.input[1])
    assert numpy_helper.to_array(target).tolist() == [65, -1, 8]
    wrong = numpy_helper.from_array(np.array([-1, 4, 8], np.int64), "wrong_target")
    rewritten.graph.initializer.append(wrong)
    node.input[1] = "wrong_target"
    with pytest.raises(batch.Unproven, match="row 0 with other rows"):
        batch.check(original, rewritten, zoo.INPUT)


def test_eager_code_that_fixes_the_batch_is_made_symbolic():
    """An eager module whose code writes the batch (`view(1, -1)`) cannot be exported with a dynamic
    batch; it is exported at batch 1 and goes through the batch pass."""
    import torch

    from scalecert.export.loading import LoadedModel, _default_preprocess
    from scalecert.export.to_onnx import to_onnx

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)).view(1, -1))

    torch.manual_seed(0)
    loaded = LoadedModel("torch", Net().eval(), _default_preprocess((3, 16, 16)), None, "net.pt")
    model, program = to_onnx(loaded)
    assert loaded.batch_note.startswith("fixed batch 1 made symbolic") and loaded.max_batch is None
    assert program is None and list(model.graph.outputs[0].shape)[0] == "batch"


def test_legacy_vit_exports(legacy_files, tmp_path_factory):
    """Opset 17 end to end (the suffix's window Split has no num_outputs before opset 18)."""
    bundle = export(tmp_path_factory, "zoo-legacy-vit", legacy_files["vit"], "--patch", PATCH)
    with open(os.path.join(bundle, "manifest.json")) as f:
        assert json.load(f)["source"]["batch"].startswith("fixed batch 1 made symbolic")


def _onnx_head(path: str, op: str) -> str:
    """conv -> global pool -> a head of `op` on a fixed batch of 1."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    head = {"Einsum": [helper.make_node("Einsum", ["flat", "W"], ["logits"], name="head", equation="nc,ck->nk")],
            "Gather": [helper.make_node("Gather", ["flat", "zero"], ["row"], name="head", axis=0),
                       helper.make_node("Unsqueeze", ["row", "axis0"], ["row2"]),
                       helper.make_node("MatMul", ["row2", "W"], ["logits"])]}[op]
    nodes = [helper.make_node("Conv", ["image", "K"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["conv"], ["pooled"]),
             helper.make_node("Reshape", ["pooled", "shape"], ["flat"]), *head]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "K"),
             numpy_helper.from_array(np.array([1, 4], np.int64), "shape"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array([0], np.int64), "axis0"),
             numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "W")]
    graph = helper.make_graph(nodes, op, [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.mark.parametrize("op, reason", [("Einsum", "Einsum head: not modelled"),
                                        ("Gather", "Gather head: gathers along the batch axis")])
def test_batch_pass_refuses_in_one_line(tmp_path, op, reason):
    """Default deny: an op it does not model, and x[0] on the batch (at batch N: the first image's
    row for every image), are not made symbolic."""
    import onnx

    from scalecert.export import batch

    with pytest.raises(batch.Unproven, match=reason):
        batch.make_symbolic(onnx.load(_onnx_head(str(tmp_path / f"{op}.onnx"), op)))


def test_fused_encoder_layer_is_refused_in_one_line(tmp_path, capfd):
    """nn.TransformerEncoderLayer traced under torch.no_grad() records one fused op with no ONNX form:
    one line that names it and the fix (no graph dump on the terminal); the fix works."""
    import torch

    from scalecert.export.networks import PatchViT

    torch.manual_seed(0)
    net = PatchViT(image=32, patch=8, dim=16, depth=1, heads=2).eval()
    path = str(tmp_path / "encoder.pt")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python branches
        torch.jit.trace(net, torch.rand(1, 3, 32, 32)).save(path)
    capfd.readouterr()
    with pytest.raises(ScaleCertError) as refused:
        in_process("export", path, "--input-size", "3x32x32", "--patch", "4", "-o", tmp_path / "out", "--quiet")
    assert "aten::_transformer_encoder_layer_fwd" in str(refused.value) and "set_fastpath_enabled(False)" in str(refused.value)
    assert "\n" not in str(refused.value)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert "_transformer_encoder_layer_fwd" not in str(torch.jit.trace(net, torch.rand(1, 3, 32, 32)).inlined_graph)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_program_with_a_fixed_batch_of_two_is_refused_in_one_line(zoo_files, tmp_path):
    import torch

    path = str(tmp_path / "resnet-b2.pt2")
    torch.export.save(torch.export.export(zoo_files[("resnet", None)], (torch.rand(2, *zoo.INPUT),)), path)
    with pytest.raises(ScaleCertError, match=r"the program was exported with a fixed batch of 2; re-export it with a "
                                             r"dynamic batch: torch\.export\.export\(model, \(x,\), dynamic_shapes="):
        in_process("export", path, "--patch", PATCH, "-o", tmp_path / "out", "--quiet")
