"""The split chosen: measured on calibration images, else given or geometric (export/plan.py)."""
from __future__ import annotations

import onnx_ir as ir

from scalecert.core import geometry
from scalecert.export.calibrate import CalibrationSet, channel_importance
from scalecert.export.options import ExportOptions, Request
from scalecert.export.plan import SplitPlan, plan_split

PLAN_IMAGES = 128  # calibration images the measured plan scores candidates on (--calib-limit caps them too)


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
