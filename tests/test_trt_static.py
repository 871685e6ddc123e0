"""TensorRT readiness checked without TensorRT or a GPU: every node of every bundle's suffix graph
(the only part TensorRT runs) is within the ONNX parser's documented support, the graph pass made
for TensorRT keeps ONNX Runtime's outputs identical, engine records are refused on the wrong machine, and the GPU-only paths are
reached and say what they need."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import bits, skimage_photos
from scalecert.bundle import Bundle
from scalecert.bundle import manifest as manifest_io
from scalecert.compile import precision
from scalecert.compile.parser_support import check_onnx, table
from scalecert.compile.tensorrt import build_engines
from scalecert.compile.trt_passes import WindowsToInt32, prepare_onnx
from scalecert.core import geometry
from scalecert.errors import ScaleCertError
from scalecert.runtime import Certifier
from scalecert.runtime.pipelines import device
from scalecert.runtime.pipelines import tensorrt as gpu
from scalecert.runtime.pipelines.onnxruntime import OrtCpuPipeline, OrtCudaPipeline


def _variants(bundle: str, tmp) -> dict:
    """fp32 files of the bundle, plus fp16/int8 variants (scalecert.compile.precision)."""
    import onnxruntime as ort

    files = {"fp32": {k: os.path.join(bundle, f"{k}.onnx") for k in ("prefix", "suffix")}}
    image = np.random.default_rng(0).standard_normal((4, *manifest_io.read(bundle)["input"]["input_size"])).astype(np.float32)
    features = ort.InferenceSession(files["fp32"]["prefix"]).run(["features"], {"image": image})[0]
    feeds = {"prefix": [{"image": image}], "suffix": [{"features": features[:1], "windows": np.array([[0, 0, 0, 0], [0, 0, 3, 3]])}]}
    files["fp16"], files["int8"] = {}, {}
    for kind, src in files["fp32"].items():
        files["fp16"][kind] = str(tmp / f"{kind}.fp16.onnx")
        precision.to_fp16(src, files["fp16"][kind], kind)
        files["int8"][kind] = str(tmp / f"{kind}.int8.onnx")
        precision.to_int8(src, files["int8"][kind], kind, feeds[kind])
    return files


@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle", "effnet_bundle"])
def test_every_bundle_graph_is_within_trt_parser_support(bundle_fixture, request, tmp_path):
    bundle = request.getfixturevalue(bundle_fixture)
    for name, files in _variants(bundle, tmp_path).items():  # the suffix: the only part TensorRT runs
        ready = str(tmp_path / f"suffix.{name}.trt.onnx")
        prepare_onnx(files["suffix"], ready)
        assert check_onnx(ready) == [], name


def _model(nodes, inputs, outputs, initializers=(), opset=18, name="control"):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def test_negative_controls_fail_the_check():
    f32 = [_vi("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    clean = _model([helper.make_node("Relu", ["x"], ["y"])], f32, [_vi("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    assert check_onnx(clean) == []

    def problems(nodes, inputs, outputs, initializers=(), opset=18):
        found = check_onnx(_model(nodes, inputs, outputs, initializers, opset))
        assert found, nodes
        return " | ".join(found)

    y = [_vi("y", TensorProto.FLOAT, None)]
    assert "Unique node u: operator not supported" in problems([helper.make_node("Unique", ["x"], ["y"], name="u")], f32, y)
    assert "input 0 is DOUBLE" in problems([helper.make_node("Add", ["d", "d"], ["y"])],
                                           [_vi("d", TensorProto.DOUBLE, [4])], [_vi("y", TensorProto.DOUBLE, [4])])
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    assert "mode='cubic'" in problems([helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic")], f32, y, [scales])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [0])
    assert "input 0 is UINT8" in problems([helper.make_node("Cast", ["x"], ["u"], to=TensorProto.UINT8),
                                           helper.make_node("Squeeze", ["u", "axes"], ["y"])],
                                          f32, [_vi("y", TensorProto.UINT8, None)], [axes])
    assert "DynamicQuantizeLinear" in problems([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])], f32,
                                               [_vi("q", TensorProto.UINT8, None)])
    scale, zero = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.INT8, [], [3])
    assert "must be zero" in problems([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])], f32,
                                      [_vi("y", TensorProto.INT8, None)], [scale, zero])
    assert "build-time constant" in problems([helper.make_node("ReduceSum", ["x", "ax"], ["y"])],
                                             [*f32, _vi("ax", TensorProto.INT64, [1])], y)
    assert "output 1 (i) is unsupported" in problems([helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2])],
                                                     f32, [*y, _vi("i", TensorProto.INT64, None)])
    assert "not standard ONNX" in problems([helper.make_node("Foo", ["x"], ["y"], domain="com.example")], f32, y)
    assert "opset 7" in problems([helper.make_node("Relu", ["x"], ["y"])], f32, y, opset=7)


def test_check_onnx_bad_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ScaleCertError, match="not a readable ONNX model"):
        check_onnx(str(bad))


def test_support_table_names_its_source():
    doc = table()
    assert doc["source"]["url"].startswith("https://github.com/onnx/onnx-tensorrt") and doc["source"]["tensorrt"].startswith("10.")
    ops = doc["operators"]
    assert len(ops) > 150 and all(("types" in v) == v["supported"] for v in ops.values())
    assert not ops["DynamicQuantizeLinear"]["supported"] and "INT64" not in ops["And"]["types"]


def test_int32_windows_pass_gives_identical_logits(tiny_bundle, tmp_path):
    import onnxruntime as ort

    manifest = manifest_io.read(tiny_bundle)
    ready = str(tmp_path / "suffix.fp32.trt.onnx")
    assert prepare_onnx(os.path.join(tiny_bundle, "suffix.onnx"), ready) == {"windows_int32": True}
    model = onnx.load(ready)
    assert {i.name: i.type.tensor_type.elem_type for i in model.graph.input}["windows"] == TensorProto.INT32
    assert not [n for n in model.graph.node if n.op_type == "Cast"]  # the whole mask path is int32, no cast back

    image = np.random.default_rng(1).standard_normal((1, *manifest["input"]["input_size"])).astype(np.float32)
    features = ort.InferenceSession(os.path.join(tiny_bundle, "prefix.onnx")).run(["features"], {"image": image})[0]
    w = manifest["windows"]
    windows = geometry.window_family(tuple(w["footprint"]), w["stride"], tuple(manifest["layer"]["shape"][1:]))
    windows = np.concatenate([np.zeros((1, 4), np.int64), windows, [[-3, -3, 50, 50], [5, 5, 2, 2]]])
    original = ort.InferenceSession(os.path.join(tiny_bundle, "suffix.onnx")).run(
        None, {"features": features, "windows": windows.astype(np.int64)})[0]
    int32 = ort.InferenceSession(ready).run(None, {"features": features, "windows": windows.astype(np.int32)})[0]
    assert np.array_equal(original, int32)
    pairs = np.concatenate([windows, windows[::-1]], axis=1)  # (B, 8): a pair of rectangles per row
    original = ort.InferenceSession(os.path.join(tiny_bundle, "suffix.onnx")).run(
        None, {"features": features, "windows": pairs.astype(np.int64)})[0]
    int32 = ort.InferenceSession(ready).run(None, {"features": features, "windows": pairs.astype(np.int32)})[0]
    assert np.array_equal(original, int32)


def test_int32_windows_pass_casts_back_where_it_must():
    import onnx_ir as ir
    import onnxruntime as ort

    offset = helper.make_tensor("offset", TensorProto.INT64, [1, 4], [1, 2, 3, 4])
    limit = helper.make_tensor("limit", TensorProto.INT64, [1, 4], [5, 5, 5, 5])
    model = _model([helper.make_node("Add", ["windows", "offset"], ["moved"]),
                    helper.make_node("Less", ["windows", "limit"], ["small"])],
                   [_vi("windows", TensorProto.INT64, ["n", 4])],
                   [_vi("moved", TensorProto.INT64, ["n", 4]), _vi("small", TensorProto.BOOL, ["n", 4])], [offset, limit])
    ir_model = ir.from_proto(model)
    windows_pass = WindowsToInt32()
    assert windows_pass(ir_model).modified and windows_pass.changed
    from onnx_ir.passes.common import TopologicalSortPass

    TopologicalSortPass()(ir_model)
    out = ir.to_proto(ir_model)
    assert [n.op_type for n in out.graph.node].count("Cast") == 1  # Add keeps int64 through a cast; Less compares int32
    windows = np.array([[0, 1, 7, 9], [4, 4, 5, 5]])
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"windows": windows})
    got = ort.InferenceSession(out.SerializeToString()).run(None, {"windows": windows.astype(np.int32)})
    assert all(np.array_equal(a, b) for a, b in zip(want, got))


RECORD = {"precision": "int8", "tensorrt": "10.3.0.30", "gpu": "Orin", "compute_capability": [8, 7]}


def test_engine_compatibility():
    assert gpu.engine_compatibility(RECORD, "10.3.0.30", "Orin", (8, 7)) is None
    for trt, name, cc, word in [("10.3.0.26", "Orin", (8, 7), "TensorRT 10.3.0.26"),
                                ("10.3.0.30", "NVIDIA H100 80GB HBM3", (9, 0), "NVIDIA H100 80GB HBM3 (sm_90)"),
                                ("10.3.0.30", "Orin", (8, 6), "(sm_86)")]:
        reason = gpu.engine_compatibility(RECORD, trt, name, cc)
        assert reason and "\n" not in reason and word in reason
        assert "built for Orin (sm_87)/TensorRT 10.3.0.30" in reason
        assert reason.endswith("rebuild with `scalecert build BUNDLE --backend trt --precision int8`")
    assert "?" in gpu.engine_compatibility({}, "10.3.0.30", "Orin", (8, 7))


def test_batches_and_device_features():
    assert device.batches(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert device.batches(3, None) == [(0, 3)] and device.batches(0, 4) == []
    assert device.aligned(1) == 256 and device.aligned(512) == 512
    feats = device.DeviceFeatures(None, [256, 1024], (16, 8, 8), np.float32)
    assert feats.shape == (2, 16, 8, 8) and feats.image(1).ptr == 1024 and feats.image(1).shape == (1, 16, 8, 8)
    with pytest.raises(ScaleCertError, match="select one"):
        feats.ptr
    with pytest.raises(ScaleCertError, match=r"\(B, 4\)"):
        device.host_windows(np.zeros((3, 2)), np.int32)


def test_io_binding_pipeline_on_the_cpu_device(tiny_bundle):
    """OrtCudaPipeline's binding code (features kept as OrtValues, bound to the suffix by pointer)
    run on the CPU device: same gates, logits and certificates as the plain CPU pipeline."""
    from PIL import Image

    photos = np.stack([np.asarray(Image.fromarray(p).resize((32, 32))) for p in skimage_photos().values()])
    with Certifier.load(tiny_bundle, backend="ort", batch=16, evaluation=True) as reference:
        want = reference.certify_batch(photos)
    with Certifier.load(tiny_bundle, backend="ort", batch=16, evaluation=True) as cert:
        cert._pipeline.deactivate()
        cert._pipeline = OrtCudaPipeline(os.path.join(tiny_bundle, "prefix.onnx"), os.path.join(tiny_bundle, "suffix.onnx"),
                                         device="cpu")
        assert isinstance(cert.pipeline, OrtCudaPipeline) and cert.pipeline.is_active  # activated on first use
        got = cert.certify_batch(photos, prefix_batch=3)
    for a, b in zip(want, got):
        assert (a.status, a.label, a.windows_evaluated) == (b.status, b.label, b.windows_evaluated)
        assert np.array_equal(a.window_labels, b.window_labels) and np.array_equal(a.gate, b.gate)
        assert abs(a.base_margin - b.base_margin) < 1e-4


class _HostCuda:
    """Stand-in for polygraphy.cuda over host memory: pointers are real addresses, copies memmove."""

    class MemcpyKind:
        HostToDevice, DeviceToHost = 1, 2

    class Stream:
        ptr = 0

        def synchronize(self):
            pass

        def free(self):
            pass

    class DeviceArray:
        @staticmethod
        def raw(shape):
            array = _HostCuda.DeviceArray()
            array.resize(shape)
            return array

        def resize(self, shape):
            self.memory = np.zeros(int(shape[0]) + device.ALIGN, np.uint8)
            self.ptr = device.aligned(self.memory.ctypes.data)
            self.allocated_nbytes = int(shape[0])

        def free(self):
            self.memory = None

    @staticmethod
    def wrapper():
        import ctypes

        return type("W", (), {"memcpy": staticmethod(lambda dst, src, n, kind, stream: ctypes.memmove(dst, src, n))})


class _OrtAsEngine:
    """Stand-in for a TensorRT engine: runs the TensorRT-ready ONNX in ONNX Runtime on tensors read
    from and written to raw addresses, checking alignment and the profile's batch limit."""

    def __init__(self, path, max_batch):
        import onnxruntime as ort

        self.plan_path, self.max_batch = path, max_batch
        self.session = ort.InferenceSession(path)
        kinds = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8}
        self.meta = {v.name: (kinds[v.type], v.shape) for v in [*self.session.get_inputs(), *self.session.get_outputs()]}
        self.dtypes = {k: np.dtype(v[0]) for k, v in self.meta.items()}
        self.runs = []

    def activate(self):
        pass

    def deactivate(self):
        pass

    def item_shape(self, name):
        return tuple(self.meta[name][1][1:])

    def run(self, inputs, outputs, stream):
        import ctypes

        assert all(ptr % device.ALIGN == 0 for ptr in [*(p for p, _ in inputs.values()), *outputs.values()])
        feeds = {}
        for name, (ptr, shape) in inputs.items():
            n = int(np.prod(shape)) * self.dtypes[name].itemsize
            feeds[name] = np.frombuffer((ctypes.c_char * n).from_address(ptr), self.dtypes[name]).reshape(shape).copy()
        assert max(len(f) for f in feeds.values()) <= self.max_batch
        self.runs.append({k: v.shape for k, v in feeds.items()})
        for name, value in zip([o.name for o in self.session.get_outputs()], self.session.run(None, feeds)):
            ctypes.memmove(outputs[name], np.ascontiguousarray(value).ctypes.data, value.nbytes)


def test_trt_pipeline_bookkeeping_with_host_stand_ins(tiny_bundle, tmp_path, monkeypatch):
    """TrtPipeline's buffers, aligned feature upload and profile-sized window pieces, with host
    memory standing in for CUDA and ONNX Runtime for the suffix engine: the prefix is the bundle's
    own ONNX on an ONNX Runtime CPU session (docs/design.md §9), its features and gates bitwise the
    CPU pipeline's, and the logits equal the CPU pipeline's."""
    import sys
    import types

    fake = types.ModuleType("polygraphy")
    fake.cuda = _HostCuda
    monkeypatch.setitem(sys.modules, "polygraphy", fake)
    monkeypatch.setitem(sys.modules, "polygraphy.cuda", _HostCuda)
    monkeypatch.setattr(gpu, "require_tensorrt", lambda: None)
    ready = str(tmp_path / "suffix.fp32.trt.onnx")
    prepare_onnx(os.path.join(tiny_bundle, "suffix.onnx"), ready)
    pipeline = gpu.TrtPipeline(os.path.join(tiny_bundle, "prefix.onnx"), ready, max_windows=7)
    pipeline.suffix_engine = _OrtAsEngine(ready, 7)
    manifest = manifest_io.read(tiny_bundle)
    w = manifest["windows"]
    windows = geometry.window_family(tuple(w["footprint"]), w["stride"], tuple(manifest["layer"]["shape"][1:]))[:30]
    image = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with pipeline, OrtCpuPipeline(os.path.join(tiny_bundle, "prefix.onnx"), os.path.join(tiny_bundle, "suffix.onnx")) as cpu:
        assert pipeline.prefix_runner.session.get_providers() == ["CPUExecutionProvider"]
        features, gate = pipeline.prefix(image)
        want_features, want_gate = cpu.prefix(image)
        assert np.array_equal(bits(gate), bits(want_gate)) and np.array_equal(bits(features), bits(want_features))
        for i in range(3):
            got = pipeline.suffix(pipeline.select(features, i), windows)
            assert np.array_equal(got, cpu.suffix(cpu.select(want_features, i), windows))
    chunks = [min(7, len(windows) - lo) for lo in range(0, len(windows), 7)]  # batches of the engine's max rows
    assert len(chunks) > 2 and [r["windows"][0] for r in pipeline.suffix_engine.runs[:len(chunks)]] == chunks
    # pairs of windows (recovery): refused by an engine profiled for one rectangle per row, equal to
    # the CPU pipeline with one profiled for two
    pairs = np.stack([windows, windows[::-1]], axis=1)
    with pipeline, OrtCpuPipeline(os.path.join(tiny_bundle, "prefix.onnx"), os.path.join(tiny_bundle, "suffix.onnx")) as cpu:
        features, _ = pipeline.prefix(image[:1])
        want_features, _ = cpu.prefix(image[:1])
        with pytest.raises(ScaleCertError, match="at most 1 rectangle"):
            pipeline.suffix(pipeline.select(features, 0), pairs)
        pipeline.max_rectangles = 2
        got = pipeline.suffix(pipeline.select(features, 0), pairs)
        assert np.array_equal(got, cpu.suffix(cpu.select(want_features, 0), pairs))
    assert pipeline.suffix_engine.runs[-1]["windows"] == (chunks[-1], 8)


def test_build_engines_needs_tensorrt_and_a_gpu(tiny_bundle, tmp_path):
    work = str(tmp_path / "work")
    shutil.copytree(tiny_bundle, work)
    with pytest.raises(ScaleCertError, match="unknown precision"):
        build_engines(tiny_bundle, work, "fp8", "suffix.onnx", 64, 256)
    with pytest.raises(ScaleCertError, match="missing"):
        build_engines(tiny_bundle, work, "int8", "suffix.int8.onnx", 64, 256)
    os.remove(os.path.join(work, "prefix.onnx"))  # the engine is the suffix's alone: no prefix is read or checked
    try:
        entry = build_engines(tiny_bundle, work, "fp32", "suffix.onnx", 64, 256)
    except ScaleCertError as exc:
        message = str(exc)
        assert "\n" not in message
        assert ("needs TensorRT" in message) or ("CUDA" in message), message
        # the suffix's ONNX pass and support check ran before the GPU was needed; nothing for the prefix
        assert os.path.isfile(os.path.join(work, "suffix.fp32.trt.onnx"))
        assert not os.path.exists(os.path.join(work, "prefix.fp32.trt.onnx"))
        import importlib.util

        # with TensorRT installed only a missing GPU excuses the refusal
        assert importlib.util.find_spec("tensorrt") is None or "CUDA" in message or "GPU" in message, message
        return  # what a machine without TensorRT or a GPU can check: the one-line refusal, after the suffix's pass
    assert os.path.isfile(os.path.join(work, entry["suffix"])) and "prefix" not in entry
    assert entry["profiles"]["suffix"]["windows"]["max"] == [64, 8] and entry["precision"] == "fp32"  # pairs fit


def test_trt_pipeline_refuses_missing_or_foreign_engines(tiny_bundle, monkeypatch):
    bundle = Bundle.open(tiny_bundle)
    with pytest.raises(ScaleCertError, match="no TensorRT engines for fp16"):
        gpu.TrtPipeline.from_bundle(bundle, "fp16")
    manifest = json.loads(json.dumps(bundle.manifest))
    manifest["engines"] = {"trt-fp32": {**RECORD, "precision": "fp32", "prefix": "engines/trt-fp32/prefix.plan",
                                        "suffix": "engines/trt-fp32/suffix.plan"}}
    monkeypatch.setattr(gpu, "require_tensorrt", lambda: type("trt", (), {"__version__": "10.7.0.23"}))
    monkeypatch.setattr(gpu, "gpu_identity", lambda device=0: ("NVIDIA H100 80GB HBM3", (9, 0)))
    with pytest.raises(ScaleCertError) as info:
        gpu.TrtPipeline.from_bundle(Bundle(tiny_bundle, manifest), "fp32")
    assert str(info.value).startswith(f"{tiny_bundle}: TensorRT engines built for Orin (sm_87)/TensorRT 10.3.0.30; "
                                      "this machine has NVIDIA H100 80GB HBM3 (sm_90)/TensorRT 10.7.0.23")
    assert str(info.value).endswith(f"`scalecert build {tiny_bundle} --backend trt --precision fp32`")
