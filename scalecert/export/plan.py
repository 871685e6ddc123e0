"""The split plan: superficial layer, window footprint, occluding stride and window family.

One function for `scalecert-export` and `scalecert tune`, so a model is tuned through exactly the
split it will be exported with.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from scalecert.core import decision, geometry
from scalecert.errors import ScaleCertError
from scalecert.export.layers import Layer, choose_layer, list_layers


@dataclass(frozen=True)
class SplitPlan:
    layer: Layer
    patch_hw: tuple[int, int]
    image_hw: tuple[int, int]
    window_hw: tuple[int, int]  # the largest footprint (docs/design.md §3.2)
    stride: int
    windows: np.ndarray  # the family (§3.4)

    @property
    def feature_hw(self) -> tuple[int, int]:
        return tuple(self.layer.shape[1:])

    def describe(self) -> str:
        rf = self.layer.rf
        return (f"layer {self.layer.name} ({self.layer.scope or 'root'}): features {self.layer.shape}, receptive field "
                f"{rf.size()}, footprint {self.window_hw}, windows {self.window_size[0]}x{self.window_size[1]} "
                f"at stride {self.stride}: {len(self.windows)}")

    @property
    def window_size(self) -> tuple[int, int]:
        return int(self.windows[0, 2] - self.windows[0, 0]), int(self.windows[0, 3] - self.windows[0, 1])


# --stride auto: the most windows per image, by decision mode. Recovery certifies every pair of
# windows, so its cost grows with the square: 36 windows are 666 pairs, PatchCleanser's 6x6 masks.
WINDOW_BUDGET = {"detect": 100, "recover": 36}


def choose_stride(spec: str, window_hw, feature_hw, budget: int) -> int:
    """An explicit positive stride, or `auto`: the smallest whose family has at most `budget` windows."""
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


def budget_stride(model: ir.Model, layer: Layer, window_hw, budget: float, window_budget: int,
                  filled: bool) -> int | None:
    """The smallest stride whose plan costs at most `budget` full-model forwards per image (the prefix,
    then the base and every window through the suffix, the occlusion counted in) with at most
    `window_budget` windows; None when none does (a model too small for the estimate: its occlusion
    outweighs its convolutions). MACs estimated from the graph."""
    from scalecert.export.stats import graph_stats, prefix_macs_by_value

    full = max(1, graph_stats(model)["macs"])
    prefix = prefix_macs_by_value(model).get(layer.name, 0)
    row = max(0, full - prefix) + occlusion_macs(layer, filled and layer.index > 0)
    feature_hw = layer.shape[1:]
    for stride in range(1, max(feature_hw) + 1):
        n = geometry.count_windows(window_hw, stride, feature_hw)
        if n <= window_budget and (prefix + (1 + n) * row) / full <= budget:
            return stride
    return None


def plan_split(model: ir.Model, image_hw, patch_hw, layer_spec: str, stride_spec: str, window_budget: int,
               max_growth: float, budget: float | None = None, filled: bool = False) -> SplitPlan:
    """The geometric split (no calibration images): the layer by `choose_layer`; the stride as given,
    else the smallest within `budget` full forwards per image (and `window_budget` windows), else
    (budget None) the smallest with at most `window_budget` windows."""
    layer = choose_layer(list_layers(model), layer_spec, patch_hw, image_hw, max_growth, model=model)
    feature_hw = layer.shape[1:]
    window_hw = geometry.window_size(patch_hw, image_hw, (layer.rf.y, layer.rf.x), feature_hw)
    stride = None
    if stride_spec == "auto" and budget is not None:
        stride = budget_stride(model, layer, window_hw, budget, window_budget, filled)
    if stride is None:
        stride = choose_stride(stride_spec, window_hw, feature_hw, window_budget)
    return SplitPlan(layer, tuple(patch_hw), tuple(image_hw), tuple(window_hw), stride,
                     geometry.window_family(window_hw, stride, feature_hw))


# --- the measured plan ----------------------------------------------------------------------------
#
# With calibration images, layer, stride and pruning rate are chosen together by what they certify
# (docs/design.md §4): every candidate is exported in memory, run on the calibration images through
# ONNX Runtime, and scored by its certified rate; the best rate within the cost budget wins, ties to
# the cheaper plan.

AUTO_RATES = (0.1, 0.2, 0.3, 0.5)
MAX_LAYER_GROWTH = 4.0  # window share / patch share: beyond this a window hides too much to certify
STRIDES_PER_LAYER = 3  # the smallest stride within the budget, and the next cheaper window counts
# The occlusion is elementwise work over each row's whole (C', H', W') features, not MACs: 2 passes
# (F - F*U), 4 with a fill (export/split.py). One pass over an element costs about 40 convolution
# MACs on ONNX Runtime CPU (EfficientNet-Lite0, 2 threads: 37 image-layer rows took 9.7 ms of
# occlusion against 9.3 ms per full forward; benchmarks/profile_suffix_ops.py), so at the image
# layer 37 rows cost 38.2 forwards, not the pixel baseline's 37.
OCCLUSION_MACS_PER_PASS = 40


def occlusion_macs(layer: Layer, filled: bool) -> int:
    """The occlusion's cost per row, in MAC-equivalents."""
    channels, height, width = layer.shape
    return channels * height * width * (4 if filled else 2) * OCCLUSION_MACS_PER_PASS


@dataclass
class Candidate:
    layer: Layer
    stride: int
    rate: float
    windows: int
    prefix_macs: int
    suffix_macs: int
    certified: float | None = None  # certified accuracy (labelled) or certified rate (label-free)
    clean: float | None = None  # accuracy or agreement of the (gated) base prediction
    windows_run: float | None = None  # mean distinct windows evaluated per image (dedupe)
    cost: float | None = None  # expected MACs per image, in full-model forwards
    chosen: bool = False
    pruned: bool = False  # stopped once it could not win: `certified` is then an upper bound

    def row(self) -> dict:
        return {"layer": self.layer.name, "scope": self.layer.scope, "feature_shape": list(self.layer.shape),
                "stride": self.stride, "prune_rate": self.rate, "windows": self.windows,
                "windows_run_mean": self.windows_run, "cost_forwards": self.cost, "certified": self.certified,
                "clean": self.clean, "chosen": self.chosen, "pruned": self.pruned}


def candidate_layers(layers: list[Layer], patch_hw, image_hw) -> list[Layer]:
    """The image (pixel-space windows) and, per (feature resolution, footprint), the deepest usable
    cut layer (the cheapest suffix for that window geometry) whose window growth is bounded."""
    from scalecert.export.layers import admitted, cuttable

    groups: dict[tuple, Layer] = {}
    for layer in layers:
        if not (admitted(layer, patch_hw, image_hw, MAX_LAYER_GROWTH) if layer.index else cuttable(layer)):
            continue
        window = geometry.window_size(patch_hw, image_hw, (layer.rf.y, layer.rf.x), layer.shape[1:])
        groups[(tuple(layer.shape[1:]), window)] = layer  # topological order: the last is the deepest
    return sorted(groups.values(), key=lambda layer: layer.index)


def candidate_strides(window_hw, feature_hw, prefix_macs: int, suffix_macs: int, full_macs: int,
                      budget: float, max_windows: int | None = None) -> list[int]:
    """The smallest stride whose dense cost fits the budget (and whose family has at most
    `max_windows` windows), then strides with fewer windows. With `max_windows` (recovery) only the
    first: recovery is scored by single windows, which cannot see that a pair of larger windows
    hides far more than one, so layers are compared at the most windows allowed (docs/design.md §4)."""
    out, last = [], None
    wanted = 1 if max_windows is not None else STRIDES_PER_LAYER
    for stride in range(1, max(feature_hw) + 1):
        n = geometry.count_windows(window_hw, stride, feature_hw)
        if (prefix_macs + (1 + n) * suffix_macs) / full_macs > budget or n == last or (max_windows is not None and n > max_windows):
            continue
        out.append(stride)
        last = n
        if len(out) == wanted:
            break
    return out


class PlanSearch:
    """Scores candidate splits on calibration images (normalised (N,C,H,W) and labels or None)."""

    def __init__(self, model: ir.Model, program, images: np.ndarray, labels, image_hw, patch_hw, budget: float,
                 phi: str, work: str, say=lambda _: None, fill: str = "zero"):
        from scalecert.export.stats import graph_stats

        self.model, self.program, self.images, self.labels = model, program, images, labels
        self.image_hw, self.patch_hw, self.budget, self.phi = tuple(image_hw), tuple(patch_hw), budget, phi
        self.work, self.say, self.fill = work, say, fill
        self.full_macs = max(1, graph_stats(model)["macs"])
        self._layers: dict[str, tuple] = {}
        self._filled: dict[str, bool] = {}

    def _graphs(self, layer: Layer):
        """(ungated features on the calibration images, suffix path, prefix MACs, suffix MACs per row
        with the occlusion's elementwise work counted in)."""
        if layer.name not in self._layers:
            import os

            from scalecert.export.calibrate import run_onnx
            from scalecert.export.split import build_prefix, build_suffix
            from scalecert.export.stats import graph_stats, with_shapes
            from scalecert.graph import save_checked

            channels = layer.shape[0]
            prefix = build_prefix(self.model, layer, np.ones(channels, np.float32), -1.0, "abs", remove_dead=False)
            tag = f"plan-{len(self._layers)}"
            prefix_path, suffix_path = (os.path.join(self.work, f"{tag}-{p}.onnx") for p in ("prefix", "suffix"))
            save_checked(prefix, prefix_path)
            x = self.images
            features = run_onnx(prefix_path, [{"image": x[i:i + 32]} for i in range(0, len(x), 32)], "features")
            fill = None
            if self.fill == "blank":
                fill = run_onnx(prefix_path, [{"image": np.zeros_like(x[:1])}], "features")[0]
                fill = fill if fill.any() else None  # all 0: the same as --fill zero
            self._filled[layer.name] = fill is not None
            suffix = build_suffix(self.model, layer, channels, fill=fill)
            save_checked(suffix, suffix_path)
            self._layers[layer.name] = (features, suffix_path, graph_stats(with_shapes(prefix))["macs"],
                                        graph_stats(with_shapes(suffix))["macs"] + occlusion_macs(layer, fill is not None))
        return self._layers[layer.name]

    def evaluate(self, layer: Layer, stride: int, rate: float = 0.0, alpha: np.ndarray | None = None,
                 beat: "Candidate | None" = None) -> Candidate:
        """Score one candidate. With `beat`, stop as soon as the candidate can no longer beat it
        (then `certified` is the upper bound it could still have reached, and `pruned` is set)."""
        from scalecert.core import sin
        from scalecert.runtime.pipelines.onnxruntime import OrtRunner

        features, suffix_path, prefix_macs, suffix_macs = self._graphs(layer)
        feature_hw = layer.shape[1:]
        window_hw = geometry.window_size(self.patch_hw, self.image_hw, (layer.rf.y, layer.rf.x), feature_hw)
        windows = geometry.window_family(window_hw, stride, feature_hw)
        masks = geometry.window_masks(windows, feature_hw)
        dedupe = geometry.Dedupe(windows, masks, self._filled[layer.name])
        if rate > 0:
            score = sin.scores(features, alpha, self.phi)
            gates = sin.gate(score, sin.threshold_for_rate(score, rate))
        else:
            gates = np.ones((len(features), *feature_hw), bool)
        live = (alpha > 0).reshape(1, -1, 1, 1) if alpha is not None else True
        n_images = len(features)
        certified = correct = 0
        run = []
        pruned = False
        with OrtRunner(suffix_path) as suffix:
            for i in range(n_images):
                gated = np.where(gates[i][None, None] & live, features[i:i + 1], np.float32(0))
                distinct = dedupe.windows_for(gates[i])
                run.append(len(distinct.representatives))
                base = int(suffix.infer({"features": gated, "windows": np.zeros((1, 4), np.int64)})["logits"].argmax())
                truth = base if self.labels is None else self.labels[i]
                correct += base == truth
                if base == truth and decision.every_row_agrees(
                        lambda rows: suffix.infer({"features": gated, "windows": rows})["logits"].argmax(1),
                        distinct.representatives, base, max_batch=64):
                    certified += 1
                if beat is not None and not _can_still_win(certified + n_images - i - 1, n_images, beat):
                    pruned = True
                    certified += n_images - i - 1  # the bound
                    break
        n = float(np.mean(run))
        return Candidate(layer, stride, rate, len(windows), prefix_macs, suffix_macs, certified / n_images,
                         correct / max(1, len(run)), n, (prefix_macs + (1 + n) * suffix_macs) / self.full_macs,
                         pruned=pruned)

    def search(self, layers: list[Layer], stride_spec: str, rate_spec: str, alpha_for,
               max_windows: int | None = None) -> tuple[list[Candidate], Candidate]:
        """Every candidate (layer x stride at rate 0, then the best split's rates) and the winner.
        `alpha_for(layer)` gives the static channel importances for a rate above 0; `max_windows`
        caps the family (recovery: its pairs grow with the square)."""
        table = []

        def better(a: Candidate, b: Candidate | None) -> bool:
            return b is None or (a.certified, -a.cost) > (b.certified, -b.cost)

        best = None
        within = (lambda c: True) if stride_spec != "auto" else (lambda c: c.cost <= self.budget)  # a given stride is the user's cost
        for layer in layers:
            _, _, prefix_macs, suffix_macs = self._graphs(layer)
            window_hw = geometry.window_size(self.patch_hw, self.image_hw, (layer.rf.y, layer.rf.x), layer.shape[1:])
            strides = ([choose_stride(stride_spec, window_hw, layer.shape[1:], 0)] if stride_spec != "auto" else
                       candidate_strides(window_hw, layer.shape[1:], prefix_macs, suffix_macs, self.full_macs, self.budget,
                                         max_windows))
            for stride in strides:
                rate = 0.0 if rate_spec == "auto" else float(rate_spec)
                candidate = self.evaluate(layer, stride, rate, alpha_for(layer) if rate > 0 else None, best)
                table.append(candidate)
                self.say(_describe(candidate))
                if not candidate.pruned and within(candidate) and better(candidate, best):
                    best = candidate
        if best is None:
            raise ScaleCertError(f"no split fits --budget {self.budget:g} full forwards per image; raise --budget")
        if rate_spec == "auto":
            alpha = alpha_for(best.layer)
            for rate in AUTO_RATES:
                candidate = self.evaluate(best.layer, best.stride, rate, alpha, best)
                table.append(candidate)
                self.say(_describe(candidate))
                if not candidate.pruned and within(candidate) and better(candidate, best):
                    best = candidate
        best.chosen = True
        return table, best


def _can_still_win(reachable: int, n_images: int, best: Candidate) -> bool:
    """Could a candidate that certifies at most `reachable` images still beat `best`? (Ties go to
    the cheaper plan, and a candidate's cost is known only at the end, so a tie can still win.)"""
    return reachable / n_images >= best.certified


def _describe(c: Candidate) -> str:
    scored = f"certified <= {c.certified:.1%} (stopped: cannot win)" if c.pruned else f"certified {c.certified:.1%}"
    return (f"plan: layer {c.layer.name} {'x'.join(map(str, c.layer.shape))}, stride {c.stride}, rate {c.rate:g}: "
            f"{c.windows} windows ({c.windows_run:.1f} distinct), cost {c.cost:.1f} forwards, {scored}, "
            f"clean {c.clean:.1%}")
