"""Class names, and calibration labels checked against the model before anything is chosen by them."""
from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir

from scalecert.errors import ScaleCertError
from scalecert.export.loading import LoadedModel


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


def check_calibration_labels(model: ir.Model, calibration, num_classes: int, where: str) -> None:
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


def model_classes(path: str | None, model: ir.Model, loaded: LoadedModel):
    """(number of classes, class names or None): from --classes, else the arch's default list."""
    num_classes = model.graph.outputs[0].shape[-1] if model.graph.outputs[0].shape else None
    num_classes = num_classes if isinstance(num_classes, int) else None
    classes = _readmodel_classes(path, num_classes)
    if classes is None and loaded.arch is not None:
        from scalecert.export.archs import REGISTRY, class_names

        default = class_names(REGISTRY[loaded.arch].classes)
        classes = default if default is not None and len(default) == num_classes else None
    return num_classes, classes


def _readmodel_classes(path: str | None, count: int | None):
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
