"""Locality of a prefix as it ships, twice (docs/design.md §3.1), before a manifest is written.

1. The proof: the receptive-field pass (export/receptive.py) on the saved prefix file, after every
   rewrite (gate, dead channels, precision), with its shapes inferred again from the graph alone
   (the file's own shape annotations are claims, not facts). `features` and `gate` must be local
   with a receptive field inside the manifest's, which every footprint is computed from.
2. The check: patches across the whole input through ONNX Runtime CPU (runtime/locality.py), features
   and gate compared bit for bit outside each footprint.

`confirm` runs both and returns the record export and build store in manifest["locality"][file]:
the runtime opens only a prefix whose sha256 has such a record (bundle/bundle.py::proven_prefix).
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir

from scalecert.bundle import manifest as manifest_io
from scalecert.errors import ModelError
from scalecert.export.receptive import RF, receptive_fields

OUTPUTS = ("features", "gate")


def _shapes_from_graph(path: str, input_size) -> ir.Model:
    proto = onnx.load(path)
    del proto.graph.value_info[:]
    for value in proto.graph.output:
        value.type.tensor_type.ClearField("shape")
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    del dims[:]
    for i, size in enumerate(["batch", *input_size]):
        dim = dims.add()
        if i == 0:
            dim.dim_param = size
        else:
            dim.dim_value = int(size)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types
        raise ModelError(f"{os.path.basename(path)}: shape inference failed "
                             f"({str(exc).splitlines()[0][:160]}); cannot prove the prefix local") from None
    return ir.from_proto(proto)


def prove(path: str, input_size, layer_rf: RF, feature_hw) -> dict:
    """The receptive-field proof of a saved prefix file, or one line naming the node that breaks it."""
    name = os.path.basename(path)
    model = _shapes_from_graph(path, input_size)
    rfs = receptive_fields(model.graph)
    outputs = {v.name: v for v in model.graph.outputs}
    record = {}
    for output in OUTPUTS:
        value = outputs.get(output)
        if value is None:
            raise ModelError(f"{name}: no {output} output; not a scalecert prefix")
        rf = rfs.get(value)
        if not isinstance(rf, RF):
            why = rf.reason if rf is not None else "it does not depend on the image"
            raise ModelError(f"{name}: {output} is not provably local: {why}")
        if not rf.within(layer_rf):
            raise ModelError(f"{name}: {output} sees pixels {rf.to_json()}, beyond the receptive field "
                                 f"{layer_rf.to_json()} the footprints were computed from")
        if tuple(value.shape[-2:]) != tuple(feature_hw):
            raise ModelError(f"{name}: {output} is {list(value.shape)}, expected positions {list(feature_hw)}")
        record[output] = rf.to_json()
    opset = model.graph.opset_imports.get("", 0)
    return {**record, "opset": opset, "nodes": sum(1 for _ in model.graph)}


def check(prefix_path: str, input_spec: dict, patch_hw, layer_rf: RF, feature_hw, pixels: np.ndarray) -> dict:
    """The sampled check through ONNX Runtime CPU, or one line naming the first position that leaks."""
    from scalecert.runtime.locality import check_locality
    from scalecert.runtime.pipelines.onnxruntime import OrtRunner

    runner = OrtRunner(prefix_path)  # as the runtime runs it (runtime/pipelines/onnxruntime.py)
    with runner:
        def prefix(images):
            out = runner.infer({"image": images})
            return out["features"], out["gate"]

        report = check_locality(prefix, pixels, input_spec, patch_hw, (layer_rf.y, layer_rf.x), feature_hw)
    if not report.passed:
        raise ModelError(f"{os.path.basename(prefix_path)} is not local: {report.leaks[0].line(patch_hw)} "
                             f"({len(report.leaks)} of {report.patched_images} patched images leaked); refusing the bundle")
    return report.to_json(patch_hw)


def confirm(bundle_dir: str, manifest: dict, prefix_file: str, pixels: np.ndarray, say=None) -> dict:
    """Prove and check `prefix_file` of the (staged) bundle; -> its manifest["locality"] record."""
    layer = manifest["layer"]
    rf = RF(tuple(layer["receptive_field"]["y"]), tuple(layer["receptive_field"]["x"]))
    path = os.path.join(bundle_dir, prefix_file)
    feature_hw = tuple(layer["shape"][1:])
    proof = prove(path, manifest["input"]["input_size"], rf, feature_hw)
    checked = check(path, manifest["input"], tuple(manifest["threat_model"]["patch"]), rf, feature_hw, pixels)
    if say is not None:
        say(f"locality of {prefix_file}: proven by the receptive-field pass ({proof['nodes']} nodes), checked at "
            f"{checked['positions']} patch positions ({checked['patched_images']} patched images, "
            f"{checked['seconds']:.1f} s): nothing moved outside a footprint")
    return {"sha256": manifest_io.sha256(path), "proof": proof, "check": checked}
