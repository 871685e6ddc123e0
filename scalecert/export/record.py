"""The manifest of a new bundle, from the choices export made (its schema: bundle/manifest.py)."""
from __future__ import annotations

import os

from scalecert.bundle import manifest as manifest_io
from scalecert.export.plan import SplitPlan
from scalecert.export.split import WINDOWS_LAYOUT


def manifest_for(opts, loaded, request, plan: SplitPlan, num_classes, classes, kept_channels, sin_info, margin, stats,
              started, work) -> manifest_io.Manifest:
    """Every choice, statistic, hash and tool version; `locality`, `plan`, `decision` and `probes`
    are filled by the stages after it (export/__init__.py)."""
    layer, rf = plan.layer, plan.layer.rf
    return manifest_io.Manifest(
        created=started.isoformat(timespec="seconds"),
        source={"file": os.path.basename(loaded.source), "path": os.path.abspath(loaded.source),
                "sha256": manifest_io.sha256(loaded.source), "pretrained": opts.pretrained,
                "kind": loaded.kind, "arch": loaded.arch,
                **({"batch": loaded.batch_note} if loaded.batch_note else {})},
        input=request.input_spec,
        num_classes=num_classes,
        classes=classes,
        threat_model={"patch": list(plan.patch_hw), "patch_spec": str(opts.patch), "image": list(plan.image_hw),
                      **({"for_source": request.source} if request.source else {})},
        layer={"name": layer.name, "scope": layer.scope, "requested": opts.layer, "shape": list(layer.shape),
               "channels_kept": kept_channels,
               "receptive_field": {"y": list(rf.y), "x": list(rf.x), "size": list(rf.size())},
               "max_growth": opts.max_growth},
        windows={"footprint": list(plan.window_hw), "stride": plan.stride, "size": list(plan.window_size),
                 "count": len(plan.windows), "budget": opts.window_budget if opts.stride == "auto" else None,
                 "fill": opts.fill},
        sin=sin_info,
        margin={manifest_io.margin_key("ort-cpu", "fp32"): margin["delta"]},
        margin_measurement={manifest_io.margin_key("ort-cpu", "fp32"): margin},
        tensors={"prefix": {"inputs": ["image"], "outputs": ["features", "gate"]},
                 "suffix": {"inputs": ["features", "windows"], "outputs": ["logits"], "windows": WINDOWS_LAYOUT,
                            **({"max_batch": loaded.max_batch} if loaded.max_batch else {})}},
        stats=stats,
        tools=manifest_io.tool_versions(),
        files=manifest_io.describe_files(work, ["prefix.onnx", "suffix.onnx"]),
        locality={},
    )
